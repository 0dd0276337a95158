//! Property tests of the sans-IO core (proptest, on stable; the fuzz
//! targets in fuzz/ are their nightly, coverage-guided counterparts):
//! un-stuffing inverts stuffing through the DATA scanner, BDAT content
//! checked and stuffed never ends a DATA early, a `Reply`
//! written with `write_to` parses back to itself, the command parser and
//! the PROXY header judge never panic, and the scanner's and the reply
//! parser's memory stays bounded however long the input. Each property
//! runs a few hundred cases; the file takes a few seconds.

use proptest::collection::vec;
use proptest::prelude::*;

use smtp_edge::proxy_protocol as proxy;
use smtp_edge::smtp::command::parse;
use smtp_edge::smtp::reply::{MAX_REPLY_LINE, MAX_REPLY_LINES};
use smtp_edge::smtp::{
    BareLineEndings, ChunkChecker, DataOptions, DataScanner, EnhancedCode, Reply, Scan, Stuffer,
    Unstuffer,
};

#[path = "support/wire.rs"]
mod wire;
use wire::stuff;

const MODES: [BareLineEndings; 2] = [BareLineEndings::Reject, BareLineEndings::Normalize];

/// Cuts `input` into pieces of the given sizes (cycled; 0 counts as 1).
fn chunked<'a>(input: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = input;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        i += 1;
        let (a, b) = rest.split_at(n.min(rest.len()));
        rest = b;
        Some(a)
    })
}

/// A text line: any bytes but CR and LF, dots likely (at the start too).
fn line() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            3 => Just(b'.'),
            1 => Just(b' '),
            6 => any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
        ],
        0..40,
    )
}

