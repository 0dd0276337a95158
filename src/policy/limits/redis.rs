//! Rate limits shared on Redis (`store = "redis"`): a local allowance per
//! key in front of a GCRA bucket in Redis, the one task that talks to Redis
//! (the `Worker`, on the redis crate's `ConnectionManager`, fed through a
//! bounded queue by its `Link`, one per `[policy.limits.redis]`), and what
//! the limits do while Redis is slow or down. Owns no reply codes
//! and no per-instance limiter: `rate.rs` wraps each [`Remote`] around its
//! local governor limiter, which serves as the provisional judge and the
//! fallback.
//!
//! # Where the state lives
//! Each key (`smtp-edge:rl:<limit>:<ip>` or `smtp-edge:rl:<limit>:<prefix>/<len>`,
//! e.g. `smtp-edge:rl:connection_rate:192.0.2.1`) holds one number, the
//! GCRA theoretical arrival time in microseconds of Redis' own clock
//! (`TIME`, so the instances' clocks do not matter), with a TTL of the time
//! until the bucket is full again: an idle key disappears, Redis memory is
//! bounded by the keys active within one refill time. One Lua script
//! ([`GCRA_LUA`], run with `EVALSHA`, reloaded on `NOSCRIPT`) does a whole
//! update atomically: it charges `debt` events unconditionally, then grants
//! up to `want` more if the bucket has them, and answers how many it granted
//! and how long until the next one is free.
//!
//! # The local allowance (why a session never waits for Redis)
//! Checks stay synchronous. Per key, each instance keeps:
//! - `credit`: tokens already charged in Redis for this instance (a lease);
//!   a check that finds credit spends one and admits;
//! - `refused_until`: Redis said the bucket is empty until then; a check
//!   with no credit before that time refuses;
//! - otherwise (first sight of the key, a refusal that ran out, a burst that
//!   outran the lease within one round trip) the check is *provisional*: the
//!   local limiter (the same rate, this instance only) decides, and an
//!   admitted event becomes `debt`, charged to Redis in the next call.
//!
//! After each check that leaves the key short (debt to report, or less
//! credit than it wants) and with no call already queued for it, a request
//! goes to the worker task through a bounded queue (`try_send`, never a
//! wait). The worker sends everything queued as one pipeline (one round trip
//! for any number of keys, each key's update one atomic script run) and
//! applies the answers. With `demand` a key's checks since its previous
//! request and `lease_max = clamp(burst / 8, 1, 64)`, a key is short when
//! its credit is below `min(lease_max, max(1, demand))`, and then leases up
//! to `min(lease_max, 2 x demand)` (`min(lease_max, 4)` for a quiet key,
//! `QUIET_LEASE`): a quiet key keeps a few tokens ahead and costs one Redis
//! call per four events, not per event; a busy key leases more and costs
//! one Redis call per lease.
//!
//! # Error bound
//! Every event the fleet admits is charged to the key's bucket exactly once
//! (a leased token before it is spent, a provisional admission afterwards),
//! except while Redis is unreachable. Hence, per key, with N instances:
//! - over a long run the fleet admits at most the configured rate: debt
//!   beyond the bucket pushes its arrival time into the future, and the
//!   refusals that follow repay it;
//! - over any interval the fleet admits at most what one GCRA limiter of
//!   that rate and burst admits, plus, per instance, the credit it held when
//!   the interval began (at most `lease_max`) and its provisional admissions
//!   that the bucket could not cover. Provisional admissions happen only
//!   without credit and without a current refusal, each also within the
//!   local limiter, so one instance adds at most one local burst per Redis
//!   round trip: the worst case is a burst that reaches all N instances at
//!   their first sight of a key, N x burst instead of burst for about one
//!   round trip. A client that keeps hammering all N instances gets, each
//!   time its refusal ends, at most what it sends an instance within one
//!   round trip (one event if it waits for each reply) per instance, repaid
//!   by a longer refusal. A client that alternates between instances one
//!   event at a time, with Redis answering in between, is held at exactly
//!   the fleet burst when the burst covers two tokens per instance (each
//!   instance's first, provisional event and its lookahead token), and at
//!   most one more per instance otherwise (tests/redis_limits.rs, and the
//!   unit tests below on a Rust twin of the script).
//! - the other way round, tokens leased by an instance the client no longer
//!   uses are lost to it: at most `lease_max` per instance per key, until
//!   Redis refills them.
//!
//! # Redis slow or down
//! A call that fails or takes longer than `timeout` marks the link degraded
//! (logged once, counted): every Redis-backed check then follows
//! `on_failure` (`local`: the local limiter decides; `open`: admit) and
//! nothing is queued. The worker probes Redis (`PING`, `SCRIPT LOAD`) every
//! second and, on the first answer, restores the shared limits (logged
//! once). Debt that could not be reported is dropped: events admitted during
//! an outage are not charged to the fleet. Mail never waits: the worker is
//! the only one that awaits Redis.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::Clock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, ServerErrorKind, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::clock::{claim_emergency_sweep, TimeSource};
use crate::policy::settings::{OnFailure, Rate, RedisConfig};

