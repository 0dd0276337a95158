//! The backend side: the set of configured backends (`Backends`), selection
//! with fail-over, and one mail transaction relayed to a backend (`Txn`):
//! identity (XFORWARD / XCLIENT), pipelined MAIL/RCPT/DATA, streamed data,
//! the final reply. Owns no queue: the backend's reply decides.
//!
//! This file holds the types and the replies the proxy gives for a backend
//! that fails; `select.rs` is their behaviour on the set (building it from
//! `[[backend]]`, round robin over the backends that are up, the pool
//! wait, XCLIENT connections, retiring on reload), `txn.rs` that of one
//! transaction. `unknown.rs` remembers recipients a backend refused as
//! unknown. `route.rs` is the groups of backends and the `[[route]]`
//! table that picks one per recipient domain; `pool.rs` is one backend's
//! pool and health, `client.rs` one backend connection, `maildir.rs` local
//! delivery.

pub mod client;
pub mod maildir;
pub mod pool;
pub mod route;
mod select;
pub mod tls;
mod txn;
pub mod unknown;

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::config::IdentityMode;
use crate::smtp::{EnhancedCode, Reply};
use crate::telemetry::own;
use maildir::{Maildir, MaildirWriter};
use pool::{Pool, PooledConn};
use route::{Group, GroupId, Routes};

enum Backend {
    Smtp {
        pool: Pool,
        identity: IdentityMode,
        /// The backend was found not to offer the identity command
        /// (XFORWARD or XCLIENT): logged once per backend (and reload).
        identity_missing: std::sync::atomic::AtomicBool,
    },
    Maildir(Maildir),
}

/// `Backends` sets made so far in this process: each gets its own
/// generation, and its connections carry it.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// All configured backends (one generation of them): `Backend::Smtp` (a
/// pool and the identity mode) or `Backend::Maildir`, their groups and the
/// `[[route]]` table. Sessions load the current set from an `ArcSwap` at
/// each MAIL (or, with routes, at the RCPT that begins a transaction); a
/// reload of `[[backend]]` or `[[route]]` swaps in a new set and retires
/// this one.
pub struct Backends {
    backends: Vec<Backend>,
    /// The selection sets: one of every backend without routes, one per
    /// routed group with them.
    groups: Vec<Group>,
    /// None without `[[route]]`: every recipient goes to group 0.
    routes: Option<Routes>,
    /// `hostname`, normalized: the domain of a recipient without one
    /// (`postmaster`).
    hostname: String,
    /// Recipients the backends refused as unknown (None: the cache is off).
    unknown: Option<unknown::UnknownRecipients>,
    /// This set's generation (a reload of `[[backend]]` makes a new one).
    generation: u64,
    /// Replaced by a reload: connections are QUIT after their transaction
    /// instead of pooled.
    retired: std::sync::atomic::AtomicBool,
    command_timeout: Duration,
    data_end_timeout: Duration,
}

fn temp_failure(text: &str) -> Reply {
    own(Reply::new(451, EnhancedCode(4, 4, 1), text))
}

/// No backend could be reached with the TLS its configuration requires
/// (not offered, refused, an untrusted certificate): nothing was sent in
/// plaintext. RFC 3463 X.7.10 "Encryption needed".
fn tls_failure() -> Reply {
    own(Reply::new(
        451,
        EnhancedCode(4, 7, 10),
        "TLS to the backend failed, try again later",
    ))
}

/// A backend's 421 (it is closing the connection) as the client hears it:
/// a 451 with the backend's text, since the client's session goes on.
fn closing_to_451(r: &Reply) -> Reply {
    let mut out = Reply::new(451, EnhancedCode(4, 4, 2), "Backend closed the connection");
    let first = r.first_line();
    if !first.is_empty() {
        out.push_text(": ");
        out.push_text(first);
    }
    own(out)
}

/// The reply a client gets when the backend failed before its final word.
pub fn backend_lost() -> Reply {
    own(Reply::new(
        451,
        EnhancedCode(4, 4, 2),
        "Backend connection lost, try again later",
    ))
}

pub(crate) enum Pend {
    /// A reply the proxy consumes itself (RSET, XFORWARD).
    Internal(&'static str),
    /// A reply that goes to the client.
    Client,
    /// A RCPT's reply, which goes to the client and may be remembered
    /// (`unknown.rs`).
    Rcpt,
}

/// A transaction's buffers, kept with its backend connection between
/// transactions: a steady stream of messages over pooled connections
/// allocates none of them.
#[derive(Default)]
pub(crate) struct TxnBufs {
    wbuf: Vec<u8>,
    replay: Vec<u8>,
    pending: VecDeque<Pend>,
}

enum Inner {
    Smtp {
        conn: Option<PooledConn>,
        wbuf: Vec<u8>,
        /// What earlier batches sent since checkout before any reply came
        /// (seldom any), to replay with the current batch in `wbuf` on a
        /// fresh connection if a reused one turns out dead (while
        /// `replaying`; `Txn::reconnect`).
        replay: Vec<u8>,
        replaying: bool,
        reused: bool,
        dedicated: bool,
        completed: bool,
    },
    Maildir {
        /// Boxed: a `Txn` of either kind stays small to move.
        writer: Option<Box<MaildirWriter>>,
        replies: VecDeque<Reply>,
        rcpts: usize,
    },
}

/// One mail transaction at one backend.
pub struct Txn {
    backends: Arc<Backends>,
    /// The group it was begun on (of `backends`).
    group: GroupId,
    inner: Inner,
    pending: VecDeque<Pend>,
    /// The `smtp.backend` span (disabled for a Maildir).
    span: tracing::Span,
    /// The backend's address or Maildir path, for logs.
    pub name: Arc<str>,
}
