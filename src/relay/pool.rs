//! Per-backend pool of ready (greeted, EHLO'd) connections on `deadpool`:
//! first-come-first-served waiting for the next returned connection or freed
//! slot, liveness check at checkout, idle expiry, transaction cap, and the
//! backend's health (marked down after failed connects, probed back). It
//! does not speak transactions; `relay::Txn` does.
//!
//! Two counts bound a backend: deadpool's slots (connections checked out or
//! idle) and a TCP semaphore whose permit each `BackendConn` holds until its
//! socket is closed, so a connection still saying QUIT after it left the
//! pool keeps counting and the backend never sees more than
//! `max_connections` at once.
//!
//! # How it behaves
//! - `Manager::create` connects, greets and EHLOs (`BackendConn::open`);
//!   `Manager::stale` is the liveness check at checkout (idle past
//!   `max_idle` or open past `max_lifetime`, or the backend said something
//!   or closed while idle: dropped, the next one tried). LIFO: the most recently used idle
//!   connection first.
//! - Waiting is deadpool's fair semaphore: a returned connection (or a slot
//!   freed by a closed one) goes to the oldest waiter, and a newcomer's
//!   non-blocking try (`Wait::No`) cannot jump the line. The session waits
//!   while reading its client (`session`'s `while_client_stays`): a client
//!   that hangs up drops the wait and so its place.
//! - Two idle lists. A connection given back while no checkout waits in
//!   line or to connect goes to the hot list (`Hot`, in the `Manager`):
//!   kept checked out of deadpool, taken back by a `Vec` pop under an
//!   uncontended lock plus the liveness check. That is the usual checkout
//!   and checkin, and skips deadpool's semaphore, slot list, recycle
//!   future and clock read (callgrind, 400 sessions: 812 -> 684
//!   instruction-cache misses per relayed message; `benches/pool.rs`
//!   316 -> 140 ns; `checkout_hot` lets `Backends::begin_now` begin a
//!   transaction with no future at all). One given
//!   back while someone waits goes to deadpool, whose fair semaphore hands
//!   it to the oldest waiter; joining the line and choosing the list
//!   happen under the same lock, so no waiter misses a connection parked
//!   in the hot list.
//! - A checkout tries the hot list, then polls deadpool's non-blocking get
//!   once in place (`idle_now`, connects refused meanwhile by
//!   `NO_CONNECT`): either way it awaits no future of deadpool's, and the
//!   checkout future a transaction boxes is 24 bytes (it was ~1.1 KB).
//!   A free slot without an idle connection, or a wait in line, goes the
//!   boxed way (`opened`, `in_line`).
//! - Connects in flight are capped (`max_connecting`, a semaphore in
//!   `Manager::create`): a checkout with a slot but no connect permit
//!   waits, and gives its slot up (`NotNow`) for a connection a checkin
//!   returned meanwhile when nobody in line took it (`Pool::checkin`
//!   wakes one; `opened` / `in_line` then take it or try again). A burst
//!   of 1 000 sessions into a pool of 512 so opens ~250 connections
//!   instead of 512, each with its connect, greeting and EHLO.
//! - `PooledConn` wraps deadpool's `Object` with the safe default inverted:
//!   dropping it discards the connection (frees the slot); only
//!   `Pool::checkin` returns it to the idle list, and only after a
//!   transaction ended cleanly (RSET queued if it did not complete). Past
//!   `max_transactions` or `max_lifetime` it is QUIT instead; the reaper
//!   (`reap`, every second) QUITs idle ones (both lists) past `max_idle`
//!   or `max_lifetime`.
//! - `SIZE`: each connect stores the limit the backend's EHLO announced
//!   (`size_limit`), which the session holds a `MAIL ... SIZE=` against.
//! - Health: every connect attempt feeds `Manager::record_success` /
//!   `record_failure`; `down_after` failures in a row mark the backend down
//!   (logged once) and start `probe`, a background task that retries with a
//!   doubling wait (`probe_interval` .. `probe_interval_max`) through the
//!   pool itself (a non-blocking checkout, so a probe never exceeds the
//!   cap); the first success marks it up (logged once) and its connection
//!   joins the pool.
//! - XCLIENT (`identity = "xclient"`): each client session gets a
//!   connection of its own (`Backends`' `open_xclient`), kept by the
//!   session between its transactions and counted against the same cap;
//!   never returned to the idle list; given up after a transaction when
//!   others wait for a slot.
//!
//! # Why deadpool
//! Rather than a hand-written pool, bb8 or mobc: a hand-written pool that
//! put returned connections on an idle list that waiters for a new slot
//! never looked at gave a burst larger than the pool 451s. deadpool's model
//! is exactly this pool's: a semaphore of checked-out objects (tokio's,
//! fair FIFO), recycle at checkout, `retain` for expiry, `Object::take` to
//! detach; it is small and runs no task of its own. bb8 would also fit
//! (checks on checkout, idle timeouts) but reaps from a background task per
//! pool and brings more than is used; mobc follows bb8's model. All three
//! return a connection to the pool when its handle is dropped, which for
//! SMTP is the unsafe default (a half-done transaction must never be
//! reused): `PooledConn` inverts it. What deadpool does not know (liveness
//! from buffered bytes, RSET only when needed, the transaction cap, health,
//! the exact TCP count) is in `Manager` and `Pool`.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleResult, Timeouts, WeakPool};
use deadpool::Runtime;
use tokio::sync::Semaphore;

