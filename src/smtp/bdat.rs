//! BDAT content (RFC 3030 CHUNKING), sans-IO: `ChunkChecker` applies the
//! DATA content rules (bare CR / LF policy, line length, size) to the
//! octets of the chunks, which have no dot-stuffing and no terminator, the
//! same however the chunks split the message; `Stuffer` turns checked
//! content into the DATA wire form for a backend without CHUNKING, so that
//! nothing in a chunk can end that DATA early; `bdat_command` writes the
//! BDAT line for a backend with CHUNKING. Both are tested against
//! reference models, their input whole, cut at every one or two points,
//! and byte at a time.

use super::data::{BareLineEndings, DataOptions};

/// Checks the content of a BDAT transaction, chunk after chunk.
///
/// Output, as a function of the whole content (the same however it is
/// split into `feed` calls), once `finish` was called:
/// - Reject mode: the content up to the first bare CR / LF (exclusive);
///   the caller must not deliver it when `bare_line_ending_seen`.
/// - Normalize mode: the content with each bare CR or LF made CRLF.
///
/// Either way the output holds CR and LF only as CRLF pairs. A CR at the
/// end of a `feed` is held back until the next byte (or `finish`) says
/// whether it starts a CRLF pair.
#[derive(Debug)]
pub struct ChunkChecker {
    mode: BareLineEndings,
    /// Most content bytes (CR / LF excluded) a line may have.
    line_limit: usize,
    line_len: usize,
    /// The last byte fed was a CR (not yet in the output).
    held_cr: bool,
    size: u64,
    bare_seen: bool,
    long_seen: bool,
    /// Reject mode, after the first bare CR / LF: output stopped for good.
    stopped: bool,
}

impl ChunkChecker {
    pub fn new(opts: DataOptions) -> ChunkChecker {
        ChunkChecker {
            mode: opts.bare_line_endings,
            line_limit: if opts.max_line == 0 {
                usize::MAX
            } else {
                opts.max_line.saturating_sub(2)
            },
            line_len: 0,
            held_cr: false,
            size: 0,
            bare_seen: false,
            long_seen: false,
            stopped: false,
        }
    }

    /// Checks `input` (the next octets of the content) and appends what may
    /// be relayed to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let n = input.len();
        if n == 0 {
            return;
        }
        self.size += n as u64;
        let mut i = 0;
        // input[run..i] is to be copied verbatim (when emitting).
        let mut run = 0;
        if std::mem::take(&mut self.held_cr) {
            if input[0] == b'\n' {
                self.flush(b"\r\n", out);
                self.line_len = 0;
                i = 1;
                run = 1;
            } else {
                self.bare(out);
            }
        }
        while let Some(off) = memchr::memchr2(b'\r', b'\n', &input[i..]) {
            self.content(off);
            let j = i + off;
            if input[j] == b'\r' {
                match input.get(j + 1) {
                    Some(b'\n') => {
                        self.line_len = 0;
                        i = j + 2;
                        continue;
                    }
                    None => {
                        // Last byte: hold the CR back.
                        self.flush(&input[run..j], out);
                        self.held_cr = true;
                        return;
                    }
                    Some(_) => {}
                }
            }
            // A bare CR or LF at j.
            self.flush(&input[run..j], out);
            self.bare(out);
            i = j + 1;
            run = i;
        }
        self.content(n - i);
        self.flush(&input[run..], out);
    }

    /// The content is complete (after the LAST chunk): a CR held back is
    /// a bare one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.held_cr) {
            self.bare(out);
        }
    }

    /// Octets of content received so far, as sent by the client.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// A bare CR or LF was seen (in either mode).
    pub fn bare_line_ending_seen(&self) -> bool {
        self.bare_seen
    }
    /// A line longer than `max_line` was seen.
    pub fn long_line_seen(&self) -> bool {
        self.long_seen
    }
    /// The content may not be delivered: a bare line ending in Reject mode,
    /// or a line too long.
    pub fn refused(&self) -> bool {
        self.stopped || self.long_seen
    }

    #[inline]
    fn content(&mut self, len: usize) {
        self.line_len += len;
        if self.line_len > self.line_limit {
            self.long_seen = true;
        }
    }

    /// Appends `bytes` unless output stopped.
    #[inline]
    fn flush(&self, bytes: &[u8], out: &mut Vec<u8>) {
        if !self.stopped {
            out.extend_from_slice(bytes);
        }
    }

    /// A bare CR or LF: in Reject mode output stops, in Normalize mode it
    /// becomes CRLF.
    fn bare(&mut self, out: &mut Vec<u8>) {
        self.bare_seen = true;
        self.line_len = 0;
        match self.mode {
            BareLineEndings::Reject => self.stopped = true,
            BareLineEndings::Normalize => self.flush(b"\r\n", out),
        }
    }
}

