//! The backend side: the set of configured backends, selection with
//! fail-over, and one mail transaction relayed to a backend (`Txn`):
//! identity (XFORWARD / XCLIENT), pipelined MAIL/RCPT/DATA, streamed data,
//! the final reply. Owns no queue: the backend's reply decides.

pub mod client;
pub mod maildir;
pub mod pool;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, IdentityMode};
use crate::smtp::{Body, EnhancedCode, MailParams, Reply};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::own;
use client::{identity_commands, BackendError, ClientIdentity};
use maildir::{Maildir, MaildirWriter};
use pool::{Pool, PoolSettings, PoolStat, PooledConn, Wait};

enum Backend {
    Smtp { pool: Pool, identity: IdentityMode },
    Maildir(Maildir),
}

/// Relays made so far in this process: each gets its own generation, and
/// its connections carry it.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// All configured backends.
pub struct Relay {
    backends: Vec<Backend>,
    next: AtomicUsize,
    /// This relay's generation (a reload of `[[backend]]` makes a new one).
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

impl Relay {
    pub fn new(cfg: &Config, metrics: &Metrics) -> std::io::Result<Arc<Relay>> {
        let t = &cfg.timeouts;
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let mut backends = Vec::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            if let Some(addr) = &b.address {
                backends.push(Backend::Smtp {
                    pool: Pool::new(
                        PoolSettings {
                            addr: addr.clone(),
                            backend: i,
                            helo_name: cfg.hostname.clone(),
                            max_connections: b.max_connections,
                            max_idle: Duration::from_secs_f64(b.max_idle),
                            max_transactions: b.max_transactions,
                            connect_timeout: Duration::from_secs_f64(t.backend_connect),
                            command_timeout: Duration::from_secs_f64(t.backend_command),
                            pool_wait: Duration::from_secs_f64(t.backend_pool_wait),
                            down_after: b.down_after,
                            probe_interval: Duration::from_secs_f64(b.probe_interval),
                            probe_interval_max: Duration::from_secs_f64(b.probe_interval_max),
                            generation,
                        },
                        metrics.backend(addr),
                    ),
                    identity: b.identity,
                });
            } else if let Some(dir) = &b.maildir {
                backends.push(Backend::Maildir(Maildir::open(dir, &cfg.hostname)?));
            }
        }
        Ok(Arc::new(Relay {
            backends,
            next: AtomicUsize::new(0),
            generation,
            retired: std::sync::atomic::AtomicBool::new(false),
            command_timeout: Duration::from_secs_f64(t.backend_command),
            data_end_timeout: Duration::from_secs_f64(t.backend_data_end),
        }))
    }