/// A reply's code and a matching enhanced code (or none).
fn code_and_enhanced() -> impl Strategy<Value = (u16, Option<EnhancedCode>)> {
    (100u16..600).prop_flat_map(|code| {
        let class = (code / 100) as u8;
        (
            Just(code),
            proptest::option::of(
                (0u16..1000, 0u16..1000).prop_map(move |(s, d)| EnhancedCode(class, s, d)),
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Content of CRLF lines, stuffed and terminated, goes through the
    /// scanner unchanged in both modes (cut anywhere), and the `Unstuffer`
    /// gives the content back.
    #[test]
    fn unstuffing_inverts_stuffing(
        lines in vec(line(), 0..20),
        sizes in vec(1usize..16, 1..8),
    ) {
        let mut content = Vec::new();
        for l in &lines {
            content.extend_from_slice(l);
            content.extend_from_slice(b"\r\n");
        }
        let mut wire = stuff(&content);
        wire.extend_from_slice(b".\r\n");
        for mode in MODES {
            let mut s = DataScanner::new(DataOptions { bare_line_endings: mode, max_line: 0 });
            let mut out = Vec::new();
            let mut end = None;
            let mut at = 0;
            for piece in chunked(&wire, &sizes) {
                if let Scan::End { consumed } = s.feed(piece, &mut out) {
                    end = Some(at + consumed);
                    break;
                }
                at += piece.len();
            }
            prop_assert_eq!(end, Some(wire.len()));
            prop_assert!(!s.bare_line_ending_seen());
            prop_assert_eq!(s.size(), wire.len() as u64 - 3);
            prop_assert_eq!(&out, &wire);
            let mut u = Unstuffer::new();
            let mut got = Vec::new();
            for piece in chunked(&out, &sizes) {
                u.feed(piece, &mut got);
            }
            prop_assert!(u.is_done());
            prop_assert_eq!(&got, &content);
        }
    }

    /// BDAT content of any bytes (CR, LF and dots likely), in any chunks,
    /// both modes: the `ChunkChecker` output holds no bare CR / LF; the
    /// `Stuffer`'d form for a DATA backend ends the data at its very end
    /// in a strict, a Postfix-like and a lenient reading, and un-stuffs to
    /// the checked content (the stable counterpart of the `bdat` fuzz
    /// target).
    #[test]
    fn bdat_stuffing_never_ends_data_early(
        content in vec(prop_oneof![
            2 => Just(b'\r'), 2 => Just(b'\n'), 2 => Just(b'.'), 3 => any::<u8>(),
        ], 0..200),
        sizes in vec(1usize..16, 1..8),
    ) {
        for mode in MODES {
            let mut c = ChunkChecker::new(DataOptions { bare_line_endings: mode, max_line: 0 });
            let mut st = Stuffer::new();
            let (mut checked, mut wire, mut piece) = (Vec::new(), Vec::new(), Vec::new());
            for chunk in chunked(&content, &sizes) {
                piece.clear();
                c.feed(chunk, &mut piece);
                checked.extend_from_slice(&piece);
                st.feed(&piece, &mut wire);
            }
            piece.clear();
            c.finish(&mut piece);
            checked.extend_from_slice(&piece);
            st.feed(&piece, &mut wire);
            st.finish(&mut wire);
            prop_assert!(wire::no_bare(&checked));
            prop_assert!(wire::no_bare(&wire));
            let end = Some(wire.len());
            prop_assert_eq!(wire::strict_end(&wire), end);
            prop_assert_eq!(wire::postfix_end(&wire), end);
            prop_assert_eq!(wire::lenient_end(&wire), end);
            let mut u = Unstuffer::new();
            let mut back = Vec::new();
            u.feed(&wire, &mut back);
            prop_assert!(u.is_done());
            if !checked.is_empty() && !checked.ends_with(b"\n") {
                checked.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(back, checked);
        }
    }

    /// `Reply::parse(write_to(reply)) == reply`, and every proper prefix
    /// of the wire form is incomplete, never an error.
    #[test]
    fn reply_round_trips(
        (code, enhanced) in code_and_enhanced(),
        lines in vec("[ -~]{0,60}", 1..5),
    ) {
        // Without an enhanced code, text that starts like one would be
        // read as one.
        prop_assume!(enhanced.is_some() || !lines[0].starts_with(&format!("{}.", code / 100)));
        let r = Reply::from_lines(code, enhanced, &lines);
        let mut wire = Vec::new();
        r.write_to(&mut wire);
        let parsed = Reply::parse(&wire);
        prop_assert_eq!(parsed, Ok(Some((r.clone(), wire.len()))), "{:?}", String::from_utf8_lossy(&wire));
        for k in 0..wire.len() {
            prop_assert_eq!(Reply::parse(&wire[..k]), Ok(None), "prefix {}", k);
        }
        // Written out again (a one-line reply passed through as it came,
        // any other formatted), the bytes are the same.
        let (parsed, _) = Reply::parse(&wire).unwrap().unwrap();
        let mut again = Vec::new();
        parsed.write_to(&mut again);
        prop_assert_eq!(again, wire);
    }

    /// Any backend line, read and written out again, reads back as the
    /// reply it was: the pass-through of a one-line reply and the
    /// formatting of the others agree.
    #[test]
    fn any_reply_line_written_again_reads_the_same(
        code in 100u16..600,
        sep in prop_oneof![4 => Just(&b" "[..]), 1 => Just(&b"-"[..]), 1 => Just(&b""[..])],
        class_ok in prop::bool::weighted(0.8),
        subject in "0?[0-9]{1,3}",
        detail in "0?[0-9]{1,3}",
        after in prop_oneof![Just(""), Just(" "), Just("  ")],
        text in line(),
        end in prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])],
    ) {
        let class = if class_ok { code / 100 } else { (code / 100) % 5 + 1 };
        let enh = format!("{class}.{subject}.{detail}{after}");
        let raw = [code.to_string().as_bytes(), sep, enh.as_bytes(), &text[..], end].concat();
        if let Ok(Some((r, _))) = Reply::parse(&raw) {
            let mut out = Vec::new();
            r.write_to(&mut out);
            let again = Reply::parse(&out);
            prop_assert_eq!(again, Ok(Some((r, out.len()))), "{:?}", String::from_utf8_lossy(&raw));
        }
    }

    /// Any line, and lines that start with a verb, parse or are refused.
    #[test]
    fn command_parse_never_panics(
        raw in vec(any::<u8>(), 0..600),
        verb in prop::sample::select(vec![
            "MAIL FROM:<", "RCPT TO:<", "EHLO ", "HELO ", "MAIL FROM: <@", "RCPT TO:<\"", "STARTTLS",
        ]),
        tail in vec(prop::sample::select(b"@.<>[]:\"\\ -=aZ0\xc3\xa9\t\r,IPv6".to_vec()), 0..80),
    ) {
        let _ = parse(&raw);
        let mut line = verb.as_bytes().to_vec();
        line.extend_from_slice(&tail);
        if let Ok(c) = parse(&line) {
            // What parsed is the line's own verb.
            let _ = format!("{c:?}");
        }
    }

    /// The PROXY judge never panics and never claims more than it was given.
    #[test]
    fn proxy_scan_never_panics(
        v2 in any::<bool>(),
        rest in vec(any::<u8>(), 0..300),
    ) {
        let mut buf = if v2 { b"\r\n\r\n\0\r\nQUIT\n".to_vec() } else { b"PROXY ".to_vec() };
        buf.extend_from_slice(&rest);
        if let proxy::Scan::Complete { len, .. } = proxy::scan(&buf) {
            prop_assert!(len <= buf.len() && len <= proxy::MAX_HEADER);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// The scanner holds at most the two bytes whose meaning depends on
    /// what follows: each feed appends at most twice its input (a bare CR
    /// or LF becomes CRLF) plus those, however long the message.
    #[test]
    fn scanner_output_bounded_by_input(
        seed in any::<u64>(),
        sizes in vec(1usize..70_000, 1..6),
    ) {
        let alphabet = b"\r\n.\r\n.abc \n\rxyz0123456789";
        let mut s = seed | 1;
        let input: Vec<u8> = (0..200_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                alphabet[(s % alphabet.len() as u64) as usize]
            })
            .collect();
        // No end of data before the last bytes: the whole input streams.
        // The terminator goes on first, so that one the random bytes make
        // with it (they end in CR LF `.`) is broken too.
        let mut input = input;
        if input.starts_with(b".\r\n") {
            input[0] = b'x';
        }
        input.extend_from_slice(b"\r\n.\r\n");
        let last = input.len() - 5;
        for i in 0..last {
            if &input[i..i + 5] == b"\r\n.\r\n" {
                input[i + 2] = b'x';
            }
        }
        for mode in MODES {
            let mut ended = false;
            let mut sc = DataScanner::new(DataOptions { bare_line_endings: mode, max_line: 1000 });
            let mut out = Vec::new();
            let (mut total_in, mut total_out) = (0, 0);
            for piece in chunked(&input, &sizes) {
                let scan = sc.feed(piece, &mut out);
                prop_assert!(out.len() <= 2 * piece.len() + 2);
                total_in += piece.len();
                total_out += out.len();
                if mode == BareLineEndings::Reject {
                    prop_assert!(total_out <= total_in);
                }
                if let Scan::End { consumed } = scan {
                    prop_assert_eq!(total_in - piece.len() + consumed, input.len());
                    ended = true;
                    break;
                }
                out.clear();
            }
            prop_assert!(ended);
        }
    }

    /// Fed any backend output in pieces, as the relay feeds it, the
    /// unparsed rest never reaches `MAX_REPLY_LINE * MAX_REPLY_LINES`:
    /// the parser refuses first.
    #[test]
    fn reply_parser_bounded(
        seed in any::<u64>(),
        sizes in vec(1usize..9000, 1..6),
        lf_every in prop::sample::select(vec![3usize, 100, 4000, 5000, usize::MAX]),
        multi in any::<bool>(),
    ) {
        let bound = MAX_REPLY_LINE * MAX_REPLY_LINES;
        let mut s = seed | 1;
        let mut input = Vec::new();
        while input.len() < bound + MAX_REPLY_LINE {
            input.extend_from_slice(if multi { b"250-" } else { b"250 " });
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let n = if lf_every == usize::MAX { bound } else { (s as usize) % lf_every };
            input.extend(std::iter::repeat_n(b'x', n));
            input.extend_from_slice(b"\r\n");
        }
        let mut buf = Vec::new();
        'feed: for piece in chunked(&input, &sizes) {
            buf.extend_from_slice(piece);
            loop {
                match Reply::parse(&buf) {
                    Ok(Some((_, used))) => {
                        buf.drain(..used);
                    }
                    Ok(None) => {
                        prop_assert!(buf.len() < bound, "{} bytes held", buf.len());
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
    }
}