/// GCRA on one key in one atomic step.
///
/// `KEYS[1]`: the bucket. `ARGV`: emission interval T (µs), capacity
/// burst x T (µs), debt (events already admitted: charged whatever the
/// bucket holds), want (tokens to lease if free). Returns `{granted,
/// wait}`: tokens granted, and µs until one more is free (0: some are).
pub const GCRA_LUA: &str = r#"
local t = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local debt = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local v = tonumber(stored)
  if v and v > now then tat = v end
end
tat = tat + debt * t
local free = math.floor((now + cap - tat) / t)
if free < 0 then free = 0 end
local granted = want
if granted > free then granted = free end
tat = tat + granted * t
local full = tat - now
if full > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', math.ceil(full / 1000)))
end
local wait = tat + t - cap - now
if wait < 0 then wait = 0 end
return {granted, wait}
"#;

/// Requests waiting for the worker, at most.
const QUEUE: usize = 16_384;
/// Keys updated in one pipeline, at most.
const MAX_BATCH: usize = 512;
/// Time between probes while degraded.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe (and a connection attempt) may take this long at least,
/// whatever `timeout` is: it runs in the background.
const PROBE_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// Why a Redis call counted as failed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Connection refused or lost, or an error reply to the whole call.
    Error,
    /// No answer within `timeout`.
    Timeout,
    /// One key's script run answered an error or something unexpected.
    Reply,
    /// The worker's queue was full: that update was not sent.
    QueueFull,
}

impl FailReason {
    pub const ALL: [FailReason; 4] = [
        FailReason::Error,
        FailReason::Timeout,
        FailReason::Reply,
        FailReason::QueueFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailReason::Error => "error",
            FailReason::Timeout => "timeout",
            FailReason::Reply => "reply",
            FailReason::QueueFull => "queue_full",
        }
    }
}

/// Counters of the Redis store, kept across reloads (monotonic).
#[derive(Debug, Default)]
pub struct RedisStats {
    calls: AtomicU64,
    failures: [AtomicU64; 4],
    outages: AtomicU64,
    fallback: AtomicU64,
}

impl RedisStats {
    fn fail(&self, why: FailReason) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// What a scrape shows of the Redis store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStatus {
    /// Round trips answered.
    pub calls: u64,
    /// Failed calls (probes included) and unsent updates, by reason.
    pub failures: Vec<(FailReason, u64)>,
    /// Times the link went from working to degraded.
    pub outages: u64,
    /// Checks decided by `on_failure` because the link was degraded.
    pub fallback_checks: u64,
    /// True while degraded (`on_failure` in force).
    pub degraded: bool,
}

/// One `[policy.limits.redis]`: the queue to its worker and its health.
/// Shared by every Redis-backed limiter and kept across reloads while the
/// section is unchanged.
pub struct Link {
    cfg: RedisConfig,
    on_failure: OnFailure,
    tx: mpsc::Sender<Request>,
    degraded: Arc<AtomicBool>,
    stats: Arc<RedisStats>,
}

impl Link {
    /// The link for `cfg` and its worker task (spawned on the current tokio
    /// runtime; with none, the link stays degraded and the limits follow
    /// `on_failure`).
    pub fn new(cfg: &RedisConfig, stats: Arc<RedisStats>) -> Arc<Link> {
        let (link, rx) = Link::detached(cfg, stats);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let worker = Worker {
                    url: cfg.url.clone().unwrap_or_default(),
                    timeout: secs(cfg.timeout),
                    on_failure: cfg.on_failure,
                    rx,
                    degraded: link.degraded.clone(),
                    stats: link.stats.clone(),
                    warned_reply: false,
                };
                rt.spawn(worker.run());
            }
            Err(_) => {
                link.degraded.store(true, Ordering::Relaxed);
                warn!("redis: no async runtime to run the client on; Redis-backed limits follow on_failure");
            }
        }
        link
    }

    /// A link with no worker: the caller gets the queue's other end.
    fn detached(cfg: &RedisConfig, stats: Arc<RedisStats>) -> (Arc<Link>, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(Link {
            cfg: cfg.clone(),
            on_failure: cfg.on_failure,
            tx,
            degraded: Arc::new(AtomicBool::new(false)),
            stats,
        });
        (link, rx)
    }

    /// True when this link was built for `cfg` (a reload keeps it then).
    pub fn is_for(&self, cfg: &RedisConfig) -> bool {
        self.cfg == *cfg
    }

    /// True while Redis is considered unreachable.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> RedisStatus {
        status(&self.stats, self.degraded())
    }
}

