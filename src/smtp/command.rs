//! SMTP command line parser (RFC 5321 grammar, ESMTP parameters of RFC 1870,
//! 6152 and 6531). Takes one line without its CRLF, returns a borrowed value.

use super::reply::Reply;

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
/// null reverse path is `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail { from: &'a str, params: MailParams },
    Rcpt { to: &'a str },
    Data,
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
        todo!()
    }
}

/// Parses one command line (without the trailing CRLF / LF).
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    todo!()
}
