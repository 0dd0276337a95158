//! SMTP replies: codes, enhanced status codes (RFC 3463), formatting of
//! single- and multi-line replies and incremental parsing of backend replies.

/// An RFC 3463 enhanced status code, e.g. `5.5.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

/// One SMTP reply: a three-digit code, an optional enhanced code and one or
/// more text lines (without the code / enhanced code prefix, without CRLF).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    pub lines: Vec<String>,
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
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Reply {
        todo!()
    }
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        todo!()
    }
    /// 4xx.
    pub fn is_transient(&self) -> bool {
        todo!()
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        todo!()
    }
    /// Appends the wire form (`250-...\r\n` ... `250 ...\r\n`), each line
    /// carrying the enhanced code when there is one.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        todo!()
    }
    /// Parses one complete (possibly multi-line) reply from the front of
    /// `buf`. `Ok(None)`: incomplete, read more. `Ok(Some((reply, used)))`:
    /// `used` bytes were consumed. Enhanced codes are recognised only when the
    /// first digit matches the reply code's class. Bounded: line length
    /// `MAX_REPLY_LINE`, at most `MAX_REPLY_LINES` lines.
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        todo!()
    }
}

/// Longest backend reply line accepted (bytes, with CRLF).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines accepted in one backend reply.
pub const MAX_REPLY_LINES: usize = 128;

/// Fast path for a fixed one-line reply: appends `"{code} {enh} {text}\r\n"`
/// with no allocation.
pub fn write_reply(out: &mut Vec<u8>, code: u16, enhanced: &str, text: &str) {
    todo!()
}