use super::client::{ticks, BackendConn, BackendError};
use super::tls::BackendTls;
use crate::telemetry::metrics::BackendMetrics;

/// Settings of one pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub addr: String,
    pub backend: usize,
    /// The backend's `group` (a label of its metrics and spans).
    pub group: String,
    pub helo_name: String,
    pub max_connections: usize,
    /// Connects in flight at once (0: no cap; a core's share at least 1).
    pub max_connecting: usize,
    pub max_idle: Duration,
    /// Longest use of one connection from when it was opened (zero: no
    /// limit).
    pub max_lifetime: Duration,
    pub max_transactions: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Longest wait in line for a connection when all are busy.
    pub pool_wait: Duration,
    /// Failed connects (or greetings) in a row that mark the backend down;
    /// 0 = never.
    pub down_after: u32,
    /// First wait before probing a down backend; doubles up to the max.
    pub probe_interval: Duration,
    pub probe_interval_max: Duration,
    /// The `Backends` generation its connections belong to.
    pub generation: u64,
    /// TLS to the backend (`tls` other than "none").
    pub tls: Option<Arc<BackendTls>>,
}

impl PoolSettings {
    /// Whether `conn` has been open longer than `max_lifetime`.
    pub fn too_old(&self, conn: &BackendConn) -> bool {
        self.too_old_at(conn, ticks())
    }

    /// `too_old` at `now` (a `ticks()` the caller read already: one clock
    /// read serves both of a checkout's or checkin's age checks).
    fn too_old_at(&self, conn: &BackendConn, now: u32) -> bool {
        !self.max_lifetime.is_zero() && age(now, conn.created) >= self.max_lifetime
    }

    /// Whether idle `conn` may still be handed out at `now`: idle no longer
    /// than `max_idle` and open less than `max_lifetime` (the reaper's
    /// test, and the time half of `Manager::stale`).
    fn fresh_at(&self, conn: &BackendConn, now: u32) -> bool {
        age(now, conn.idle_since) <= self.max_idle && !self.too_old_at(conn, now)
    }
}

/// The time from `then` to `now`, both `ticks()`.
fn age(now: u32, then: u32) -> Duration {
    Duration::from_millis(u64::from(now.wrapping_sub(then)) * 100)
}

/// A pool's state at one moment (for metrics).
#[derive(Debug, Clone)]
pub struct PoolStat {
    pub addr: String,
    pub group: String,
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub up: bool,
}

/// Whether a checkout may wait in line for a busy pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Only an idle connection or a free slot now.
    No,
    /// Up to `pool_wait`, first come first served.
    Yes,
}

/// Up/down state of one backend, fed by every connect attempt.
#[derive(Debug)]
struct Health {
    failures: AtomicU32,
    down: AtomicBool,
    /// A reload replaced the set this pool is of (`Pool::retire`): a
    /// prober stops, whoever still holds the set.
    retired: AtomicBool,
}

thread_local! {
    /// Set while `Pool::idle_now` polls a checkout in place: `create`
    /// then refuses at once (`BackendError::NotNow`), before any connect.
    static NO_CONNECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One of the checkouts a counter counts, for as long as it lives.
struct Waiting<'a>(&'a AtomicU32);

impl Waiting<'_> {
    fn on(n: &AtomicU32) -> Waiting<'_> {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Creates and checks connections for deadpool.
#[derive(Debug)]
pub struct Manager {
    settings: PoolSettings,
    metrics: BackendMetrics,
    /// This share's TCP permits (`max_connections`, or a core's part of it).
    tcp: Arc<Semaphore>,
    /// This share's connects in flight (`max_connecting`); None: no cap.
    connecting: Option<Semaphore>,
    /// Checkouts waiting for a connect permit, and the signal a checkin
    /// gives one of them when it returned a connection nobody in line
    /// took (`create` then gives its slot up for it: `NotNow`).
    connect_waiters: AtomicU32,
    returned: tokio::sync::Notify,
    /// Shared by the shares of every core: the backend is up or down once.
    health: Arc<Health>,
    /// The `SIZE` the backend announced in its last EHLO (0: none, or no
    /// limit); shared by every core's share.
    size: Arc<AtomicU64>,
    /// The pool itself, for the prober a failure may start.
    pool: OnceLock<WeakPool<Manager>>,
    /// The idle connections a checkout takes first (see `Hot`).
    hot: Mutex<Hot>,
}

/// The hot idle list: connections given back while nobody waited, kept
/// checked out of deadpool (their slots stay taken) so that the usual
/// checkout and checkin are a `Vec` pop and push under an uncontended
/// lock, with none of deadpool's semaphore, slot list, recycle future or
/// clock read. deadpool's own idle list still serves the rest: a
/// connection given back while a checkout waited in line or to connect
/// (`line` > 0) goes to deadpool, whose fair semaphore hands it to the
/// oldest waiter. `line` changes under the same lock as the list, so a
/// checkout that is about to wait in line either finds a connection
/// here or is seen by the checkin that would have put one here.
#[derive(Debug, Default)]
struct Hot {
    idle: Vec<Object<Manager>>,
    /// Checkouts waiting in line (`Pool::in_line`) or for a connect
    /// permit (`Manager::await_connect`) now.
    line: usize,
}