    /// Starts the idle reaper; call once inside the runtime.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(relay) = weak.upgrade() else { return };
                for b in &relay.backends {
                    if let Backend::Smtp { pool, .. } = b {
                        pool.reap();
                    }
                }
            }
        });
    }

    /// Takes this relay out of service after a reload replaced it: idle
    /// connections get QUIT now, those in use after their transaction.
    pub fn retire(self: &Arc<Self>) {
        self.retired.store(true, Ordering::Release);
        let me = self.clone();
        tokio::spawn(async move { me.close_idle().await });
    }

    /// The backend addresses (or Maildir paths), in configuration order.
    pub fn names(&self) -> Vec<String> {
        self.backends
            .iter()
            .map(|b| match b {
                Backend::Smtp { pool, .. } => pool.settings().addr.clone(),
                Backend::Maildir(md) => md.root().display().to_string(),
            })
            .collect()
    }

    /// QUITs all idle backend connections.
    pub async fn close_idle(&self) {
        for b in &self.backends {
            if let Backend::Smtp { pool, .. } = b {
                pool.close_idle().await;
            }
        }
    }

    /// Idle connections held per backend (for tests and metrics).
    pub fn idle_counts(&self) -> Vec<usize> {
        self.backends
            .iter()
            .map(|b| match b {
                Backend::Smtp { pool, .. } => pool.idle_count(),
                Backend::Maildir(_) => 0,
            })
            .collect()
    }

    fn pool(&self, i: usize) -> Option<&Pool> {
        match self.backends.get(i) {
            Some(Backend::Smtp { pool, .. }) => Some(pool),
            _ => None,
        }
    }

    /// The state of every SMTP backend's pool (for metrics).
    pub fn pool_stats(&self) -> Vec<PoolStat> {
        self.backends
            .iter()
            .filter_map(|b| match b {
                Backend::Smtp { pool, .. } => Some(pool.stat()),
                Backend::Maildir(_) => None,
            })
            .collect()
    }

    /// Up/down per backend (a Maildir is always up), for tests and metrics.
    pub fn backends_up(&self) -> Vec<bool> {
        self.backends
            .iter()
            .map(|b| match b {
                Backend::Smtp { pool, .. } => pool.is_up(),
                Backend::Maildir(_) => true,
            })
            .collect()
    }

    /// Begins a transaction for `id`: picks a backend and a connection, and
    /// queues the identity. Backends marked down are skipped. Round robin
    /// first asks each backend for a connection without waiting; when every
    /// backend that is up is busy, the transaction waits in line at the
    /// first busy one (first come first served, `backend_pool_wait`). A
    /// dedicated (XCLIENT) connection of the session is used when given.
    pub async fn begin(
        self: &Arc<Self>,
        id: &ClientIdentity,
        dedicated: Option<PooledConn>,
    ) -> Result<Txn, Reply> {
        // A session's XCLIENT connection from before a reload of the
        // backends belongs to the old relay: let it go.
        let dedicated = match dedicated {
            Some(c) if c.generation != self.generation => {
                tokio::spawn(c.quit());
                None
            }
            other => other,
        };
        if let Some(conn) = dedicated {
            if conn.idle_ok() {
                return Ok(Txn::smtp(self.clone(), conn, false, true));
            }
            // The backend closed the session's connection between two
            // transactions: open a new one (with a new XCLIENT) below.
            tracing::debug!(backend = %conn.peer, "dedicated connection closed; reopening");
        }
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut busy = None;
        for k in 0..n {
            let i = (start + k) % n;
            match &self.backends[i] {
                Backend::Maildir(md) => match Box::pin(md.begin()).await {
                    Ok(w) => {
                        return Ok(Txn {
                            relay: self.clone(),
                            inner: Inner::Maildir {
                                writer: Some(w),
                                replies: VecDeque::new(),
                                rcpts: 0,
                            },
                            pending: VecDeque::new(),
                            span: tracing::Span::none(),
                            name: md.root().display().to_string().into(),
                        })
                    }
                    Err(e) => {
                        tracing::error!(maildir = %md.root().display(), "cannot create message file: {e}")
                    }
                },
                Backend::Smtp { pool, .. } if !pool.is_up() => {}
                Backend::Smtp { .. } => match self.begin_smtp(i, id, Wait::No).await {
                    Ok(txn) => return Ok(txn),
                    Err(BackendError::Exhausted) => {
                        busy.get_or_insert(i);
                    }
                    Err(_) => {}
                },
            }
        }
        let Some(i) = busy else {
            return Err(temp_failure("No backend available, try again later"));
        };
        match self.begin_smtp(i, id, Wait::Yes).await {
            Ok(txn) => Ok(txn),
            Err(BackendError::Exhausted) => Err(own(Reply::new(
                451,
                EnhancedCode(4, 4, 5),
                "All backend connections busy, try again later",
            ))),
            Err(_) => Err(temp_failure("No backend available, try again later")),
        }
    }

    /// A transaction on SMTP backend `i`: a pooled connection with XFORWARD
    /// queued, or a new dedicated one with XCLIENT said.
    async fn begin_smtp(
        self: &Arc<Self>,
        i: usize,
        id: &ClientIdentity,
        wait: Wait,
    ) -> Result<Txn, BackendError> {
        let Backend::Smtp { pool, identity } = &self.backends[i] else {
            return Err(BackendError::Closed);
        };
        let t0 = std::time::Instant::now();
        let opened = match identity {
            // Boxed: its connect and XCLIENT exchange would make every
            // checkout's future large.
            IdentityMode::Xclient => Box::pin(self.open_xclient(pool, id, wait))
                .await
                .map(|c| (c, false, true)),
            _ => pool
                .checkout(wait)
                .await
                .map(|(c, reused)| (c, reused, false)),
        };
        match opened {
            Ok((conn, reused, dedicated)) => {
                // One span per backend exchange: checkout to the end of
                // the transaction (it ends when the Txn goes).
                let span = crate::span!(
                    crate::telemetry::in_traced(),
                    "smtp.backend",
                    "otel.kind" = "client",
                    "server.address" = pool.settings().addr.as_str(),
                    "smtp.backend.connection_id" = conn.id(),
                    "smtp.backend.reused" = reused,
                    "smtp.backend.pool_wait_ms" = t0.elapsed().as_secs_f64() * 1000.0,
                );
                let mut txn = Txn::smtp(self.clone(), conn, reused, dedicated);
                txn.span = span;
                if *identity == IdentityMode::Xforward {
                    txn.queue_xforward(id);
                }
                Ok(txn)
            }
            Err(e) => {
                if !matches!(e, BackendError::Exhausted) {
                    tracing::warn!(backend = %pool.settings().addr, "backend unavailable: {e}");
                }
                Err(e)
            }
        }
    }

    async fn open_xclient(
        &self,
        pool: &Pool,
        id: &ClientIdentity,
        wait: Wait,
    ) -> Result<PooledConn, BackendError> {
        // XCLIENT connections never return to the idle list, so this is a
        // new connection (or the slot of one).
        let (mut conn, _) = pool.checkout(wait).await?;
        if conn.caps.xclient.is_empty() {
            tracing::warn!(backend = %pool.settings().addr, "backend does not offer XCLIENT; identity not passed");
            return Ok(conn);
        }
        let mut cmd = Vec::new();
        identity_commands("XCLIENT", &conn.caps.xclient.clone(), id, &mut cmd);
        // Each XCLIENT line is answered with a new greeting.
        let lines = cmd.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
        conn.send(&cmd).await?;
        for _ in 0..lines {
            let r = conn.read_reply(self.command_timeout).await?;
            if r.code != 220 {
                return Err(BackendError::Refused(r));
            }
        }
        // Say EHLO as the client did (Postfix's XCLIENT_README): this EHLO
        // is the HELO name the backend records for the session.
        let helo = id.helo.as_deref().unwrap_or(&pool.settings().helo_name);
        conn.ehlo(helo, self.command_timeout).await?;
        Ok(conn)
    }
}