/// The counters as a scrape shows them.
pub fn status(stats: &RedisStats, degraded: bool) -> RedisStatus {
    RedisStatus {
        calls: stats.calls.load(Ordering::Relaxed),
        failures: FailReason::ALL
            .iter()
            .map(|&r| (r, stats.failures[r as usize].load(Ordering::Relaxed)))
            .collect(),
        outages: stats.outages.load(Ordering::Relaxed),
        fallback_checks: stats.fallback.load(Ordering::Relaxed),
        degraded,
    }
}

fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v)
        .unwrap_or(Duration::from_millis(50))
        .max(Duration::from_millis(1))
}

/// One key's update, queued for the worker.
pub struct Request {
    lim: Arc<Remote>,
    key: IpAddr,
    /// Events admitted provisionally, to charge.
    debt: u32,
    /// Tokens to lease.
    want: u32,
}

/// The lease of a quiet key (bounded by `lease_max`, so a limit whose
/// burst is under 16 still leases one token at a time). One token per
/// call cost a Redis update per event: on an MX most keys are quiet (a
/// client connects every few seconds), and the fleet load test measured 3
/// script runs per message and 13-28 % more CPU per message in the
/// instances (loadtest/RESULTS.md section 10). Four is still within the
/// error bound of `lease_max` per instance.
const QUIET_LEASE: u32 = 4;

/// One key's local allowance (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    credit: u32,
    debt: u32,
    /// Checks since the last request (sizes the next lease).
    demand: u32,
    /// Clock (ns) before which a check without credit refuses.
    refused_until: u64,
    /// Clock (ns) of the last check.
    last: u64,
    /// A request for this key is queued or in flight.
    queued: bool,
}

/// The Redis side of one rate limiter (one limit, one scope).
pub struct Remote {
    link: Arc<Link>,
    /// `connection_rate`, `message_rate`, `recipient_rate`.
    limit: &'static str,
    /// For prefix keys: the prefix lengths (IPv4, IPv6), named in the key.
    prefix: Option<(u8, u8)>,
    /// Emission interval and capacity (burst x interval), µs, for Redis.
    t_us: u64,
    cap_us: u64,
    lease_max: u32,
    /// A key idle this long (ns) holds nothing Redis does not forget too.
    idle_ns: u64,
    keys: DashMap<IpAddr, KeyState>,
    /// Keys in `keys`, maintained under the shard locks.
    len: AtomicUsize,
    cap: usize,
    overflow: Arc<AtomicU64>,
    next_sweep: AtomicU64,
    clock: TimeSource,
}