/// Turns message content into the DATA wire form: a `.` is added in front
/// of every line that starts with `.`, and `finish` ends the last line with
/// CRLF (when the content did not) and appends the `.` CRLF terminator.
///
/// Its input is meant to be `ChunkChecker` output (CRLF pairs only), but a
/// line start is taken to follow any CR or LF, so that even a bare one
/// could not put a lone `.` on a line of its own for a backend that reads
/// bare line endings.
#[derive(Debug, Clone, Copy)]
pub struct Stuffer {
    /// The next byte starts a line (in any reading of line endings).
    at_start: bool,
    /// The content so far ends with LF (or is empty).
    ends_lf: bool,
}

impl Default for Stuffer {
    fn default() -> Stuffer {
        Stuffer {
            at_start: true,
            ends_lf: true,
        }
    }
}

impl Stuffer {
    pub fn new() -> Stuffer {
        Stuffer::default()
    }

    /// Appends the wire form of `content` to `wire`.
    pub fn feed(&mut self, content: &[u8], wire: &mut Vec<u8>) {
        let n = content.len();
        if n == 0 {
            return;
        }
        wire.reserve(n + 8);
        let mut i = 0;
        let mut run = 0;
        loop {
            if self.at_start && content[i] == b'.' {
                wire.extend_from_slice(&content[run..i]);
                wire.push(b'.');
                run = i;
            }
            match memchr::memchr2(b'\r', b'\n', &content[i..]) {
                Some(off) if i + off + 1 < n => {
                    i += off + 1;
                    self.at_start = true;
                }
                Some(_) => {
                    self.at_start = true;
                    break;
                }
                None => {
                    self.at_start = false;
                    break;
                }
            }
        }
        wire.extend_from_slice(&content[run..]);
        self.ends_lf = content[n - 1] == b'\n';
    }

    /// Appends the end of the data: CRLF if the content did not end with a
    /// line ending, then `.` CRLF.
    pub fn finish(&mut self, wire: &mut Vec<u8>) {
        if !self.ends_lf {
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        *self = Stuffer::default();
    }
}

/// Writes `BDAT <len>[ LAST]` CRLF.
pub fn bdat_command(len: usize, last: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "BDAT {len}");
    if last {
        out.extend_from_slice(b" LAST");
    }
    out.extend_from_slice(b"\r\n");
}

/// The checker's reference model, shared with fuzz/.
#[cfg(test)]
#[path = "../../tests/support/chunks.rs"]
mod test_chunks;

#[cfg(test)]
mod tests {
    use super::test_chunks::{check_pieces, model, Checked};
    use super::*;
    use crate::smtp::Unstuffer;

    const REJECT: DataOptions = DataOptions {
        bare_line_endings: BareLineEndings::Reject,
        max_line: 1000,
    };
    const NORMALIZE: DataOptions = DataOptions {
        bare_line_endings: BareLineEndings::Normalize,
        max_line: 1000,
    };

