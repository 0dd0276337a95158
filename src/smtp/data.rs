//! DATA body scanner: finds the end of data (`<CRLF>.<CRLF>` and nothing
//! else), detects or normalizes bare CR / LF (SMTP smuggling), counts size
//! and long lines, and preserves dot-stuffing. Also the un-stuffer used for
//! local delivery (`Unstuffer`: wire form to content).
//!
//! `DataScanner::feed` returns `Scan::More` or `Scan::End { consumed }`;
//! `set_discard` keeps scanning to the end without output. In the middle
//! of a line it skips whole 64-byte blocks of plain lines at once
//! (`skip_plain`, `mod block`: CR, LF and `.` bit masks from AVX2, or SSE2
//! when the CPU lacks AVX2; line lengths from the LF mask) and falls back to
//! the byte-wise `memchr2` path at anything else. Output goes to an
//! `Output`: a `Vec<u8>` (copied), or `Segments`, which keeps the verbatim
//! runs as ranges of the input chunk plus a few literal bytes (the
//! `Received:` header, released held bytes, stuffing, the terminator) for
//! one vectored write.

/// What to do with a bare CR or LF (one not part of a CR LF pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BareLineEndings {
    /// Stop forwarding, keep scanning to the real end, then refuse (550 5.5.2).
    #[default]
    Reject,
    /// Turn each bare CR / LF into CRLF; lines so made that start with `.`
    /// (or are `.`) are dot-stuffed so they stay content.
    Normalize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataOptions {
    pub bare_line_endings: BareLineEndings,
    /// Longest text line allowed, CRLF included (RFC 5321: 1000). 0 = no limit.
    pub max_line: usize,
}

/// Result of feeding bytes to the scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// All input consumed; the end of data was not seen yet.
    More,
    /// The end of data ends at `consumed` bytes into the input; the bytes after
    /// it belong to the next command.
    End { consumed: usize },
}

impl Default for DataOptions {
    /// Reject bare line endings; RFC 5321 line limit of 1000 (CRLF included).
    fn default() -> DataOptions {
        DataOptions {
            bare_line_endings: BareLineEndings::Reject,
            max_line: 1000,
        }
    }
}

/// Where the scanner stands between two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line that follows a real CRLF (or the start of data):
    /// a `.` here may begin the end of data.
    CleanStart,
    /// At the start of a line that follows a bare CR or LF.
    BareStart,
    /// Inside a line.
    Mid,
    /// A CR was the last byte of the previous chunk (held back).
    Cr,
    /// `.` at a clean line start (held back).
    Dot,
    /// `.` CR at a clean line start (both held back).
    DotCr,
    /// The end of data was seen.
    Ended,
}

/// Streaming scanner for one message body. State carries across chunks.
///
/// Output, as a function of the whole input (the same however it is split):
/// - Reject mode: the input up to the first bare CR / LF (exclusive) or, when
///   there is none, the input up to and including the terminating
///   `<CRLF>.<CRLF>`. Once a bare CR / LF is seen nothing more is appended;
///   the caller must not send the body on (drop the backend connection).
/// - Normalize mode: every line with CRLF ending; a bare CR or LF becomes
///   CRLF; a line that starts after a bare ending and begins with `.` gets one
///   more `.`, as does a line that is exactly `.` and ends with a bare ending.
///   Only the client's own `<CRLF>.<CRLF>` ends the output.
#[derive(Debug)]
pub struct DataScanner {
    mode: BareLineEndings,
    /// Most content bytes (CR / LF excluded) a line may have.
    line_limit: usize,
    state: State,
    /// Content bytes of the current line so far.
    line_len: usize,
    /// Input bytes scanned (up to the end of data).
    total: u64,
    bare_seen: bool,
    long_seen: bool,
    discard: bool,
    /// Reject mode, after the first bare CR / LF: output stopped for good.
    stopped: bool,
}

