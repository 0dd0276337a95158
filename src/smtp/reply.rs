//! SMTP replies: codes, enhanced status codes (RFC 3463), formatting of
//! single- and multi-line replies and incremental parsing of backend replies.
//!
//! `Reply` keeps its lines in one inline buffer (a one-line backend reply
//! allocates nothing; read them with `lines` / `first_line`);
//! `write_reply` is the allocation-free path for the proxy's own fixed
//! replies; `Reply::parse` reads a backend's reply incrementally, bounded by
//! `MAX_REPLY_LINE` and `MAX_REPLY_LINES` (`ReplyError` beyond). A
//! backend's one-line reply already in the form `write_to` would give it
//! (`250 2.1.0 Ok`) keeps that line, and `write_to` copies it as it came:
//! the relayed message's replies pass through without being formatted.

use std::fmt;

use smallvec::SmallVec;

/// An RFC 3463 enhanced status code, e.g. `5.5.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// `n` in decimal at the front of `buf`; the digits written.
fn dec_into(buf: &mut [u8], n: u16) -> usize {
    let mut tmp = [0u8; 5];
    let mut i = tmp.len();
    let mut n = n;
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let k = tmp.len() - i;
    buf[..k].copy_from_slice(&tmp[i..]);
    k
}

/// A reply code as text in `buf`, without the formatting machinery (for
/// span fields recorded once per message).
pub fn code_text(code: u16, buf: &mut [u8; 5]) -> &str {
    let k = dec_into(buf, code);
    std::str::from_utf8(&buf[..k]).unwrap_or("")
}