    fn check_split(opts: DataOptions, input: &[u8], cuts: &[usize]) -> Checked {
        let mut pieces = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            pieces.push(&input[start..end]);
            start = end;
        }
        check_pieces(opts, &pieces, |_| ())
    }

    fn check_all_splits(opts: DataOptions, input: &[u8]) -> Checked {
        let whole = check_split(opts, input, &[]);
        assert_eq!(whole, model(opts, input), "{input:?}");
        for k in 0..=input.len() {
            assert_eq!(check_split(opts, input, &[k]), whole, "cut {k} {input:?}");
            for m in k..=input.len() {
                assert_eq!(
                    check_split(opts, input, &[k, m]),
                    whole,
                    "cuts {k} {m} {input:?}"
                );
            }
        }
        let bytes: Vec<usize> = (1..input.len()).collect();
        assert_eq!(check_split(opts, input, &bytes), whole);
        whole
    }

    fn stuff_split(content: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut s = Stuffer::new();
        let mut wire = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&content.len())) {
            s.feed(&content[start..end], &mut wire);
            start = end;
        }
        s.finish(&mut wire);
        wire
    }

    fn stuff_reference(content: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut at_start = true;
        for &b in content {
            if at_start && b == b'.' {
                wire.push(b'.');
            }
            wire.push(b);
            at_start = b == b'\r' || b == b'\n';
        }
        if !content.is_empty() && content.last() != Some(&b'\n') {
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
        wire
    }

    fn stuff_all_splits(content: &[u8]) -> Vec<u8> {
        let whole = stuff_split(content, &[]);
        assert_eq!(whole, stuff_reference(content), "{content:?}");
        for k in 0..=content.len() {
            assert_eq!(stuff_split(content, &[k]), whole, "cut {k} {content:?}");
        }
        let bytes: Vec<usize> = (1..content.len()).collect();
        assert_eq!(stuff_split(content, &bytes), whole);
        whole
    }

    /// Where a lenient receiver (a line ends at CR or LF, as old Sendmail
    /// and Postfix before 3.9 with bare LF, or `\r.\r` readers) would see
    /// the first line that is exactly `.`: the index just past it.
    fn lenient_end(wire: &[u8]) -> Option<usize> {
        let brk = |b: u8| b == b'\r' || b == b'\n';
        (0..wire.len()).find_map(|i| {
            let starts = i == 0 || brk(wire[i - 1]);
            (starts && wire[i] == b'.' && wire.get(i + 1).is_some_and(|&b| brk(b)))
                .then(|| i + 1 + wire[i + 1..].iter().take_while(|&&b| b == b'\r').count())
                .map(|e| {
                    if wire.get(e) == Some(&b'\n') {
                        e + 1
                    } else {
                        e
                    }
                })
        })
    }

    #[test]
    fn bdat_command_lines() {
        let mut out = Vec::new();
        bdat_command(0, true, &mut out);
        bdat_command(4096, false, &mut out);
        assert_eq!(out, b"BDAT 0 LAST\r\nBDAT 4096\r\n");
    }

    #[test]
    fn clean_content_passes_unchanged() {
        let input = b"Subject: x\r\n\r\n.leading dot\r\n.\r\nbody\r\n";
        for opts in [REJECT, NORMALIZE] {
            let c = check_all_splits(opts, input);
            assert_eq!(c.out, input);
            assert!(!c.bare && !c.refused);
            assert_eq!(c.size, input.len() as u64);
        }
    }

    #[test]
    fn crlf_split_across_chunks_is_not_bare() {
        // Every cut, including between the CR and the LF of each pair.
        let input = b"a\r\nb\r\n\r\nc";
        for opts in [REJECT, NORMALIZE] {
            let c = check_all_splits(opts, input);
            assert_eq!(c.out, input);
            assert!(!c.bare);
        }
        // A CR at the very end of the content is bare.
        let c = check_all_splits(REJECT, b"a\r\nb\r");
        assert!(c.bare && c.refused);
        assert_eq!(c.out, b"a\r\nb");
        let c = check_all_splits(NORMALIZE, b"a\r\nb\r");
        assert_eq!(c.out, b"a\r\nb\r\n");
    }

    #[test]
    fn smuggling_payloads_normalized_and_stuffed() {
        let cases: &[(&[u8], &[u8])] = &[
            (
                b"a\n.\nMAIL FROM:<x>\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n",
            ),
            (
                b"a\r.\rMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n",
            ),
            (
                b"a\r\n.\r\nMAIL FROM:<x>\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n",
            ),
            (b"a\r\n.\n", b"a\r\n..\r\n.\r\n"),
            (b"a\n.\r\n", b"a\r\n..\r\n.\r\n"),
            (b".\r\r\n", b"..\r\n\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        ];
        for &(content, want) in cases {
            let c = check_all_splits(NORMALIZE, content);
            let wire = stuff_all_splits(&c.out);
            assert_eq!(wire, want, "{content:?}");
            assert_eq!(lenient_end(&wire), Some(wire.len()), "{content:?}");
            let r = check_all_splits(REJECT, content);
            if r.bare {
                assert!(r.refused);
            } else {
                // Only CRLF in it: stuffed as it is.
                assert_eq!(stuff_all_splits(&r.out), want);
            }
        }
    }

    #[test]
    fn long_lines_across_chunks() {
        let opts = DataOptions {
            bare_line_endings: BareLineEndings::Reject,
            max_line: 6,
        };
        assert!(!check_all_splits(opts, b"abcd\r\nabcd\r\nabcd").long);
        let c = check_all_splits(opts, b"abcd\r\nabcde\r\n");
        assert!(c.long && c.refused);
        assert_eq!(c.out, b"abcd\r\nabcde\r\n", "output continues");
        let opts = DataOptions {
            bare_line_endings: BareLineEndings::Normalize,
            max_line: 6,
        };
        // Bare endings end lines too.
        assert!(!check_all_splits(opts, b"abcd\nabcd\rabcd").long);
        let opts = DataOptions {
            bare_line_endings: BareLineEndings::Normalize,
            max_line: 0,
        };
        assert!(!check_split(opts, &vec![b'x'; 100_000], &[]).long);
    }

    #[test]
    fn stuffer_ends_lines_and_data() {
        assert_eq!(stuff_all_splits(b""), b".\r\n");
        assert_eq!(stuff_all_splits(b"x"), b"x\r\n.\r\n");
        assert_eq!(stuff_all_splits(b"x\r\n"), b"x\r\n.\r\n");
        assert_eq!(stuff_all_splits(b".\r\n..\r\n"), b"..\r\n...\r\n.\r\n");
        assert_eq!(stuff_all_splits(b"a.b\r\n. \r\n"), b"a.b\r\n.. \r\n.\r\n");
        // A Stuffer is ready for the next message after finish.
        let mut s = Stuffer::new();
        let mut w = Vec::new();
        s.feed(b"a", &mut w);
        s.finish(&mut w);
        s.feed(b".b", &mut w);
        s.finish(&mut w);
        assert_eq!(w, b"a\r\n.\r\n..b\r\n.\r\n");
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn random_content_never_ends_data_early() {
        let alphabet = b"\r\n.\r\n.ab";
        let mut seed = 0x3030_bda7_0000_0001u64;
        for _ in 0..3000 {
            let len = (xorshift(&mut seed) % 12) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(xorshift(&mut seed) % alphabet.len() as u64) as usize])
                .collect();
            for max_line in [0, 3] {
                for mode in [BareLineEndings::Reject, BareLineEndings::Normalize] {
                    let opts = DataOptions {
                        bare_line_endings: mode,
                        max_line,
                    };
                    let c = check_all_splits(opts, &input);
                    // No bare CR / LF ever goes out.
                    let lone = (0..c.out.len()).any(|i| match c.out[i] {
                        b'\r' => c.out.get(i + 1) != Some(&b'\n'),
                        b'\n' => i == 0 || c.out[i - 1] != b'\r',
                        _ => false,
                    });
                    assert!(!lone, "{input:?} -> {:?}", c.out);
                    let wire = stuff_all_splits(&c.out);
                    // The only end of data, in any reading, is the last line.
                    assert_eq!(lenient_end(&wire), Some(wire.len()), "{input:?}");
                    // And un-stuffing gives the content back (with a final
                    // CRLF when it had none).
                    let mut u = Unstuffer::new();
                    let mut back = Vec::new();
                    u.feed(&wire, &mut back);
                    assert!(u.is_done());
                    let mut want = c.out.clone();
                    if !want.is_empty() && !want.ends_with(b"\n") {
                        want.extend_from_slice(b"\r\n");
                    }
                    assert_eq!(back, want, "{input:?}");
                }
            }
        }
    }

    #[test]
    fn stuffer_is_safe_on_bare_endings_too() {
        // Not what the checker gives it, but even so nothing ends early.
        let mut seed = 0x0bad_cafe_1234_5678u64;
        let alphabet = b"\r\n.x";
        for _ in 0..2000 {
            let len = (xorshift(&mut seed) % 10) as usize;
            let content: Vec<u8> = (0..len)
                .map(|_| alphabet[(xorshift(&mut seed) % alphabet.len() as u64) as usize])
                .collect();
            let wire = stuff_all_splits(&content);
            assert_eq!(lenient_end(&wire), Some(wire.len()), "{content:?}");
        }
    }
}
