//! Connection caps and rate limits: a global session cap, concurrent
//! sessions per IP and per prefix (dashmap counters released by guards), and
//! GCRA rates (governor, keyed) per IP and per prefix, with idle-key eviction.
//! Decides nothing about replies: it reports which limit was hit.
//!
//! This file holds the limiter set, [`Limiters`]: what `Policy` calls, the
//! build and reload that carry state over, the sweeper, the overflow count
//! and the Redis status. Its parts: `concurrency.rs` (session counters and
//! permits), `rate.rs` (keyed GCRA limiters and their bounded key store),
//! `redis.rs` (the Redis store), `clock.rs` (the time source) and `hit.rs`
//! (what a limiter reports).
//!
//! # Stores
//! A rate with `store = "redis"` keeps its governor limiter and puts a
//! [`Remote`](redis::Remote) in front of it: the fleet's state
//! is in Redis, the local limiter judges provisional checks and is the
//! fallback while Redis is unreachable (see `redis.rs` for the scheme
//! and its error bound). Checks stay synchronous and report the same
//! [`LimitHit`] whatever the store.
//!
//! # Keys
//! Every limit is counted per client address and per network prefix (the
//! address masked to `ipv4_prefix` / `ipv6_prefix` bits). IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`) count as the IPv4 address.
//!
//! # State
//! A limit whose action is `off` (or whose value is unset / 0) keeps no state
//! and never reports a hit. Concurrency counters hold only clients with a
//! live session: a [`ConnPermit`] removes its key when the count drops to 0.
//!
//! # Reload
//! [`Limiters::reload`] builds the limiters for a new configuration from the
//! running ones, carrying their state over so that nothing is miscounted:
//! - the global session counter always (it counts every session, capped or
//!   not, so raising or setting a cap counts the sessions already running);
//! - the concurrency counters (per IP always, per prefix while the prefix
//!   lengths are unchanged), judged against the new thresholds. A
//!   [`ConnPermit`] releases into the counters it incremented, so sessions
//!   admitted before a reload release correctly whatever changed. Sessions
//!   admitted while a counter was not kept (concurrency off, that limit 0, or
//!   another prefix length) are not counted in it until they end;
//! - each rate limiter whose rate, key (IP, or prefix of an unchanged
//!   length) and `max_tracked_keys` are unchanged, and that is still on:
//!   the same limiter, with its state. Any other one starts fresh;
//! - the count of overflowing checks ([`Limiters::overflow`]);
//! - the Redis link while `[policy.limits.redis]` is unchanged (a
//!   Redis-backed limiter is kept only on the same link; a new one starts
//!   with an empty local allowance and finds the fleet's state in Redis),
//!   and the Redis counters always.
//!
//! The old `Limiters` is [`retired`](Limiters::retire): its sweeper stops at its
//! next tick, and the new one's sweeper sweeps the shared state.
//!
//! # Bounded memory
//! Rate limiters keep one GCRA state per key. Idle keys (indistinguishable
//! from a fresh key) are evicted by [`Limiters::sweep`], run periodically by
//! [`Limiters::spawn_sweeper`]. Each rate limiter holds at most
//! `max_tracked_keys` keys:
//! - when a limiter reaches the bound, the checking path runs an immediate
//!   eviction of that limiter (at most once per second per limiter);
//! - if it is still full (a flood of distinct addresses all within their
//!   window), a key it does not hold yet is judged as a fresh key and **not
//!   stored**: that limiter fails open for new keys. Keys it already holds
//!   are still limited, and so is the other scope: a flood of distinct
//!   addresses from few networks still meets the per-prefix limit (only if
//!   the per-prefix limiter is itself full do new prefixes pass too). Each
//!   such unstored check counts in [`Limiters::overflow`].
//!
//! Failing open rather than closed keeps a flood of spoofed-looking distinct
//! sources from locking out every new legitimate client, and keeps memory at
//! a fixed bound; the per-prefix limits, the concurrency limits and the global
//! cap are what still contain such a flood.

mod clock;
mod concurrency;
mod hit;
mod rate;
pub mod redis;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;

use self::clock::TimeSource;
use self::concurrency::{ConcCounts, Concurrency};
pub use self::concurrency::{ConnPermit, GlobalPermit};
pub use self::hit::{LimitHit, LimitKind, Scope};
use self::rate::{RateEnv, RatePair, Tracked};
use self::redis::{Link, RedisStats, RedisStatus};
use super::settings::{LimitsConfig, Rate, RateConfig, Store};