impl DataScanner {
    pub fn new(opts: DataOptions) -> DataScanner {
        DataScanner {
            mode: opts.bare_line_endings,
            line_limit: if opts.max_line == 0 {
                usize::MAX
            } else {
                opts.max_line.saturating_sub(2)
            },
            state: State::CleanStart,
            line_len: 0,
            total: 0,
            bare_seen: false,
            long_seen: false,
            discard: false,
            stopped: false,
        }
    }
    /// Scans `input`, appending the bytes to forward to the backend to `out`
    /// (wire form: still dot-stuffed, CRLF line endings, including the final
    /// `.\r\n` once the end is seen). Bytes whose meaning depends on what
    /// follows (a CR, a lone `.` at a line start) are held back until known.
    /// Nothing is appended while discarding (see `set_discard`) or, in Reject
    /// mode, from the first bare CR / LF on.
    ///
    /// Once the end was seen, further calls consume nothing and return
    /// `Scan::End { consumed: 0 }`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Scan {
        if self.emitting() && self.state != State::Ended {
            // Reject mode never grows the data; normalizing rarely does (and
            // `Vec` grows on its own when it must).
            out.reserve(input.len() + 8);
        }
        self.feed_into(input, out)
    }

    /// `feed` into any `Output`: with `Segments`, the verbatim runs are
    /// kept as ranges of `input` (to be written from there, not copied).
    pub fn feed_into<O: Output>(&mut self, input: &[u8], out: &mut O) -> Scan {
        if self.state == State::Ended {
            return Scan::End { consumed: 0 };
        }
        let normalize = self.mode == BareLineEndings::Normalize;
        let simd = block::Masks::detect();
        let n = input.len();
        let mut i = 0;
        // input[run..i] is to be copied verbatim (when emitting); it is
        // flushed before anything else is appended.
        let mut run = 0;
        while i < n {
            match self.state {
                State::Mid => loop {
                    // Hottest path: whole blocks of plain lines at once.
                    i = self.skip_plain(input, i, simd);
                    // Hot path: jump from line ending to line ending; plain
                    // CRLF followed by anything but `.` stays in the run.
                    let Some(off) = memchr::memchr2(b'\r', b'\n', &input[i..]) else {
                        self.content(n - i);
                        i = n;
                        break;
                    };
                    self.content(off);
                    self.line_len = 0;
                    let j = i + off;
                    if input[j] == b'\r' {
                        match input.get(j + 1) {
                            Some(b'\n') => {
                                i = j + 2;
                                match input.get(i) {
                                    Some(b'.') | None => {
                                        self.state = State::CleanStart;
                                        break;
                                    }
                                    Some(_) => continue,
                                }
                            }
                            Some(_) => {
                                self.bare_at(input, &mut run, j, out);
                                i = j + 1;
                                self.state = State::BareStart;
                                break;
                            }
                            None => {
                                // Last byte: hold the CR back.
                                self.flush(input, &mut run, j, out);
                                i = n;
                                run = n;
                                self.state = State::Cr;
                                break;
                            }
                        }
                    } else {
                        self.bare_at(input, &mut run, j, out);
                        i = j + 1;
                        self.state = State::BareStart;
                        break;
                    }
                },
                State::CleanStart => {
                    if input[i] == b'.' {
                        self.flush(input, &mut run, i, out);
                        self.content(1);
                        i += 1;
                        run = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::BareStart => {
                    if input[i] == b'.' {
                        self.content(1);
                        if normalize {
                            // Made a line start by normalization: stuff it.
                            // The client's `.` stays in the verbatim run.
                            self.flush(input, &mut run, i, out);
                            self.emit(b".", out);
                        }
                        i += 1;
                    }
                    self.state = State::Mid;
                }
                State::Cr => {
                    // Held CR from the previous chunk.
                    self.flush(input, &mut run, i, out);
                    if input[i] == b'\n' {
                        // Real CRLF: the CR goes out now, the LF with the run.
                        self.emit(b"\r", out);
                        i += 1;
                        self.state = State::CleanStart;
                    } else {
                        self.bare_held(b"", b"\r\n", out);
                        self.state = State::BareStart;
                    }
                }
                State::Dot => {
                    self.flush(input, &mut run, i, out);
                    match input[i] {
                        b'\r' => {
                            self.line_len = 0;
                            i += 1;
                            run = i;
                            self.state = State::DotCr;
                        }
                        b'\n' => {
                            // "." ended by a bare LF.
                            self.line_len = 0;
                            self.bare_held(b".", b"..\r\n", out);
                            i += 1;
                            run = i;
                            self.state = State::BareStart;
                        }
                        _ => {
                            self.emit(b".", out);
                            self.state = State::Mid;
                        }
                    }
                }
                State::DotCr => {
                    self.flush(input, &mut run, i, out);
                    if input[i] == b'\n' {
                        i += 1;
                        self.emit(b".\r\n", out);
                        self.state = State::Ended;
                        self.total += i as u64;
                        return Scan::End { consumed: i };
                    }
                    // "." ended by a bare CR (e.g. CR CR LF).
                    self.bare_held(b".", b"..\r\n", out);
                    self.state = State::BareStart;
                }
                State::Ended => unreachable!("checked on entry"),
            }
        }
        self.flush(input, &mut run, n, out);
        self.total += n as u64;
        Scan::More
    }
    /// Stop appending output (message refused, e.g. too large); scanning
    /// for the end of data continues.
    pub fn set_discard(&mut self) {
        self.discard = true;
    }
    /// A bare CR or LF was seen (in either mode).
    pub fn bare_line_ending_seen(&self) -> bool {
        self.bare_seen
    }
    /// A line longer than `max_line` was seen.
    pub fn long_line_seen(&self) -> bool {
        self.long_seen
    }
    /// Bytes of message received so far, as sent by the client, not counting
    /// the terminating `.\r\n`.
    pub fn size(&self) -> u64 {
        if self.state == State::Ended {
            self.total - 3
        } else {
            self.total
        }
    }
    /// The end of data was seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Ended
    }
    /// Output is being appended (not discarding, and in Reject mode no bare
    /// CR / LF seen yet).
    pub fn emitting(&self) -> bool {
        !self.discard && !self.stopped
    }

    /// In the `Mid` state at `i`: skips whole `block::LEN`-byte blocks of
    /// plain lines (each CR followed by LF, each LF preceded by CR, no line
    /// starting with `.`, no CR or LF as the block's last byte, where what
    /// follows is not known yet), counting their line lengths. They stay
    /// in the verbatim run. Returns where the byte-wise path takes over.
    #[inline]
    fn skip_plain(&mut self, input: &[u8], i: usize, simd: block::Masks) -> usize {
        if input.len() - i < block::LEN {
            return i;
        }
        simd.skip(self, input, i)
    }

    /// One block of `skip_plain`, given its CR and LF masks and a way to
    /// its `.` mask (made only for a block whose line endings are plain):
    /// false (nothing changed) when the block is not plain.
    #[inline(always)]
    fn plain_block(&mut self, cr: u64, lf: u64, dot: impl FnOnce() -> u64) -> bool {
        if cr | lf == 0 {
            self.content(block::LEN);
            return true;
        }
        // Plain: each LF right after a CR and each CR right before an LF
        // (an LF first would follow the previous block's last byte, which
        // is no CR), so `lf == cr << 1`; no ending as the last byte, where
        // what follows is not known yet (a CR at 62 puts its LF there, one
        // at 63 is itself the last); no line starting with `.`.
        if lf != cr << 1 || cr >> 62 != 0 || (lf << 1) & dot() != 0 {
            return false;
        }
        // Content before the first CR, between CRLFs, after the last LF.
        let first = lf.trailing_zeros() as usize;
        let last = block::LEN - 1 - lf.leading_zeros() as usize;
        self.content(first - 1);
        if self.line_limit < block::LEN {
            // A limit shorter than a block: check the lines inside it too.
            let mut m = lf & (lf - 1);
            let mut prev = first;
            while m != 0 {
                let k = m.trailing_zeros() as usize;
                self.line_len = 0;
                self.content(k - prev - 2);
                prev = k;
                m &= m - 1;
            }
            self.line_len = 0;
            self.content(block::LEN - 1 - last);
        } else {
            // Shorter than a block, so within the limit.
            self.line_len = block::LEN - 1 - last;
        }
        true
    }

    #[inline]
    fn content(&mut self, len: usize) {
        self.line_len += len;
        if self.line_len > self.line_limit {
            self.long_seen = true;
        }
    }

    /// Appends `input[*run..upto]` when emitting; the run then starts at `upto`.
    #[inline]
    fn flush<O: Output>(&self, input: &[u8], run: &mut usize, upto: usize, out: &mut O) {
        if self.emitting() && upto > *run {
            out.verbatim(input, *run..upto);
        }
        *run = upto;
    }

    #[inline]
    fn emit<O: Output>(&self, bytes: &[u8], out: &mut O) {
        if self.emitting() {
            out.literal(bytes);
        }
    }

    /// A bare CR or LF at `input[j]` inside a line.
    fn bare_at<O: Output>(&mut self, input: &[u8], run: &mut usize, j: usize, out: &mut O) {
        self.bare_seen = true;
        self.flush(input, run, j, out);
        match self.mode {
            BareLineEndings::Reject => self.stopped = true,
            BareLineEndings::Normalize => {
                self.emit(b"\r\n", out);
                *run = j + 1;
            }
        }
    }

    /// A bare CR or LF that resolves held bytes: in Reject mode `reject` (the
    /// held bytes before the bare one) goes out and output stops; in
    /// Normalize mode `normalized` replaces the held bytes and the bare one.
    fn bare_held<O: Output>(&mut self, reject: &[u8], normalized: &[u8], out: &mut O) {
        self.bare_seen = true;
        match self.mode {
            BareLineEndings::Reject => {
                self.emit(reject, out);
                self.stopped = true;
            }
            BareLineEndings::Normalize => self.emit(normalized, out),
        }
    }
}

