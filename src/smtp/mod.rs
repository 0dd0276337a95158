//! The SMTP protocol, sans-IO: bytes in, values out. Owns the command parser,
//! the reply codec, the DATA scanner and the BDAT content checker; knows
//! nothing of sockets or tokio.

pub mod bdat;
pub mod command;
pub mod data;
pub mod domain;
pub mod reply;

pub use bdat::{bdat_command, ChunkChecker, Stuffer};
pub use command::{Body, Command, CommandError, MailParams};
pub use data::{BareLineEndings, DataOptions, DataScanner, Output, Scan, Segments, Unstuffer};
pub use reply::{Answered, EnhancedCode, Reply, ReplyError};
