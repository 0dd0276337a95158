//! The SMTP protocol, sans-IO: bytes in, values out. Owns the command parser,
//! the reply codec and the DATA scanner; knows nothing of sockets or tokio.

pub mod command;
pub mod data;
pub mod reply;

pub use command::{Body, Command, CommandError, MailParams};
pub use data::{BareLineEndings, DataOptions, DataScanner, Output, Scan, Segments, Unstuffer};
pub use reply::{EnhancedCode, Reply, ReplyError};
