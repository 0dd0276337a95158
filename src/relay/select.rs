//! What the set of backends does: built from `[[backend]]` (one pool per
//! SMTP backend, or a Maildir), `begin` hands a session a `Txn` (round
//! robin over the backends that are up, asking each for a connection
//! without waiting, then waiting in line at the first busy one, bounded by
//! `backend_pool_wait`), dedicated XCLIENT connections, pool statistics,
//! and retiring a set a reload replaced. No backend up: 451 4.4.1 at once;
//! the wait in line run out: 451 4.4.5.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::client::{identity_commands, BackendError, ClientIdentity};
use super::maildir::Maildir;
use super::pool::{Pool, PoolSettings, PoolStat, PooledConn, Wait};
use super::route::{self, GroupId};
use super::tls::BackendTls;
use super::{temp_failure, tls_failure, Backend, Backends, Inner, Txn, GENERATIONS};
use crate::config::{Config, IdentityMode};
use crate::smtp::{EnhancedCode, Reply};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::own;
use tracing::Instrument;

impl Backends {
    pub fn new(cfg: &Config, metrics: &Metrics) -> std::io::Result<Arc<Backends>> {
        let t = &cfg.timeouts;
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        let mut backends = Vec::new();
        for (i, b) in cfg.backends.iter().enumerate() {
            if let Some(addr) = &b.address {
                let tls = BackendTls::new(b).map_err(|e| {
                    std::io::Error::other(format!("backend[{i}] ({addr}) TLS: {e}"))
                })?;
                if tls.is_some() && !b.tls_verify {
                    tracing::warn!(
                        backend = %addr,
                        "tls_verify = false: the backend's certificate is not checked (any certificate, any name)"
                    );
                }
                backends.push(Backend::Smtp {
                    pool: Pool::new(
                        PoolSettings {
                            addr: addr.clone(),
                            backend: i,
                            group: b.group.clone(),
                            helo_name: cfg.hostname.clone(),
                            max_connections: b.max_connections,
                            max_connecting: b.max_connecting,
                            max_idle: Duration::from_secs_f64(b.max_idle),
                            max_lifetime: Duration::from_secs_f64(b.max_lifetime),
                            max_transactions: b.max_transactions,
                            connect_timeout: Duration::from_secs_f64(t.backend_connect),
                            command_timeout: Duration::from_secs_f64(t.backend_command),
                            pool_wait: Duration::from_secs_f64(t.backend_pool_wait),
                            down_after: b.down_after,
                            probe_interval: Duration::from_secs_f64(b.probe_interval),
                            probe_interval_max: Duration::from_secs_f64(b.probe_interval_max),
                            generation,
                            tls,
                        },
                        metrics.backend(addr, &b.group),
                        cfg.runtime.cores(),
                    ),
                    identity: b.identity,
                    identity_missing: Default::default(),
                });
            } else if let Some(dir) = &b.maildir {
                backends.push(Backend::Maildir(Maildir::open(dir, &cfg.hostname)?));
            }
        }
        let (groups, routes) = route::build(cfg);
        let hostname = crate::smtp::domain::normalize(&cfg.hostname)
            .map(|h| h.into_owned())
            .unwrap_or_default();
        Ok(Arc::new(Backends {
            backends,
            groups,
            routes,
            hostname,
            unknown: super::unknown::UnknownRecipients::new(cfg),
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

    /// Takes this set out of service after a reload replaced it: idle
    /// connections get QUIT now, those in use after their transaction.
    pub fn retire(self: &Arc<Self>) {
        self.retired.store(true, Ordering::Release);
        for b in &self.backends {
            if let Backend::Smtp { pool, .. } = b {
                pool.retire();
            }
        }
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

    pub(super) fn pool(&self, i: usize) -> Option<&Pool> {
        self.smtp_backend(i).map(|(pool, ..)| pool)
    }

    /// SMTP backend `i`'s pool, identity mode and identity-missing flag;
    /// None for a Maildir (or no) backend.
    fn smtp_backend(&self, i: usize) -> Option<SmtpBackend<'_>> {
        match self.backends.get(i) {
            Some(Backend::Smtp {
                pool,
                identity,
                identity_missing,
            }) => Some((pool, identity, identity_missing)),
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

    /// Whether recipients are routed by domain (`[[route]]`): the
    /// transaction then begins at its first recipient, on that one's group.
    pub fn routed(&self) -> bool {
        self.routes.is_some()
    }

    /// The group that takes `rcpt` (an address without its brackets); None
    /// when no route takes its domain (or the domain is not a valid one).
    /// Without routes, the one group of every backend. A recipient without
    /// a domain (`postmaster`) is routed as the edge's own `hostname`.
    pub fn route(&self, rcpt: &str) -> Option<GroupId> {
        let Some(routes) = &self.routes else {
            return Some(GroupId(0));
        };
        let domain = crate::smtp::domain::recipient_domain(rcpt).unwrap_or(&self.hostname);
        let domain = crate::smtp::domain::normalize(domain)?;
        routes.lookup(&domain).map(GroupId)
    }

    /// A backend of group `g` refused `rcpt` as unknown a short while ago:
    /// its reply, for the edge to give itself (`[policy.recipients]`).
    pub fn unknown_recipient(&self, g: GroupId, rcpt: &str) -> Option<Reply> {
        self.unknown.as_ref()?.refusal(g, rcpt)
    }

    /// The group's name as `[[route]]` gives it (`*` without routes).
    pub fn group_name(&self, g: GroupId) -> &str {
        &self.groups[g.0].name
    }

    /// The smallest message size limit (`SIZE`) the group's backends
    /// announced in their EHLO; None while none announced one.
    pub fn size_limit(&self, g: GroupId) -> Option<u64> {
        self.groups[g.0]
            .members
            .iter()
            .filter_map(|&i| self.pool(i)?.size_limit())
            .min()
    }

    /// Begins a transaction for `id` on group `g` (of this set): picks a
    /// backend and a connection, and queues the identity. Backends marked
    /// down are skipped. Round robin first asks each backend of the group
    /// for a connection without waiting; when every one that is up is busy,
    /// the transaction waits in line at the first busy one (first come
    /// first served, `backend_pool_wait`). A dedicated (XCLIENT) connection
    /// of the session is used when given and of the group.
    pub async fn begin(
        self: &Arc<Self>,
        g: GroupId,
        id: &ClientIdentity,
        dedicated: Option<PooledConn>,
    ) -> Result<Txn, Reply> {
        let group = &self.groups[g.0];
        // A session's XCLIENT connection from before a reload of the
        // backends belongs to the old relay, and one to another group's
        // backend cannot take this transaction: let it go.
        let dedicated = match dedicated {
            Some(c) if c.generation != self.generation || !group.members.contains(&c.backend) => {
                tokio::spawn(c.quit());
                None
            }
            other => other,
        };
        if let Some(mut conn) = dedicated {
            if conn.idle_ok() {
                let mut txn = Txn::smtp(self.clone(), conn, false, true);
                txn.group = g;
                return Ok(txn);
            }
            // The backend closed the session's connection between two
            // transactions: open a new one (with a new XCLIENT) below.
            tracing::debug!(backend = %conn.peer, "dedicated connection closed; reopening");
        }
        let n = group.members.len();
        let start = group.next.take();
        let mut busy = None;
        // A backend that must be TLS and could not be: the client hears
        // why (4.7.x), not just that no backend was there.
        let mut tls_failed = false;
        for k in 0..n {
            let i = group.members[(start + k) % n];
            match &self.backends[i] {
                Backend::Maildir(md) => match Box::pin(md.begin()).await {
                    Ok(w) => {
                        return Ok(Txn {
                            backends: self.clone(),
                            group: g,
                            inner: Inner::Maildir {
                                writer: Some(Box::new(w)),
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
                Backend::Smtp { .. } => match self.begin_smtp(i, g, id, Wait::No).await {
                    Ok(txn) => return Ok(txn),
                    Err(BackendError::Exhausted) => {
                        busy.get_or_insert(i);
                    }
                    Err(BackendError::Tls { .. }) => tls_failed = true,
                    Err(_) => {}
                },
            }
        }
        let Some(i) = busy else {
            if tls_failed {
                return Err(tls_failure());
            }
            return Err(temp_failure("No backend available, try again later"));
        };
        match self.begin_smtp(i, g, id, Wait::Yes).await {
            Ok(txn) => Ok(txn),
            Err(BackendError::Exhausted) => Err(own(Reply::new(
                451,
                EnhancedCode(4, 4, 5),
                "All backend connections busy, try again later",
            ))),
            Err(BackendError::Tls { .. }) => Err(tls_failure()),
            Err(_) => Err(temp_failure("No backend available, try again later")),
        }
    }

    /// `begin`'s usual case, not a future: the group's backend whose turn
    /// it is in the round robin is up, needs no XCLIENT connection of its
    /// own, and has a connection in its pool's hot list (`Pool::checkout_hot`).
    /// None: the caller goes the full way (`begin`), which then takes the
    /// same turn (the round robin moves on only here or there).
    ///
    /// `held`: the session's reference to the set of its last transaction
    /// (`Txn::end`), the new one's when it is to this set: a reference
    /// count every core shares is then not written per message.
    pub fn begin_now(
        self: &Arc<Self>,
        g: GroupId,
        id: &ClientIdentity,
        held: &mut Option<Arc<Backends>>,
    ) -> Option<Txn> {
        let group = &self.groups[g.0];
        let n = group.members.len();
        if n == 0 {
            return None;
        }
        let backend = self.smtp_backend(group.members[group.next.peek() % n])?;
        let (pool, identity, _) = backend;
        if *identity == IdentityMode::Xclient || !pool.is_up() {
            return None;
        }
        let (conn, reused) = pool.checkout_hot()?;
        group.next.take();
        let span = backend_span(pool);
        let me = match held.take() {
            Some(h) if Arc::ptr_eq(&h, self) => h,
            _ => self.clone(),
        };
        Some(Self::smtp_txn(
            me,
            g,
            id,
            backend,
            span,
            0.0,
            (conn, reused, false),
        ))
    }

    /// A transaction on SMTP backend `i`: a pooled connection with XFORWARD
    /// queued, or a new dedicated one with XCLIENT said.
    async fn begin_smtp(
        self: &Arc<Self>,
        i: usize,
        g: GroupId,
        id: &ClientIdentity,
        wait: Wait,
    ) -> Result<Txn, BackendError> {
        let Some(backend) = self.smtp_backend(i) else {
            return Err(BackendError::Closed);
        };
        let (pool, identity, identity_missing) = backend;
        let span = backend_span(pool);
        // Only a span that records anything reads the clock.
        let t0 = (!span.is_disabled()).then(std::time::Instant::now);
        let opened = match identity {
            // Boxed: its connect and XCLIENT exchange would make every
            // checkout's future large.
            IdentityMode::Xclient => Box::pin(self.open_xclient(pool, id, wait, identity_missing))
                .instrument(span.clone())
                .await
                .map(|c| (c, false, true)),
            _ => pool
                .checkout(wait)
                .instrument(span.clone())
                .await
                .map(|(c, reused)| (c, reused, false)),
        };
        match opened {
            Ok(got) => {
                let waited = t0.map_or(0.0, |t0| t0.elapsed().as_secs_f64() * 1000.0);
                Ok(Self::smtp_txn(
                    self.clone(),
                    g,
                    id,
                    backend,
                    span,
                    waited,
                    got,
                ))
            }
            Err(e) => {
                if !matches!(e, BackendError::Exhausted) {
                    tracing::warn!(backend = %pool.settings().addr, "backend unavailable: {e}");
                }
                Err(e)
            }
        }
    }

    /// The transaction on a connection checked out of `backend`'s pool:
    /// its span's fields (`waited`: milliseconds in line), XFORWARD queued
    /// when the backend takes the identity that way.
    fn smtp_txn(
        backends: Arc<Self>,
        g: GroupId,
        id: &ClientIdentity,
        (pool, identity, identity_missing): SmtpBackend<'_>,
        span: tracing::Span,
        waited: f64,
        (conn, reused, dedicated): (PooledConn, bool, bool),
    ) -> Txn {
        if !span.is_disabled() {
            span.record("smtp.backend.connection_id", conn.id());
            span.record("smtp.backend.reused", reused);
            span.record("smtp.backend.pool_wait_ms", waited);
        }
        let mut txn = Txn::smtp(backends, conn, reused, dedicated);
        txn.group = g;
        txn.span = span;
        if *identity == IdentityMode::Xforward && !txn.queue_xforward(id) {
            identity_not_offered(pool, identity_missing, "XFORWARD");
        }
        txn
    }

    async fn open_xclient(
        &self,
        pool: &Pool,
        id: &ClientIdentity,
        wait: Wait,
        missing: &AtomicBool,
    ) -> Result<PooledConn, BackendError> {
        // XCLIENT connections never return to the idle list, so this is a
        // new connection (or the slot of one).
        let (mut conn, _) = pool.checkout(wait).await?;
        if conn.caps.xclient.is_empty() {
            identity_not_offered(pool, missing, "XCLIENT");
            return Ok(conn);
        }
        let mut cmd = Vec::new();
        identity_commands("XCLIENT", conn.caps.xclient, id, &mut cmd);
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

/// An SMTP backend's parts a transaction needs: its pool, how it takes
/// the client's identity, and whether it was found not to offer that.
type SmtpBackend<'a> = (&'a Pool, &'a IdentityMode, &'a AtomicBool);

/// One span per backend exchange, from the checkout (a new connection's
/// `tls.handshake` is its child) to the end of the transaction (it ends
/// when the Txn goes); a child of the span current when it is made.
fn backend_span(pool: &Pool) -> tracing::Span {
    crate::span!(
        crate::telemetry::in_traced(),
        "smtp.backend",
        "otel.kind" = "client",
        "server.address" = pool.settings().addr.as_str(),
        "smtp.backend.group" = pool.settings().group.as_str(),
        "smtp.backend.connection_id" = tracing::field::Empty,
        "smtp.backend.reused" = tracing::field::Empty,
        "smtp.backend.pool_wait_ms" = tracing::field::Empty,
    )
}

/// A backend set to get the client's identity (`identity`) does not offer
/// the command in its EHLO: the mail goes on without it (the backend then
/// sees the proxy as the client), said at warn once per backend, not per
/// transaction (a reload of `[[backend]]` says it again).
fn identity_not_offered(pool: &Pool, missing: &AtomicBool, command: &str) {
    if !missing.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            backend = %pool.settings().addr,
            "backend does not offer {command}; identity not passed (logged once per backend)"
        );
    }
}