pub(crate) enum Pend {
    /// A reply the proxy consumes itself (RSET, XFORWARD).
    Internal(&'static str),
    /// A reply that goes to the client.
    Client,
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
        /// Everything sent since checkout until the first reply, to replay
        /// on a fresh connection if a reused one turns out dead (while
        /// `replaying`).
        replay: Vec<u8>,
        replaying: bool,
        reused: bool,
        dedicated: bool,
        completed: bool,
    },
    Maildir {
        writer: Option<MaildirWriter>,
        replies: VecDeque<Reply>,
        rcpts: usize,
    },
}

/// One mail transaction at one backend.
pub struct Txn {
    relay: Arc<Relay>,
    inner: Inner,
    pending: VecDeque<Pend>,
    /// The `smtp.backend` span (disabled for a Maildir).
    span: tracing::Span,
    /// The backend's address or Maildir path, for logs.
    pub name: Arc<str>,
}

impl Txn {
    fn smtp(relay: Arc<Relay>, mut conn: PooledConn, reused: bool, dedicated: bool) -> Txn {
        let name = conn.peer.clone();
        let TxnBufs {
            mut wbuf,
            mut replay,
            mut pending,
        } = std::mem::take(&mut conn.spare);
        wbuf.clear();
        wbuf.reserve(256);
        replay.clear();
        pending.clear();
        let mut txn = Txn {
            relay,
            inner: Inner::Smtp {
                conn: None,
                wbuf,
                replay,
                replaying: true,
                reused,
                dedicated,
                completed: false,
            },
            pending,
            span: tracing::Span::none(),
            name,
        };
        conn.txns += 1;
        if std::mem::take(&mut conn.needs_rset) {
            txn.queue_raw(b"RSET\r\n", Pend::Internal("RSET"));
        }
        if let Inner::Smtp { conn: c, .. } = &mut txn.inner {
            *c = Some(conn);
        }
        txn
    }