impl Remote {
    /// The Redis side of a limiter at `rate` over per-IP keys (`prefix`
    /// None) or prefix keys (`prefix`: the prefix lengths, IPv4 and IPv6,
    /// named in the key); None for a rate that cannot limit anything
    /// (refused by validation anyway).
    pub(super) fn new(
        link: Arc<Link>,
        limit: &'static str,
        prefix: Option<(u8, u8)>,
        rate: &Rate,
        cap: usize,
        clock: TimeSource,
        overflow: Arc<AtomicU64>,
    ) -> Option<Arc<Remote>> {
        if rate.count == 0 || !(rate.period.is_finite() && rate.period > 0.0) {
            return None;
        }
        let t_ns = (rate.period * 1e9 / f64::from(rate.count)).clamp(1.0, 1e18) as u64;
        let burst = u64::from(rate.burst.unwrap_or(rate.count).max(1));
        let t_us = (t_ns / 1_000).max(1);
        Some(Arc::new(Remote {
            link,
            limit,
            prefix,
            t_us,
            cap_us: t_us.saturating_mul(burst),
            lease_max: (burst / 8).clamp(1, 64) as u32,
            idle_ns: t_ns.saturating_mul(burst).max(1_000_000_000),
            keys: DashMap::new(),
            len: AtomicUsize::new(0),
            cap: cap.max(1),
            overflow,
            next_sweep: AtomicU64::new(0),
            clock,
        }))
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// True when `key`'s event is allowed. `local` is the local limiter's
    /// check: the judge of provisional and fallback decisions, and spent on
    /// every admitted event so it is warm when Redis goes away.
    pub fn check(self: &Arc<Self>, key: IpAddr, local: impl FnOnce() -> bool) -> bool {
        if self.link.degraded() {
            self.link.stats.fallback.fetch_add(1, Ordering::Relaxed);
            return match self.link.on_failure {
                OnFailure::Local => local(),
                OnFailure::Open => true,
            };
        }
        let now = self.now();
        if let Some(mut s) = self.keys.get_mut(&key) {
            return self.decide(key, &mut s, now, local);
        }
        if self.len.load(Ordering::Relaxed) >= self.cap {
            self.emergency_sweep(now);
        }
        match self.keys.entry(key) {
            Entry::Occupied(mut e) => self.decide(key, e.get_mut(), now, local),
            Entry::Vacant(v) => {
                // Reserve a place first so concurrent inserts cannot
                // overshoot the bound; a key that finds no place is judged
                // by the local limiter alone.
                if self.len.fetch_add(1, Ordering::Relaxed) >= self.cap {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    self.overflow.fetch_add(1, Ordering::Relaxed);
                    return local();
                }
                let mut s = KeyState::default();
                let allowed = self.decide(key, &mut s, now, local);
                v.insert(s);
                allowed
            }
        }
    }

    fn decide(
        self: &Arc<Self>,
        key: IpAddr,
        s: &mut KeyState,
        now: u64,
        local: impl FnOnce() -> bool,
    ) -> bool {
        s.last = now;
        s.demand = s.demand.saturating_add(1);
        let allowed = if s.credit > 0 {
            s.credit -= 1;
            // Keeps the fallback's view of this instance's traffic.
            let _ = local();
            true
        } else if now < s.refused_until {
            false
        } else if local() {
            s.debt = s.debt.saturating_add(1);
            true
        } else {
            false
        };
        if let Some(req) = self.next_request(key, s, now) {
            if self.link.tx.try_send(req).is_err() {
                // Full (or the worker is gone): the debt stays and goes with
                // the next request.
                s.queued = false;
                self.link.stats.fail(FailReason::QueueFull);
            }
        }
        allowed
    }

    /// The update `key` needs now, if any, marking it queued.
    fn next_request(self: &Arc<Self>, key: IpAddr, s: &mut KeyState, now: u64) -> Option<Request> {
        if s.queued {
            return None;
        }
        // Short: less credit than the checks since the last request.
        // Then top up to twice that (`QUIET_LEASE` for a quiet key), so a busy
        // key's next lease is asked for before this one runs out.
        let want = self.lease_max.min(s.demand.max(1));
        let lease = if now >= s.refused_until && s.credit < want {
            let target = if s.demand <= 1 {
                self.lease_max.min(QUIET_LEASE)
            } else {
                self.lease_max.min(s.demand.saturating_mul(2))
            };
            target.saturating_sub(s.credit)
        } else {
            0
        };
        if s.debt == 0 && lease == 0 {
            return None;
        }
        s.queued = true;
        s.demand = 0;
        Some(Request {
            lim: self.clone(),
            key,
            debt: s.debt,
            want: lease,
        })
    }

    /// Applies Redis' answer to a request (`Err`: it failed; its debt is
    /// dropped). Returns the follow-up request the key needs now.
    fn apply(
        self: &Arc<Self>,
        key: IpAddr,
        sent_debt: u32,
        answer: Result<(u32, u64), ()>,
    ) -> Option<Request> {
        let now = self.now();
        let mut s = self.keys.get_mut(&key)?;
        s.queued = false;
        s.debt = s.debt.saturating_sub(sent_debt);
        let (granted, wait_us) = answer.ok()?;
        s.credit = s.credit.saturating_add(granted);
        s.refused_until = now.saturating_add(wait_us.saturating_mul(1_000));
        if self.link.degraded() {
            return None;
        }
        self.next_request(key, &mut s, now)
    }

    /// The Redis key of `key`.
    fn redis_key(&self, key: IpAddr) -> String {
        match (self.prefix, key) {
            (None, _) => format!("smtp-edge:rl:{}:{key}", self.limit),
            (Some((v4, _)), IpAddr::V4(_)) => format!("smtp-edge:rl:{}:{key}/{v4}", self.limit),
            (Some((_, v6)), IpAddr::V6(_)) => format!("smtp-edge:rl:{}:{key}/{v6}", self.limit),
        }
    }

    /// Drops keys that hold nothing Redis would not have forgotten: idle for
    /// a whole refill time, no refusal running, nothing to report.
    pub fn sweep(&self) {
        self.retain_idle(self.now());
        self.keys.shrink_to_fit();
    }

    fn retain_idle(&self, now: u64) {
        let idle = self.idle_ns;
        self.keys.retain(|_, s| {
            let keep = s.queued
                || s.debt > 0
                || now < s.refused_until
                || now.saturating_sub(s.last) < idle;
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn emergency_sweep(&self, now: u64) {
        if claim_emergency_sweep(&self.next_sweep, now) {
            self.retain_idle(now);
        }
    }

    /// Keys held.
    pub fn keys_held(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        self.clock.now().as_u64()
    }
}

/// The task that talks to Redis for one [`Link`].
struct Worker {
    url: String,
    timeout: Duration,
    on_failure: OnFailure,
    rx: mpsc::Receiver<Request>,
    degraded: Arc<AtomicBool>,
    stats: Arc<RedisStats>,
    /// A per-key error reply was logged already.
    warned_reply: bool,
}

/// One key's answer from the script.
type Answer = Result<(u32, u64), String>;

impl Worker {
    async fn run(mut self) {
        let probe_timeout = self.timeout.max(PROBE_TIMEOUT_MIN);
        let script = Script::new(GCRA_LUA);
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(probe_timeout));
        let manager = redis::Client::open(self.url.as_str())
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, config));
        let mut con = match manager {
            Ok(c) => c,
            Err(e) => {
                self.degrade(FailReason::Error, &e.to_string());
                // Nothing to connect to: fail every request until the link
                // is replaced.
                while let Some(r) = self.rx.recv().await {
                    r.lim.apply(r.key, r.debt, Err(()));
                }
                return;
            }
        };
        match self.probe(&mut con, &script, probe_timeout).await {
            Ok(()) => info!(
                on_failure = self.on_failure.name(),
                "redis: connected; shared rate limits on"
            ),
            Err((why, e)) => {
                self.degrade(why, &e);
                if !self.recover(&mut con, &script, probe_timeout).await {
                    return;
                }
            }
        }
        let mut backlog: VecDeque<Request> = VecDeque::new();
        loop {
            if backlog.is_empty() {
                match self.rx.recv().await {
                    Some(r) => backlog.push_back(r),
                    None => return,
                }
            }
            while backlog.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(r) => backlog.push_back(r),
                    Err(_) => break,
                }
            }
            let n = backlog.len().min(MAX_BATCH);
            let batch: Vec<Request> = backlog.drain(..n).collect();
            let call = tokio::time::timeout(self.timeout, call(&mut con, &script, &batch)).await;
            let failed = match call {
                Ok(Ok(answers)) => {
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                    for (r, a) in batch.iter().zip(answers) {
                        let a = match a {
                            Ok(a) => Ok(a),
                            Err(e) => {
                                self.stats.fail(FailReason::Reply);
                                if !self.warned_reply {
                                    self.warned_reply = true;
                                    warn!(error = %e, "redis: the rate-limit script failed for a key (logged once); that key is judged locally");
                                }
                                Err(())
                            }
                        };
                        if let Some(next) = r.lim.apply(r.key, r.debt, a) {
                            backlog.push_back(next);
                        }
                    }
                    None
                }
                Ok(Err(e)) => Some((FailReason::Error, e.to_string())),
                Err(_) => Some((
                    FailReason::Timeout,
                    format!("no answer within {:?}", self.timeout),
                )),
            };
            if let Some((why, e)) = failed {
                for r in batch.iter().chain(backlog.iter()) {
                    r.lim.apply(r.key, r.debt, Err(()));
                }
                backlog.clear();
                self.degrade(why, &e);
                if !self.recover(&mut con, &script, probe_timeout).await {
                    return;
                }
            }
        }
    }

    /// Marks the link degraded; logs when it was not already.
    fn degrade(&self, why: FailReason, error: &str) {
        self.stats.fail(why);
        if !self.degraded.swap(true, Ordering::Relaxed) {
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            warn!(
                error,
                reason = why.name(),
                on_failure = self.on_failure.name(),
                "redis: unreachable; shared rate limits degraded, each instance follows on_failure until Redis answers again"
            );
        }
    }

    /// Probes until Redis answers (then the link is restored: true), failing
    /// every request that arrives meanwhile. False when every sender is gone.
    async fn recover(
        &mut self,
        con: &mut ConnectionManager,
        script: &Script,
        budget: Duration,
    ) -> bool {
        let mut next = tokio::time::Instant::now() + PROBE_EVERY;
        loop {
            tokio::select! {
                r = self.rx.recv() => match r {
                    Some(r) => {
                        r.lim.apply(r.key, r.debt, Err(()));
                    }
                    None => return false,
                },
                _ = tokio::time::sleep_until(next) => {
                    match self.probe(con, script, budget).await {
                        Ok(()) => {
                            self.degraded.store(false, Ordering::Relaxed);
                            info!("redis: answering again; shared rate limits restored");
                            return true;
                        }
                        Err((why, e)) => {
                            self.stats.fail(why);
                            debug!(error = %e, "redis: probe failed");
                            next = tokio::time::Instant::now() + PROBE_EVERY;
                        }
                    }
                }
            }
        }
    }

    /// `PING` and `SCRIPT LOAD` (a restarted Redis has no scripts).
    async fn probe(
        &self,
        con: &mut ConnectionManager,
        script: &Script,
        budget: Duration,
    ) -> Result<(), (FailReason, String)> {
        let probe = async {
            // The connection manager answers the first command after an
            // outage with the result of the reconnect it started while
            // Redis was down (a stale "Connection refused", seen in the
            // fleet load test: recovery took a probe more); that failure
            // starts a fresh reconnect, which a second try awaits.
            if redis::cmd("PING").query_async::<String>(con).await.is_err() {
                redis::cmd("PING").query_async::<String>(con).await?;
            }
            script.load_async(con).await?;
            RedisResult::Ok(())
        };
        match tokio::time::timeout(budget, probe).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((FailReason::Error, e.to_string())),
            Err(_) => Err((FailReason::Timeout, format!("no answer within {budget:?}"))),
        }
    }
}