impl EnhancedCode {
    /// `class.subject.detail` in `buf`, without the formatting machinery.
    pub fn text<'a>(&self, buf: &'a mut [u8; 17]) -> &'a str {
        let k = self.spell(buf);
        std::str::from_utf8(&buf[..k]).unwrap_or("")
    }

    /// `class.subject.detail` as ASCII digits and dots in `buf`; its length.
    fn spell(&self, buf: &mut [u8]) -> usize {
        let mut k = dec_into(buf, u16::from(self.0));
        for n in [self.1, self.2] {
            buf[k] = b'.';
            k += 1;
            k += dec_into(&mut buf[k..], n);
        }
        k
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced code and one or
/// more text lines (without the code / enhanced code prefix, without CRLF).
///
/// The lines are kept in one small buffer, separated by `\n`, inline up to
/// `INLINE` bytes: the one-line replies of a relayed message (a backend's
/// `250 2.1.0 Ok`) cost no allocation.
///
/// The wire form: when `head > 0` the buffer holds the whole reply line as
/// `write_to` writes it, less its CRLF (`250 2.1.0 Ok`), and the text
/// starts at `head`. Only `parse` makes one (`Reply::wired` says when);
/// anything that changes the text or the enhanced code goes through a
/// method that first turns it back into the plain form (`unwire`).
/// `enhanced` is private for that reason; `code` is checked against the
/// line's digits before the line is copied.
#[derive(Clone)]
pub struct Reply {
    pub code: u16,
    enhanced: Option<EnhancedCode>,
    text: SmallVec<[u8; INLINE]>,
    head: u8,
}

impl PartialEq for Reply {
    /// The same code, enhanced code and text, whichever form holds them.
    fn eq(&self, other: &Reply) -> bool {
        self.code == other.code
            && self.enhanced == other.enhanced
            && self.text_bytes() == other.text_bytes()
    }
}

impl Eq for Reply {}

/// Bytes of reply text kept without a heap allocation.
const INLINE: usize = 48;

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("code", &self.code)
            .field("enhanced", &self.enhanced)
            .field("lines", &self.lines().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a backend reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line")]
    Malformed,
    #[error("reply line too long")]
    LineTooLong,
    #[error("reply has too many lines")]
    TooManyLines,
}

impl Reply {
    /// A one-line reply with an enhanced code.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl AsRef<str>) -> Reply {
        let mut r = Reply {
            code,
            enhanced: Some(enhanced),
            text: SmallVec::new(),
            head: 0,
        };
        r.push_text(text.as_ref());
        r
    }
    /// A reply of several lines (none: one empty line).
    pub fn from_lines<S: AsRef<str>>(
        code: u16,
        enhanced: Option<EnhancedCode>,
        lines: impl IntoIterator<Item = S>,
    ) -> Reply {
        let mut r = Reply {
            code,
            enhanced,
            text: SmallVec::new(),
            head: 0,
        };
        for (i, line) in lines.into_iter().enumerate() {
            if i > 0 {
                r.text.push(b'\n');
            }
            r.push_text(line.as_ref());
        }
        r
    }
    /// Appends `text` to the last line; a CR or LF in it is dropped, so it
    /// can never break the reply's framing.
    pub fn push_text(&mut self, text: &str) {
        self.unwire();
        let mut t = text.as_bytes();
        while let Some(k) = memchr::memchr2(b'\r', b'\n', t) {
            self.text.extend_from_slice(&t[..k]);
            t = &t[k + 1..];
        }
        self.text.extend_from_slice(t);
    }
    /// The text lines (at least one, maybe empty).
    pub fn lines(&self) -> impl Iterator<Item = &str> + '_ {
        self.text_str().split('\n')
    }
    /// The first line of text.
    pub fn first_line(&self) -> &str {
        self.lines().next().unwrap_or("")
    }
    fn text_str(&self) -> &str {
        // Only ever filled from `&str`s and valid UTF-8 (`parse` converts
        // lossily; the wire form is ASCII), so this never fails.
        std::str::from_utf8(self.text_bytes()).unwrap_or("")
    }
    /// The text lines, `\n` between them (without the wire form's head).
    fn text_bytes(&self) -> &[u8] {
        &self.text[usize::from(self.head)..]
    }
    /// The enhanced status code, if the reply has one.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }
    /// Sets (or removes) the enhanced status code.
    pub fn set_enhanced(&mut self, enhanced: Option<EnhancedCode>) {
        if enhanced != self.enhanced {
            self.unwire();
            self.enhanced = enhanced;
        }
    }
    /// The plain form: the buffer holds only the text.
    fn unwire(&mut self) {
        if self.head > 0 {
            self.text.drain(..usize::from(self.head));
            self.head = 0;
        }
    }
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
    /// The text lines joined with a single space (for logs and traces).
    pub fn text(&self) -> String {
        self.text_str().replace('\n', " ")
    }
    /// Appends the wire form (`250-...\r\n` ... `250 ...\r\n`), each line
    /// carrying the enhanced code when there is one.
    ///
    /// A reply without lines is written as one line with empty text. An empty
    /// text line is written without a trailing space (`250 2.0.0\r\n`).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // The wire form: the line as it came, when its code is still ours.
        if self.head > 0 && kept_code(&self.text) == self.code {
            out.reserve(self.text.len() + 2);
            out.extend_from_slice(&self.text);
            out.extend_from_slice(b"\r\n");
            return;
        }
        // Each line: its head (`250-`, `250 2.1.0 `) built on the stack,
        // then three copies (a relayed message's replies are one line).
        let mut rest: &[u8] = self.text_bytes();
        loop {
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            let mut head = [0u8; 24];
            let mut k = dec_into(&mut head, self.code);
            head[k] = if next.is_none() { b' ' } else { b'-' };
            k += 1;
            if let Some(enh) = &self.enhanced {
                k += enh.spell(&mut head[k..]);
                if !line.is_empty() {
                    head[k] = b' ';
                    k += 1;
                }
            }
            // The text holds no CR, and LF only between lines.
            out.reserve(k + line.len() + 2);
            out.extend_from_slice(&head[..k]);
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            match next {
                Some(n) => rest = n,
                None => return,
            }
        }
    }
    /// Parses one complete (possibly multi-line) reply from the front of
    /// `buf`. `Ok(None)`: incomplete, read more. `Ok(Some((reply, used)))`:
    /// `used` bytes were consumed. Enhanced codes are recognised only when the
    /// first digit matches the reply code's class. Bounded: line length
    /// `MAX_REPLY_LINE`, at most `MAX_REPLY_LINES` lines.
    ///
    /// Lines may end with CRLF or a lone LF. Every line must carry the same
    /// code. The enhanced code is taken from the first line and stripped from
    /// every line that starts with the same one. Text that is not UTF-8 is
    /// converted lossily.
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        if buf.is_empty() {
            // Nothing read yet (the relay asks before its first read).
            return Ok(None);
        }
        // A complete one-line reply (the usual case) in one pass.
        if let Some((lf, plain)) = first_line(buf) {
            let line = strip_cr(&buf[..lf]);
            if line.get(3) != Some(&b'-') {
                let (code, _, text) = split_line(line)?;
                if plain {
                    if let Some(reply) = Reply::wired(code, line, text) {
                        return Ok(Some((reply, lf + 1)));
                    }
                }
                let mut reply = Reply {
                    code,
                    enhanced: None,
                    text: SmallVec::new(),
                    head: 0,
                };
                reply.push_line(0, text, &mut ([0; 16], 0));
                return Ok(Some((reply, lf + 1)));
            }
        }
        // Pass 1: validate and find the end without allocating, so that an
        // incomplete reply costs nothing.
        let mut pos = 0;
        let mut count = 0usize;
        let mut code = 0u16;
        let used = loop {
            let rest = &buf[pos..];
            let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
            let Some(lf) = memchr::memchr(b'\n', window) else {
                if rest.len() >= MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                // Validate what we have so far so that garbage fails early.
                check_partial(rest, if count == 0 { None } else { Some(code) })?;
                return Ok(None);
            };
            let line = strip_cr(&rest[..lf]);
            let (c, last, _) = split_line(line)?;
            if count == 0 {
                code = c;
            } else if c != code {
                return Err(ReplyError::Malformed);
            }
            count += 1;
            pos += lf + 1;
            if last {
                break pos;
            }
            if count >= MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
        };

        // Pass 2: build the reply.
        let mut reply = Reply {
            code,
            enhanced: None,
            text: SmallVec::new(),
            head: 0,
        };
        let mut enh = ([0; 16], 0);
        for (i, raw) in buf[..used].split_inclusive(|&b| b == b'\n').enumerate() {
            let line = strip_cr(&raw[..raw.len() - 1]);
            let (_, _, text) = split_line(line)?;
            reply.push_line(i, text, &mut enh);
        }
        Ok(Some((reply, used)))
    }

    /// The wire form of the one-line reply `line` (code `code`, `text` after
    /// the code's space), when writing it out again would give back the
    /// same bytes: an enhanced code of the code's class spelled without
    /// leading zeros, then nothing or a space and some text (or, for a 1xx
    /// or 3xx reply, which gets no enhanced code, any text after the
    /// space). `line` is plain (`first_line`: ASCII, no CR, no longer than
    /// the inline buffer). Otherwise None (`push_line` builds the plain
    /// form).
    fn wired(code: u16, line: &[u8], text: &[u8]) -> Option<Reply> {
        debug_assert!(line.len() <= INLINE && line.is_ascii() && !line.contains(&b'\r'));
        let (enhanced, head) = match parse_enhanced(text, code) {
            Some((enh, len)) => {
                // Five bytes are a digit each, spelled as `write_to` would.
                let spelled = len == 5 || len == 3 + digits(enh.1) + digits(enh.2);
                // `250 2.1.0 ` with nothing after: written without the space.
                if !spelled || text.len() == len + 1 {
                    return None;
                }
                (Some(enh), (4 + len + 1).min(line.len()))
            }
            // A 1xx or 3xx reply (354) gets no enhanced code
            // (`ensure_enhanced`): its text follows the code's space.
            None if matches!(code / 100, 1 | 3) && line.len() > 3 => (None, 4),
            None => return None,
        };
        Some(Reply {
            code,
            enhanced,
            text: SmallVec::from_slice(line),
            head: head as u8,
        })
    }

    /// Appends the text of reply line `i`: the enhanced code is taken from
    /// the first line (`enh` keeps its spelling, `x.y.z` at most 9 bytes)
    /// and stripped from every line that starts with it.
    fn push_line(&mut self, i: usize, text: &[u8], enh: &mut ([u8; 16], usize)) {
        // A CR inside the text is dropped (`push_text`): drop it before the
        // enhanced code is looked for, so that the reply reads the same when
        // written again (`250 2.1.0\rx` is `250 2.1.0x`).
        let owned;
        let mut text = if memchr::memchr(b'\r', text).is_some() {
            owned = text
                .iter()
                .copied()
                .filter(|&b| b != b'\r')
                .collect::<Vec<u8>>();
            &owned[..]
        } else {
            text
        };
        if i == 0 {
            if let Some((code, len)) = parse_enhanced(text, self.code) {
                self.enhanced = Some(code);
                enh.0[..len].copy_from_slice(&text[..len]);
                enh.1 = len;
            }
        }
        let spelled = &enh.0[..enh.1];
        if self.enhanced.is_some() && text.starts_with(spelled) {
            let after = &text[spelled.len()..];
            if after.is_empty() {
                text = after;
            } else if after[0] == b' ' {
                text = &after[1..];
            }
        }
        if i > 0 {
            self.text.push(b'\n');
        }
        // No CR is left and the line holds no LF: plain ASCII (nearly every
        // backend's text) is taken as it is.
        if text.is_ascii() {
            self.text.extend_from_slice(text);
            return;
        }
        match std::str::from_utf8(text) {
            Ok(t) => self.push_text(t),
            Err(_) => self.push_text(&String::from_utf8_lossy(text)),
        }
    }
}

