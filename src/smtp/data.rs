//! DATA body scanner: finds the end of data (`<CRLF>.<CRLF>` and nothing
//! else), detects or normalizes bare CR / LF (SMTP smuggling), counts size
//! and long lines, and preserves dot-stuffing. Also the un-stuffer used for
//! local delivery.

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

/// Streaming scanner for one message body. State carries across chunks.
#[derive(Debug)]
pub struct DataScanner {
    _private: (),
}

impl DataScanner {
    pub fn new(opts: DataOptions) -> DataScanner {
        todo!()
    }
    /// Scans `input`, appending the bytes to forward to the backend to `out`
    /// (wire form: still dot-stuffed, CRLF line endings, including the final
    /// `.\r\n` once the end is seen). Bytes whose meaning depends on what
    /// follows (a CR, a lone `.` at a line start) are held back until known.
    /// Nothing is appended while discarding (see `set_discard`) or, in Reject
    /// mode, from the first bare CR / LF on.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Scan {
        todo!()
    }
    /// Stop appending output (message refused, e.g. too large); scanning
    /// for the end of data continues.
    pub fn set_discard(&mut self) {
        todo!()
    }
    /// A bare CR or LF was seen (in either mode).
    pub fn bare_line_ending_seen(&self) -> bool {
        todo!()
    }
    /// A line longer than `max_line` was seen.
    pub fn long_line_seen(&self) -> bool {
        todo!()
    }
    /// Bytes of message received so far, as sent by the client, not counting
    /// the terminating `.\r\n`.
    pub fn size(&self) -> u64 {
        todo!()
    }
}

/// Turns wire-form data (CRLF lines, dot-stuffed, possibly ending with the
/// `.\r\n` terminator line) into message content: removes one leading dot of
/// each line and the terminator line. Streaming; state carries across chunks.
#[derive(Debug, Default)]
pub struct Unstuffer {
    _private: (),
}

impl Unstuffer {
    pub fn new() -> Unstuffer {
        todo!()
    }
    /// Appends the content of `wire` to `out`.
    pub fn feed(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        todo!()
    }
}