/// The limiters, shared by every session.
pub struct Limiters {
    max_connections: usize,
    /// Sessions holding a [`GlobalPermit`] (all of them, capped or not).
    global: Arc<AtomicUsize>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    v4_mask: u32,
    v6_mask: u128,
    /// The thresholds; None when concurrency is off or both limits are 0.
    concurrency: Option<Concurrency>,
    /// Live sessions per IP and per prefix (kept even while concurrency is
    /// off, so a reload that turns it back on still knows older sessions).
    counts: Arc<ConcCounts>,
    connection_rate: RatePair,
    message_rate: RatePair,
    recipient_rate: RatePair,
    max_tracked_keys: usize,
    /// New keys judged without being stored because a limiter was full.
    overflow: Arc<AtomicU64>,
    /// The Redis link of the `store = "redis"` rates (None when no rate
    /// uses it), kept by reloads while `[policy.limits.redis]` is unchanged.
    redis: Option<Arc<Link>>,
    /// Counters of the Redis store, over all links (carried by reloads).
    redis_stats: Arc<RedisStats>,
    /// A Redis store was ever configured (its metrics are shown).
    redis_seen: bool,
    sweep_interval: Duration,
    clock: TimeSource,
    /// Set when replaced by a reload: the sweeper stops.
    retired: AtomicBool,
}

impl Limiters {
    pub fn new(cfg: &LimitsConfig) -> Arc<Limiters> {
        Self::build(cfg, TimeSource::real(), None)
    }

    /// Like [`Limiters::new`], with the rate limiters (and the throttle of
    /// their emergency eviction) on a manually advanced clock: for tests and
    /// simulations.
    pub fn with_fake_clock(cfg: &LimitsConfig, clock: FakeRelativeClock) -> Arc<Limiters> {
        Self::build(cfg, TimeSource::Fake(clock), None)
    }