impl Manager {
    /// Connects, greets and EHLOs, and records the outcome in the health.
    async fn connect(&self) -> Result<BackendConn, BackendError> {
        let s = &self.settings;
        let mut r = BackendConn::open(
            &s.addr,
            s.backend,
            &s.helo_name,
            s.connect_timeout,
            s.command_timeout,
            s.tls.as_deref(),
        )
        .await;
        match &mut r {
            Ok(conn) => {
                conn.generation = s.generation;
                self.size
                    .store(conn.caps.size.unwrap_or(0), Ordering::Relaxed);
                self.metrics.created.inc();
                if let Some(resumed) = conn.tls_resumed() {
                    self.metrics.tls_handshakes.inc();
                    if resumed {
                        self.metrics.tls_resumed.inc();
                    }
                }
                self.record_success();
            }
            Err(e) => {
                self.metrics.connect_failures.inc();
                if let BackendError::Tls { reason, .. } = e {
                    self.metrics.tls_failure(reason);
                }
                self.record_failure(e);
            }
        }
        r
    }

    /// Waits for a connect permit (at most `connect_timeout`:
    /// `Exhausted`), or gives up the wait with `NotNow` when a checkin
    /// returned a connection meanwhile (`Pool::opened` then takes it).
    async fn await_connect<'a>(
        &self,
        cap: &'a Semaphore,
    ) -> Result<tokio::sync::SemaphorePermit<'a>, BackendError> {
        // In line for a connect permit: a connection given back meanwhile
        // goes to deadpool and wakes this wait (`returned`); one idle in
        // the hot list now is taken instead of connecting.
        let Some(_line) = self.join_line() else {
            return Err(BackendError::NotNow);
        };
        let _waiting = Waiting::on(&self.connect_waiters);
        let returned = self.returned.notified();
        let wait = async {
            tokio::select! {
                biased;
                p = cap.acquire() => p.map_err(|_| BackendError::Closed),
                () = returned => Err(BackendError::NotNow),
            }
        };
        tokio::time::timeout(self.settings.connect_timeout, wait)
            .await
            .map_err(|_| BackendError::Exhausted)?
    }

    fn record_success(&self) {
        self.health.failures.store(0, Ordering::Relaxed);
        if self.health.down.swap(false, Ordering::AcqRel) {
            tracing::info!(backend = %self.settings.addr, "backend is up again; back in rotation");
        }
    }

    fn record_failure(&self, e: &BackendError) {
        let s = &self.settings;
        let n = self.health.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if s.down_after == 0 || n < s.down_after || self.health.down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            backend = %s.addr,
            "backend marked down after {n} failed connects in a row (last: {e}); skipped until a probe succeeds"
        );
        if let Some(pool) = self.pool.get().and_then(WeakPool::upgrade) {
            tokio::spawn(probe(pool.weak(), s.probe_interval, s.probe_interval_max));
        }
    }
}

impl managed::Manager for Manager {
    /// Boxed: a checkout, a `Txn` and a checkin move the handle, not the
    /// ~300-byte connection (a relayed message moved it about ten times).
    type Type = Box<BackendConn>;
    type Error = BackendError;

    async fn create(&self) -> Result<Box<BackendConn>, BackendError> {
        if NO_CONNECT.get() {
            return Err(BackendError::NotNow);
        }
        let _connecting = match &self.connecting {
            Some(cap) => match cap.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => Some(self.await_connect(cap).await?),
            },
            None => None,
        };
        // A socket of a connection that left the pool may still be closing:
        // wait for it (bounded) rather than exceed max_connections.
        let permit = tokio::time::timeout(
            self.settings.connect_timeout,
            self.tcp.clone().acquire_owned(),
        )
        .await
        .map_err(|_| BackendError::Exhausted)?
        .map_err(|_| BackendError::Closed)?;
        // Boxed: opening a connection is the rare path; the checkout a
        // transaction awaits stays small without it.
        let mut conn = Box::pin(self.connect()).await?;
        conn._permit = Some(permit);
        Ok(Box::new(conn))
    }

    async fn recycle(
        &self,
        conn: &mut Box<BackendConn>,
        _: &Metrics,
    ) -> RecycleResult<BackendError> {
        if self.stale(conn) {
            return Err(managed::RecycleError::message("stale"));
        }
        Ok(())
    }
}

impl Manager {
    /// The liveness check at checkout, for both idle lists: idle past
    /// `max_idle`, open past `max_lifetime` (missed by the reaper), or
    /// the backend said something or closed while it was idle.
    fn stale(&self, conn: &mut BackendConn) -> bool {
        let stale = !self.settings.fresh_at(conn, ticks()) || !conn.idle_ok();
        if stale {
            tracing::debug!(backend = %self.settings.addr, "dropping stale idle connection");
        }
        stale
    }