/// Runs the script for every request of `batch` in one pipeline; keys that
/// answer `NOSCRIPT` (Redis restarted or flushed its scripts) are run again
/// after loading it. One answer per request, in order.
async fn call(
    con: &mut ConnectionManager,
    script: &Script,
    batch: &[Request],
) -> RedisResult<Vec<Answer>> {
    let mut answers = run_pipeline(con, script, batch.iter()).await?;
    let missing: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Err(Retry::NoScript)))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        script.load_async(con).await?;
        let again = run_pipeline(con, script, missing.iter().map(|&i| &batch[i])).await?;
        for (i, a) in missing.into_iter().zip(again) {
            answers[i] = a;
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| match a {
            Ok(v) => Ok(v),
            Err(Retry::NoScript) => Err("NOSCRIPT after SCRIPT LOAD".to_string()),
            Err(Retry::Failed(e)) => Err(e),
        })
        .collect())
}

enum Retry {
    NoScript,
    Failed(String),
}

async fn run_pipeline<'a>(
    con: &mut ConnectionManager,
    script: &Script,
    reqs: impl Iterator<Item = &'a Request>,
) -> RedisResult<Vec<Result<(u32, u64), Retry>>> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for r in reqs {
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(r.lim.redis_key(r.key))
            .arg(r.lim.t_us)
            .arg(r.lim.cap_us)
            .arg(r.debt)
            .arg(r.want);
        n += 1;
    }
    pipe.ignore_errors();
    let replies: Vec<RedisResult<Value>> = pipe.query_async(con).await?;
    if replies.len() != n {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "pipeline answered a different number of replies",
        )));
    }
    Ok(replies
        .into_iter()
        .map(|r| match r {
            Ok(v) => {
                parse_answer(&v).ok_or_else(|| Retry::Failed(format!("unexpected reply {v:?}")))
            }
            Err(e) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                Err(Retry::NoScript)
            }
            Err(e) => Err(Retry::Failed(e.to_string())),
        })
        .collect())
}

