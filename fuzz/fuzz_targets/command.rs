//! Fuzz target: the command parser (`smtp::command::parse`). No panic, and
//! a command that parses keeps the invariants the session and the relay
//! rely on: names and addresses hold no control bytes (nothing can be
//! smuggled into the line relayed to a backend), the relayed form of an
//! address parses back to the same address, a BDAT line written by
//! `bdat_command` for the parsed size parses back to the same command, the
//! verb is the line's first word, and an error's two reply writers agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_edge::smtp::bdat_command;
use smtp_edge::smtp::command::{parse, Body, Command, MailParams};

fn clean(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != 0x7f)
}

fn params_text(p: &MailParams) -> String {
    let mut s = String::new();
    if let Some(size) = p.size {
        s += &format!(" SIZE={size}");
    }
    match p.body {
        Some(Body::SevenBit) => s += " BODY=7BIT",
        Some(Body::EightBitMime) => s += " BODY=8BITMIME",
        None => {}
    }
    if p.smtputf8 {
        s += " SMTPUTF8";
    }
    s
}

fuzz_target!(|line: &[u8]| {
    let parsed = parse(line);
    // A single trailing CR is the parser's to strip.
    if !line.ends_with(b"\r") {
        let mut with_cr = line.to_vec();
        with_cr.push(b'\r');
        assert_eq!(parse(&with_cr), parsed);
    }
    let verb = |v: &[u8]| line.len() >= v.len() && line[..v.len()].eq_ignore_ascii_case(v);
    match parsed {
        Err(e) => {
            let mut a = Vec::new();
            e.reply().write_to(&mut a);
            let mut b = Vec::new();
            e.write_reply(&mut b);
            assert_eq!(a, b, "{e:?}");
        }
        Ok(Command::Ehlo(name)) | Ok(Command::Helo(name)) => {
            assert!(verb(b"EHLO") || verb(b"HELO"));
            assert!(!name.is_empty());
            assert!(name.bytes().all(|b| b > 0x20 && b != 0x7f), "{name:?}");
        }
        Ok(Command::Mail { from, params }) => {
            assert!(verb(b"MAIL"));
            assert!(clean(from), "{from:?}");
            // The form the relay sends parses back to the same command.
            let relayed = format!("MAIL FROM:<{from}>{}", params_text(&params));
            assert_eq!(
                parse(relayed.as_bytes()),
                Ok(Command::Mail { from, params }),
                "{relayed:?}"
            );
        }
        Ok(Command::Rcpt { to }) => {
            assert!(verb(b"RCPT"));
            assert!(!to.is_empty());
            assert!(clean(to), "{to:?}");
            let relayed = format!("RCPT TO:<{to}>");
            assert_eq!(
                parse(relayed.as_bytes()),
                Ok(Command::Rcpt { to }),
                "{relayed:?}"
            );
        }
        Ok(Command::StartTls) => assert!(verb(b"STARTTLS")),
        Ok(Command::Bdat { size, last }) => {
            assert!(verb(b"BDAT"));
            // The line the relay writes for a chunk of that size parses
            // back to the same command.
            let mut relayed = Vec::new();
            bdat_command(usize::try_from(size).unwrap(), last, &mut relayed);
            assert_eq!(
                relayed.strip_suffix(b"\r\n").map(parse),
                Some(Ok(Command::Bdat { size, last })),
                "{relayed:?}"
            );
        }
        Ok(c) => {
            let v: &[u8] = match c {
                Command::Data => b"DATA",
                Command::Rset => b"RSET",
                Command::Noop => b"NOOP",
                Command::Quit => b"QUIT",
                Command::Vrfy => b"VRFY",
                Command::Help => b"HELP",
                other => unreachable!("{other:?}"),
            };
            assert!(verb(v), "{c:?}");
        }
    }
});