    fn hot(&self) -> MutexGuard<'_, Hot> {
        // Nothing panics while holding it; a poisoned lock is still sound.
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently returned live connection of the hot list; stale
    /// ones on the way are discarded (their slots freed).
    fn hot_pop(&self) -> Option<Object<Manager>> {
        loop {
            let mut obj = self.hot().idle.pop()?;
            if !self.stale(&mut obj) {
                return Some(obj);
            }
            drop(Object::take(obj));
        }
    }

    /// Gives idle `obj` (a connection of `deadpool`, this manager's pool)
    /// back: to the hot list when nobody waits in line (the usual case),
    /// else to deadpool, whose oldest waiter takes it. The one way back
    /// for `Pool::checkin` and the prober, so the line's rule holds for
    /// both.
    fn park(&self, obj: Object<Manager>, deadpool: &managed::Pool<Manager>) {
        let mut hot = self.hot();
        if hot.line == 0 {
            hot.idle.push(obj);
            return;
        }
        drop(hot);
        // Dropping the deadpool object (not the PooledConn) returns it to
        // deadpool.
        drop(obj);
        // A checkout waiting to connect (`max_connecting`) takes it, when
        // nobody waits in line for it (rare: bursts only get here).
        let to_connect = self.connect_waiters.load(Ordering::Relaxed) as usize;
        if to_connect > 0 {
            // deadpool's `waiting`: checkouts in line for a slot, and those
            // with one that are connecting or waiting to.
            let connecting = self.connecting.as_ref().map_or(0, |c| {
                self.settings
                    .max_connecting
                    .saturating_sub(c.available_permits())
            });
            if deadpool.status().waiting <= to_connect + connecting {
                self.returned.notify_one();
            }
        }
    }

    /// Joins the line (`Line`), under the same lock as the hot list, when
    /// that is empty; None: a connection is idle there, take it instead.
    fn join_line(&self) -> Option<Line<'_>> {
        let mut hot = self.hot();
        if !hot.idle.is_empty() {
            return None;
        }
        hot.line += 1;
        Some(Line(self))
    }
}

/// A checkout in line or connecting (`Hot::line`), for as long as it lives.
struct Line<'a>(&'a Manager);

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.0.hot().line -= 1;
    }
}

/// A checkout's deadpool timeouts: waiting in line at most `wait` (zero:
/// not at all); creating and recycling are bounded by the manager itself.
fn get_within(wait: Duration) -> Timeouts {
    Timeouts {
        wait: Some(wait),
        create: None,
        recycle: None,
    }
}

/// A failed checkout as the relay sees it.
fn get_error(e: PoolError<BackendError>) -> BackendError {
    match e {
        PoolError::Backend(e) => e,
        PoolError::Timeout(_) => BackendError::Exhausted,
        _ => BackendError::Closed,
    }
}

/// Probes a down backend in the background, waiting longer after each
/// failure, until a connect succeeds (the new connection joins the pool).
async fn probe(weak: WeakPool<Manager>, first: Duration, max: Duration) {
    let mut wait = first;
    loop {
        tokio::time::sleep(wait).await;
        let Some(pool) = weak.upgrade() else { return };
        if pool.manager().health.retired.load(Ordering::Acquire) {
            return;
        }
        // An idle connection that passes the liveness check proves the
        // backend as well as a new one; it goes back as a checkin's would
        // (a checkout may have joined the line since it was taken).
        if let Some(obj) = pool.manager().hot_pop() {
            pool.manager().park(obj, &pool);
            pool.manager().record_success();
            return;
        }
        let t = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        match pool.timeout_get(&t).await {
            // An idle connection that passed the liveness check proves the
            // backend as well as a new one.
            Ok(_) => pool.manager().record_success(),
            // Every slot busy, or its wait to connect ended by a
            // connection given back: nothing probed; try again.
            Err(PoolError::Timeout(_) | PoolError::Backend(BackendError::NotNow)) => {}
            Err(e) => {
                wait = (wait * 2).min(max);
                tracing::debug!(backend = %pool.manager().settings.addr, "probe failed: {e:?}; next in {wait:?}");
            }
        }
        if !pool.manager().health.down.load(Ordering::Acquire) {
            return;
        }
    }
}

/// A connection checked out of a pool. Dropping it discards the connection
/// (its slot goes to the next waiter); only `Pool::checkin` returns it.
pub struct PooledConn(Option<Object<Manager>>);

impl Deref for PooledConn {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        self.0.as_ref().expect("pooled connection")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.0.as_mut().expect("pooled connection")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            drop(Object::take(obj));
        }
    }
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.as_deref().fmt(f)
    }
}

impl PooledConn {
    /// Leaves the pool (freeing its slot) and says QUIT; the socket keeps
    /// its TCP permit until closed.
    pub fn quit(mut self) -> impl std::future::Future<Output = ()> + Send {
        let obj = self.0.take().expect("pooled connection");
        let conn: Box<BackendConn> = Object::take(obj);
        (*conn).quit()
    }

    /// This connection's id (for traces): an integer, so a span records
    /// it without formatting.
    pub fn id(&self) -> Option<i64> {
        self.0.as_ref().map(|c| c.id as i64)
    }
}

/// Whether a connection deadpool handed out came from its idle list
/// (rather than being opened for this checkout).
fn reused(obj: &Object<Manager>) -> bool {
    Object::metrics(obj).recycle_count > 0
}