/// `{granted, wait}` as the script returns it.
fn parse_answer(v: &Value) -> Option<(u32, u64)> {
    let Value::Array(items) = v else { return None };
    match items.as_slice() {
        [Value::Int(granted), Value::Int(wait)] => {
            Some((u32::try_from(*granted).ok()?, u64::try_from(*wait).ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(count: u32, period: f64, burst: Option<u32>) -> Rate {
        Rate {
            count,
            period,
            burst,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Redis in Rust: the script's twin, one bucket per key, on the
    /// shared fake clock.
    #[derive(Default)]
    struct Bucket {
        tat_us: std::collections::HashMap<String, u64>,
    }

    impl Bucket {
        fn run(
            &mut self,
            key: String,
            now_us: u64,
            t: u64,
            cap: u64,
            debt: u32,
            want: u32,
        ) -> (u32, u64) {
            let stored = self.tat_us.entry(key).or_default();
            let mut tat = (*stored).max(now_us);
            tat += u64::from(debt) * t;
            let free = (now_us + cap).saturating_sub(tat) / t;
            let granted = u64::from(want).min(free);
            tat += granted * t;
            *stored = tat;
            let wait = (tat + t).saturating_sub(cap + now_us);
            (granted as u32, wait)
        }
    }

    struct Instance {
        lim: Arc<Remote>,
        rx: mpsc::Receiver<Request>,
        local: governor::DefaultKeyedRateLimiter<IpAddr>,
        link: Arc<Link>,
    }

    fn instance(r: Rate, clock: &FakeRelativeClock, on_failure: OnFailure) -> Instance {
        let cfg = RedisConfig {
            url: Some("redis://127.0.0.1:1".into()),
            on_failure,
            ..RedisConfig::default()
        };
        let (link, rx) = Link::detached(&cfg, Arc::default());
        let lim = Remote::new(
            link.clone(),
            "connection_rate",
            None,
            &r,
            1000,
            TimeSource::Fake(clock.clone()),
            Arc::default(),
        )
        .unwrap();
        let per = Duration::from_secs_f64(r.period / f64::from(r.count));
        let quota = governor::Quota::with_period(per)
            .unwrap()
            .allow_burst(std::num::NonZeroU32::new(r.burst.unwrap_or(r.count)).unwrap());
        Instance {
            lim,
            rx,
            local: governor::RateLimiter::keyed(quota),
            link,
        }
    }

    impl Instance {
        fn check(&self, key: IpAddr) -> bool {
            self.lim.check(key, || self.local.check_key(&key).is_ok())
        }

        /// Serves every queued request from `bucket` (Redis answering
        /// before the next event).
        fn serve(&mut self, bucket: &mut Bucket, clock: &FakeRelativeClock) -> usize {
            let mut n = 0;
            while let Ok(r) = self.rx.try_recv() {
                n += 1;
                let now_us = clock.now().as_u64() / 1000;
                let a = bucket.run(
                    r.lim.redis_key(r.key),
                    now_us,
                    r.lim.t_us,
                    r.lim.cap_us,
                    r.debt,
                    r.want,
                );
                if let Some(next) = r.lim.apply(r.key, r.debt, Ok(a)) {
                    self.link.tx.try_send(next).ok().unwrap();
                }
            }
            n
        }
    }

    /// One client alternating between two instances, one event at a time:
    /// the fleet admits the burst, not twice it.
    #[test]
    fn alternating_client_gets_the_fleet_burst() {
        for burst in [3u32, 4, 10] {
            let clock = FakeRelativeClock::default();
            let r = rate(burst, 3600.0, None);
            let mut a = instance(r, &clock, OnFailure::Local);
            let mut b = instance(r, &clock, OnFailure::Local);
            let mut bucket = Bucket::default();
            let key = ip("192.0.2.7");
            let mut admitted = 0;
            for i in 0..40 {
                let inst = if i % 2 == 0 { &mut a } else { &mut b };
                if inst.check(key) {
                    admitted += 1;
                }
                inst.serve(&mut bucket, &clock);
                clock.advance(Duration::from_millis(10));
            }
            assert_eq!(admitted, burst, "burst {burst}");
        }
    }

    /// Over a long run the fleet admits the configured rate, whatever the
    /// lease and provisional decisions did on the way.
    #[test]
    fn long_run_rate_is_the_fleet_rate() {
        let clock = FakeRelativeClock::default();
        // 10 per second, burst 20; three instances hammered in turn, 100
        // attempts a second each, for 60 s.
        let r = rate(10, 1.0, Some(20));
        let mut fleet: Vec<Instance> = (0..3)
            .map(|_| instance(r, &clock, OnFailure::Local))
            .collect();
        let mut bucket = Bucket::default();
        let key = ip("198.51.100.1");
        let mut admitted = 0u32;
        for i in 0..18_000 {
            let n = i % 3;
            if fleet[n].check(key) {
                admitted += 1;
            }
            fleet[n].serve(&mut bucket, &clock);
            clock.advance(Duration::from_micros(3_333));
        }
        // 60 s at 10/s plus the burst; the bound allows a little more per
        // instance, the long run must not.
        eprintln!("admitted {admitted} over 60 s at 10/s, burst 20, 3 instances");
        assert!(admitted <= 600 + 20 + 3, "{admitted}");
        assert!(admitted >= 600, "{admitted}");
    }

    /// A burst at instances that have not heard back from Redis yet is
    /// judged by their local limiters and charged afterwards: the debt is
    /// repaid by refusals.
    #[test]
    fn provisional_admissions_are_charged() {
        let clock = FakeRelativeClock::default();
        // 5 a minute: one token every 12 s.
        let r = rate(5, 60.0, None);
        let mut a = instance(r, &clock, OnFailure::Local);
        let mut b = instance(r, &clock, OnFailure::Local);
        let mut bucket = Bucket::default();
        let key = ip("203.0.113.9");
        // Both instances see 5 at once before Redis answers anything.
        let first: u32 = (0..5)
            .map(|_| a.check(key) as u32 + b.check(key) as u32)
            .sum();
        assert_eq!(first, 10);
        a.serve(&mut bucket, &clock);
        b.serve(&mut bucket, &clock);
        // All 10 are charged (and a's lookahead token): 6 over the bucket.
        // Hammered every second, the fleet admits only a's token until the
        // debt is repaid (11 x 12 s - 60 s = 72 s).
        let mut later = 0;
        for _ in 0..70 {
            clock.advance(Duration::from_secs(1));
            later += a.check(key) as u32 + b.check(key) as u32;
            a.serve(&mut bucket, &clock);
            b.serve(&mut bucket, &clock);
        }
        assert_eq!(later, 1);
    }

    /// A busy key leases several tokens per call; a quiet one keeps one
    /// ahead.
    #[test]
    fn lease_grows_with_demand() {
        let clock = FakeRelativeClock::default();
        let mut a = instance(rate(1000, 60.0, None), &clock, OnFailure::Local);
        assert_eq!(a.lim.lease_max, 64);
        let mut bucket = Bucket::default();
        let key = ip("192.0.2.1");
        let mut calls = 0;
        for _ in 0..10 {
            // Ten events between two Redis answers.
            for _ in 0..10 {
                assert!(a.check(key));
            }
            calls += a.serve(&mut bucket, &clock);
        }
        eprintln!("{calls} Redis calls for 100 events");
        assert!(calls <= 11, "{calls}");
        let quiet = ip("192.0.2.2");
        assert!(a.check(quiet));
        a.serve(&mut bucket, &clock);
        let s = *a.lim.keys.get(&quiet).unwrap();
        assert_eq!((s.credit, s.debt, s.queued), (QUIET_LEASE, 0, false));
    }

    /// Degraded: `local` enforces the local limiter, `open` admits all; no
    /// request is queued; checks are counted as fallbacks.
    #[test]
    fn degraded_follows_on_failure() {
        let clock = FakeRelativeClock::default();
        let r = rate(2, 60.0, None);
        for (mode, expect) in [(OnFailure::Local, 2), (OnFailure::Open, 5)] {
            let mut a = instance(r, &clock, mode);
            a.link.degraded.store(true, Ordering::Relaxed);
            let key = ip("192.0.2.3");
            let admitted: u32 = (0..5).map(|_| a.check(key) as u32).sum();
            assert_eq!(admitted, expect, "{mode:?}");
            assert!(a.rx.try_recv().is_err());
            assert_eq!(a.link.status().fallback_checks, 5);
            assert!(a.link.status().degraded);
        }
    }

    #[test]
    fn failed_call_drops_its_debt_and_frees_the_key() {
        let clock = FakeRelativeClock::default();
        let mut a = instance(rate(5, 60.0, None), &clock, OnFailure::Local);
        let key = ip("192.0.2.4");
        assert!(a.check(key));
        let r = a.rx.try_recv().unwrap();
        assert_eq!((r.debt, r.want), (1, 1));
        assert!(a.lim.apply(r.key, r.debt, Err(())).is_none());
        let s = *a.lim.keys.get(&key).unwrap();
        assert_eq!((s.debt, s.queued), (0, false));
        // The next check asks again.
        assert!(a.check(key));
        assert!(a.rx.try_recv().is_ok());
    }

    #[test]
    fn keys_name_the_limit_and_the_prefix() {
        let clock = FakeRelativeClock::default();
        let a = instance(rate(5, 60.0, None), &clock, OnFailure::Local);
        assert_eq!(
            a.lim.redis_key(ip("192.0.2.1")),
            "smtp-edge:rl:connection_rate:192.0.2.1"
        );
        let (link, _rx) = Link::detached(&RedisConfig::default(), Arc::default());
        let p = Remote::new(
            link,
            "message_rate",
            Some((24, 48)),
            &rate(5, 60.0, None),
            10,
            TimeSource::Fake(clock),
            Arc::default(),
        )
        .unwrap();
        assert_eq!(
            p.redis_key(ip("192.0.2.0")),
            "smtp-edge:rl:message_rate:192.0.2.0/24"
        );
        assert_eq!(
            p.redis_key(ip("2001:db8::")),
            "smtp-edge:rl:message_rate:2001:db8::/48"
        );
    }

    #[test]
    fn idle_keys_swept() {
        let clock = FakeRelativeClock::default();
        let mut a = instance(rate(60, 60.0, Some(2)), &clock, OnFailure::Local);
        let mut bucket = Bucket::default();
        for i in 0..10u8 {
            assert!(a.check(IpAddr::from([10, 0, 0, i])));
        }
        a.serve(&mut bucket, &clock);
        assert_eq!(a.lim.keys_held(), 10);
        a.lim.sweep();
        assert_eq!(a.lim.keys_held(), 10);
        clock.advance(Duration::from_secs(3));
        a.lim.sweep();
        assert_eq!(a.lim.keys_held(), 0);
        assert!(a.lim.keys.is_empty());
    }

    #[test]
    fn answers_parsed_without_panics() {
        assert_eq!(
            parse_answer(&Value::Array(vec![Value::Int(3), Value::Int(0)])),
            Some((3, 0))
        );
        for bad in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(-1), Value::Int(0)]),
            Value::Array(vec![Value::Int(1), Value::Int(-5)]),
            Value::Array(vec![Value::Int(1), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(3)]),
        ] {
            assert_eq!(parse_answer(&bad), None, "{bad:?}");
        }
    }
}