    fn build(cfg: &LimitsConfig, clock: TimeSource, prev: Option<&Limiters>) -> Arc<Limiters> {
        let (ipv4_prefix, ipv6_prefix) = (cfg.ipv4_prefix.min(32), cfg.ipv6_prefix.min(128));
        let cap = cfg.max_tracked_keys.max(1);
        let same_prefixes =
            prev.is_some_and(|p| (p.ipv4_prefix, p.ipv6_prefix) == (ipv4_prefix, ipv6_prefix));
        let overflow = prev.map_or_else(|| Arc::new(AtomicU64::new(0)), |p| p.overflow.clone());
        let global = prev.map_or_else(|| Arc::new(AtomicUsize::new(0)), |p| p.global.clone());
        let counts = Arc::new(ConcCounts {
            ips: prev.map_or_else(Arc::default, |p| p.counts.ips.clone()),
            prefixes: match prev {
                Some(p) if same_prefixes => p.counts.prefixes.clone(),
                _ => Arc::default(),
            },
        });
        let redis_stats = prev.map_or_else(Arc::default, |p| p.redis_stats.clone());
        let redis = match &cfg.redis {
            Some(rc) if cfg.uses_redis() && rc.url.is_some() => Some(
                prev.and_then(|p| p.redis.clone())
                    .filter(|l| l.is_for(rc))
                    .unwrap_or_else(|| Link::new(rc, redis_stats.clone())),
            ),
            _ => None,
        };
        let env = RateEnv {
            cap,
            clock: &clock,
            overflow: &overflow,
            prefixes: (ipv4_prefix, ipv6_prefix),
            redis: redis.as_ref(),
        };
        let pair = |r: &RateConfig, kind, old: Option<&RatePair>| {
            // A limiter is kept when it limits the same key at the same
            // rate within the same bound, in the same store (for Redis, on
            // the same link).
            let link = match r.store {
                Store::Redis => redis.as_ref(),
                Store::Local => None,
            };
            let reuse = |t: Option<&Arc<Tracked>>, rate: &Rate, by_prefix: bool| {
                t.filter(|t| {
                    t.rate == *rate
                        && t.cap == cap
                        && (!by_prefix || same_prefixes)
                        && match (&t.remote, link) {
                            (None, None) => true,
                            (Some(r), Some(l)) => Arc::ptr_eq(r.link(), l),
                            _ => false,
                        }
                })
                .cloned()
            };
            RatePair::new(r, kind, &env, |rate, by_prefix| {
                let old = old?;
                reuse(
                    if by_prefix {
                        old.prefix.as_ref()
                    } else {
                        old.ip.as_ref()
                    },
                    rate,
                    by_prefix,
                )
            })
        };
        let connection_rate = pair(
            &cfg.connection_rate,
            LimitKind::ConnectionRate,
            prev.map(|p| &p.connection_rate),
        );
        let message_rate = pair(
            &cfg.message_rate,
            LimitKind::MessageRate,
            prev.map(|p| &p.message_rate),
        );
        let recipient_rate = pair(
            &cfg.recipient_rate,
            LimitKind::RecipientRate,
            prev.map(|p| &p.recipient_rate),
        );
        let c = &cfg.concurrency;
        let concurrency =
            (c.action.runs() && (c.per_ip > 0 || c.per_prefix > 0)).then_some(Concurrency {
                per_ip: c.per_ip,
                per_prefix: c.per_prefix,
            });
        let sweep_interval = Duration::try_from_secs_f64(cfg.sweep_interval)
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_millis(1));
        Arc::new(Limiters {
            max_connections: cfg.max_connections,
            global,
            ipv4_prefix,
            ipv6_prefix,
            v4_mask: mask_bits::<u32>(ipv4_prefix),
            v6_mask: mask_bits::<u128>(ipv6_prefix),
            concurrency,
            counts,
            connection_rate,
            message_rate,
            recipient_rate,
            max_tracked_keys: cap,
            overflow,
            redis_seen: redis.is_some() || prev.is_some_and(|p| p.redis_seen),
            redis,
            redis_stats,
            sweep_interval,
            clock,
            retired: AtomicBool::new(false),
        })
    }

    /// The limiters for `cfg`, carrying over this one's state (see the
    /// module documentation), on the same clock. This `Limiters` keeps
    /// working for the sessions that hold it; call [`Limiters::retire`] on it
    /// once the new one is in use.
    pub fn reload(&self, cfg: &LimitsConfig) -> Arc<Limiters> {
        Self::build(cfg, self.clock.clone(), Some(self))
    }

    /// Stops this `Limiters`' sweeper (at its next tick): a reload replaced
    /// it, and the new one sweeps the state they share.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// What `self` (built by [`Limiters::reload`] from `old`) shares with
    /// `old`: the names of the limiters and counters carried over, and of
    /// those that started fresh. Limits that keep no state are in neither.
    pub fn carried_from(&self, old: &Limiters) -> (Vec<&'static str>, Vec<&'static str>) {
        let (mut kept, mut fresh) = (Vec::new(), Vec::new());
        let mut note = |name, same: bool| {
            if same {
                kept.push(name)
            } else {
                fresh.push(name)
            }
        };
        note("sessions", Arc::ptr_eq(&self.global, &old.global));
        // A counter is carried over when the old Limiters kept it too.
        let (c, o) = (self.concurrency, old.concurrency);
        if let Some(c) = c {
            if c.per_ip > 0 {
                note(
                    "concurrency.per_ip",
                    o.is_some_and(|o| o.per_ip > 0)
                        && Arc::ptr_eq(&self.counts.ips, &old.counts.ips),
                );
            }
            if c.per_prefix > 0 {
                note(
                    "concurrency.per_prefix",
                    o.is_some_and(|o| o.per_prefix > 0)
                        && Arc::ptr_eq(&self.counts.prefixes, &old.counts.prefixes),
                );
            }
        }
        for (name, new, prev) in [
            (
                ["connection_rate.per_ip", "connection_rate.per_prefix"],
                &self.connection_rate,
                &old.connection_rate,
            ),
            (
                ["message_rate.per_ip", "message_rate.per_prefix"],
                &self.message_rate,
                &old.message_rate,
            ),
            (
                ["recipient_rate.per_ip", "recipient_rate.per_prefix"],
                &self.recipient_rate,
                &old.recipient_rate,
            ),
        ] {
            for (name, n, o) in [
                (name[0], &new.ip, &prev.ip),
                (name[1], &new.prefix, &prev.prefix),
            ] {
                if let Some(n) = n {
                    note(name, o.as_ref().is_some_and(|o| Arc::ptr_eq(n, o)));
                }
            }
        }
        (kept, fresh)
    }

    /// A global slot, or None when `max_connections` sessions are running.
    ///
    /// Every session is counted, also without a cap (one atomic add), so a
    /// reload that sets a cap counts the sessions already running.
    pub fn try_global(&self) -> Option<GlobalPermit> {
        concurrency::try_global(&self.global, self.max_connections)
    }

    /// Sessions currently holding a global slot.
    pub fn global_in_use(&self) -> usize {
        self.global.load(Ordering::Relaxed)
    }

    /// Counts a new session from `ip` (always: the permit must be dropped to
    /// release it) and checks concurrency then connection rate.
    ///
    /// The concurrency hit is per IP first, then per prefix, counting this
    /// session. The connection rate (per IP, then per prefix) is checked only
    /// when concurrency was not hit, so a client refused for concurrency does
    /// not also spend its connection-rate budget.
    pub fn connect(&self, ip: IpAddr) -> (ConnPermit, Option<LimitHit>) {
        let ip = ip.to_canonical();
        let prefix = self.prefix_of(ip);
        let (permit, hit) = match &self.concurrency {
            None => (ConnPermit::none(), None),
            Some(c) => c.enter(&self.counts, ip, prefix),
        };
        if let Some(scope) = hit {
            let hit = LimitHit {
                kind: LimitKind::Concurrency,
                scope,
            };
            return (permit, Some(hit));
        }
        (permit, self.connection_rate.check(ip, prefix))
    }

    /// One message (MAIL FROM) from `ip`.
    ///
    /// Per IP, then per prefix. A message allowed per IP but refused per
    /// prefix has still spent its per-IP cell (GCRA state is updated as it
    /// is checked); this errs towards limiting, which is acceptable.
    pub fn message(&self, ip: IpAddr) -> Option<LimitHit> {
        let ip = ip.to_canonical();
        self.message_rate.check(ip, self.prefix_of(ip))
    }

    /// One recipient (RCPT TO) from `ip`.
    ///
    /// Per IP, then per prefix; as with [`Limiters::message`], the per-IP cell
    /// is spent even when the per-prefix limit then refuses.
    pub fn recipient(&self, ip: IpAddr) -> Option<LimitHit> {
        let ip = ip.to_canonical();
        self.recipient_rate.check(ip, self.prefix_of(ip))
    }

    /// Evicts idle keys from every limiter.
    ///
    /// Rate limiters drop keys whose state is indistinguishable from a fresh
    /// key and release spare capacity; concurrency counters drop their keys
    /// by themselves and are only shrunk.
    pub fn sweep(&self) {
        for t in self.rate_limiters() {
            t.lim.retain_recent();
            t.lim.shrink_to_fit();
            if let Some(r) = &t.remote {
                r.sweep();
            }
        }
        self.counts.ips.shrink_to_fit();
        self.counts.prefixes.shrink_to_fit();
    }

    /// Keys held over all limiters and counters.
    pub fn tracked_keys(&self) -> usize {
        let rates: usize = self
            .rate_limiters()
            .map(|t| t.lim.len() + t.remote.as_ref().map_or(0, |r| r.keys_held()))
            .sum();
        rates + self.counts.ips.len() + self.counts.prefixes.len()
    }

    /// Checks of new keys that a full rate limiter judged without storing
    /// them (see the module documentation).
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// The Redis store's counters and health; None when no Redis store was
    /// ever configured.
    pub fn redis_status(&self) -> Option<RedisStatus> {
        if !self.redis_seen {
            return None;
        }
        Some(match &self.redis {
            Some(l) => l.status(),
            None => redis::status(&self.redis_stats, false),
        })
    }

    /// Runs `sweep` every `sweep_interval` until the Limiters are dropped or
    /// retired.
    ///
    /// Must be called within a tokio runtime. The task holds only a weak
    /// reference, and runs each sweep on the blocking pool (a sweep of a
    /// large map takes milliseconds). Nothing is spawned when no limit keeps
    /// state.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        if self.rate_limiters().next().is_none() && self.concurrency.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.sweep_interval;
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + every;
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(limits) = weak.upgrade() else { break };
                if limits.retired.load(Ordering::Relaxed) {
                    break;
                }
                if tokio::task::spawn_blocking(move || limits.sweep())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }

    fn prefix_of(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & self.v4_mask)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & self.v6_mask)),
        }
    }

    fn rate_limiters(&self) -> impl Iterator<Item = &Tracked> {
        [
            &self.connection_rate,
            &self.message_rate,
            &self.recipient_rate,
        ]
        .into_iter()
        .flat_map(|p| [p.ip.as_deref(), p.prefix.as_deref()])
        .flatten()
    }
}

impl fmt::Debug for Limiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiters")
            .field("max_connections", &self.max_connections)
            .field("max_tracked_keys", &self.max_tracked_keys)
            .field("global_in_use", &self.global_in_use())
            .field("tracked_keys", &self.tracked_keys())
            .field("overflow", &self.overflow())
            .finish_non_exhaustive()
    }
}

/// The top `bits` bits set.
fn mask_bits<T>(bits: u8) -> T
where
    T: Default + std::ops::Not<Output = T> + std::ops::Shl<u32, Output = T> + Copy,
{
    let width = (std::mem::size_of::<T>() * 8) as u32;
    let bits = u32::from(bits).min(width);
    if bits == 0 {
        T::default()
    } else {
        !T::default() << (width - bits)
    }
}

#[cfg(test)]
mod tests;