/// Connections to one backend: one share (a deadpool pool with its own
/// slots and TCP permits) per core in the thread-per-core layout, else
/// one. A session takes connections from its own core's share only, so a
/// backend connection is only ever polled by the thread that opened it;
/// the shares' sizes add up to `max_connections`. Health and the learned
/// `SIZE` are the backend's, shared by every share.
#[derive(Debug)]
pub struct Pool {
    shares: Box<[managed::Pool<Manager>]>,
}

/// `max` split into `n` parts as even as can be, the larger ones first.
pub fn split(max: usize, n: usize) -> impl Iterator<Item = usize> {
    let n = n.max(1);
    (0..n).map(move |k| max / n + usize::from(k < max % n))
}

impl Pool {
    /// A pool of `settings.max_connections` in `shares` parts (one per
    /// core; each needs at least one connection, which config validation
    /// checks).
    pub fn new(settings: PoolSettings, metrics: BackendMetrics, shares: usize) -> Pool {
        let health = Arc::new(Health {
            failures: AtomicU32::new(0),
            down: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        });
        let size = Arc::new(AtomicU64::new(0));
        let connecting: Vec<usize> = split(settings.max_connecting, shares).collect();
        let shares = split(settings.max_connections, shares)
            .zip(connecting)
            .map(|(max, connecting)| {
                // Never more than the share's slots (the default cap on a
                // small pool; and a semaphore's bound); 0 stays no cap.
                let connecting = match settings.max_connecting {
                    0 => 0,
                    _ => connecting.clamp(1, max.max(1)),
                };
                let manager = Manager {
                    metrics: metrics.clone(),
                    tcp: Arc::new(Semaphore::new(max)),
                    connecting: (connecting > 0).then(|| Semaphore::new(connecting)),
                    connect_waiters: AtomicU32::new(0),
                    returned: tokio::sync::Notify::new(),
                    health: health.clone(),
                    size: size.clone(),
                    settings: PoolSettings {
                        max_connections: max,
                        max_connecting: connecting,
                        ..settings.clone()
                    },
                    pool: OnceLock::new(),
                    hot: Mutex::default(),
                };
                let inner = managed::Pool::builder(manager)
                    .max_size(max)
                    .queue_mode(managed::QueueMode::Lifo)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .expect("pool with a runtime and no hooks");
                let _ = inner.manager().pool.set(inner.weak());
                inner
            })
            .collect();
        Pool { shares }
    }

    /// The current core's share.
    #[inline]
    fn inner(&self) -> &managed::Pool<Manager> {
        let k = crate::cores::current();
        // Core k < shares always (both come from `[runtime]`); the modulo
        // only keeps a stray thread from panicking.
        &self.shares[if k < self.shares.len() {
            k
        } else {
            k % self.shares.len()
        }]
    }

    /// The pool's settings (kept by its manager); `max_connections` is the
    /// current core's share.
    pub fn settings(&self) -> &PoolSettings {
        &self.inner().manager().settings
    }

    /// A ready connection: the most recently used idle one that is still
    /// alive, a new one in a free slot, or, with `Wait::Yes`, the next one
    /// any session returns (first come first served, at most `pool_wait`).
    /// Returns whether it was reused (a reused one may still turn out dead
    /// on first use; the caller then asks `reconnect`).
    pub async fn checkout(&self, wait: Wait) -> Result<(PooledConn, bool), BackendError> {
        // The hot idle list first (`Hot`), then deadpool's idle list,
        // taken in place (`idle_now`): no future of deadpool's in this
        // one, which every transaction awaits (and moves into a box); a
        // slot free for a new connection, or a wait in line, goes the
        // boxed way.
        if let Some(got) = self.checkout_hot() {
            return Ok(got);
        }
        let Some(got) = self.idle_now() else {
            return Box::pin(self.opened(wait)).await;
        };
        if let Some(r) = self.settled(got, wait) {
            return r;
        }
        // Boxed: the wait in line is the rarer path.
        Box::pin(self.in_line()).await
    }

    /// `checkout`'s usual case, not a future: the most recently returned
    /// live connection of the hot list (always reused), if any.
    pub fn checkout_hot(&self) -> Option<(PooledConn, bool)> {
        let obj = self.inner().manager().hot_pop()?;
        Some(self.taken(obj, true, 0.0))
    }

    /// What a non-blocking get came to: the connection or the error, or
    /// None when no slot was free and `Wait::Yes` waits in line (not an
    /// async fn: its future would be in every checkout's).
    fn settled(
        &self,
        got: Result<Object<Manager>, PoolError<BackendError>>,
        wait: Wait,
    ) -> Option<Result<(PooledConn, bool), BackendError>> {
        match got {
            Ok(obj) => {
                let reused = reused(&obj);
                Some(Ok(self.taken(obj, reused, 0.0)))
            }
            Err(PoolError::Timeout(_)) if wait == Wait::Yes => None,
            Err(e) => Some(Err(get_error(e))),
        }
    }