/// Where `DataScanner::feed_into` puts its output: runs of the input to be
/// sent verbatim, and literal bytes (held bytes released, stuffing,
/// normalized line endings, the terminator).
pub trait Output {
    fn verbatim(&mut self, input: &[u8], range: std::ops::Range<usize>);
    fn literal(&mut self, bytes: &[u8]);
}

impl Output for Vec<u8> {
    #[inline]
    fn verbatim(&mut self, input: &[u8], range: std::ops::Range<usize>) {
        self.extend_from_slice(&input[range]);
    }
    #[inline]
    fn literal(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The scanner's output for one input chunk as a list of pieces, the
/// verbatim ones as ranges of that chunk: sent with one vectored write
/// (`io_slices`), the message bytes never copied. Reused across chunks
/// (`clear`); holds literals pushed before the chunk (the `Received:`
/// header) too.
#[derive(Debug, Default)]
pub struct Segments {
    literals: Vec<u8>,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// `literals[a..b]`.
    Literal(usize, usize),
    /// `input[a..b]`.
    Input(usize, usize),
}

impl Segments {
    pub fn clear(&mut self) {
        self.literals.clear();
        self.pieces.clear();
    }
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
    /// Appends literal bytes written by `write` (the `Received:` header
    /// before the first chunk).
    pub fn push_literal(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let a = self.literals.len();
        write(&mut self.literals);
        let b = self.literals.len();
        self.literal_range(a, b);
    }
    fn literal_range(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        match self.pieces.last_mut() {
            Some(Piece::Literal(_, end)) if *end == a => *end = b,
            _ => self.pieces.push(Piece::Literal(a, b)),
        }
    }
    /// The pieces as slices for a vectored write; `input` must be the chunk
    /// the scanner was fed.
    pub fn io_slices<'a>(
        &'a self,
        input: &'a [u8],
    ) -> smallvec::SmallVec<[std::io::IoSlice<'a>; 8]> {
        self.pieces
            .iter()
            .map(|p| {
                std::io::IoSlice::new(match *p {
                    Piece::Literal(a, b) => &self.literals[a..b],
                    Piece::Input(a, b) => &input[a..b],
                })
            })
            .collect()
    }
}

impl Output for Segments {
    #[inline]
    fn verbatim(&mut self, _input: &[u8], range: std::ops::Range<usize>) {
        match self.pieces.last_mut() {
            Some(Piece::Input(_, end)) if *end == range.start => *end = range.end,
            _ => self.pieces.push(Piece::Input(range.start, range.end)),
        }
    }
    #[inline]
    fn literal(&mut self, bytes: &[u8]) {
        let a = self.literals.len();
        self.literals.extend_from_slice(bytes);
        self.literal_range(a, a + bytes.len());
    }
}

/// CR, LF and `.` masks of 64-byte blocks for `DataScanner::skip_plain`:
/// AVX2 when the CPU has it, else SSE2 (every x86-64 has it); none
/// elsewhere (the byte-wise path then does all the work).
mod block {
    use super::DataScanner;

    /// Bytes per block: one bit per byte in a `u64` mask.
    pub const LEN: usize = 64;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Masks {
        #[cfg(target_arch = "x86_64")]
        Avx2,
        #[cfg(target_arch = "x86_64")]
        Sse2,
        #[cfg(not(target_arch = "x86_64"))]
        None,
    }

    impl Masks {
        /// The best the CPU offers (std caches the CPUID answer).
        #[inline]
        pub fn detect() -> Masks {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    Masks::Avx2
                } else {
                    Masks::Sse2
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Masks::None
        }

        /// Skips plain blocks from `i` (see `DataScanner::skip_plain`).
        #[inline]
        pub fn skip(self, s: &mut DataScanner, input: &[u8], i: usize) -> usize {
            match self {
                // SAFETY: Avx2 is only chosen when the CPU has AVX2.
                #[cfg(target_arch = "x86_64")]
                Masks::Avx2 => unsafe { x86::skip_avx2(s, input, i) },
                #[cfg(target_arch = "x86_64")]
                Masks::Sse2 => x86::skip_sse2(s, input, i),
                #[cfg(not(target_arch = "x86_64"))]
                Masks::None => i,
            }
        }