    fn queue_raw(&mut self, bytes: &[u8], p: Pend) {
        if let Inner::Smtp { wbuf, .. } = &mut self.inner {
            wbuf.extend_from_slice(bytes);
        }
        self.pending.push_back(p);
    }

    fn queue_xforward(&mut self, id: &ClientIdentity) {
        let Inner::Smtp {
            conn: Some(conn),
            wbuf,
            ..
        } = &mut self.inner
        else {
            return;
        };
        if conn.caps.xforward.is_empty() {
            return;
        }
        // Straight into the batch, a reply owed per line.
        let start = wbuf.len();
        id.xforward_lines(&conn.caps.xforward, wbuf);
        for _ in memchr::memchr_iter(b'\n', &wbuf[start..]) {
            self.pending.push_back(Pend::Internal("XFORWARD"));
        }
    }

    /// Whether commands may be queued several at a time.
    pub fn pipelining(&self) -> bool {
        match &self.inner {
            Inner::Smtp { conn, .. } => conn.as_ref().is_some_and(|c| c.caps.pipelining),
            Inner::Maildir { .. } => true,
        }
    }

    pub fn queue_mail(&mut self, from: &str, params: &MailParams) {
        if let Inner::Maildir { replies, .. } = &mut self.inner {
            replies.push_back(Reply::new(250, EnhancedCode(2, 1, 0), "Ok"));
            return;
        }
        let Inner::Smtp { wbuf, .. } = &mut self.inner else {
            return;
        };
        // Written straight into the batch: no allocation per command.
        wbuf.extend_from_slice(b"MAIL FROM:<");
        wbuf.extend_from_slice(from.as_bytes());
        wbuf.push(b'>');
        if let Some(size) = params.size {
            use std::io::Write;
            let _ = write!(wbuf, " SIZE={size}");
        }
        match params.body {
            Some(Body::SevenBit) => wbuf.extend_from_slice(b" BODY=7BIT"),
            Some(Body::EightBitMime) => wbuf.extend_from_slice(b" BODY=8BITMIME"),
            None => {}
        }
        if params.smtputf8 {
            wbuf.extend_from_slice(b" SMTPUTF8");
        }
        wbuf.extend_from_slice(b"\r\n");
        self.pending.push_back(Pend::Client);
    }

    pub fn queue_rcpt(&mut self, to: &str) {
        if let Inner::Maildir { replies, rcpts, .. } = &mut self.inner {
            *rcpts += 1;
            replies.push_back(Reply::new(250, EnhancedCode(2, 1, 5), "Ok"));
            return;
        }
        if let Inner::Smtp { wbuf, .. } = &mut self.inner {
            wbuf.extend_from_slice(b"RCPT TO:<");
            wbuf.extend_from_slice(to.as_bytes());
            wbuf.extend_from_slice(b">\r\n");
        }
        self.pending.push_back(Pend::Client);
    }

    pub fn queue_data(&mut self) {
        if let Inner::Maildir { replies, rcpts, .. } = &mut self.inner {
            replies.push_back(if *rcpts == 0 {
                Reply::new(554, EnhancedCode(5, 5, 1), "No valid recipients")
            } else {
                Reply::new(
                    354,
                    EnhancedCode(2, 0, 0),
                    "End data with <CR><LF>.<CR><LF>",
                )
            });
            return;
        }
        self.queue_raw(b"DATA\r\n", Pend::Client);
    }