    /// deadpool's non-blocking checkout polled once, in place, with
    /// connects refused (`NO_CONNECT`): Some(Ok) an idle connection that
    /// passed `recycle` (which never waits); Some(Err(Timeout)) no free
    /// slot (or one that is someone's in line: first come first served
    /// holds); None a free slot without an idle connection, which only
    /// a connect fills (nothing was connected; the slot is free again).
    fn idle_now(&self) -> Option<Result<Object<Manager>, PoolError<BackendError>>> {
        struct Allow;
        impl Drop for Allow {
            fn drop(&mut self) {
                NO_CONNECT.set(false);
            }
        }
        NO_CONNECT.set(true);
        let _allow = Allow;
        let now = get_within(Duration::ZERO);
        let get = std::pin::pin!(self.inner().timeout_get(&now));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::future::Future::poll(get, &mut cx) {
            std::task::Poll::Ready(Err(PoolError::Backend(BackendError::NotNow))) => None,
            std::task::Poll::Ready(r) => Some(r),
            // Not reached (recycle and the empty hooks never wait); the
            // slow way is right whatever happened.
            std::task::Poll::Pending => None,
        }
    }

    /// `checkout` when a new connection is wanted: connects in a free
    /// slot, or waits in line with `Wait::Yes` when that slot was taken
    /// meanwhile.
    async fn opened(&self, wait: Wait) -> Result<(PooledConn, bool), BackendError> {
        loop {
            let got = match self.inner().timeout_get(&get_within(Duration::ZERO)).await {
                // A connection came back while this one waited to connect
                // (`max_connecting`), or was idle when it began to: take
                // it, or the slot again.
                Err(PoolError::Backend(BackendError::NotNow)) => {
                    if let Some(got) = self.checkout_hot() {
                        return Ok(got);
                    }
                    match self.idle_now() {
                        Some(got) => got,
                        None => continue,
                    }
                }
                got => got,
            };
            return match self.settled(got, wait) {
                Some(r) => r,
                None => self.in_line().await,
            };
        }
    }

    /// `checkout`'s wait in line, at most `pool_wait`.
    async fn in_line(&self) -> Result<(PooledConn, bool), BackendError> {
        let t0 = Instant::now();
        let wait = self.settings().pool_wait;
        // In line before deadpool's wait begins: from here on a checkin
        // gives its connection to deadpool, which hands it to the oldest
        // in line (this one, or one before it).
        let _line = loop {
            if let Some(got) = self.checkout_hot() {
                return Ok(got);
            }
            if let Some(line) = self.inner().manager().join_line() {
                break line;
            }
        };
        loop {
            let t = get_within(wait.saturating_sub(t0.elapsed()));
            match self.inner().timeout_get(&t).await {
                Ok(obj) => {
                    let reused = reused(&obj);
                    return Ok(self.taken(obj, reused, t0.elapsed().as_secs_f64()));
                }
                // A slot, then a connection given back while waiting to
                // connect (`max_connecting`): in line again for it.
                Err(PoolError::Backend(BackendError::NotNow)) => continue,
                Err(e) => return Err(get_error(e)),
            }
        }
    }

    /// A checked-out connection, counted; `waited` seconds in line.
    fn taken(&self, obj: Object<Manager>, reused: bool, waited: f64) -> (PooledConn, bool) {
        let conn = PooledConn(Some(obj));
        let m = &self.inner().manager().metrics;
        m.pool_wait.observe(waited);
        if reused {
            m.reused.inc();
        }
        (conn, reused)
    }

    /// Replaces a reused connection that proved dead with a new one in the
    /// same slot (no new wait in line).
    pub async fn reconnect(&self, conn: &mut PooledConn) -> Result<(), BackendError> {
        let permit = conn._permit.take();
        // Boxed: inline, the connect would make every transaction's reply
        // future (which awaits this on its rare path) larger to move.
        let mut fresh = Box::pin(self.inner().manager().connect()).await?;
        fresh._permit = permit;
        *conn.deref_mut() = fresh;
        Ok(())
    }

    /// Gives a connection back after a transaction: to the next waiter or
    /// the idle list. Connections past their transaction cap or their
    /// `max_lifetime` are closed with QUIT (in the background; the backend
    /// still counts them).
    #[inline]
    pub fn checkin(&self, mut conn: PooledConn) {
        let s = self.settings();
        let now = ticks();
        if conn.txns >= s.max_transactions || s.max_idle.is_zero() || s.too_old_at(&conn, now) {
            tokio::spawn(conn.quit());
            return;
        }
        conn.idle_since = now;
        let obj = conn.0.take().expect("pooled connection");
        let share = self.inner();
        share.manager().park(obj, share);
    }

    /// The message size limit (`SIZE n`) the backend announced in the
    /// EHLO of its newest connection; None before one, or when it
    /// announced none or no limit (`SIZE 0`).
    pub fn size_limit(&self) -> Option<u64> {
        let n = self.inner().manager().size.load(Ordering::Relaxed);
        (n > 0).then_some(n)
    }

    /// Out of service for good (a reload replaced its set): a prober of
    /// it stops. A session may hold the old set a while longer (its last
    /// transaction's, `Txn::end`), which must not keep it connecting.
    pub fn retire(&self) {
        self.inner()
            .manager()
            .health
            .retired
            .store(true, Ordering::Release);
    }

    /// False while the backend is marked down (being probed).
    pub fn is_up(&self) -> bool {
        !self.inner().manager().health.down.load(Ordering::Acquire)
    }