/// The command a backend's reply answers: it decides the enhanced status
/// code the reply gets when it came without one (`Reply::ensure_enhanced`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    Mail,
    Rcpt,
    /// The DATA command itself (its 354 or its refusal).
    Data,
    /// The message: DATA's final reply after the dot, a BDAT chunk's reply.
    Message,
}

impl Reply {
    /// Gives a reply that has no enhanced status code one, so that a client
    /// told ENHANCEDSTATUSCODES gets one on every 2xx, 4xx and 5xx reply
    /// (RFC 2034 section 3), whatever the backend sent:
    ///
    /// | reply | MAIL  | RCPT  | DATA  | message |
    /// |-------|-------|-------|-------|---------|
    /// | 2xx   | 2.1.0 | 2.1.5 | 2.0.0 | 2.0.0   |
    /// | 4xx   | 4.0.0 | 4.0.0 | 4.0.0 | 4.0.0   |
    /// | 5xx   | 5.0.0 | 5.0.0 | 5.0.0 | 5.0.0   |
    ///
    /// 2.1.0 and 2.1.5 are what Postfix and Exim's own codes say for an
    /// accepted sender and recipient (RFC 3463 X.1.0 other address status,
    /// X.1.5 destination address valid). A refusal's code says why, which
    /// only the backend knows: X.0.0 is RFC 3463's code for a status of
    /// which only the class is known. A 1xx or 3xx reply (354) is left
    /// alone: RFC 2034 asks for none. A reply with a code keeps it, and
    /// the text is never touched: no allocation either way.
    pub fn ensure_enhanced(&mut self, answered: Answered) {
        if self.enhanced.is_some() {
            return;
        }
        // A wire form without an enhanced code is a 1xx or 3xx, which
        // gets none below; a code changed since is caught by `write_to`.
        self.enhanced = match (self.code / 100, answered) {
            (2, Answered::Mail) => Some(EnhancedCode(2, 1, 0)),
            (2, Answered::Rcpt) => Some(EnhancedCode(2, 1, 5)),
            (2, _) => Some(EnhancedCode(2, 0, 0)),
            (4, _) => Some(EnhancedCode(4, 0, 0)),
            (5, _) => Some(EnhancedCode(5, 0, 0)),
            _ => None,
        };
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(enh) = &self.enhanced {
            write!(f, " {enh}")?;
        }
        for line in self.lines() {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// Longest backend reply line accepted (bytes, with CRLF).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines accepted in one backend reply.
pub const MAX_REPLY_LINES: usize = 128;

/// Fast path for a fixed one-line reply: appends `"{code} {enh} {text}\r\n"`
/// with no allocation. An empty `enhanced` is left out (`"{code} {text}\r\n"`).
pub fn write_reply(out: &mut Vec<u8>, code: u16, enhanced: &str, text: &str) {
    out.reserve(5 + 1 + enhanced.len() + 1 + text.len() + 2);
    write_dec(out, code);
    out.push(b' ');
    if !enhanced.is_empty() {
        out.extend_from_slice(enhanced.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The code a kept line starts with (its three digits, checked by
/// `parse`), for `write_to`'s check that the reply's code is still it:
/// cheaper than spelling the code (three divisions) and comparing.
#[inline]
fn kept_code(line: &[u8]) -> u16 {
    let d = |i: usize| u16::from(line[i].wrapping_sub(b'0'));
    d(0) * 100 + d(1) * 10 + d(2)
}

/// How many decimal digits `n` (at most 999) is written with.
fn digits(n: u16) -> usize {
    match n {
        0..=9 => 1,
        10..=99 => 2,
        _ => 3,
    }
}

/// Appends the decimal form of `n` without allocating.
fn write_dec(out: &mut Vec<u8>, n: u16) {
    let mut buf = [0u8; 5];
    let k = dec_into(&mut buf, n);
    out.extend_from_slice(&buf[..k]);
}

/// Where the first line of `buf` ends (its LF, within `MAX_REPLY_LINE`
/// bytes), and whether it is plain enough for `Reply::wired`: ASCII, no
/// CR but one right before the LF, at most `INLINE` bytes without its
/// ending (a longer line would allocate where its text alone might not).
/// One `memchr2` for the first CR or LF answers both the end and the CR
/// question of a usual reply (`250 2.0.0 Ok: queued as 4XyZ\r\n`): a
/// `memchr` for each cost twice as much (RESULTS.md section 35).
#[inline]
fn first_line(buf: &[u8]) -> Option<(usize, bool)> {
    let window = &buf[..buf.len().min(MAX_REPLY_LINE)];
    let i = memchr::memchr2(b'\r', b'\n', window)?;
    let plain = |end: usize| end <= INLINE && window[..end].is_ascii();
    if window[i] == b'\n' {
        return Some((i, plain(i)));
    }
    if window.get(i + 1) == Some(&b'\n') {
        return Some((i + 1, plain(i)));
    }
    // A CR inside the line: not plain.
    memchr::memchr(b'\n', &window[i + 1..]).map(|k| (i + 1 + k, false))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits a reply line (without its line ending) into code, "is the last
/// line" and text.
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    if line.len() < 3 {
        return Err(ReplyError::Malformed);
    }
    let code = parse_code(&line[..3]).ok_or(ReplyError::Malformed)?;
    match line.get(3) {
        None => Ok((code, true, b"")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::Malformed),
    }
}

fn parse_code(d: &[u8]) -> Option<u16> {
    match d {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// Checks the start of an incomplete line, so that a peer that is not
/// speaking SMTP is noticed before it fills the buffer.
fn check_partial(rest: &[u8], code: Option<u16>) -> Result<(), ReplyError> {
    let rest = strip_cr(rest);
    for (i, &b) in rest.iter().take(3).enumerate() {
        let ok = match i {
            0 => (b'1'..=b'5').contains(&b),
            _ => b.is_ascii_digit(),
        };
        if !ok {
            return Err(ReplyError::Malformed);
        }
    }
    if rest.len() >= 3 {
        let c = parse_code(&rest[..3]).ok_or(ReplyError::Malformed)?;
        if code.is_some_and(|code| code != c) {
            return Err(ReplyError::Malformed);
        }
    }
    if rest.len() >= 4 && rest[3] != b' ' && rest[3] != b'-' {
        return Err(ReplyError::Malformed);
    }
    Ok(())
}

/// Parses `x.y.z` followed by a space or the end of the text, where `x` is
/// the first digit of `code`. Returns the code and the length of `x.y.z`.
#[inline]
fn parse_enhanced(text: &[u8], code: u16) -> Option<(EnhancedCode, usize)> {
    let class = (code / 100) as u8;
    // The usual spelling, a digit each (`2.1.0`), inline; longer numbers
    // in a call of their own.
    if let [c, b'.', s @ b'0'..=b'9', b'.', d @ b'0'..=b'9', rest @ ..] = text {
        if *c == b'0' + class && matches!(rest.first(), None | Some(b' ')) {
            let (s, d) = (u16::from(s - b'0'), u16::from(d - b'0'));
            return Some((EnhancedCode(class, s, d), 5));
        }
    }
    parse_enhanced_long(text, class)
}

/// `parse_enhanced` for a code spelled with more than one digit in its
/// second or third number (`5.7.26`), or for what is none.
#[inline(never)]
fn parse_enhanced_long(text: &[u8], class: u8) -> Option<(EnhancedCode, usize)> {
    let first = *text.first()?;
    if first != b'0' + class || text.get(1) != Some(&b'.') {
        return None;
    }
    let (subject, n1) = parse_num3(&text[2..])?;
    if text.get(2 + n1) != Some(&b'.') {
        return None;
    }
    let (detail, n2) = parse_num3(&text[3 + n1..])?;
    let len = 3 + n1 + n2;
    match text.get(len) {
        None | Some(b' ') => Some((EnhancedCode(class, subject, detail), len)),
        Some(_) => None,
    }
}

/// One to three decimal digits (0-999): value and digit count.
fn parse_num3(s: &[u8]) -> Option<(u16, usize)> {
    let n = s.iter().take(4).take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 3 {
        return None;
    }
    let v = s[..n]
        .iter()
        .fold(0u16, |v, &d| v * 10 + u16::from(d - b'0'));
    Some((v, n))
}

#[cfg(test)]
mod tests {
    #[test]
    fn texts_match_display() {
        for e in [
            EnhancedCode(2, 0, 0),
            EnhancedCode(5, 7, 1),
            EnhancedCode(4, 999, 999),
            EnhancedCode(255, 65535, 65535),
        ] {
            assert_eq!(e.text(&mut [0; 17]), e.to_string());
        }
        for c in [0u16, 7, 250, 554, 65535] {
            assert_eq!(code_text(c, &mut [0; 5]), c.to_string());
        }
    }

    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn parse_all(s: &str) -> (Reply, usize) {
        Reply::parse(s.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn new_and_classes() {
        let r = Reply::new(550, EnhancedCode(5, 5, 1), "no");
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 5, 1)));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["no"]);
        assert!(r.is_permanent() && !r.is_transient() && !r.is_positive());
        let r = Reply::new(451, EnhancedCode(4, 3, 0), "later");
        assert!(r.is_transient() && !r.is_permanent() && !r.is_positive());
        for code in [220, 250, 354] {
            let r = Reply::new(code, EnhancedCode(2, 0, 0), "ok");
            assert!(r.is_positive() && !r.is_transient() && !r.is_permanent());
        }
        let r = Reply::new(199, EnhancedCode(2, 0, 0), "odd");
        assert!(!r.is_positive() && !r.is_transient() && !r.is_permanent());
    }

    #[test]
    fn write_single_and_multi() {
        let r = Reply::new(502, EnhancedCode(5, 5, 1), "Command not recognized");
        assert_eq!(wire(&r), "502 5.5.1 Command not recognized\r\n");
        let r = Reply::from_lines(250, None, vec!["mx.example", "PIPELINING", "8BITMIME"]);
        assert_eq!(
            wire(&r),
            "250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
        let r = Reply::from_lines(550, Some(EnhancedCode(5, 7, 1)), vec!["first", "last"]);
        assert_eq!(wire(&r), "550-5.7.1 first\r\n550 5.7.1 last\r\n");
        let r = Reply::from_lines(421, Some(EnhancedCode(4, 100, 999)), Vec::<&str>::new());
        assert_eq!(wire(&r), "421 4.100.999\r\n");
        let r = Reply::from_lines(250, None, vec![""]);
        assert_eq!(wire(&r), "250 \r\n");
    }

    #[test]
    fn write_appends_and_strips_crlf_in_text() {
        let mut out = b"x".to_vec();
        let r = Reply::new(250, EnhancedCode(2, 0, 0), "a\r\n250 b\nc\r");
        r.write_to(&mut out);
        assert_eq!(out, b"x250 2.0.0 a250 bc\r\n");
    }

    #[test]
    fn write_reply_fast_path() {
        let mut out = Vec::new();
        write_reply(&mut out, 250, "2.0.0", "Ok");
        assert_eq!(out, b"250 2.0.0 Ok\r\n");
        out.clear();
        write_reply(&mut out, 354, "", "End data with <CR><LF>.<CR><LF>");
        assert_eq!(out, b"354 End data with <CR><LF>.<CR><LF>\r\n");
        out.clear();
        write_reply(&mut out, 0, "", "");
        assert_eq!(out, b"0 \r\n");
    }

    #[test]
    fn ensure_enhanced_adds_a_code_only_when_missing() {
        let cases = [
            ("250 OK\r\n", Answered::Mail, "250 2.1.0 OK\r\n"),
            ("250 Accepted\r\n", Answered::Rcpt, "250 2.1.5 Accepted\r\n"),
            (
                "250 OK id=1\r\n",
                Answered::Message,
                "250 2.0.0 OK id=1\r\n",
            ),
            (
                "550 no such user\r\n",
                Answered::Rcpt,
                "550 5.0.0 no such user\r\n",
            ),
            ("451 later\r\n", Answered::Mail, "451 4.0.0 later\r\n"),
            ("554 no\r\n", Answered::Data, "554 5.0.0 no\r\n"),
            ("250\r\n", Answered::Rcpt, "250 2.1.5\r\n"),
            (
                "250-a\r\n250 b\r\n",
                Answered::Message,
                "250-2.0.0 a\r\n250 2.0.0 b\r\n",
            ),
            ("354 go ahead\r\n", Answered::Data, "354 go ahead\r\n"),
            ("250 2.1.0 Ok\r\n", Answered::Rcpt, "250 2.1.0 Ok\r\n"),
            (
                "550 5.1.1 unknown\r\n",
                Answered::Rcpt,
                "550 5.1.1 unknown\r\n",
            ),
        ];
        for (raw, answered, want) in cases {
            let (mut r, _) = parse_all(raw);
            r.ensure_enhanced(answered);
            assert_eq!(wire(&r), want, "{raw:?} {answered:?}");
        }
    }

    #[test]
    fn one_line_replies_are_written_as_before() {
        let w = |r: &Reply| {
            let mut v = Vec::new();
            r.write_to(&mut v);
            String::from_utf8(v).unwrap()
        };
        let r = |code, enh: Option<EnhancedCode>, text: &str| {
            let mut r = Reply::parse(format!("{code} x\r\n").as_bytes())
                .unwrap()
                .unwrap()
                .0;
            r.set_enhanced(enh);
            r.text.clear();
            r.push_text(text);
            r
        };
        assert_eq!(
            w(&r(250, Some(EnhancedCode(2, 0, 0)), "Ok")),
            "250 2.0.0 Ok\r\n"
        );
        assert_eq!(w(&r(250, Some(EnhancedCode(2, 0, 0)), "")), "250 2.0.0\r\n");
        assert_eq!(w(&r(550, None, "no")), "550 no\r\n");
        assert_eq!(w(&r(550, None, "")), "550 \r\n");
        assert_eq!(
            w(&r(553, Some(EnhancedCode(5, 123, 999)), "grüße")),
            "553 5.123.999 grüße\r\n"
        );
        // Non-ASCII text from a backend keeps its bytes; invalid UTF-8 is
        // replaced, as before.
        let (p, _) = Reply::parse("250 2.1.5 empfänger ok\r\n".as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(w(&p), "250 2.1.5 empfänger ok\r\n");
        let (p, _) = Reply::parse(b"250 2.1.5 a\xffb\r\n").unwrap().unwrap();
        assert_eq!(w(&p), "250 2.1.5 a\u{fffd}b\r\n");
    }

    #[test]
    fn round_trip() {
        let r = Reply::from_lines(
            250,
            Some(EnhancedCode(2, 1, 5)),
            vec!["one", "two words", "", "three"],
        );
        let w = wire(&r);
        let (p, used) = parse_all(&w);
        assert_eq!(used, w.len());
        assert_eq!(p, r);
    }

    #[test]
    fn parse_single_line() {
        let (r, used) = parse_all("250 2.1.0 Ok\r\n");
        assert_eq!(used, 14);
        assert_eq!(r.code, 250);
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 1, 0)));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["Ok"]);

        let (r, _) = parse_all("354 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(r.code, 354);
        assert_eq!(r.enhanced, None);
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["End data with <CR><LF>.<CR><LF>"]
        );
    }

    #[test]
    fn parse_bare_code_and_empty_text() {
        let (r, used) = parse_all("250\r\n");
        assert_eq!((r.code, used), (250, 5));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec![""]);
        let (r, _) = parse_all("250 \r\n");
        assert_eq!(r.lines().collect::<Vec<_>>(), vec![""]);
        let (r, _) = parse_all("250 2.0.0\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 0, 0)));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec![""]);
    }

    #[test]
    fn parse_multi_line_ehlo() {
        let s = "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\nnext";
        let (r, used) = parse_all(s);
        assert_eq!(&s[used..], "next");
        assert_eq!(r.enhanced, None);
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec![
                "mx.example.org",
                "PIPELINING",
                "SIZE 10240000",
                "ENHANCEDSTATUSCODES",
                "8BITMIME"
            ]
        );
    }

    #[test]
    fn parse_multi_line_enhanced_stripped() {
        let s = "550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last\r\n";
        let (r, used) = parse_all(s);
        assert_eq!(used, s.len());
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 7, 1)));
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["first", "second", "last"]
        );
        // A line carrying a different (or no) enhanced code keeps its text.
        let s = "550-5.7.1 first\r\n550-no code\r\n550 5.1.1 other\r\n";
        let (r, _) = parse_all(s);
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["first", "no code", "5.1.1 other"]
        );
    }

    #[test]
    fn parse_enhanced_rules() {
        // Class mismatch: not an enhanced code.
        let (r, _) = parse_all("250 5.0.0 odd\r\n");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["5.0.0 odd"]);
        // Ranges.
        let (r, _) = parse_all("451 4.999.999 x\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(4, 999, 999)));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["x"]);
        let (r, _) = parse_all("451 4.1000.0 x\r\n");
        assert_eq!(r.enhanced, None);
        let (r, _) = parse_all("451 4.1.1000 x\r\n");
        assert_eq!(r.enhanced, None);
        let (r, _) = parse_all("451 4.1.1x\r\n");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["4.1.1x"]);
        let (r, _) = parse_all("451 4..1 x\r\n");
        assert_eq!(r.enhanced, None);
        let (r, _) = parse_all("451 4.1. x\r\n");
        assert_eq!(r.enhanced, None);
        let (r, _) = parse_all("451 41.1.1 x\r\n");
        assert_eq!(r.enhanced, None);
        let (r, _) = parse_all("451 4.01.001 x\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(4, 1, 1)));
    }

    #[test]
    fn first_line_ends_and_plainness() {
        // (input, LF's index and plain)
        type Case<'a> = (&'a [u8], Option<(usize, bool)>);
        let long = format!("250 {}\r\n", "x".repeat(INLINE - 4));
        let longer = format!("250 {}\r\n", "x".repeat(INLINE - 3));
        let cases: [Case; 10] = [
            (b"", None),
            (b"250 ok", None),
            (b"250 ok\r", None),
            (b"250 ok\r\n", Some((7, true))),
            (b"250 ok\n250 more\r\n", Some((6, true))),
            (b"250 o\rk\r\n", Some((8, false))),
            (b"250 o\rk", None),
            ("250 \u{e9}\r\n".as_bytes(), Some((7, false))),
            (long.as_bytes(), Some((INLINE + 1, true))),
            (longer.as_bytes(), Some((INLINE + 2, false))),
        ];
        for (input, want) in cases {
            assert_eq!(
                first_line(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // A one-digit enhanced code and a longer one read the same way.
        let (r, _) = parse_all("250 2.1.0 Ok\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 1, 0)));
        let (r, _) = parse_all("550 5.7.26 Unauthenticated\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 7, 26)));
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["Unauthenticated"]);
        let (r, _) = parse_all("250 2.1.05 x\r\n");
        assert_eq!(r.enhanced, Some(EnhancedCode(2, 1, 5)));
        assert_eq!(wire(&r), "250 2.1.5 x\r\n");
    }

    #[test]
    fn parse_lf_only_and_mixed() {
        let s = "250-a\n250-b\r\n250 c\n";
        let (r, used) = parse_all(s);
        assert_eq!(used, s.len());
        assert_eq!(r.lines().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }

    #[test]
    fn parse_incomplete() {
        let s = "250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
        for i in 0..s.len() {
            assert_eq!(Reply::parse(&s.as_bytes()[..i]), Ok(None), "prefix {i}");
        }
        assert!(Reply::parse(s.as_bytes()).unwrap().is_some());
        // An incomplete line ending in CR is still incomplete.
        assert_eq!(Reply::parse(b"250 ok\r"), Ok(None));
    }

    #[test]
    fn parse_malformed() {
        for s in [
            "25\r\n",
            "abc ok\r\n",
            "250x ok\r\n",
            "250_ok\r\n",
            "\r\n",
            "650 nope\r\n",
            "099 nope\r\n",
            "250-a\r\n251 b\r\n",
            "250-a\r\n\r\n",
            "250-a\r\n550-b\r\n250 c\r\n",
        ] {
            assert_eq!(
                Reply::parse(s.as_bytes()),
                Err(ReplyError::Malformed),
                "{s:?}"
            );
        }
        // Garbage is noticed before the line is complete.
        assert_eq!(Reply::parse(b"HTTP/1.1"), Err(ReplyError::Malformed));
        assert_eq!(Reply::parse(b"250-a\r\n251"), Err(ReplyError::Malformed));
        assert_eq!(Reply::parse(b"250x"), Err(ReplyError::Malformed));
    }

    #[test]
    fn parse_too_long() {
        // Exactly the limit, CRLF included: fine.
        let mut s = b"250 ".to_vec();
        s.resize(MAX_REPLY_LINE - 2, b'a');
        s.extend_from_slice(b"\r\n");
        assert_eq!(s.len(), MAX_REPLY_LINE);
        assert!(Reply::parse(&s).unwrap().is_some());
        // One more: too long.
        let mut s = b"250 ".to_vec();
        s.resize(MAX_REPLY_LINE - 1, b'a');
        s.extend_from_slice(b"\r\n");
        assert_eq!(Reply::parse(&s), Err(ReplyError::LineTooLong));
        // Incomplete but already too long.
        let mut s = b"250-ok\r\n250 ".to_vec();
        s.resize(8 + MAX_REPLY_LINE, b'a');
        assert_eq!(Reply::parse(&s), Err(ReplyError::LineTooLong));
        // Incomplete, not yet too long.
        s.truncate(8 + MAX_REPLY_LINE - 1);
        assert_eq!(Reply::parse(&s), Ok(None));
    }

    #[test]
    fn parse_too_many_lines() {
        let mut s = String::new();
        for _ in 0..MAX_REPLY_LINES - 1 {
            s.push_str("250-x\r\n");
        }
        let mut ok = s.clone();
        ok.push_str("250 end\r\n");
        let (r, _) = parse_all(&ok);
        assert_eq!(r.lines().count(), MAX_REPLY_LINES);
        s.push_str("250-x\r\n");
        assert_eq!(Reply::parse(s.as_bytes()), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn parse_non_utf8_lossy() {
        let (r, _) = Reply::parse(b"550 5.1.1 bad \xff\xfe user\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["bad \u{fffd}\u{fffd} user"]
        );
    }

    #[test]
    fn parse_garbage_never_panics() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let alphabet = b"0123456789 -.\r\n25x";
        for _ in 0..20_000 {
            let len = (xorshift(&mut seed) % 40) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    let r = xorshift(&mut seed);
                    if r.is_multiple_of(4) {
                        r as u8 >> 3
                    } else {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            if let Ok(Some((_, used))) = Reply::parse(&buf) {
                assert!(used <= buf.len());
            }
        }
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn display() {
        let r = Reply::new(550, EnhancedCode(5, 7, 1), "denied");
        assert_eq!(r.to_string(), "550 5.7.1 denied");
        assert_eq!(r.text(), "denied");
    }

    /// Fuzz finding (fuzz/README.md, `reply` target): a CR inside the text
    /// hid the enhanced code from the parser, and `push_text` then dropped
    /// the CR, so the reply written again (`550 5.1.0x`) parsed to another
    /// reply (one with the enhanced code).
    #[test]
    fn cr_inside_text_is_dropped_before_the_enhanced_code() {
        let wire = b"550-5.10.0\r .11'..\r 51\n550 5t\xff wo\r\n";
        let (r, used) = Reply::parse(wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 10, 0)));
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            [".11'.. 51", "5t\u{fffd} wo"]
        );
        let mut again = Vec::new();
        r.write_to(&mut again);
        assert_eq!(Reply::parse(&again), Ok(Some((r, again.len()))));
        let (r, _) = Reply::parse(b"250 2.1.0\rx\r\n").unwrap().unwrap();
        assert_eq!((r.enhanced, r.first_line()), (None, "2.1.0x"));
    }

    /// The wire form changes nothing a reader sees: every one-line reply
    /// writes the same bytes, reads the same text and compares equal
    /// whether `parse` kept its line or built the plain form.
    #[test]
    fn wire_form_writes_what_the_plain_form_writes() {
        let codes = ["250", "354", "451", "550", "221", "334"];
        let enh = [
            "",
            "2.1.0",
            "2.01.0",
            "2.1.00",
            "5.7.1",
            "4.999.999",
            "2.0.0",
            "5.1.1",
            "2.1",
        ];
        let seps = ["", " ", "  ", "\t"];
        let texts: [&[u8]; 8] = [
            b"",
            b"Ok",
            b" Ok",
            b"Ok: queued as 4XyZ",
            b"a\rb",
            "grüße".as_bytes(),
            b"x\xffy",
            b" ",
        ];
        let mut wired = 0;
        for c in codes {
            for e in enh {
                for sep in seps {
                    for t in texts {
                        for end in ["\r\n", "\n"] {
                            let line = [format!("{c} {e}{sep}").as_bytes(), t].concat();
                            let bytes = [&line[..], end.as_bytes()].concat();
                            let Ok(Some((r, used))) = Reply::parse(&bytes) else {
                                continue;
                            };
                            assert_eq!(used, bytes.len());
                            let mut plain = r.clone();
                            plain.unwire();
                            wired += usize::from(r.head > 0);
                            let raw = String::from_utf8_lossy(&bytes);
                            assert_eq!(wire(&r), wire(&plain), "{raw:?}");
                            assert_eq!(r, plain, "{raw:?}");
                            assert_eq!(r.text(), plain.text(), "{raw:?}");
                            assert_eq!(r.enhanced(), plain.enhanced(), "{raw:?}");
                            if r.head > 0 {
                                // Passed through: the line exactly as it came.
                                let want = [&line[..], b"\r\n"].concat();
                                assert_eq!(wire(&r).as_bytes(), &want[..], "{raw:?}");
                            }
                        }
                    }
                }
            }
        }
        assert!(wired > 20, "{wired}");
    }

    /// A reply kept in its wire form that is changed afterwards is written
    /// as changed.
    #[test]
    fn wire_form_follows_changes() {
        let (mut r, _) = parse_all("250 2.1.0\r\n");
        assert!(r.head > 0);
        r.push_text("(trace 1)");
        assert_eq!(wire(&r), "250 2.1.0 (trace 1)\r\n");
        let (mut r, _) = parse_all("550 5.1.1 unknown user\r\n");
        r.set_enhanced(Some(EnhancedCode(5, 7, 1)));
        assert_eq!(wire(&r), "550 5.7.1 unknown user\r\n");
        r.set_enhanced(None);
        assert_eq!(wire(&r), "550 unknown user\r\n");
        let (mut r, _) = parse_all("451 4.3.0 later\r\n");
        r.code = 421;
        assert_eq!(wire(&r), "421 4.3.0 later\r\n");
        // Past the inline buffer: the plain form (no allocation where the
        // text alone fits), the same bytes.
        let long = format!("250 2.0.0 {}\r\n", "q".repeat(INLINE - 9));
        let (r, _) = parse_all(&long);
        assert_eq!((r.head, wire(&r)), (0, long.clone()));
        assert!(!r.text.spilled());
        let (mut r, _) = parse_all("354 go ahead\r\n");
        assert!(r.head > 0);
        r.code = 554;
        r.ensure_enhanced(Answered::Data);
        assert_eq!(wire(&r), "554 5.0.0 go ahead\r\n");
    }
}