    /// Sends what is queued and collects, in order, the replies owed to the
    /// client. A reused connection that proves dead before its first reply
    /// is replaced by a fresh one and the commands replayed; any other
    /// failure turns every owed reply into a 451.
    pub async fn replies(&mut self, out: &mut Vec<Reply>) {
        if let Inner::Maildir { replies, .. } = &mut self.inner {
            out.extend(replies.drain(..));
            return;
        }
        // Without PIPELINING at the backend, one command per round trip.
        let pipelining = self.pipelining();
        let queued = match &mut self.inner {
            Inner::Smtp { wbuf, .. } => std::mem::take(wbuf),
            Inner::Maildir { .. } => Vec::new(),
        };
        // Pipelined: all of it at once (even nothing: replies may be owed);
        // else line by line.
        let failed = if pipelining {
            let owed = self.pending.len();
            !self.exchange(&queued, owed, out).await
        } else {
            let mut failed = false;
            for line in queued.split_inclusive(|&b| b == b'\n') {
                if failed || !self.exchange(line, 1, out).await {
                    failed = true;
                }
            }
            failed
        };
        if failed {
            if let Inner::Smtp { conn, .. } = &mut self.inner {
                *conn = None;
            }
            for p in self.pending.drain(..) {
                if let Pend::Client = p {
                    out.push(backend_lost());
                }
            }
        }
        if let Inner::Smtp { wbuf, .. } = &mut self.inner {
            *wbuf = queued;
            wbuf.clear();
        }
    }

