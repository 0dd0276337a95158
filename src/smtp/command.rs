//! SMTP command line parser (RFC 5321 grammar, ESMTP parameters of RFC 1870,
//! 6152 and 6531). Takes one line without its CRLF, returns a borrowed value
//! (`Command`, with `MailParams` for MAIL). Local parts are read leniently,
//! as Postfix reads them (`john.@example.com`). Each `CommandError` maps to
//! exactly one reply (`CommandError::reply`, or `write_reply` without
//! allocating).

use super::reply::{EnhancedCode, Reply};

/// BODY= parameter (RFC 6152).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// Parameters of MAIL FROM that the proxy understands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
}

/// One parsed command. Addresses are given without the angle brackets; the
/// null reverse path is `""`. `Bdat` is `BDAT <size> [LAST]` (RFC 3030):
/// the chunk's octets follow its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail { from: &'a str, params: MailParams },
    Rcpt { to: &'a str },
    Data,
    Bdat { size: u64, last: bool },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
}

/// Why a command line was refused; each maps to exactly one reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown verb: 502 5.5.1.
    #[error("command not recognized")]
    Unrecognized,
    /// Bad syntax of the command or its path: 501 5.5.2 with the text.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// Bad syntax of an argument / parameter value: 501 5.5.4 with the text.
    #[error("invalid argument: {0}")]
    Argument(&'static str),
    /// Unknown or unsupported ESMTP parameter: 555 5.5.4.
    #[error("unsupported parameter")]
    UnknownParameter,
    /// Non-ASCII address without SMTPUTF8: 553 5.6.7.
    #[error("non-ASCII address without SMTPUTF8")]
    NeedsSmtputf8,
}

impl CommandError {
    /// The reply the client gets for this error.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => {
                Reply::new(502, EnhancedCode(5, 5, 1), "Command not recognized")
            }
            CommandError::Syntax(t) => Reply::new(501, EnhancedCode(5, 5, 2), *t),
            CommandError::Argument(t) => Reply::new(501, EnhancedCode(5, 5, 4), *t),
            CommandError::UnknownParameter => {
                Reply::new(555, EnhancedCode(5, 5, 4), "Unsupported parameter")
            }
            CommandError::NeedsSmtputf8 => Reply::new(
                553,
                EnhancedCode(5, 6, 7),
                "Non-ASCII address requires SMTPUTF8",
            ),
        }
    }

    /// Same as [`reply`](Self::reply), written straight to the wire buffer
    /// without allocating.
    pub fn write_reply(&self, out: &mut Vec<u8>) {
        use super::reply::write_reply;
        match self {
            CommandError::Unrecognized => write_reply(out, 502, "5.5.1", "Command not recognized"),
            CommandError::Syntax(t) => write_reply(out, 501, "5.5.2", t),
            CommandError::Argument(t) => write_reply(out, 501, "5.5.4", t),
            CommandError::UnknownParameter => {
                write_reply(out, 555, "5.5.4", "Unsupported parameter")
            }
            CommandError::NeedsSmtputf8 => {
                write_reply(out, 553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            }
        }
    }
}

const MAIL_SYNTAX: &str = "Syntax: MAIL FROM:<address>";
const RCPT_SYNTAX: &str = "Syntax: RCPT TO:<address>";
const BAD_SENDER: &str = "Bad sender address syntax";
const BAD_RECIPIENT: &str = "Bad recipient address syntax";

/// Parses one command line (without the trailing CRLF / LF).
///
/// A single trailing CR is stripped. Words are separated by spaces (tabs are
/// tolerated); trailing white space is ignored. The path of MAIL / RCPT may
/// follow the colon after optional spaces (`MAIL FROM: <a@b>`).
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let verb_end = line.iter().position(|&b| is_wsp(b)).unwrap_or(line.len());
    let verb = &line[..verb_end];
    let args = trim(&line[verb_end..]);

    match verb.len() {
        4 => {
            let v = [
                verb[0].to_ascii_uppercase(),
                verb[1].to_ascii_uppercase(),
                verb[2].to_ascii_uppercase(),
                verb[3].to_ascii_uppercase(),
            ];
            match &v {
                b"EHLO" => hello(args, "Syntax: EHLO hostname").map(Command::Ehlo),
                b"HELO" => hello(args, "Syntax: HELO hostname").map(Command::Helo),
                b"MAIL" => mail(args),
                b"RCPT" => rcpt(args),
                b"DATA" => no_args(args, Command::Data, "Syntax: DATA"),
                b"BDAT" => bdat(args),
                b"RSET" => no_args(args, Command::Rset, "Syntax: RSET"),
                b"QUIT" => no_args(args, Command::Quit, "Syntax: QUIT"),
                b"NOOP" => Ok(Command::Noop),
                b"VRFY" => Ok(Command::Vrfy),
                b"HELP" => Ok(Command::Help),
                _ => Err(CommandError::Unrecognized),
            }
        }
        8 if verb.eq_ignore_ascii_case(b"STARTTLS") => {
            no_args(args, Command::StartTls, "Syntax: STARTTLS")
        }
        _ => Err(CommandError::Unrecognized),
    }
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_wsp(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_wsp(b)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_wsp(b)).unwrap_or(s.len());
    &s[start..]
}