    /// Sessions of the current core waiting in line for a connection now.
    pub fn waiting(&self) -> usize {
        self.inner().status().waiting
    }

    /// This backend's metrics.
    pub fn metrics(&self) -> &BackendMetrics {
        &self.inner().manager().metrics
    }

    /// Idle, in use and waiting now (every core's share), and whether the
    /// backend is up.
    pub fn stat(&self) -> PoolStat {
        let (mut idle, mut in_use, mut waiting) = (0, 0, 0);
        for p in &self.shares {
            let s = p.status();
            let hot = p.manager().hot().idle.len();
            idle += s.available + hot;
            in_use += s.size.saturating_sub(s.available + hot);
            waiting += s.waiting;
        }
        PoolStat {
            addr: self.settings().addr.clone(),
            group: self.settings().group.clone(),
            idle,
            in_use,
            waiting,
            up: self.is_up(),
        }
    }

    /// Closes idle connections that expired, idle past `max_idle` or open
    /// past `max_lifetime` (QUIT, in the background), in every share.
    pub fn reap(&self) {
        let s = self.settings();
        let now = ticks();
        for p in &self.shares {
            for c in p.retain(|c, _| s.fresh_at(c, now)).removed {
                tokio::spawn(c.quit());
            }
            let expired: Vec<_> = (p.manager().hot().idle)
                .extract_if(.., |c| !s.fresh_at(c, now))
                .collect();
            for c in expired {
                tokio::spawn(PooledConn(Some(c)).quit());
            }
        }
    }

    /// QUITs every idle connection (shutdown), in every share.
    pub async fn close_idle(&self) {
        let mut quits = Vec::new();
        for p in &self.shares {
            let hot = std::mem::take(&mut p.manager().hot().idle);
            quits.extend(
                hot.into_iter()
                    .map(|c| tokio::spawn(PooledConn(Some(c)).quit())),
            );
            quits.extend(
                p.retain(|_, _| false)
                    .removed
                    .into_iter()
                    .map(|c| tokio::spawn(c.quit())),
            );
        }
        for q in quits {
            let _ = q.await;
        }
    }