    /// Sends `bytes` and reads `owed` replies. A reused connection that
    /// proves dead before its first reply is replaced by a fresh one and
    /// everything since checkout replayed. False when the backend failed.
    async fn exchange(&mut self, bytes: &[u8], owed: usize, out: &mut Vec<Reply>) -> bool {
        let t = self.relay.command_timeout;
        let relay = self.relay.clone();
        let Inner::Smtp {
            conn,
            replay,
            replaying,
            reused,
            ..
        } = &mut self.inner
        else {
            return false;
        };
        let Some(c) = conn.as_mut() else {
            return false;
        };
        if *replaying {
            replay.extend_from_slice(bytes);
        }
        if let Err(e) = c.send(bytes).await {
            tracing::debug!("backend write failed: {e}");
        }
        let mut got = 0;
        while got < owed && !self.pending.is_empty() {
            let c = conn.as_mut().expect("conn");
            match c.read_reply(t).await {
                Ok(reply) => {
                    *replaying = false;
                    got += 1;
                    // 421: the backend is closing; the client gets a 451 (its
                    // own session goes on) and the connection is not reused.
                    let closing = reply.code == 421;
                    let reply = if closing {
                        closing_to_451(&reply)
                    } else {
                        reply
                    };
                    match self.pending.pop_front() {
                        Some(Pend::Client) => out.push(reply),
                        Some(Pend::Internal(what)) if !reply.is_positive() => {
                            tracing::warn!(backend = %c.peer, "{what} refused: {} {}", reply.code, reply.text());
                        }
                        Some(Pend::Internal(_)) => {}
                        None => {}
                    }
                    if closing {
                        tracing::warn!(backend = %c.peer, "backend said 421; dropping the connection");
                        return false;
                    }
                }
                Err(e) => {
                    if !(*reused && std::mem::take(replaying)) {
                        tracing::warn!(backend = %c.peer, "backend failed: {e}");
                        return false;
                    }
                    let sent = &replay[..];
                    tracing::debug!(backend = %c.peer, "reused connection dead ({e}), reconnecting");
                    *reused = false;
                    let replaced = match relay.pool(c.backend) {
                        Some(pool) => pool.reconnect(c).await,
                        None => Err(BackendError::Closed),
                    };
                    let resent = match replaced {
                        Ok(()) => {
                            c.txns += 1;
                            c.send(sent).await
                        }
                        Err(e) => {
                            tracing::warn!("backend reconnect failed: {e}");
                            Err(e)
                        }
                    };
                    if resent.is_err() {
                        *conn = None;
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Sends DATA at once (nothing else may be owed); its reply is read by
    /// `data_reply` before any message byte is sent. False when the backend
    /// is gone.
    pub async fn send_data_command(&mut self) -> bool {
        match &mut self.inner {
            Inner::Maildir { .. } => true,
            Inner::Smtp { conn, .. } => match conn.as_mut() {
                Some(c) => {
                    if c.send(b"DATA\r\n").await.is_ok() {
                        return true;
                    }
                    *conn = None;
                    false
                }
                None => false,
            },
        }
    }

    /// The backend's reply to the DATA sent by `send_data_command`: 354, its
    /// refusal, or a 451 when it failed (the connection is then dropped).
    pub async fn data_reply(&mut self) -> Reply {
        if !matches!(self.inner, Inner::Smtp { .. }) {
            return Reply::new(354, EnhancedCode(2, 0, 0), "Go ahead");
        }
        match self.next_reply("DATA").await {
            Ok(r) if r.code == 354 || r.code >= 400 => r,
            Ok(r) => {
                if let Inner::Smtp { conn, .. } = &mut self.inner {
                    if let Some(c) = conn.take() {
                        tracing::warn!(backend = %c.peer, "unexpected reply to DATA: {}", r.code);
                    }
                }
                backend_lost()
            }
            Err(r) => r,
        }
    }

    /// The backend's next reply to `what`, in the middle of a transaction:
    /// `Err` with a 451 for a 421 or a failure (the connection is then
    /// dropped), or with `backend_lost` when it is already gone.
    async fn next_reply(&mut self, what: &str) -> Result<Reply, Reply> {
        let t = self.relay.command_timeout;
        let Inner::Smtp { conn, .. } = &mut self.inner else {
            return Err(backend_lost());
        };
        let Some(c) = conn.as_mut() else {
            return Err(backend_lost());
        };
        match c.read_reply(t).await {
            Ok(r) if r.code == 421 => {
                *conn = None;
                Err(closing_to_451(&r))
            }
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!(backend = %c.peer, "no reply to {what}: {e}");
                *conn = None;
                Err(backend_lost())
            }
        }
    }

    /// The backend offers CHUNKING: a client's BDAT content is relayed as
    /// BDAT chunks (`smtp::bdat_command` + content through `send_data`);
    /// otherwise it is converted to DATA (a Maildir takes DATA).
    pub fn chunking(&self) -> bool {
        matches!(&self.inner, Inner::Smtp { conn: Some(c), .. } if c.caps.chunking)
    }

    /// The backend's reply to one relayed BDAT chunk that is not the last
    /// (the last one's is `finish_data`): its reply, a 451 for a 421 or a
    /// failure (the connection is then dropped).
    pub async fn chunk_reply(&mut self) -> Reply {
        if !matches!(self.inner, Inner::Smtp { .. }) {
            return Reply::new(250, EnhancedCode(2, 0, 0), "Ok");
        }
        self.next_reply("BDAT").await.unwrap_or_else(|r| r)
    }

    /// True when the backend connection is gone.
    pub fn is_broken(&self) -> bool {
        matches!(&self.inner, Inner::Smtp { conn: None, .. })
    }

    /// Streams message bytes (wire form) to the backend, gathered from
    /// `bufs` (one vectored write when the socket takes it all).
    pub async fn send_data_vectored(
        &mut self,
        bufs: &mut [std::io::IoSlice<'_>],
    ) -> Result<(), BackendError> {
        match &mut self.inner {
            Inner::Smtp { conn, .. } => match conn.as_mut() {
                Some(c) => {
                    let t = self.relay.command_timeout;
                    let r = tokio::time::timeout(t, c.send_vectored(bufs)).await;
                    match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            *conn = None;
                            Err(e)
                        }
                        Err(_) => {
                            *conn = None;
                            Err(BackendError::Timeout)
                        }
                    }
                }
                None => Err(BackendError::Closed),
            },
            Inner::Maildir { writer, .. } => match writer.as_mut() {
                Some(w) => {
                    for b in bufs.iter() {
                        w.write_wire(b).await.map_err(BackendError::Io)?;
                    }
                    Ok(())
                }
                None => Err(BackendError::Closed),
            },
        }
    }

    /// Streams message bytes (wire form) to the backend.
    pub async fn send_data(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.send_data_vectored(&mut [std::io::IoSlice::new(bytes)])
            .await
    }

    /// After the terminating `.\r\n` was sent: the backend's final reply, or
    /// a 451 when the backend failed.
    pub async fn finish_data(&mut self) -> Reply {
        let t = self.relay.data_end_timeout;
        match &mut self.inner {
            Inner::Smtp {
                conn, completed, ..
            } => {
                let Some(c) = conn.as_mut() else {
                    return backend_lost();
                };
                let t0 = std::time::Instant::now();
                let got = c.read_reply(t).await;
                if let (Ok(_), Some(pool)) = (&got, self.relay.pool(c.backend)) {
                    pool.metrics().reply.observe(t0.elapsed().as_secs_f64());
                }
                match got {
                    Ok(r) if r.code == 421 => {
                        *conn = None;
                        closing_to_451(&r)
                    }
                    Ok(r) => {
                        *completed = true;
                        r
                    }
                    Err(e) => {
                        tracing::warn!(backend = %c.peer, "no final reply: {e}");
                        *conn = None;
                        backend_lost()
                    }
                }
            }
            Inner::Maildir { writer, .. } => match writer.take() {
                Some(w) => {
                    let id = w.id.clone();
                    match w.commit().await {
                        Ok(path) => {
                            tracing::debug!(path = %path.display(), "delivered to maildir");
                            Reply::new(250, EnhancedCode(2, 0, 0), format!("Ok: queued as {id}"))
                        }
                        Err(e) => {
                            tracing::error!("maildir delivery failed: {e}");
                            Reply::new(
                                451,
                                EnhancedCode(4, 3, 0),
                                "Local delivery failed, try again later",
                            )
                        }
                    }
                }
                None => backend_lost(),
            },
        }
    }

    /// Drops the backend connection without finishing the data (no dot is
    /// ever sent), so nothing partial is delivered.
    pub fn abort(mut self) {
        if let Inner::Smtp { conn, .. } = &mut self.inner {
            conn.take();
        }
    }

    /// Ends the transaction normally. A dedicated (XCLIENT) connection is
    /// handed back to the session; a pooled one returns to its pool, marked
    /// for RSET unless the transaction completed.
    pub fn end(mut self) -> Option<PooledConn> {
        if let Inner::Smtp {
            conn,
            completed,
            dedicated,
            wbuf,
            replay,
            ..
        } = &mut self.inner
        {
            let mut c = conn.take()?;
            c.spare = TxnBufs {
                wbuf: std::mem::take(wbuf),
                replay: std::mem::take(replay),
                pending: std::mem::take(&mut self.pending),
            };
            if !*completed {
                c.needs_rset = true;
            }
            let pool = self.relay.pool(c.backend);
            if self.relay.retired.load(Ordering::Acquire) {
                tokio::spawn(c.quit());
                return None;
            }
            if *dedicated {
                // Others waiting for this backend's slots: give this one up
                // (the session says XCLIENT again on its next MAIL).
                if pool.is_some_and(|p| p.waiting() > 0) {
                    tokio::spawn(c.quit());
                    return None;
                }
                return Some(c);
            }
            if let Some(pool) = pool {
                pool.checkin(c);
            }
        }
        None
    }
}