fn no_args<'a>(
    args: &[u8],
    cmd: Command<'a>,
    msg: &'static str,
) -> Result<Command<'a>, CommandError> {
    if args.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Argument(msg))
    }
}

/// EHLO / HELO: the first word is the client's name (domain or address
/// literal; checking it is policy's job). Extra words are ignored, as Postfix
/// does. The name must be printable (no controls), valid UTF-8.
fn hello<'a>(args: &'a [u8], msg: &'static str) -> Result<&'a str, CommandError> {
    let mut end = 0;
    for &b in args {
        if is_wsp(b) {
            break;
        }
        if b < 0x21 || b == 0x7f {
            return Err(CommandError::Argument(msg));
        }
        end += 1;
    }
    if end == 0 {
        return Err(CommandError::Argument(msg));
    }
    std::str::from_utf8(&args[..end]).map_err(|_| CommandError::Argument(msg))
}

/// Strips an ASCII prefix, case-insensitively.
fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn mail(args: &[u8]) -> Result<Command<'_>, CommandError> {
    let rest = strip_prefix_ci(args, b"FROM:").ok_or(CommandError::Syntax(MAIL_SYNTAX))?;
    let rest = trim_start(rest);
    if rest.first() != Some(&b'<') {
        return Err(CommandError::Syntax(MAIL_SYNTAX));
    }
    let path = parse_path(rest, true, false).ok_or(CommandError::Syntax(BAD_SENDER))?;
    let tail = &rest[path.end..];
    if !tail.is_empty() && !is_wsp(tail[0]) {
        return Err(CommandError::Syntax(BAD_SENDER));
    }
    let params = mail_params(tail)?;
    if path.non_ascii && !params.smtputf8 {
        return Err(CommandError::NeedsSmtputf8);
    }
    Ok(Command::Mail {
        from: path.mailbox,
        params,
    })
}

fn rcpt(args: &[u8]) -> Result<Command<'_>, CommandError> {
    let rest = strip_prefix_ci(args, b"TO:").ok_or(CommandError::Syntax(RCPT_SYNTAX))?;
    let rest = trim_start(rest);
    if rest.first() != Some(&b'<') {
        return Err(CommandError::Syntax(RCPT_SYNTAX));
    }
    let path = parse_path(rest, false, true).ok_or(CommandError::Syntax(BAD_RECIPIENT))?;
    let tail = &rest[path.end..];
    if !tail.is_empty() && !is_wsp(tail[0]) {
        return Err(CommandError::Syntax(BAD_RECIPIENT));
    }
    // Non-ASCII recipients are accepted here; the session checks them against
    // the SMTPUTF8 parameter of the transaction's MAIL.
    if !trim(tail).is_empty() {
        return Err(CommandError::UnknownParameter);
    }
    Ok(Command::Rcpt { to: path.mailbox })
}

/// `BDAT` arguments: `chunk-size [SP "LAST"]` (RFC 3030), the size 1 to 20
/// digits that fit a u64.
fn bdat(args: &[u8]) -> Result<Command<'_>, CommandError> {
    const SYNTAX: &str = "Syntax: BDAT size [LAST]";
    let mut words = args.split(|&b| is_wsp(b)).filter(|w| !w.is_empty());
    let size = words
        .next()
        .and_then(parse_size)
        .ok_or(CommandError::Argument(SYNTAX))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(CommandError::Argument(SYNTAX)),
    };
    if words.next().is_some() {
        return Err(CommandError::Argument(SYNTAX));
    }
    Ok(Command::Bdat { size, last })
}

/// MAIL FROM parameters: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531).
fn mail_params(tail: &[u8]) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    for word in tail.split(|&b| is_wsp(b)).filter(|w| !w.is_empty()) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(eq) => (&word[..eq], Some(&word[eq + 1..])),
            None => (word, None),
        };
        if key.eq_ignore_ascii_case(b"SIZE") {
            if params.size.is_some() {
                return Err(CommandError::Argument("Duplicate SIZE parameter"));
            }
            let size = value
                .and_then(parse_size)
                .ok_or(CommandError::Argument("Bad message size syntax"))?;
            params.size = Some(size);
        } else if key.eq_ignore_ascii_case(b"BODY") {
            if params.body.is_some() {
                return Err(CommandError::Argument("Duplicate BODY parameter"));
            }
            let body = match value {
                Some(v) if v.eq_ignore_ascii_case(b"7BIT") => Body::SevenBit,
                Some(v) if v.eq_ignore_ascii_case(b"8BITMIME") => Body::EightBitMime,
                _ => return Err(CommandError::Argument("Bad BODY parameter")),
            };
            params.body = Some(body);
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            if params.smtputf8 {
                return Err(CommandError::Argument("Duplicate SMTPUTF8 parameter"));
            }
            if value.is_some() {
                return Err(CommandError::Argument("Bad SMTPUTF8 parameter"));
            }
            params.smtputf8 = true;
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    Ok(params)
}