        /// (CR, LF, `.`) masks of `b[..LEN]`: bit k set when byte k is one.
        #[cfg(test)]
        pub fn masks(self, b: &[u8]) -> (u64, u64, u64) {
            let b: &[u8; LEN] = b.try_into().expect("a block");
            match self {
                // SAFETY: the test asks for Avx2 only when the CPU has it.
                #[cfg(target_arch = "x86_64")]
                Masks::Avx2 => unsafe {
                    let (cr, lf) = x86::avx2_ends(b);
                    (cr, lf, x86::avx2_dots(b))
                },
                #[cfg(target_arch = "x86_64")]
                Masks::Sse2 => {
                    let (cr, lf) = x86::sse2_ends(b);
                    (cr, lf, x86::sse2_dots(b))
                }
                #[cfg(not(target_arch = "x86_64"))]
                Masks::None => unreachable!(),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::{DataScanner, LEN};
        use std::arch::x86_64::*;

        /// Feeds blocks to `plain_block` while they are plain.
        #[inline(always)]
        fn skip(
            s: &mut DataScanner,
            input: &[u8],
            mut i: usize,
            ends: impl Fn(&[u8; LEN]) -> (u64, u64),
            dots: impl Fn(&[u8; LEN]) -> u64,
        ) -> usize {
            while let Some(b) = input.get(i..i + LEN) {
                let b: &[u8; LEN] = b.try_into().expect("LEN bytes");
                let (cr, lf) = ends(b);
                if !s.plain_block(cr, lf, || dots(b)) {
                    break;
                }
                i += LEN;
            }
            i
        }

        #[target_feature(enable = "avx2")]
        pub fn skip_avx2(s: &mut DataScanner, input: &[u8], i: usize) -> usize {
            skip(s, input, i, |b| avx2_ends(b), |b| avx2_dots(b))
        }

        pub fn skip_sse2(s: &mut DataScanner, input: &[u8], i: usize) -> usize {
            skip(s, input, i, sse2_ends, sse2_dots)
        }

        /// Bit k set when byte k of `b` is `c`, for each `c` of `cs`.
        #[target_feature(enable = "avx2")]
        #[inline]
        fn avx2_masks<const N: usize>(b: &[u8; LEN], cs: [u8; N]) -> [u64; N] {
            let p = b.as_ptr() as *const __m256i;
            // SAFETY: two unaligned 32-byte loads inside the 64-byte array.
            let (lo, hi) = unsafe { (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))) };
            cs.map(|c| {
                let c = _mm256_set1_epi8(c as i8);
                let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, c)) as u32 as u64;
                let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, c)) as u32 as u64;
                lo | hi << 32
            })
        }

        /// (CR, LF) masks of a block.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn avx2_ends(b: &[u8; LEN]) -> (u64, u64) {
            let [cr, lf] = avx2_masks(b, [b'\r', b'\n']);
            (cr, lf)
        }

        /// The `.` mask of a block.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn avx2_dots(b: &[u8; LEN]) -> u64 {
            avx2_masks(b, [b'.'])[0]
        }

        #[inline]
        fn sse2_masks<const N: usize>(b: &[u8; LEN], cs: [u8; N]) -> [u64; N] {
            let mut out = [0u64; N];
            for k in 0..4 {
                // SAFETY: SSE2 is part of x86-64; an unaligned 16-byte load
                // inside the 64-byte array.
                unsafe {
                    let v = _mm_loadu_si128(b.as_ptr().add(16 * k) as *const __m128i);
                    for (o, &c) in out.iter_mut().zip(&cs) {
                        let m = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8)));
                        *o |= (m as u16 as u64) << (16 * k);
                    }
                }
            }
            out
        }

        #[inline]
        pub fn sse2_ends(b: &[u8; LEN]) -> (u64, u64) {
            let [cr, lf] = sse2_masks(b, [b'\r', b'\n']);
            (cr, lf)
        }

        #[inline]
        pub fn sse2_dots(b: &[u8; LEN]) -> u64 {
            sse2_masks(b, [b'.'])[0]
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum UnstuffState {
    #[default]
    LineStart,
    Mid,
    /// A line-start `.` was dropped; it may be the terminator line.
    Dot,
    /// `.` CR at a line start (CR held back).
    DotCr,
    /// The terminator line was seen; the rest is ignored.
    Done,
}

/// Turns wire-form data (CRLF lines, dot-stuffed, possibly ending with the
/// `.\r\n` terminator line) into message content: removes one leading dot of
/// each line and the terminator line. Streaming; state carries across chunks.
#[derive(Debug, Default)]
pub struct Unstuffer {
    state: UnstuffState,
}

impl Unstuffer {
    pub fn new() -> Unstuffer {
        Unstuffer::default()
    }
    /// Appends the content of `wire` to `out`.
    pub fn feed(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        if self.state == UnstuffState::Done {
            return;
        }
        out.reserve(wire.len());
        let n = wire.len();
        let mut i = 0;
        let mut run = 0;
        while i < n {
            match self.state {
                UnstuffState::Mid => loop {
                    let Some(off) = memchr::memchr(b'\n', &wire[i..]) else {
                        i = n;
                        break;
                    };
                    i += off + 1;
                    match wire.get(i) {
                        Some(b'.') | None => {
                            self.state = UnstuffState::LineStart;
                            break;
                        }
                        Some(_) => continue,
                    }
                },
                UnstuffState::LineStart => {
                    if wire[i] == b'.' {
                        out.extend_from_slice(&wire[run..i]);
                        i += 1;
                        run = i;
                        self.state = UnstuffState::Dot;
                    } else {
                        self.state = UnstuffState::Mid;
                    }
                }
                UnstuffState::Dot => {
                    if wire[i] == b'\r' {
                        out.extend_from_slice(&wire[run..i]);
                        i += 1;
                        run = i;
                        self.state = UnstuffState::DotCr;
                    } else {
                        self.state = UnstuffState::Mid;
                    }
                }
                UnstuffState::DotCr => {
                    out.extend_from_slice(&wire[run..i]);
                    if wire[i] == b'\n' {
                        self.state = UnstuffState::Done;
                        return;
                    }
                    out.push(b'\r');
                    run = i;
                    self.state = UnstuffState::Mid;
                }
                UnstuffState::Done => return,
            }
        }
        out.extend_from_slice(&wire[run..n]);
    }
    /// The terminator line was seen; further input is ignored.
    pub fn is_done(&self) -> bool {
        self.state == UnstuffState::Done
    }
}

/// Test helpers shared with tests/props.rs and fuzz/.
#[cfg(test)]
#[path = "../../tests/support/wire.rs"]
mod test_wire;

#[cfg(test)]
mod tests {
    use super::test_wire::{no_bare, postfix_end, stuff};
    use super::*;

    const REJECT: DataOptions = DataOptions {
        bare_line_endings: BareLineEndings::Reject,
        max_line: 0,
    };
    const NORMALIZE: DataOptions = DataOptions {
        bare_line_endings: BareLineEndings::Normalize,
        max_line: 0,
    };

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        out: Vec<u8>,
        scan: Scan,
        bare: bool,
        long: bool,
        size: u64,
    }

    /// Feeds `input` in the pieces given by the cut positions (sorted).
    fn run_split(opts: DataOptions, input: &[u8], cuts: &[usize]) -> Outcome {
        let mut s = DataScanner::new(opts);
        let mut out = Vec::new();
        let mut scan = Scan::More;
        let mut start = 0;
        // The same through `Segments`, as the session sends it.
        let mut s2 = DataScanner::new(opts);
        let mut segs = Segments::default();
        let mut out2 = Vec::new();
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            let chunk = &input[start..end];
            segs.clear();
            let scan2 = s2.feed_into(chunk, &mut segs);
            for sl in segs.io_slices(chunk) {
                out2.extend_from_slice(&sl);
            }
            let fed = s.feed(chunk, &mut out);
            assert_eq!(fed, scan2);
            assert_eq!(out, out2, "segments of {input:?} cut at {cuts:?}");
            match fed {
                Scan::More => {}
                Scan::End { consumed } => {
                    scan = Scan::End {
                        consumed: start + consumed,
                    };
                    break;
                }
            }
            start = end;
        }
        Outcome {
            out,
            scan,
            bare: s.bare_line_ending_seen(),
            long: s.long_line_seen(),
            size: s.size(),
        }
    }

    fn run(opts: DataOptions, input: &[u8]) -> Outcome {
        run_split(opts, input, &[])
    }

    /// Checks that every way of cutting `input` in two, and cutting it into
    /// single bytes, gives the one-shot result. Returns that result.
    fn run_all_splits(opts: DataOptions, input: &[u8]) -> Outcome {
        let whole = run(opts, input);
        for k in 0..=input.len() {
            assert_eq!(
                run_split(opts, input, &[k]),
                whole,
                "split at {k} of {input:?}"
            );
        }
        let bytes: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run_split(opts, input, &bytes), whole, "bytes of {input:?}");
        whole
    }

    /// Reference model, written from the definitions, byte by byte.
    fn reference(opts: DataOptions, input: &[u8]) -> Outcome {
        #[derive(Clone, Copy, PartialEq)]
        enum Term {
            Crlf,
            Bare,
            None,
        }
        // Split into lines: (start, content end, terminator, next start).
        let mut lines = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < input.len() {
            match input[i] {
                b'\r' if input.get(i + 1) == Some(&b'\n') => {
                    lines.push((start, i, Term::Crlf, i + 2));
                    i += 2;
                    start = i;
                }
                b'\r' if i + 1 == input.len() => {
                    // Unknown yet: the line is incomplete.
                    break;
                }
                b'\r' | b'\n' => {
                    lines.push((start, i, Term::Bare, i + 1));
                    i += 1;
                    start = i;
                }
                _ => i += 1,
            }
        }
        if start < input.len() {
            lines.push((start, input.len(), Term::None, input.len()));
        }
        let limit = if opts.max_line == 0 {
            usize::MAX
        } else {
            opts.max_line.saturating_sub(2)
        };
        let normalize = opts.bare_line_endings == BareLineEndings::Normalize;
        let mut out = Vec::new();
        let mut bare = false;
        let mut long = false;
        let mut prev = Term::Crlf;
        let mut first_bare = None;
        for &(s, e, t, next) in &lines {
            let content = &input[s..e];
            let clen = content.len() - usize::from(t == Term::None && content.ends_with(b"\r"));
            if clen > limit {
                long = true;
            }
            if prev == Term::Crlf && content == b"." && t == Term::Crlf {
                // End of data.
                let (out, bare) = if normalize {
                    out.extend_from_slice(b".\r\n");
                    (out, bare)
                } else {
                    match first_bare {
                        Some(k) => (input[..k].to_vec(), true),
                        None => (input[..next].to_vec(), false),
                    }
                };
                return Outcome {
                    out,
                    scan: Scan::End { consumed: next },
                    bare,
                    long,
                    size: (next - 3) as u64,
                };
            }
            if t == Term::Bare {
                bare = true;
                first_bare.get_or_insert(e);
            }
            if t == Term::None {
                // Incomplete last line: what can be emitted already.
                let held = if prev == Term::Crlf && content == b"." {
                    1
                } else if prev == Term::Crlf && content == b".\r" {
                    2
                } else {
                    usize::from(content.ends_with(b"\r"))
                };
                if normalize {
                    if prev == Term::Bare && content.first() == Some(&b'.') {
                        out.push(b'.');
                    }
                    out.extend_from_slice(&content[..content.len() - held]);
                } else if first_bare.is_none() {
                    out = input[..input.len() - held].to_vec();
                }
                break;
            }
            if normalize {
                if (prev == Term::Bare && content.first() == Some(&b'.'))
                    || (content == b"." && t == Term::Bare)
                {
                    out.push(b'.');
                }
                out.extend_from_slice(content);
                out.extend_from_slice(b"\r\n");
            } else if first_bare.is_none() {
                out.extend_from_slice(&input[s..next]);
            }
            prev = t;
        }
        if !normalize {
            if let Some(k) = first_bare {
                out = input[..k].to_vec();
            }
        }
        Outcome {
            out,
            scan: Scan::More,
            bare,
            long,
            size: input.len() as u64,
        }
    }

    /// The smuggling vectors, each with a real end after it.
    const SMUGGLE: &[&[u8]] = &[
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r\r\n",
    ];

    #[test]
    fn empty_message() {
        for opts in [REJECT, NORMALIZE] {
            let o = run_all_splits(opts, b".\r\n");
            assert_eq!(o.out, b".\r\n");
            assert_eq!(o.scan, Scan::End { consumed: 3 });
            assert_eq!(o.size, 0);
            assert!(!o.bare && !o.long);
        }
    }

    #[test]
    fn simple_message_and_pipelining() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        for opts in [REJECT, NORMALIZE] {
            let o = run_all_splits(opts, input);
            assert_eq!(o.out, b"Subject: x\r\n\r\nhello\r\n.\r\n");
            assert_eq!(
                o.scan,
                Scan::End {
                    consumed: input.len() - 6
                }
            );
            assert_eq!(o.size, 21);
            assert!(!o.bare);
        }
    }

    #[test]
    fn end_of_data_not_consumed_past_terminator() {
        let mut s = DataScanner::new(REJECT);
        let mut out = Vec::new();
        assert_eq!(s.feed(b"a\r\n", &mut out), Scan::More);
        assert_eq!(
            s.feed(b".\r\nMAIL FROM:<>\r\n", &mut out),
            Scan::End { consumed: 3 }
        );
        assert!(s.is_done());
        assert_eq!(out, b"a\r\n.\r\n");
        assert_eq!(s.size(), 3);
        // Fed again after the end: nothing consumed, nothing appended.
        assert_eq!(s.feed(b"x", &mut out), Scan::End { consumed: 0 });
        assert_eq!(out, b"a\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing_preserved() {
        let input = b"..\r\n..leading\r\n...\r\n.x\r\nmid.dle\r\n. \r\n.\r\n";
        for opts in [REJECT, NORMALIZE] {
            let o = run_all_splits(opts, input);
            assert_eq!(o.out, input);
            assert_eq!(
                o.scan,
                Scan::End {
                    consumed: input.len()
                }
            );
            assert!(!o.bare);
        }
    }

    #[test]
    fn not_an_end() {
        // Things that look like an end but are not; the real end comes later.
        for v in [
            &b"a\r\n. \r\n"[..],
            b"a\r\n.. \r\n",
            b"a\r\n..\r\n",
            b"a.\r\n",
            b"a\r\n .\r\n",
        ] {
            let mut input = v.to_vec();
            input.extend_from_slice(b"z\r\n.\r\n");
            for opts in [REJECT, NORMALIZE] {
                let o = run_all_splits(opts, &input);
                assert_eq!(o.out, input);
                assert_eq!(
                    o.scan,
                    Scan::End {
                        consumed: input.len()
                    }
                );
            }
        }
    }

    /// Index of the first bare CR / LF.
    fn first_bare(v: &[u8]) -> usize {
        (0..v.len())
            .find(|&i| {
                v[i] == b'\n' && (i == 0 || v[i - 1] != b'\r')
                    || v[i] == b'\r' && v.get(i + 1) != Some(&b'\n')
            })
            .unwrap()
    }

    #[test]
    fn smuggling_reject_mode() {
        for v in SMUGGLE {
            let mut input = b"Subject: x\r\n\r\nbody".to_vec();
            let bare_at = input.len() + first_bare(v);
            input.extend_from_slice(v);
            input.extend_from_slice(b"MAIL FROM:<evil@example>\r\nRCPT TO:<v@example>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n");
            let end = input.len() - 6;
            let o = run_all_splits(REJECT, &input);
            assert!(o.bare, "{v:?}");
            assert_eq!(o.out, &input[..bare_at], "{v:?}");
            assert_eq!(o.scan, Scan::End { consumed: end }, "{v:?}");
            assert_eq!(o.size, end as u64 - 3);
            // Whatever was forwarded cannot end the data at a backend.
            assert_eq!(postfix_end(&o.out), None, "{v:?}");
            assert_eq!(o, reference(REJECT, &input));
        }
    }

    #[test]
    fn smuggling_normalize_mode() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"\n.\n", b"\r\n..\r\n"),
            (b"\r.\r", b"\r\n..\r\n"),
            (b"\r\n.\n", b"\r\n..\r\n"),
            (b"\n.\r\n", b"\r\n..\r\n"),
            (b"\r.\r\n", b"\r\n..\r\n"),
            (b"\r\n.\r\r\n", b"\r\n..\r\n\r\n"),
        ];
        assert_eq!(cases.len(), SMUGGLE.len());
        for &(v, expected) in cases {
            let mut input = b"Subject: x\r\n\r\nbody".to_vec();
            input.extend_from_slice(v);
            input.extend_from_slice(b"MAIL FROM:<evil@example>\r\n.\r\nQUIT\r\n");
            let end = input.len() - 6;
            let o = run_all_splits(NORMALIZE, &input);
            let mut want = b"Subject: x\r\n\r\nbody".to_vec();
            want.extend_from_slice(expected);
            want.extend_from_slice(b"MAIL FROM:<evil@example>\r\n.\r\n");
            assert_eq!(o.out, want, "{v:?}");
            assert!(o.bare, "{v:?}");
            assert_eq!(o.scan, Scan::End { consumed: end }, "{v:?}");
            assert_eq!(o.size, end as u64 - 3);
            assert_eq!(postfix_end(&o.out), Some(o.out.len()), "{v:?}");
            assert_eq!(o, reference(NORMALIZE, &input));
        }
    }

    #[test]
    fn smuggling_vectors_at_data_start() {
        // At the very start of the data the `.` line rules still hold.
        let cases: &[(&[u8], &[u8])] = &[
            (b".\n", b"..\r\n"),
            (b".\r\r\n", b"..\r\n\r\n"),
            (b".\rx", b"..\r\nx"),
            (b"\n.\r\n", b"\r\n..\r\n"),
            (b"\r.\r\n", b"\r\n..\r\n"),
        ];
        for &(v, expected) in cases {
            let mut input = v.to_vec();
            input.extend_from_slice(b"\r\n.\r\n");
            let o = run_all_splits(NORMALIZE, &input);
            let mut want = expected.to_vec();
            want.extend_from_slice(b"\r\n.\r\n");
            assert_eq!(o.out, want, "{v:?}");
            assert_eq!(postfix_end(&o.out), Some(o.out.len()), "{v:?}");
            let r = run_all_splits(REJECT, &input);
            assert!(r.bare);
            assert_eq!(postfix_end(&r.out), None);
            assert_eq!(
                r.scan,
                Scan::End {
                    consumed: input.len()
                }
            );
        }
    }

    #[test]
    fn normalize_lines() {
        let o = run_all_splits(NORMALIZE, b"a\nb\rc\r\r\nd\n\n.e\n..f\r\n.g\r\n.\r\n");
        assert_eq!(
            o.out,
            b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n..e\r\n...f\r\n.g\r\n.\r\n"
        );
        assert!(o.bare);
        // A clean-start line beginning with `.` keeps the client's stuffing
        // even when it ends with a bare line ending.
        let o = run_all_splits(NORMALIZE, b"x\r\n.y\nz\r\n.\r\n");
        assert_eq!(o.out, b"x\r\n.y\r\nz\r\n.\r\n");
        // A clean "." line that ends in a bare CR gets stuffed.
        let o = run_all_splits(NORMALIZE, b"x\r\n.\rz\r\n.\r\n");
        assert_eq!(o.out, b"x\r\n..\r\nz\r\n.\r\n");
        assert_eq!(postfix_end(&o.out), Some(o.out.len()));
    }

    #[test]
    fn reject_mode_stops_output_but_finds_end() {
        let input = b"ok line\r\nbad\nline\r\nmore\r\n.\r\nNOOP\r\n";
        let o = run_all_splits(REJECT, input);
        assert_eq!(o.out, b"ok line\r\nbad");
        assert!(o.bare);
        assert_eq!(
            o.scan,
            Scan::End {
                consumed: input.len() - 6
            }
        );
        // A "." after a bare line ending is not the end.
        let input = b"a\n.\r\nb\r\n.\r\n";
        let o = run_all_splits(REJECT, input);
        assert_eq!(o.out, b"a");
        assert_eq!(
            o.scan,
            Scan::End {
                consumed: input.len()
            }
        );
    }

    #[test]
    fn held_bytes_released() {
        let mut s = DataScanner::new(REJECT);
        let mut out = Vec::new();
        assert_eq!(s.feed(b"abc\r", &mut out), Scan::More);
        assert_eq!(out, b"abc");
        assert_eq!(s.feed(b"\n", &mut out), Scan::More);
        assert_eq!(out, b"abc\r\n");
        assert_eq!(s.feed(b".", &mut out), Scan::More);
        assert_eq!(out, b"abc\r\n");
        assert_eq!(s.feed(b"\r", &mut out), Scan::More);
        assert_eq!(out, b"abc\r\n");
        assert_eq!(s.feed(b"\n", &mut out), Scan::End { consumed: 1 });
        assert_eq!(out, b"abc\r\n.\r\n");

        let mut s = DataScanner::new(REJECT);
        let mut out = Vec::new();
        s.feed(b".", &mut out);
        assert_eq!(out, b"");
        s.feed(b".x\r", &mut out);
        assert_eq!(out, b"..x");
        s.feed(b"y", &mut out);
        assert_eq!(out, b"..x");
        assert!(s.bare_line_ending_seen());

        let mut s = DataScanner::new(NORMALIZE);
        let mut out = Vec::new();
        s.feed(b"abc\r", &mut out);
        assert_eq!(out, b"abc");
        s.feed(b"y", &mut out);
        assert_eq!(out, b"abc\r\ny");
    }

    #[test]
    fn discard() {
        let mut s = DataScanner::new(REJECT);
        let mut out = Vec::new();
        s.feed(b"first\r\nsec", &mut out);
        assert_eq!(out, b"first\r\nsec");
        s.set_discard();
        assert!(!s.emitting());
        assert_eq!(
            s.feed(b"ond\r\n.\r\nQUIT", &mut out),
            Scan::End { consumed: 8 }
        );
        assert_eq!(out, b"first\r\nsec");
        assert_eq!(s.size(), 15);

        let mut s = DataScanner::new(NORMALIZE);
        let mut out = Vec::new();
        s.set_discard();
        assert_eq!(
            s.feed(b"a\nb\r\n.\r\n", &mut out),
            Scan::End { consumed: 8 }
        );
        assert!(out.is_empty());
        assert!(s.bare_line_ending_seen());
    }

    #[test]
    fn long_lines() {
        let opts = |max_line| DataOptions {
            bare_line_endings: BareLineEndings::Reject,
            max_line,
        };
        let line = |n: usize| {
            let mut v = vec![b'x'; n];
            v.extend_from_slice(b"\r\n.\r\n");
            v
        };
        // 998 content bytes + CRLF = 1000: fine; 999: too long.
        let o = run(opts(1000), &line(998));
        assert!(!o.long);
        assert_eq!(o.out, line(998));
        let o = run(opts(1000), &line(999));
        assert!(o.long);
        assert_eq!(o.out, line(999), "output continues");
        let o = run(opts(0), &line(100_000));
        assert!(!o.long);
        // Split anywhere: same verdict.
        let o = run_all_splits(opts(10), &line(9));
        assert!(o.long);
        let o = run_all_splits(opts(10), &line(8));
        assert!(!o.long);
        // Bare line endings also end lines.
        let o = run_all_splits(opts(10), b"12345678\n12345678\r12345678\r\n.\r\n");
        assert!(!o.long);
        assert_eq!(DataOptions::default().max_line, 1000);
    }

    #[test]
    fn size_counts_client_bytes() {
        let input = b"ab\r\n..c\r\n.\r\n";
        for opts in [REJECT, NORMALIZE] {
            let o = run_all_splits(opts, input);
            assert_eq!(o.size, 9);
        }
        let mut s = DataScanner::new(NORMALIZE);
        let mut out = Vec::new();
        s.feed(b"a\nb", &mut out);
        assert_eq!(s.size(), 3);
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn matches_reference_model_on_random_inputs() {
        let alphabet = b"\r\n.\r\n.ab";
        let mut seed = 0xdead_beef_cafe_f00du64;
        for round in 0..4000u32 {
            let len = (xorshift(&mut seed) % 14) as usize;
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[(xorshift(&mut seed) % alphabet.len() as u64) as usize])
                .collect();
            if round.is_multiple_of(2) {
                input.extend_from_slice(b"\r\n.\r\nX");
            }
            for max_line in [0, 3, 4] {
                for mode in [BareLineEndings::Reject, BareLineEndings::Normalize] {
                    let opts = DataOptions {
                        bare_line_endings: mode,
                        max_line,
                    };
                    let o = run_all_splits(opts, &input);
                    assert_eq!(o, reference(opts, &input), "{mode:?} {max_line} {input:?}");
                    // Whatever goes out has no bare CR / LF (a held CR is
                    // never in `out`).
                    assert!(no_bare(&o.out), "{mode:?} {input:?} -> {:?}", o.out);
                    if let Scan::End { .. } = o.scan {
                        match mode {
                            BareLineEndings::Normalize => {
                                assert_eq!(postfix_end(&o.out), Some(o.out.len()), "{input:?}");
                                // And the content round-trips to what a
                                // CRLF-only reading of the output gives.
                                let mut u = Unstuffer::new();
                                let mut content = Vec::new();
                                u.feed(&o.out, &mut content);
                                assert!(u.is_done());
                            }
                            BareLineEndings::Reject if o.bare => {
                                assert_eq!(postfix_end(&o.out), None, "{input:?}");
                            }
                            BareLineEndings::Reject => {
                                assert_eq!(postfix_end(&o.out), Some(o.out.len()), "{input:?}");
                            }
                        }
                    } else {
                        assert_eq!(postfix_end(&o.out), None, "{input:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_chunking_of_longer_inputs() {
        let alphabet = b"\r\n.\r\n.abcdefgh \r\n";
        let mut seed = 0x5151_2024_abcd_0001u64;
        for _ in 0..3000 {
            let len = (xorshift(&mut seed) % 200) as usize;
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[(xorshift(&mut seed) % alphabet.len() as u64) as usize])
                .collect();
            input.extend_from_slice(b"\r\n.\r\nNEXT");
            let mut cuts: Vec<usize> = (0..(xorshift(&mut seed) % 12))
                .map(|_| (xorshift(&mut seed) as usize) % (input.len() + 1))
                .collect();
            cuts.sort_unstable();
            for mode in [BareLineEndings::Reject, BareLineEndings::Normalize] {
                let opts = DataOptions {
                    bare_line_endings: mode,
                    max_line: 20,
                };
                let o = run_split(opts, &input, &cuts);
                assert_eq!(o, reference(opts, &input), "{mode:?} {input:?} {cuts:?}");
                assert!(no_bare(&o.out));
            }
        }
    }

    /// Inputs long enough for the block path: plain 20-90 byte lines with,
    /// now and then, a bare CR or LF, a dot line, an empty line or a long
    /// line, at every offset from the blocks' edges.
    #[test]
    fn block_path_matches_reference_model() {
        let mut seed = 0x0b10_c0de_2026_1201u64;
        for round in 0..600u32 {
            let mut input = Vec::new();
            let lines = 1 + xorshift(&mut seed) % 12;
            for _ in 0..lines {
                let len = 20 + (xorshift(&mut seed) % 70) as usize;
                input.extend((0..len).map(|k| b'a' + (k % 26) as u8));
                input.extend_from_slice(match xorshift(&mut seed) % 24 {
                    0 => b"\n",
                    1 => b"\r",
                    2 => b"\r\n.",
                    3 => b"\r\n..",
                    4 => b"\r\n\r\n",
                    5 => b"\r\r\n",
                    6 => b"\n.\n",
                    _ => b"\r\n",
                });
            }
            if round % 3 == 0 {
                let at = (xorshift(&mut seed) as usize) % (input.len() + 1);
                input.insert(at, b'.');
            }
            input.extend_from_slice(b"\r\n.\r\nNEXT");
            for max_line in [0, 40, 80] {
                for mode in [BareLineEndings::Reject, BareLineEndings::Normalize] {
                    let opts = DataOptions {
                        bare_line_endings: mode,
                        max_line,
                    };
                    let whole = run(opts, &input);
                    assert_eq!(
                        whole,
                        reference(opts, &input),
                        "{mode:?} {max_line} {input:?}"
                    );
                    for k in (0..=input.len()).step_by(7) {
                        assert_eq!(
                            run_split(opts, &input, &[k]),
                            whole,
                            "{mode:?} {k} {input:?}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block_masks_agree() {
        let mut seed = 0x3a5c_77e1_0102_0304u64;
        for _ in 0..2000 {
            let b: Vec<u8> = (0..64)
                .map(|_| b"\r\nab."[(xorshift(&mut seed) % 5) as usize])
                .collect();
            let bit = |c: u8| {
                b.iter()
                    .enumerate()
                    .filter(|&(_, &x)| x == c)
                    .fold(0u64, |m, (k, _)| m | 1 << k)
            };
            let want = (bit(b'\r'), bit(b'\n'), bit(b'.'));
            assert_eq!(super::block::Masks::Sse2.masks(&b), want);
            if std::arch::is_x86_feature_detected!("avx2") {
                assert_eq!(super::block::Masks::Avx2.masks(&b), want);
            }
        }
    }

    #[test]
    fn big_body_many_chunks() {
        let mut body = Vec::new();
        for i in 0..5000u32 {
            if i.is_multiple_of(7) {
                body.extend_from_slice(b".");
            }
            body.extend_from_slice(
                format!("line {i} of the body, some text to fill it up\r\n").as_bytes(),
            );
        }
        let mut input = body.clone();
        input.extend_from_slice(b".\r\n");
        for chunk in [1, 2, 3, 7, 64, 1000, 4096, 65536] {
            for opts in [REJECT, NORMALIZE] {
                let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
                let o = run_split(opts, &input, &cuts);
                assert_eq!(o.out, input);
                assert_eq!(
                    o.scan,
                    Scan::End {
                        consumed: input.len()
                    }
                );
                assert_eq!(o.size, body.len() as u64);
            }
        }
    }

    fn unstuff_split(wire: &[u8], cuts: &[usize]) -> (Vec<u8>, bool) {
        let mut u = Unstuffer::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&wire.len())) {
            u.feed(&wire[start..end], &mut out);
            start = end;
        }
        (out, u.is_done())
    }

    fn unstuff_all_splits(wire: &[u8]) -> (Vec<u8>, bool) {
        let whole = unstuff_split(wire, &[]);
        for k in 0..=wire.len() {
            assert_eq!(unstuff_split(wire, &[k]), whole, "split at {k} of {wire:?}");
        }
        let bytes: Vec<usize> = (1..wire.len()).collect();
        assert_eq!(unstuff_split(wire, &bytes), whole);
        whole
    }

    #[test]
    fn unstuffer_basics() {
        assert_eq!(unstuff_all_splits(b".\r\n"), (b"".to_vec(), true));
        assert_eq!(
            unstuff_all_splits(b"a\r\n..b\r\n..\r\n.c\r\n.\r\nignored\r\n"),
            (b"a\r\n.b\r\n.\r\nc\r\n".to_vec(), true)
        );
        assert_eq!(
            unstuff_all_splits(b"a\r\n..b"),
            (b"a\r\n.b".to_vec(), false)
        );
        assert_eq!(
            unstuff_all_splits(b"a\r\n.\rb\r\n"),
            (b"a\r\n\rb\r\n".to_vec(), false)
        );
        assert_eq!(unstuff_all_splits(b"a.b\r\n"), (b"a.b\r\n".to_vec(), false));
    }

    #[test]
    fn unstuffer_round_trips() {
        let mut seed = 0x0123_4567_89ab_cdefu64;
        let lines: &[&[u8]] = &[b"", b".", b"..", b".x", b"x.", b"plain text", b". .", b"\r"];
        for _ in 0..500 {
            let mut content = Vec::new();
            for _ in 0..(xorshift(&mut seed) % 8) {
                content
                    .extend_from_slice(lines[(xorshift(&mut seed) % lines.len() as u64) as usize]);
                content.extend_from_slice(b"\r\n");
            }
            let mut wire = stuff(&content);
            wire.extend_from_slice(b".\r\n");
            // The scanner passes clean wire data through unchanged ...
            for opts in [REJECT, NORMALIZE] {
                let o = run(opts, &wire);
                if !o.bare {
                    assert_eq!(o.out, wire);
                    assert_eq!(o.size, wire.len() as u64 - 3);
                }
            }
            // ... and the unstuffer gives the content back.
            let (got, done) = unstuff_all_splits(&wire);
            assert!(done);
            assert_eq!(got, content);
        }
    }

    #[test]
    fn normalized_output_unstuffs_to_crlf_content() {
        // Content as a CRLF-only reader would see it after normalization.
        let input = b"a\n.b\r.\rc\r\n..d\n.\r\n.\r\n";
        let o = run_all_splits(NORMALIZE, input);
        assert_eq!(o.out, b"a\r\n..b\r\n..\r\nc\r\n..d\r\n..\r\n.\r\n");
        let (content, done) = unstuff_all_splits(&o.out);
        assert!(done);
        assert_eq!(content, b"a\r\n.b\r\n.\r\nc\r\n.d\r\n.\r\n");
    }
}