    /// Idle connections now held (every share).
    pub fn idle_count(&self) -> usize {
        self.shares
            .iter()
            .map(|p| p.status().available + p.manager().hot().idle.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that greets, answers every line with 250 and counts the
    /// connections it accepted.
    async fn counting_backend() -> (String, Arc<AtomicU32>) {
        slow_backend(Duration::ZERO).await
    }

    /// `counting_backend` that waits `greet_after` before its greeting.
    async fn slow_backend(greet_after: Duration) -> (String, Arc<AtomicU32>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let n = Arc::new(AtomicU32::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    tokio::time::sleep(greet_after).await;
                    let _ = w.write_all(b"220 sink\r\n").await;
                    while let Ok(Some(_)) = lines.next_line().await {
                        let _ = w.write_all(b"250 ok\r\n").await;
                    }
                });
            }
        });
        (addr, n)
    }

    fn pool_of(addr: &str, max: usize) -> Pool {
        pool_capped(addr, max, 0)
    }

    fn pool_capped(addr: &str, max: usize, connecting: usize) -> Pool {
        pool_with(addr, max, connecting, |_| {})
    }

    /// `pool_capped` with its settings changed by `f` first.
    fn pool_with(
        addr: &str,
        max: usize,
        connecting: usize,
        f: impl FnOnce(&mut PoolSettings),
    ) -> Pool {
        let mut settings = PoolSettings {
            addr: addr.to_string(),
            backend: 0,
            group: "default".into(),
            helo_name: "edge.test".into(),
            max_connections: max,
            max_connecting: connecting,
            max_idle: Duration::from_secs(60),
            max_lifetime: Duration::ZERO,
            max_transactions: 1000,
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            pool_wait: Duration::from_millis(200),
            down_after: 0,
            probe_interval: Duration::from_secs(1),
            probe_interval_max: Duration::from_secs(1),
            generation: 0,
            tls: None,
        };
        f(&mut settings);
        let metrics = crate::telemetry::metrics::Metrics::new().backend(addr, "default");
        Pool::new(settings, metrics, 1)
    }

    /// The in-place try (`idle_now`) takes an idle connection without a
    /// connect, leaves a free slot to the connecting path, refuses no
    /// connect after it (`NO_CONNECT` cleared), and a full pool is
    /// `Exhausted` without a wait.
    #[tokio::test]
    async fn checkout_in_place_reuses_connects_and_refuses() {
        let (addr, accepted) = counting_backend().await;
        let pool = pool_of(&addr, 1);
        let (c, reused) = pool.checkout(Wait::No).await.expect("a new connection");
        assert!(!reused);
        assert!(!NO_CONNECT.get());
        assert!(matches!(
            pool.checkout(Wait::No).await,
            Err(BackendError::Exhausted)
        ));
        assert!(matches!(
            pool.checkout(Wait::Yes).await,
            Err(BackendError::Exhausted)
        ));
        pool.checkin(c);
        let (c, reused) = pool.checkout(Wait::No).await.expect("the idle one");
        assert!(reused);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A connection that leaves the pool frees its slot: the next
        // checkout connects again.
        drop(c);
        let (_c, reused) = pool.checkout(Wait::Yes).await.expect("a new one");
        assert!(!reused);
        assert!(!NO_CONNECT.get());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A cap past the pool's size is the pool's size (no semaphore of
        // usize::MAX permits, which would panic).
        let pool = pool_capped(&addr, 3, usize::MAX);
        assert_eq!(pool.settings().max_connecting, 3);
        assert!(pool.checkout(Wait::No).await.is_ok());
    }

    /// A connection given back while nobody waits goes to the hot list
    /// and out of it without a connect; one given back while a checkout
    /// waits in line goes to that checkout; a hot one the backend spoke
    /// on while idle is dropped for a new one; the reaper's and the
    /// shutdown's counts include the hot list.
    #[tokio::test]
    async fn hot_list_serves_the_line_and_checks_liveness() {
        let (addr, accepted) = counting_backend().await;
        let pool = Arc::new(pool_of(&addr, 1));
        let (c, reused) = pool.checkout(Wait::No).await.expect("a new connection");
        assert!(!reused);
        pool.checkin(c);
        assert_eq!(pool.inner().manager().hot().idle.len(), 1);
        assert_eq!(pool.inner().status().available, 0);
        assert_eq!((pool.stat().idle, pool.stat().in_use), (1, 0));
        let (c, reused) = pool.checkout(Wait::No).await.expect("the hot one");
        assert!(reused);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!((pool.stat().idle, pool.stat().in_use), (0, 1));

        // A checkout in line for the only connection gets it when it
        // comes back (through deadpool, not the hot list).
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.checkout(Wait::Yes).await })
        };
        while pool.inner().manager().hot().line == 0 {
            tokio::task::yield_now().await;
        }
        pool.checkin(c);
        let (mut c, reused) = waiter.await.unwrap().expect("served from the line");
        assert!(reused);
        assert_eq!(pool.inner().manager().hot().line, 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // The backend answers a NOOP after the connection went idle: the
        // liveness check drops it, and the checkout connects again.
        c.send(b"NOOP\r\n").await.unwrap();
        pool.checkin(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (c, reused) = pool.checkout(Wait::No).await.expect("a new one");
        assert!(!reused);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        pool.checkin(c);
        assert_eq!(pool.idle_count(), 1);
        pool.close_idle().await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.stat().in_use, 0);
    }

    /// The reaper QUITs a connection idle in the hot list past
    /// `max_idle` (its slot is free again), and keeps a fresh one.
    #[tokio::test]
    async fn reaper_expires_the_hot_list() {
        let (addr, accepted) = counting_backend().await;
        let pool = pool_with(&addr, 2, 0, |s| s.max_idle = Duration::from_millis(500));
        let (a, _) = pool.checkout(Wait::No).await.expect("a");
        let (b, _) = pool.checkout(Wait::No).await.expect("b");
        pool.checkin(a);
        // Ages count in 100 ms ticks: a is 700 ms or more past its
        // checkin, b at most a tick or two (500 ms of margin for a slow
        // machine).
        tokio::time::sleep(Duration::from_millis(800)).await;
        pool.checkin(b);
        pool.reap();
        assert_eq!(
            pool.idle_count(),
            1,
            "the older one expired, the fresh one kept"
        );
        assert_eq!(pool.stat().in_use, 0);
        // Both slots usable: the kept one, then a new connection.
        let (_b, reused) = pool.checkout(Wait::No).await.expect("the kept one");
        assert!(reused);
        let (_c, reused) = pool.checkout(Wait::No).await.expect("a new one");
        assert!(!reused);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn shares_add_up_to_the_cap() {
        assert_eq!(super::split(4, 3).collect::<Vec<_>>(), [2, 1, 1]);
        assert_eq!(super::split(8, 1).collect::<Vec<_>>(), [8]);
        assert_eq!(super::split(5, 0).collect::<Vec<_>>(), [5]);
        for (max, n) in [(7, 4), (100, 16), (16, 16)] {
            let v: Vec<_> = super::split(max, n).collect();
            assert_eq!((v.len(), v.iter().sum::<usize>()), (n, max));
            assert!(v.iter().all(|&x| x >= max / n && x <= max / n + 1));
        }
    }

    /// `max_connecting`: a burst of checkouts larger than the cap opens
    /// only the cap's connects at a time, and the checkouts waiting to
    /// connect take the connections given back instead of opening their
    /// own; every checkout is served.
    #[tokio::test]
    async fn a_burst_waits_for_connections_given_back() {
        let (addr, accepted) = slow_backend(Duration::from_millis(100)).await;
        let pool = Arc::new(pool_capped(&addr, 20, 2));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let (c, _) = pool.checkout(Wait::Yes).await.expect("served");
                // A short transaction, then back to the pool.
                tokio::time::sleep(Duration::from_millis(5)).await;
                pool.checkin(c);
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Two connects in flight, none greeted yet.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        for t in tasks {
            t.await.unwrap();
        }
        // The first two connections carried the burst: the waiting
        // checkouts took them as they came back.
        let opened = accepted.load(Ordering::SeqCst);
        assert!(opened <= 4, "{opened} connections opened for 20 checkouts");
        assert!(!NO_CONNECT.get());
    }
}