/// 1 to 20 decimal digits that fit a u64.
fn parse_size(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

struct Path<'a> {
    /// The mailbox without brackets and without a source route.
    mailbox: &'a str,
    /// Index just past the closing `>`.
    end: usize,
    /// The path (route included) holds non-ASCII (UTF-8) bytes.
    non_ascii: bool,
}

/// Parses `<...>` at the start of `s` (RFC 5321 Path / Reverse-path, with
/// RFC 6531 UTF-8). `None` on any syntax error.
fn parse_path(s: &[u8], null_ok: bool, postmaster_ok: bool) -> Option<Path<'_>> {
    debug_assert_eq!(s.first(), Some(&b'<'));
    let mut p = 1;
    if *s.get(p)? == b'>' {
        return null_ok.then_some(Path {
            mailbox: "",
            end: 2,
            non_ascii: false,
        });
    }
    // Optional source route: "@a.example,@b.example:" (accepted and dropped).
    let route = *s.get(p)? == b'@';
    if route {
        loop {
            p = parse_domain_name(s, p + 1)?;
            match *s.get(p)? {
                b',' => {
                    p += 1;
                    if *s.get(p)? != b'@' {
                        return None;
                    }
                }
                b':' => {
                    p += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let start = p;
    p = if *s.get(p)? == b'"' {
        parse_quoted_string(s, p)?
    } else {
        parse_dot_string(s, p)?
    };
    if *s.get(p)? == b'@' {
        p = parse_domain(s, p + 1)?;
    } else if !(postmaster_ok && !route && s[start..p].eq_ignore_ascii_case(b"postmaster")) {
        return None;
    }
    if *s.get(p)? != b'>' {
        return None;
    }
    // The whole path (route included) must be UTF-8; the mailbox starts
    // after the ASCII ':' of the route (or at the start), a char boundary.
    let bytes = &s[1..p];
    let non_ascii = !bytes.is_ascii();
    let whole = if non_ascii {
        std::str::from_utf8(bytes).ok()?
    } else {
        // SAFETY: ASCII is UTF-8. (The checked conversion cost ~160
        // instructions per address, two per message, against ~30 for
        // `is_ascii`, which the path needs anyway.)
        unsafe { std::str::from_utf8_unchecked(bytes) }
    };
    Some(Path {
        mailbox: &whole[start - 1..],
        end: p + 1,
        non_ascii,
    })
}

/// Byte classes for the path grammar: atext of RFC 5322 and letter / digit /
/// hyphen of domain labels; bytes >= 0x80 (UTF-8, RFC 6531) count as both.
const ATEXT: u8 = 1;
const LDH: u8 = 2;
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c >= 0x80 {
            t[b] = ATEXT | LDH;
        }
        b += 1;
    }
    t[b'-' as usize] = ATEXT | LDH;
    let specials = b"!#$%&'*+/=?^_`{|}~";
    let mut i = 0;
    while i < specials.len() {
        t[specials[i] as usize] = ATEXT;
        i += 1;
    }
    t
};

#[inline]
fn is_atext(b: u8) -> bool {
    CLASS[b as usize] & ATEXT != 0
}

#[inline]
fn is_ldh(b: u8) -> bool {
    CLASS[b as usize] & LDH != 0
}

/// Dot-string = Atom *("." Atom), read leniently as Postfix does
/// (`strict_rfc821_envelopes = no`): leading, trailing and doubled dots are
/// accepted (`john.@example.com` is real mail from real carriers), since an
/// edge stricter than its backend loses mail. Returns the index after it.
fn parse_dot_string(s: &[u8], mut p: usize) -> Option<usize> {
    let start = p;
    while p < s.len() && (is_atext(s[p]) || s[p] == b'.') {
        p += 1;
    }
    (p > start && s[start..p].iter().any(|&b| b != b'.')).then_some(p)
}

/// Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE, with UTF-8.
/// `s[p]` is the opening quote. Returns the index after the closing quote.
fn parse_quoted_string(s: &[u8], mut p: usize) -> Option<usize> {
    p += 1;
    loop {
        match *s.get(p)? {
            b'"' => return Some(p + 1),
            b'\\' => {
                let q = *s.get(p + 1)?;
                if !(32..=126).contains(&q) {
                    return None;
                }
                p += 2;
            }
            32..=126 | 0x80..=0xff => p += 1,
            _ => return None,
        }
    }
}

/// Domain or address literal. Returns the index after it.
fn parse_domain(s: &[u8], p: usize) -> Option<usize> {
    if s.get(p) == Some(&b'[') {
        parse_address_literal(s, p)
    } else {
        parse_domain_name(s, p)
    }
}

/// Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str],
/// UTF-8 bytes counting as letters (U-labels). ASCII labels at most 63
/// octets, the whole name at most 255.
fn parse_domain_name(s: &[u8], mut p: usize) -> Option<usize> {
    let start = p;
    loop {
        let label = p;
        let mut ascii = true;
        while p < s.len() && is_ldh(s[p]) {
            ascii &= s[p] < 0x80;
            p += 1;
        }
        let l = &s[label..p];
        if l.is_empty() || l[0] == b'-' || l[l.len() - 1] == b'-' || (ascii && l.len() > 63) {
            return None;
        }
        if s.get(p) == Some(&b'.') {
            p += 1;
        } else {
            break;
        }
    }
    (p - start <= 255).then_some(p)
}

/// `[1.2.3.4]` or `[IPv6:...]`. `s[p]` is `[`. Returns the index after `]`.
fn parse_address_literal(s: &[u8], p: usize) -> Option<usize> {
    let len = s[p + 1..].iter().take(64).position(|&b| b == b']')?;
    let inner = &s[p + 1..p + 1 + len];
    let ok = match strip_prefix_ci(inner, b"IPv6:") {
        Some(v6) => std::str::from_utf8(v6)
            .ok()
            .and_then(|v| v.parse::<std::net::Ipv6Addr>().ok())
            .is_some(),
        None => is_ipv4(inner),
    };
    ok.then_some(p + len + 2)
}

/// Four decimal numbers of 1-3 digits, 0-255, separated by dots.
fn is_ipv4(s: &[u8]) -> bool {
    let mut parts = 0;
    for part in s.split(|&b| b == b'.') {
        parts += 1;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let v = part.iter().fold(0u16, |v, &d| v * 10 + u16::from(d - b'0'));
        if v > 255 {
            return false;
        }
    }
    parts == 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command<'_>, CommandError> {
        parse(s.as_bytes())
    }

    fn mail_ok(s: &str) -> (&str, MailParams) {
        match p(s) {
            Ok(Command::Mail { from, params }) => (from, params),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn rcpt_ok(s: &str) -> &str {
        match p(s) {
            Ok(Command::Rcpt { to }) => to,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn simple_verbs_any_case() {
        assert_eq!(p("DATA"), Ok(Command::Data));
        assert_eq!(p("data"), Ok(Command::Data));
        assert_eq!(p("DaTa\r"), Ok(Command::Data));
        assert_eq!(p("RSET"), Ok(Command::Rset));
        assert_eq!(p("rset "), Ok(Command::Rset));
        assert_eq!(p("QUIT"), Ok(Command::Quit));
        assert_eq!(p("quit"), Ok(Command::Quit));
        assert_eq!(p("NOOP"), Ok(Command::Noop));
        assert_eq!(p("NOOP anything at all"), Ok(Command::Noop));
        assert_eq!(p("VRFY"), Ok(Command::Vrfy));
        assert_eq!(p("vrfy postmaster"), Ok(Command::Vrfy));
        assert_eq!(p("HELP"), Ok(Command::Help));
        assert_eq!(p("help me"), Ok(Command::Help));
        assert_eq!(
            p("BDAT 0 LAST"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(
            p("bdat 4096\r"),
            Ok(Command::Bdat {
                size: 4096,
                last: false
            })
        );
        assert_eq!(
            p("BDAT 18446744073709551615 last"),
            Ok(Command::Bdat {
                size: u64::MAX,
                last: true
            })
        );
        for bad in [
            "BDAT",
            "BDAT LAST",
            "BDAT -1",
            "BDAT 1x",
            "BDAT 18446744073709551616",
            "BDAT 10 FIRST",
            "BDAT 10 LAST x",
        ] {
            assert_eq!(
                p(bad),
                Err(CommandError::Argument("Syntax: BDAT size [LAST]")),
                "{bad}"
            );
        }
        assert_eq!(p("STARTTLS"), Ok(Command::StartTls));
        assert_eq!(p("StartTls\r"), Ok(Command::StartTls));
    }

    #[test]
    fn no_argument_verbs_refuse_arguments() {
        for (s, msg) in [
            ("DATA x", "Syntax: DATA"),
            ("RSET x", "Syntax: RSET"),
            ("QUIT now", "Syntax: QUIT"),
            ("STARTTLS x", "Syntax: STARTTLS"),
        ] {
            let e = p(s).unwrap_err();
            assert_eq!(e, CommandError::Argument(msg));
            let r = e.reply();
            assert_eq!((r.code, r.enhanced()), (501, Some(EnhancedCode(5, 5, 4))));
        }
    }

    #[test]
    fn unrecognized() {
        for s in [
            "",
            " ",
            "\r",
            "FOO",
            "EHL",
            "EHLOO x",
            "MAILFROM:<a@b>",
            " EHLO x",
            "XCLIENT ADDR=1.2.3.4",
            "AUTH PLAIN",
            "STARTTLSX",
            "\u{e9}HLO x",
        ] {
            assert_eq!(p(s), Err(CommandError::Unrecognized), "{s:?}");
        }
        let r = CommandError::Unrecognized.reply();
        assert_eq!(r.code, 502);
        assert_eq!(r.enhanced(), Some(EnhancedCode(5, 5, 1)));
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["Command not recognized"]
        );
    }

    #[test]
    fn ehlo_helo() {
        assert_eq!(
            p("EHLO mx.example.org"),
            Ok(Command::Ehlo("mx.example.org"))
        );
        assert_eq!(
            p("ehlo mx.example.org\r"),
            Ok(Command::Ehlo("mx.example.org"))
        );
        assert_eq!(p("HELO [192.0.2.1]"), Ok(Command::Helo("[192.0.2.1]")));
        assert_eq!(p("EHLO  spaced  "), Ok(Command::Ehlo("spaced")));
        assert_eq!(p("EHLO host extra words"), Ok(Command::Ehlo("host")));
        assert_eq!(p("EHLO\thost"), Ok(Command::Ehlo("host")));
        assert_eq!(
            p("EHLO b\u{fc}cher.example"),
            Ok(Command::Ehlo("b\u{fc}cher.example"))
        );
        assert_eq!(
            p("EHLO"),
            Err(CommandError::Argument("Syntax: EHLO hostname"))
        );
        assert_eq!(
            p("EHLO "),
            Err(CommandError::Argument("Syntax: EHLO hostname"))
        );
        assert_eq!(
            p("HELO"),
            Err(CommandError::Argument("Syntax: HELO hostname"))
        );
        assert_eq!(
            parse(b"EHLO a\0b"),
            Err(CommandError::Argument("Syntax: EHLO hostname"))
        );
        assert_eq!(
            parse(b"EHLO \xff\xfe"),
            Err(CommandError::Argument("Syntax: EHLO hostname"))
        );
        let r = p("EHLO").unwrap_err().reply();
        assert_eq!((r.code, r.enhanced()), (501, Some(EnhancedCode(5, 5, 4))));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["Syntax: EHLO hostname"]);
    }

    #[test]
    fn mail_basic() {
        assert_eq!(
            mail_ok("MAIL FROM:<a@b.example>"),
            ("a@b.example", MailParams::default())
        );
        assert_eq!(mail_ok("mail from:<a@b.example>\r").0, "a@b.example");
        assert_eq!(mail_ok("MAIL FROM: <a@b.example>").0, "a@b.example");
        assert_eq!(mail_ok("MAIL FROM:   <a@b.example>  ").0, "a@b.example");
        assert_eq!(mail_ok("MAIL FROM:<>"), ("", MailParams::default()));
        assert_eq!(mail_ok("MAIL FROM:<> SIZE=10").1.size, Some(10));
        assert_eq!(
            mail_ok("MAIL FROM:<first.last+tag@sub.example.org>").0,
            "first.last+tag@sub.example.org"
        );
        assert_eq!(mail_ok("MAIL FROM:<a@localhost>").0, "a@localhost");
        assert_eq!(mail_ok("MAIL FROM:<a@[192.0.2.1]>").0, "a@[192.0.2.1]");
        assert_eq!(
            mail_ok("MAIL FROM:<a@[IPv6:2001:db8::1]>").0,
            "a@[IPv6:2001:db8::1]"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<a@[ipv6:::ffff:192.0.2.1]>").0,
            "a@[ipv6:::ffff:192.0.2.1]"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<!#$%&'*+-/=?^_`{|}~@x-y.example>").0,
            "!#$%&'*+-/=?^_`{|}~@x-y.example"
        );
        assert_eq!(mail_ok("MAIL FROM:<a@1.2.3.4>").0, "a@1.2.3.4");
    }

    #[test]
    fn mail_syntax_errors() {
        for s in [
            "MAIL",
            "MAIL FROM",
            "MAIL FROM:",
            "MAIL TO:<a@b>",
            "MAIL FROM:a@b",
            "MAIL FROM a@b",
            "MAIL FROM :<a@b>",
        ] {
            assert_eq!(p(s), Err(CommandError::Syntax(MAIL_SYNTAX)), "{s:?}");
        }
        for s in [
            "MAIL FROM:<a@b",
            "MAIL FROM:<a>",
            "MAIL FROM:<@>",
            "MAIL FROM:<a@>",
            "MAIL FROM:<@b>",
            "MAIL FROM:<a@b>x",
            "MAIL FROM:<a@b>>",
            "MAIL FROM:<<a@b>>",
            "MAIL FROM:<a b@c>",
            "MAIL FROM:<a@b..c>",
            "MAIL FROM:<a@b.c.>",
            "MAIL FROM:<a@.b.c>",
            "MAIL FROM:<a@-b.c>",
            "MAIL FROM:<a@b-.c>",
            "MAIL FROM:<a@b_c.d>",
            "MAIL FROM:<a@[1.2.3]>",
            "MAIL FROM:<a@[1.2.3.256]>",
            "MAIL FROM:<a@[1.2.3.4.5]>",
            "MAIL FROM:<a@[1.2.3.4>",
            "MAIL FROM:<a@[IPv6:zz::1]>",
            "MAIL FROM:<a@[IPv6:1.2.3.4]>",
            "MAIL FROM:<a@[tag:foo]>",
            "MAIL FROM:<a@[]>",
            "MAIL FROM:<a@b@c>",
            "MAIL FROM:<\"unterminated@b>",
            "MAIL FROM:<\"a\"b@c>",
            "MAIL FROM:<Postmaster>",
            "MAIL FROM:<a@b,c>",
        ] {
            let e = p(s).unwrap_err();
            assert!(matches!(e, CommandError::Syntax(_)), "{s:?}: {e:?}");
            let r = e.reply();
            assert_eq!(
                (r.code, r.enhanced()),
                (501, Some(EnhancedCode(5, 5, 2))),
                "{s:?}"
            );
        }
        let long_label = format!("MAIL FROM:<a@{}.example>", "x".repeat(64));
        assert!(matches!(p(&long_label), Err(CommandError::Syntax(_))));
        let ok_label = format!("MAIL FROM:<a@{}.example>", "x".repeat(63));
        assert!(p(&ok_label).is_ok());
        let long_domain = format!("MAIL FROM:<a@{}x>", "x.".repeat(128));
        assert!(matches!(p(&long_domain), Err(CommandError::Syntax(_))));
    }

    #[test]
    fn quoted_local_parts() {
        assert_eq!(
            mail_ok("MAIL FROM:<\"john doe\"@example.org>").0,
            "\"john doe\"@example.org"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<\"a>b\"@example.org>").0,
            "\"a>b\"@example.org"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<\"a\\\"b\"@example.org>").0,
            "\"a\\\"b\"@example.org"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<\"a\\\\\"@example.org>").0,
            "\"a\\\\\"@example.org"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<\"\"@example.org>").0,
            "\"\"@example.org"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<\"a@b\"@example.org> SIZE=5").0,
            "\"a@b\"@example.org"
        );
        assert_eq!(
            rcpt_ok("RCPT TO:<\"x y>z\"@example.org>"),
            "\"x y>z\"@example.org"
        );
        // Tab or control characters are not qtext.
        assert!(parse(b"MAIL FROM:<\"a\tb\"@c>").is_err());
        assert!(parse(b"MAIL FROM:<\"a\0b\"@c>").is_err());
        assert!(parse(b"MAIL FROM:<\"a\\\x01\"@c>").is_err());
    }

    #[test]
    fn lenient_local_part_dots() {
        for a in ["a..b@c", ".a@c", "john.@example.com"] {
            assert_eq!(mail_ok(&format!("MAIL FROM:<{a}>")).0, a);
        }
        assert!(p("MAIL FROM:<..@c>").is_err());
    }

    #[test]
    fn source_routes_dropped() {
        assert_eq!(
            mail_ok("MAIL FROM:<@a.example,@b.example:user@c.example>").0,
            "user@c.example"
        );
        assert_eq!(
            mail_ok("MAIL FROM:<@a.example:user@c.example>").0,
            "user@c.example"
        );
        assert_eq!(
            rcpt_ok("RCPT TO:<@a.example,@b.example:user@c.example>"),
            "user@c.example"
        );
        for s in [
            "MAIL FROM:<@a.example user@c.example>",
            "MAIL FROM:<@a.example,user@c.example>",
            "MAIL FROM:<@:user@c.example>",
            "MAIL FROM:<@a.example,:user@c.example>",
            "MAIL FROM:<@a.example:>",
            "MAIL FROM:<@a.example:@b.example>",
            "RCPT TO:<@a.example:Postmaster>",
        ] {
            assert!(matches!(p(s), Err(CommandError::Syntax(_))), "{s:?}");
        }
    }

    #[test]
    fn mail_params() {
        let (_, pr) = mail_ok("MAIL FROM:<a@b> SIZE=12345 BODY=8BITMIME");
        assert_eq!(
            pr,
            MailParams {
                size: Some(12345),
                body: Some(Body::EightBitMime),
                smtputf8: false
            }
        );
        let (_, pr) = mail_ok("MAIL FROM:<a@b> size=0 body=7bit smtputf8");
        assert_eq!(
            pr,
            MailParams {
                size: Some(0),
                body: Some(Body::SevenBit),
                smtputf8: true
            }
        );
        let (_, pr) = mail_ok("MAIL FROM:<a@b>  SIZE=18446744073709551615  ");
        assert_eq!(pr.size, Some(u64::MAX));
        let (_, pr) = mail_ok("MAIL FROM:<a@b> SIZE=00000000000000000001");
        assert_eq!(pr.size, Some(1));

        for s in [
            "MAIL FROM:<a@b> SIZE=18446744073709551616",
            "MAIL FROM:<a@b> SIZE=99999999999999999999",
            "MAIL FROM:<a@b> SIZE=000000000000000000001",
            "MAIL FROM:<a@b> SIZE=999999999999999999999999999999999999",
            "MAIL FROM:<a@b> SIZE=",
            "MAIL FROM:<a@b> SIZE",
            "MAIL FROM:<a@b> SIZE=-1",
            "MAIL FROM:<a@b> SIZE=+1",
            "MAIL FROM:<a@b> SIZE=1k",
            "MAIL FROM:<a@b> SIZE=1 SIZE=2",
            "MAIL FROM:<a@b> BODY=BINARYMIME",
            "MAIL FROM:<a@b> BODY=",
            "MAIL FROM:<a@b> BODY",
            "MAIL FROM:<a@b> BODY=8bitmime BODY=7BIT",
            "MAIL FROM:<a@b> SMTPUTF8 SMTPUTF8",
            "MAIL FROM:<a@b> SMTPUTF8=yes",
        ] {
            let e = p(s).unwrap_err();
            assert!(matches!(e, CommandError::Argument(_)), "{s:?}: {e:?}");
            let r = e.reply();
            assert_eq!((r.code, r.enhanced()), (501, Some(EnhancedCode(5, 5, 4))));
        }
        for s in [
            "MAIL FROM:<a@b> RET=HDRS",
            "MAIL FROM:<a@b> ENVID=x",
            "MAIL FROM:<a@b> AUTH=<>",
            "MAIL FROM:<a@b> =",
            "MAIL FROM:<a@b> SIZE=1 FOO",
            "MAIL FROM:<a@b> SIZ=1",
        ] {
            assert_eq!(p(s), Err(CommandError::UnknownParameter), "{s:?}");
        }
        let r = CommandError::UnknownParameter.reply();
        assert_eq!((r.code, r.enhanced()), (555, Some(EnhancedCode(5, 5, 4))));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["Unsupported parameter"]);
    }

    #[test]
    fn smtputf8_addresses() {
        let (from, pr) = mail_ok("MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8");
        assert_eq!(from, "j\u{f6}rg@b\u{fc}cher.example");
        assert!(pr.smtputf8);
        assert_eq!(
            mail_ok("MAIL FROM:<\"\u{4f60} \u{597d}\"@example.org> SMTPUTF8").0,
            "\"\u{4f60} \u{597d}\"@example.org"
        );
        assert_eq!(
            p("MAIL FROM:<j\u{f6}rg@example.org>"),
            Err(CommandError::NeedsSmtputf8)
        );
        assert_eq!(
            p("MAIL FROM:<a@b\u{fc}cher.example> SIZE=1"),
            Err(CommandError::NeedsSmtputf8)
        );
        assert_eq!(
            p("MAIL FROM:<@r\u{e9}.example:a@b.example>"),
            Err(CommandError::NeedsSmtputf8)
        );
        let r = CommandError::NeedsSmtputf8.reply();
        assert_eq!((r.code, r.enhanced()), (553, Some(EnhancedCode(5, 6, 7))));
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["Non-ASCII address requires SMTPUTF8"]
        );
        // RCPT accepts UTF-8; the session checks against MAIL's SMTPUTF8.
        assert_eq!(
            rcpt_ok("RCPT TO:<\u{4f60}\u{597d}@example.\u{4e2d}\u{56fd}>"),
            "\u{4f60}\u{597d}@example.\u{4e2d}\u{56fd}"
        );
        // Invalid UTF-8 is a syntax error, with or without SMTPUTF8.
        for line in [
            &b"MAIL FROM:<j\xf6rg@example.org> SMTPUTF8"[..],
            b"MAIL FROM:<jorg@example.\xc3> SMTPUTF8",
            b"MAIL FROM:<\"\xff\"@example.org> SMTPUTF8",
            b"MAIL FROM:<@\xe9.example:a@b.example> SMTPUTF8",
            b"MAIL FROM:<j\xf6rg@example.org>",
            b"RCPT TO:<j\xf6rg@example.org>",
            b"RCPT TO:<a@\xed\xa0\x80.example>",
        ] {
            assert!(
                matches!(parse(line), Err(CommandError::Syntax(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn rcpt() {
        assert_eq!(rcpt_ok("RCPT TO:<a@b.example>"), "a@b.example");
        assert_eq!(rcpt_ok("rcpt to:<a@b.example>\r"), "a@b.example");
        assert_eq!(rcpt_ok("RCPT TO: <a@b.example>"), "a@b.example");
        assert_eq!(rcpt_ok("RCPT TO:<Postmaster>"), "Postmaster");
        assert_eq!(rcpt_ok("RCPT TO:<postMASTER>"), "postMASTER");
        assert_eq!(
            rcpt_ok("RCPT TO:<postmaster@b.example>"),
            "postmaster@b.example"
        );
        assert_eq!(rcpt_ok("RCPT TO:<a@b.example>   "), "a@b.example");
        assert_eq!(p("RCPT TO:<>"), Err(CommandError::Syntax(BAD_RECIPIENT)));
        assert_eq!(
            p("RCPT TO:<postmasterx>"),
            Err(CommandError::Syntax(BAD_RECIPIENT))
        );
        assert_eq!(p("RCPT TO:<a>"), Err(CommandError::Syntax(BAD_RECIPIENT)));
        assert_eq!(p("RCPT TO:a@b"), Err(CommandError::Syntax(RCPT_SYNTAX)));
        assert_eq!(p("RCPT FROM:<a@b>"), Err(CommandError::Syntax(RCPT_SYNTAX)));
        assert_eq!(p("RCPT"), Err(CommandError::Syntax(RCPT_SYNTAX)));
        assert_eq!(
            p("RCPT TO:<a@b>x"),
            Err(CommandError::Syntax(BAD_RECIPIENT))
        );
        for s in [
            "RCPT TO:<a@b> NOTIFY=NEVER",
            "RCPT TO:<a@b> ORCPT=rfc822;a@b",
            "RCPT TO:<a@b> SIZE=1",
            "RCPT TO:<a@b> x",
        ] {
            assert_eq!(p(s), Err(CommandError::UnknownParameter), "{s:?}");
        }
    }

    #[test]
    fn error_write_reply_matches_reply() {
        for e in [
            CommandError::Unrecognized,
            CommandError::Syntax("x y"),
            CommandError::Argument("z"),
            CommandError::UnknownParameter,
            CommandError::NeedsSmtputf8,
        ] {
            let mut a = Vec::new();
            let mut b = Vec::new();
            e.reply().write_to(&mut a);
            e.write_reply(&mut b);
            assert_eq!(a, b);
        }
        let mut out = Vec::new();
        CommandError::Syntax(BAD_SENDER).write_reply(&mut out);
        assert_eq!(out, b"501 5.5.2 Bad sender address syntax\r\n");
    }

    #[test]
    fn byte_classes() {
        for b in 0..=255u8 {
            let atext =
                b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80;
            let ldh = b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80;
            assert_eq!(is_atext(b), atext, "{b}");
            assert_eq!(is_ldh(b), ldh, "{b}");
        }
    }

    #[test]
    fn trailing_cr_only_one_stripped() {
        assert_eq!(p("DATA\r\r"), Err(CommandError::Unrecognized));
        assert_eq!(p("DATA \r\r"), Err(CommandError::Argument("Syntax: DATA")));
        assert!(p("MAIL FROM:<a@b>\r\r").is_err());
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn fuzz_never_panics() {
        let pieces: &[&[u8]] = &[
            b"MAIL",
            b"mail",
            b"RCPT",
            b"EHLO",
            b"DATA",
            b"STARTTLS",
            b" ",
            b"FROM:",
            b"TO:",
            b"<",
            b">",
            b"@",
            b".",
            b",",
            b":",
            b"\"",
            b"\\",
            b"[",
            b"]",
            b"IPv6:",
            b"a",
            b"ex",
            b"-",
            b"SIZE=",
            b"BODY=",
            b"8BITMIME",
            b"SMTPUTF8",
            b"=",
            b"9",
            b"99999999999",
            b"\0",
            b"\r",
            b"\n",
            b"\t",
            b"\xc3",
            b"\xa9",
            b"\xff",
            b"\xf0\x9f\x92\xa9",
            b"Postmaster",
            b"1.2.3.4",
            b"::1",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut line = Vec::with_capacity(256);
        let mut ok = 0;
        for i in 0..100_000u32 {
            line.clear();
            let r = xorshift(&mut seed);
            // Mostly structured noise, sometimes plain random bytes.
            if i.is_multiple_of(5) {
                let len = (r % 64) as usize;
                for _ in 0..len {
                    line.push(xorshift(&mut seed) as u8);
                }
            } else {
                let start: &[&[u8]] = &[b"MAIL FROM:<", b"RCPT TO:<", b"EHLO ", b""];
                line.extend_from_slice(start[(r % 4) as usize]);
                let n = (r >> 8) % 16;
                for _ in 0..n {
                    let k = xorshift(&mut seed) as usize % pieces.len();
                    line.extend_from_slice(pieces[k]);
                }
            }
            match parse(&line) {
                Ok(Command::Mail { from, .. }) => {
                    ok += 1;
                    assert!(
                        from.is_empty() || line.windows(from.len()).any(|w| w == from.as_bytes())
                    );
                }
                Ok(Command::Rcpt { to }) => {
                    ok += 1;
                    assert!(!to.is_empty());
                }
                Ok(_) => ok += 1,
                Err(e) => {
                    let r = e.reply();
                    assert!(r.is_permanent());
                }
            }
        }
        assert!(ok > 0);
    }
}
