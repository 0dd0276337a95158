//! Connection caps and rate limits: a global session cap, concurrent
//! sessions per IP and per prefix (dashmap counters released by guards), and
//! GCRA rates (governor, keyed) per IP and per prefix, with idle-key eviction.
//! Decides nothing about replies: it reports which limit was hit.
//!
//! # Stores
//! A rate with `store = "redis"` keeps its governor limiter and puts a
//! [`Remote`](super::redis_rate::Remote) in front of it: the fleet's state
//! is in Redis, the local limiter judges provisional checks and is the
//! fallback while Redis is unreachable (see `redis_rate.rs` for the scheme
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
//! [`Limits::reload`] builds the limiters for a new configuration from the
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
//! - the count of overflowing checks ([`Limits::overflow`]);
//! - the Redis link while `[policy.limits.redis]` is unchanged (a
//!   Redis-backed limiter is kept only on the same link; a new one starts
//!   with an empty local allowance and finds the fleet's state in Redis),
//!   and the Redis counters always.
//!
//! The old `Limits` is [`retired`](Limits::retire): its sweeper stops at its
//! next tick, and the new one's sweeper sweeps the shared state.
//!
//! # Bounded memory
//! Rate limiters keep one GCRA state per key. Idle keys (indistinguishable
//! from a fresh key) are evicted by [`Limits::sweep`], run periodically by
//! [`Limits::spawn_sweeper`]. Each rate limiter holds at most
//! `max_tracked_keys` keys:
//! - when a limiter reaches the bound, the checking path runs an immediate
//!   eviction of that limiter (at most once per second per limiter);
//! - if it is still full (a flood of distinct addresses all within their
//!   window), a key it does not hold yet is judged as a fresh key and **not
//!   stored**: that limiter fails open for new keys. Keys it already holds
//!   are still limited, and so is the other scope: a flood of distinct
//!   addresses from few networks still meets the per-prefix limit (only if
//!   the per-prefix limiter is itself full do new prefixes pass too). Each
//!   such unstored check counts in [`Limits::overflow`].
//!
//! Failing open rather than closed keeps a flood of spoofed-looking distinct
//! sources from locking out every new legitimate client, and keeps memory at
//! a fixed bound; the per-prefix limits, the concurrency limits and the global
//! cap are what still contain such a flood.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, FakeRelativeClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use super::redis_rate::{Link, RedisStats, RedisStatus, Remote};
use super::settings::{LimitsConfig, Rate, RateConfig, Store};

/// Which limit a client went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Concurrency,
    ConnectionRate,
    MessageRate,
    RecipientRate,
}

impl LimitKind {
    /// The limit's section name under `[policy.limits]`.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Concurrency => "concurrency",
            LimitKind::ConnectionRate => "connection_rate",
            LimitKind::MessageRate => "message_rate",
            LimitKind::RecipientRate => "recipient_rate",
        }
    }
}

/// The key a limit was counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ip,
    Prefix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHit {
    pub kind: LimitKind,
    pub scope: Scope,
}

/// The limiters, shared by every session.
pub struct Limits {
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

/// Holds one slot of the global count; released on drop.
pub struct GlobalPermit {
    slot: Arc<AtomicUsize>,
}

/// Holds the per-IP and per-prefix concurrency slots; released on drop
/// into the counters it incremented.
pub struct ConnPermit {
    held: Option<Held>,
}

struct Held {
    counts: Arc<ConcCounts>,
    /// The keys incremented (None: that limit kept no counter).
    ip: Option<IpAddr>,
    prefix: Option<IpAddr>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Arc<Limits> {
        Self::build(cfg, TimeSource::real(), None)
    }

    /// Like [`Limits::new`], with the rate limiters (and the throttle of
    /// their emergency eviction) on a manually advanced clock: for tests and
    /// simulations.
    pub fn with_fake_clock(cfg: &LimitsConfig, clock: FakeRelativeClock) -> Arc<Limits> {
        Self::build(cfg, TimeSource::Fake(clock), None)
    }

    fn build(cfg: &LimitsConfig, clock: TimeSource, prev: Option<&Limits>) -> Arc<Limits> {
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
        Arc::new(Limits {
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
    /// module documentation), on the same clock. This `Limits` keeps
    /// working for the sessions that hold it; call [`Limits::retire`] on it
    /// once the new one is in use.
    pub fn reload(&self, cfg: &LimitsConfig) -> Arc<Limits> {
        Self::build(cfg, self.clock.clone(), Some(self))
    }

    /// Stops this `Limits`' sweeper (at its next tick): a reload replaced
    /// it, and the new one sweeps the state they share.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// What `self` (built by [`Limits::reload`] from `old`) shares with
    /// `old`: the names of the limiters and counters carried over, and of
    /// those that started fresh. Limits that keep no state are in neither.
    pub fn carried_from(&self, old: &Limits) -> (Vec<&'static str>, Vec<&'static str>) {
        let (mut kept, mut fresh) = (Vec::new(), Vec::new());
        let mut note = |name, same: bool| {
            if same {
                kept.push(name)
            } else {
                fresh.push(name)
            }
        };
        note("sessions", Arc::ptr_eq(&self.global, &old.global));
        // A counter is carried over when the old Limits kept it too.
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
        let max = self.max_connections;
        if max == 0 {
            self.global.fetch_add(1, Ordering::AcqRel);
        } else {
            self.global
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()?;
        }
        Some(GlobalPermit {
            slot: self.global.clone(),
        })
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
        let mut hit = None;
        let permit = match &self.concurrency {
            None => ConnPermit { held: None },
            Some(c) => {
                // A limit of 0 keeps no counter.
                let n_ip = if c.per_ip > 0 {
                    acquire(&self.counts.ips, ip)
                } else {
                    0
                };
                let n_prefix = if c.per_prefix > 0 {
                    acquire(&self.counts.prefixes, prefix)
                } else {
                    0
                };
                if n_ip > c.per_ip {
                    hit = Some(Scope::Ip);
                } else if n_prefix > c.per_prefix {
                    hit = Some(Scope::Prefix);
                }
                ConnPermit {
                    held: Some(Held {
                        counts: self.counts.clone(),
                        ip: (c.per_ip > 0).then_some(ip),
                        prefix: (c.per_prefix > 0).then_some(prefix),
                    }),
                }
            }
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
    /// Per IP, then per prefix; as with [`Limits::message`], the per-IP cell
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
            None => super::redis_rate::status(&self.redis_stats, false),
        })
    }

    /// Runs `sweep` every `sweep_interval` until the Limits are dropped or
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

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("max_connections", &self.max_connections)
            .field("max_tracked_keys", &self.max_tracked_keys)
            .field("global_in_use", &self.global_in_use())
            .field("tracked_keys", &self.tracked_keys())
            .field("overflow", &self.overflow())
            .finish_non_exhaustive()
    }
}

impl Drop for GlobalPermit {
    fn drop(&mut self) {
        self.slot.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for GlobalPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlobalPermit").finish()
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            if let Some(ip) = h.ip {
                release(&h.counts.ips, ip);
            }
            if let Some(prefix) = h.prefix {
                release(&h.counts.prefixes, prefix);
            }
        }
    }
}

impl fmt::Debug for ConnPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ConnPermit");
        if let Some(h) = &self.held {
            d.field("ip", &h.ip).field("prefix", &h.prefix);
        }
        d.finish()
    }
}

/// Concurrency thresholds.
#[derive(Clone, Copy)]
struct Concurrency {
    per_ip: u32,
    per_prefix: u32,
}

/// Live sessions per IP and per prefix. Each map is its own Arc so that a
/// reload can keep one (per IP) and replace the other (a new prefix length).
struct ConcCounts {
    ips: Arc<DashMap<IpAddr, u32>>,
    prefixes: Arc<DashMap<IpAddr, u32>>,
}

/// Increments `key`'s count under the shard lock; returns the new count.
fn acquire(map: &DashMap<IpAddr, u32>, key: IpAddr) -> u32 {
    let mut n = map.entry(key).or_insert(0);
    *n = n.saturating_add(1);
    *n
}

/// Decrements `key`'s count and removes it at 0, under the same shard lock
/// as `acquire`, so a concurrent increment either sees the entry before
/// removal or creates a fresh one after it.
fn release(map: &DashMap<IpAddr, u32>, key: IpAddr) {
    if let Entry::Occupied(mut e) = map.entry(key) {
        let n = e.get_mut();
        *n = n.saturating_sub(1);
        if *n == 0 {
            e.remove();
        }
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

/// The per-IP and per-prefix limiters of one kind of event.
struct RatePair {
    kind: LimitKind,
    ip: Option<Arc<Tracked>>,
    prefix: Option<Arc<Tracked>>,
}

/// What every rate limiter of one `Limits` is built with.
struct RateEnv<'a> {
    cap: usize,
    clock: &'a TimeSource,
    overflow: &'a Arc<AtomicU64>,
    /// Prefix lengths (IPv4, IPv6): named in Redis prefix keys.
    prefixes: (u8, u8),
    /// The link for `store = "redis"` rates.
    redis: Option<&'a Arc<Link>>,
}

impl RatePair {
    /// `reuse(rate, by_prefix)` offers a running limiter to keep instead of
    /// a new one.
    fn new(
        cfg: &RateConfig,
        kind: LimitKind,
        env: &RateEnv<'_>,
        reuse: impl Fn(&Rate, bool) -> Option<Arc<Tracked>>,
    ) -> RatePair {
        let make = |r: &Option<Rate>, by_prefix: bool| {
            let rate = r.as_ref()?;
            let quota = quota(rate)?;
            if !cfg.action.runs() {
                return None;
            }
            reuse(rate, by_prefix).or_else(|| {
                let remote = match (cfg.store, env.redis) {
                    (Store::Redis, Some(link)) => Remote::new(
                        link.clone(),
                        kind.name(),
                        if by_prefix { Scope::Prefix } else { Scope::Ip },
                        env.prefixes,
                        rate,
                        env.cap,
                        env.clock.clone(),
                        env.overflow.clone(),
                    ),
                    _ => None,
                };
                Some(Arc::new(Tracked::new(
                    *rate,
                    quota,
                    env.cap,
                    env.clock.clone(),
                    env.overflow.clone(),
                    remote,
                )))
            })
        };
        RatePair {
            kind,
            ip: make(&cfg.per_ip, false),
            prefix: make(&cfg.per_prefix, true),
        }
    }

    fn check(&self, ip: IpAddr, prefix: IpAddr) -> Option<LimitHit> {
        let hit = |scope| {
            Some(LimitHit {
                kind: self.kind,
                scope,
            })
        };
        if let Some(t) = &self.ip {
            if !t.check(&ip) {
                return hit(Scope::Ip);
            }
        }
        if let Some(t) = &self.prefix {
            if !t.check(&prefix) {
                return hit(Scope::Prefix);
            }
        }
        None
    }
}

/// `count` per `period`, `burst` at once, as a GCRA quota; None for a rate
/// that cannot limit anything (rejected by config validation anyway).
fn quota(r: &Rate) -> Option<Quota> {
    if r.count == 0 || !(r.period.is_finite() && r.period > 0.0) {
        return None;
    }
    let per = Duration::try_from_secs_f64(r.period / f64::from(r.count))
        .ok()?
        .max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(r.burst.unwrap_or(r.count)).unwrap_or(NonZeroU32::MIN);
    Some(Quota::with_period(per)?.allow_burst(burst))
}

type Keyed = RateLimiter<IpAddr, KeyStore, TimeSource, NoOpMiddleware<Nanos>>;

/// Spacing of emergency evictions of one limiter from the checking path.
const EMERGENCY_SWEEP_EVERY: u64 = 1_000_000_000;

/// Whether the caller at `now` (nanoseconds) runs an emergency sweep: true
/// for one caller per `EMERGENCY_SWEEP_EVERY`, whose time `next` holds.
pub(crate) fn claim_emergency_sweep(next: &std::sync::atomic::AtomicU64, now: u64) -> bool {
    let at = next.load(Ordering::Relaxed);
    now >= at
        && next
            .compare_exchange(
                at,
                now.saturating_add(EMERGENCY_SWEEP_EVERY),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// One keyed GCRA limiter with its key bound; with a Redis store, the
/// local allowance in front of the shared bucket (the local limiter then
/// judges provisional and fallback checks).
struct Tracked {
    lim: Keyed,
    remote: Option<Arc<Remote>>,
    /// As configured (compared on reload).
    rate: Rate,
    cap: usize,
    /// Clock reading (ns) before which no emergency eviction runs.
    next_sweep: AtomicU64,
}

impl Tracked {
    fn new(
        rate: Rate,
        quota: Quota,
        cap: usize,
        clock: TimeSource,
        overflow: Arc<AtomicU64>,
        remote: Option<Arc<Remote>>,
    ) -> Tracked {
        let store = KeyStore {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            cap,
            overflow,
        };
        Tracked {
            lim: RateLimiter::new(quota, store, clock),
            remote,
            rate,
            cap,
            next_sweep: AtomicU64::new(0),
        }
    }

    /// True when allowed.
    fn check(&self, key: &IpAddr) -> bool {
        match &self.remote {
            None => self.check_local(key),
            Some(r) => r.check(*key, || self.check_local(key)),
        }
    }

    /// The local limiter alone.
    fn check_local(&self, key: &IpAddr) -> bool {
        if self.lim.len() >= self.cap {
            self.emergency_sweep();
        }
        self.lim.check_key(key).is_ok()
    }

    /// Evicts idle keys now, unless another caller did within the last
    /// second. Capacity is not shrunk: the map is about to fill again.
    fn emergency_sweep(&self) {
        let now = self.lim.clock().now().as_u64();
        if claim_emergency_sweep(&self.next_sweep, now) {
            self.lim.retain_recent();
        }
    }
}

/// A governor state store: a dashmap of GCRA theoretical arrival times (ns
/// since the limiter's start) that refuses to grow past `cap` keys. A key
/// it cannot store is judged as a fresh key and counted in `overflow`.
struct KeyStore {
    map: DashMap<IpAddr, AtomicU64>,
    /// Keys in `map`, maintained under the shard locks (dashmap's own `len`
    /// locks every shard in turn).
    len: AtomicUsize,
    cap: usize,
    overflow: Arc<AtomicU64>,
}

/// Governor's compare-and-swap update of one state.
fn measure_and_replace_one<T, F, E>(state: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let mut prev = state.load(Ordering::Acquire);
    loop {
        let (result, next) = f(Some(Nanos::from(prev)))?;
        match state.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(actual) => prev = actual,
        }
    }
}

impl StateStore for KeyStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return measure_and_replace_one(&state, f);
        }
        match self.map.entry(*key) {
            Entry::Occupied(e) => measure_and_replace_one(e.get(), f),
            Entry::Vacant(v) => {
                // Reserve a place first so concurrent inserts cannot
                // overshoot the bound.
                if self.len.fetch_add(1, Ordering::Relaxed) >= self.cap {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    self.overflow.fetch_add(1, Ordering::Relaxed);
                    return f(None).map(|(result, _)| result);
                }
                match f(None) {
                    Ok((result, tat)) => {
                        v.insert(AtomicU64::new(tat.into()));
                        Ok(result)
                    }
                    Err(e) => {
                        self.len.fetch_sub(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            }
        }
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for KeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.map.retain(|_, tat| {
            let keep = tat.load(Ordering::Relaxed) > drop_below;
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The rate limiters' clock: governor's default (quanta) clock, or a fake
/// one for tests. Readings are ns since construction.
#[derive(Clone)]
pub(super) enum TimeSource {
    Real(DefaultClock, <DefaultClock as Clock>::Instant),
    Fake(FakeRelativeClock),
}

impl TimeSource {
    fn real() -> TimeSource {
        let clock = DefaultClock::default();
        let start = clock.now();
        TimeSource::Real(clock, start)
    }
}

impl Clock for TimeSource {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            TimeSource::Real(clock, start) => clock.now().duration_since(*start),
            TimeSource::Fake(clock) => clock.now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::settings::{Action, ConcurrencyConfig};
    use std::time::Instant;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rate(count: u32, period: f64, burst: Option<u32>) -> Option<Rate> {
        Some(Rate {
            count,
            period,
            burst,
        })
    }

    fn rates(per_ip: Option<Rate>, per_prefix: Option<Rate>) -> RateConfig {
        RateConfig {
            action: Action::Defer,
            per_ip,
            per_prefix,
            store: Store::Local,
        }
    }

    fn conc(per_ip: u32, per_prefix: u32) -> ConcurrencyConfig {
        ConcurrencyConfig {
            action: Action::Reject,
            per_ip,
            per_prefix,
        }
    }

    fn base() -> LimitsConfig {
        LimitsConfig {
            max_connections: 0,
            ..LimitsConfig::default()
        }
    }

    fn hit(kind: LimitKind, scope: Scope) -> Option<LimitHit> {
        Some(LimitHit { kind, scope })
    }

    #[test]
    fn global_cap_acquire_release() {
        let l = Limits::new(&LimitsConfig {
            max_connections: 2,
            ..base()
        });
        let a = l.try_global().unwrap();
        let b = l.try_global().unwrap();
        assert!(l.try_global().is_none());
        assert_eq!(l.global_in_use(), 2);
        drop(a);
        let c = l.try_global().unwrap();
        assert!(l.try_global().is_none());
        drop((b, c));
        assert_eq!(l.global_in_use(), 0);
    }

    #[test]
    fn global_unlimited() {
        let l = Limits::new(&base());
        let permits: Vec<_> = (0..1000).map(|_| l.try_global().unwrap()).collect();
        assert_eq!(permits.len(), 1000);
        // Counted all the same (for a reload that sets a cap).
        assert_eq!(l.global_in_use(), 1000);
        drop(permits);
        assert_eq!(l.global_in_use(), 0);
    }

    #[test]
    fn concurrency_per_ip_released_on_drop() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(2, 0),
            ..base()
        });
        let a = ip("192.0.2.1");
        let (p1, h1) = l.connect(a);
        let (p2, h2) = l.connect(a);
        let (p3, h3) = l.connect(a);
        assert_eq!((h1, h2), (None, None));
        assert_eq!(h3, hit(LimitKind::Concurrency, Scope::Ip));
        // Another address is counted apart.
        let (p4, h4) = l.connect(ip("192.0.2.2"));
        assert_eq!(h4, None);
        // A rejected session releases its slot too.
        drop(p3);
        let (p5, h5) = l.connect(a);
        assert_eq!(h5, hit(LimitKind::Concurrency, Scope::Ip));
        drop((p1, p5));
        let (p6, h6) = l.connect(a);
        assert_eq!(h6, None);
        drop((p2, p4, p6));
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn concurrency_per_prefix() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(5, 3),
            ..base()
        });
        let mut held: Vec<_> = (1..=3)
            .map(|i| {
                let (p, h) = l.connect(ip(&format!("198.51.100.{i}")));
                assert_eq!(h, None);
                p
            })
            .collect();
        let (p, h) = l.connect(ip("198.51.100.200"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
        drop(p);
        // Another /24 is fine.
        let (p, h) = l.connect(ip("198.51.101.1"));
        assert_eq!(h, None);
        held.push(p);
        held.pop();
        held.pop();
        let (p, h) = l.connect(ip("198.51.100.9"));
        assert_eq!(h, None);
        held.push(p);
        assert_eq!(l.tracked_keys(), 4); // 3 IPs + 1 prefix
        held.clear();
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn ip_hit_reported_before_prefix() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(1, 1),
            ..base()
        });
        let (_a, h) = l.connect(ip("192.0.2.1"));
        assert_eq!(h, None);
        let (_b, h) = l.connect(ip("192.0.2.1"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        let (_c, h) = l.connect(ip("192.0.2.2"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
    }

    #[test]
    fn prefix_grouping() {
        let l = Limits::new(&base());
        assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("192.0.2.0"));
        assert_eq!(
            l.prefix_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        let l = Limits::new(&LimitsConfig {
            ipv4_prefix: 0,
            ipv6_prefix: 128,
            ..base()
        });
        assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("0.0.0.0"));
        assert_eq!(l.prefix_of(ip("2001:db8::1")), ip("2001:db8::1"));
        let l = Limits::new(&LimitsConfig {
            ipv4_prefix: 32,
            ipv6_prefix: 0,
            ..base()
        });
        assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("192.0.2.77"));
        assert_eq!(l.prefix_of(ip("2001:db8::1")), ip("::"));
    }

    #[test]
    fn ipv6_64_grouping() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(0, 2),
            ..base()
        });
        let (_a, h) = l.connect(ip("2001:db8:0:1::1"));
        assert_eq!(h, None);
        let (_b, h) = l.connect(ip("2001:db8:0:1:ffff::2"));
        assert_eq!(h, None);
        let (_c, h) = l.connect(ip("2001:db8:0:1:1234:5678:9abc:def0"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
        let (_d, h) = l.connect(ip("2001:db8:0:2::1"));
        assert_eq!(h, None);
        // Two prefixes counted, no per-IP counters (per_ip = 0).
        assert_eq!(l.tracked_keys(), 2);
    }

    #[test]
    fn ipv4_24_grouping_and_mapped() {
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                concurrency: conc(1, 2),
                message_rate: rates(rate(1, 60.0, None), None),
                ..base()
            },
            FakeRelativeClock::default(),
        );
        let (_a, h) = l.connect(ip("203.0.113.1"));
        assert_eq!(h, None);
        // The mapped form is the same client.
        let (b, h) = l.connect(ip("::ffff:203.0.113.1"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        drop(b);
        let (_c, h) = l.connect(ip("::ffff:203.0.113.250"));
        assert_eq!(h, None);
        let (_d, h) = l.connect(ip("203.0.113.99"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
        // Rates share the key too.
        assert_eq!(l.message(ip("203.0.113.1")), None);
        assert_eq!(
            l.message(ip("::ffff:203.0.113.1")),
            hit(LimitKind::MessageRate, Scope::Ip)
        );
    }

    #[test]
    fn rate_per_ip_burst_then_refill() {
        let clock = FakeRelativeClock::default();
        // 2 per 10 s (one cell every 5 s), 3 at once.
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                message_rate: rates(rate(2, 10.0, Some(3)), None),
                ..base()
            },
            clock.clone(),
        );
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(l.message(a), None);
        }
        assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        assert_eq!(l.message(ip("192.0.2.2")), None);
        clock.advance(Duration::from_millis(4_900));
        assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        clock.advance(Duration::from_millis(100));
        assert_eq!(l.message(a), None);
        assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        clock.advance(Duration::from_secs(15));
        for _ in 0..3 {
            assert_eq!(l.message(a), None);
        }
        assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        // Other kinds are separate (and off here).
        assert_eq!(l.recipient(a), None);
    }

    #[test]
    fn rate_per_prefix_and_kinds() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                recipient_rate: rates(rate(100, 60.0, None), rate(3, 60.0, None)),
                connection_rate: rates(rate(1, 60.0, None), None),
                ..base()
            },
            clock,
        );
        for i in 1..=3 {
            assert_eq!(l.recipient(ip(&format!("192.0.2.{i}"))), None);
        }
        assert_eq!(
            l.recipient(ip("192.0.2.4")),
            hit(LimitKind::RecipientRate, Scope::Prefix)
        );
        assert_eq!(l.recipient(ip("192.0.3.4")), None);
        let (_p, h) = l.connect(ip("192.0.2.1"));
        assert_eq!(h, None);
        let (_p, h) = l.connect(ip("192.0.2.1"));
        assert_eq!(h, hit(LimitKind::ConnectionRate, Scope::Ip));
    }

    #[test]
    fn connection_rate_not_spent_on_concurrency_hit() {
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                concurrency: conc(1, 0),
                connection_rate: rates(rate(2, 60.0, None), None),
                ..base()
            },
            FakeRelativeClock::default(),
        );
        let a = ip("192.0.2.1");
        let (p1, h) = l.connect(a);
        assert_eq!(h, None);
        for _ in 0..5 {
            let (_p, h) = l.connect(a);
            assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        }
        drop(p1);
        let (p2, h) = l.connect(a);
        assert_eq!(h, None); // second cell still there
        drop(p2);
        let (_p3, h) = l.connect(a);
        assert_eq!(h, hit(LimitKind::ConnectionRate, Scope::Ip));
    }

    #[test]
    fn off_keeps_no_state() {
        let r = rate(1, 60.0, None);
        let off = RateConfig {
            action: Action::Off,
            per_ip: r,
            per_prefix: r,
            store: Store::Local,
        };
        let l = Limits::new(&LimitsConfig {
            concurrency: ConcurrencyConfig {
                action: Action::Off,
                per_ip: 1,
                per_prefix: 1,
            },
            connection_rate: off.clone(),
            message_rate: off.clone(),
            // On, but no values.
            recipient_rate: rates(None, None),
            ..base()
        });
        let a = ip("192.0.2.1");
        let mut held = Vec::new();
        for _ in 0..10 {
            let (p, h) = l.connect(a);
            assert_eq!(h, None);
            held.push(p);
            assert_eq!(l.message(a), None);
            assert_eq!(l.recipient(a), None);
        }
        assert_eq!(l.tracked_keys(), 0);
        assert_eq!(l.rate_limiters().count(), 0);
        assert!(l.concurrency.is_none());
        // Concurrency on with both limits 0 keeps nothing either.
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(0, 0),
            ..base()
        });
        let (_p, h) = l.connect(a);
        assert_eq!(h, None);
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn idle_keys_swept() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                message_rate: rates(rate(10, 60.0, None), rate(100, 60.0, None)),
                ..base()
            },
            clock.clone(),
        );
        assert_eq!(l.message(ip("192.0.2.1")), None);
        assert_eq!(l.message(ip("198.51.100.1")), None);
        assert_eq!(l.tracked_keys(), 4);
        l.sweep();
        assert_eq!(l.tracked_keys(), 4); // still within their window
        clock.advance(Duration::from_secs(30));
        assert_eq!(l.message(ip("192.0.2.1")), None);
        clock.advance(Duration::from_secs(5));
        l.sweep();
        // Only 192.0.2.1's per-IP state is still distinguishable from fresh.
        assert_eq!(l.tracked_keys(), 1);
        clock.advance(Duration::from_secs(60));
        l.sweep();
        assert_eq!(l.tracked_keys(), 0);
    }

    /// 1M distinct addresses: all tracked, then all evicted.
    #[test]
    fn million_distinct_keys_swept() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                max_tracked_keys: 2_000_000,
                message_rate: rates(rate(10, 60.0, None), rate(10_000, 60.0, None)),
                ..base()
            },
            clock.clone(),
        );
        let t = Instant::now();
        let base_ip = u32::from(Ipv4Addr::new(10, 0, 0, 0));
        for i in 0..1_000_000u32 {
            let a = IpAddr::V4(Ipv4Addr::from(base_ip + i));
            assert_eq!(l.message(a), None);
        }
        let fed = t.elapsed();
        // 1M IPs + 3907 /24s.
        assert_eq!(l.tracked_keys(), 1_000_000 + 3_907);
        assert_eq!(l.overflow(), 0);
        clock.advance(Duration::from_secs(120));
        let t = Instant::now();
        l.sweep();
        assert_eq!(l.tracked_keys(), 0);
        eprintln!("fed 1M keys in {fed:?}, swept in {:?}", t.elapsed());
    }

    /// A flood of distinct addresses within their window: the per-IP map
    /// stays at the bound, new keys pass uncounted, the prefix still limits.
    #[test]
    fn flood_is_bounded() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                max_tracked_keys: 10_000,
                message_rate: rates(rate(10, 60.0, None), rate(1_000, 60.0, None)),
                ..base()
            },
            clock.clone(),
        );
        let mut prefix_hits = 0;
        for i in 0..100_000u128 {
            // One /64, distinct interface ids.
            let a = IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8u128 << 96) | (i + 1)));
            match l.message(a) {
                None => {}
                Some(h) => {
                    assert_eq!(
                        h,
                        LimitHit {
                            kind: LimitKind::MessageRate,
                            scope: Scope::Prefix
                        }
                    );
                    prefix_hits += 1;
                }
            }
            assert!(l.message_rate.ip.as_ref().unwrap().lim.len() <= 10_000);
            assert!(l.tracked_keys() <= 10_001);
        }
        assert_eq!(prefix_hits, 100_000 - 1_000);
        assert_eq!(l.overflow(), 90_000);
        // Keys already held are still limited per IP.
        let first = IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8u128 << 96) | 1));
        for _ in 0..9 {
            let _ = l.message(first);
        }
        assert_eq!(l.message(first), hit(LimitKind::MessageRate, Scope::Ip));
    }

    /// A full limiter evicts idle keys from the checking path, at most once
    /// a second.
    #[test]
    fn full_limiter_sweeps_itself() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                max_tracked_keys: 100,
                recipient_rate: rates(rate(1, 1.0, None), None),
                ..base()
            },
            clock.clone(),
        );
        let key = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..100 {
            assert_eq!(l.recipient(key(i)), None);
        }
        assert_eq!(l.tracked_keys(), 100);
        // Full and all recent: the first check sweeps (nothing to evict)...
        assert_eq!(l.recipient(key(100)), None);
        assert_eq!(l.overflow(), 1);
        // ... and the next sweep waits a second even once keys are idle.
        clock.advance(Duration::from_millis(900));
        assert_eq!(l.recipient(key(101)), None);
        assert_eq!(l.overflow(), 2);
        assert_eq!(l.tracked_keys(), 100);
        clock.advance(Duration::from_millis(1200));
        assert_eq!(l.recipient(key(102)), None);
        assert_eq!(l.overflow(), 2);
        assert_eq!(l.tracked_keys(), 1);
    }

    /// Many threads connect and drop the same keys: the counters end empty.
    #[test]
    fn concurrent_connect_drop() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(3, 5),
            ..base()
        });
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..5_000u32 {
                        let a = if i % 3 == 0 {
                            ip("192.0.2.1")
                        } else {
                            IpAddr::V4(Ipv4Addr::new(192, 0, 2, (t * 2 + i % 2) as u8))
                        };
                        held.push(l.connect(a).0);
                        if held.len() > (i as usize % 4) {
                            held.remove(0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.tracked_keys(), 0);
        assert!(l.counts.ips.is_empty() && l.counts.prefixes.is_empty());
    }

    #[tokio::test]
    async fn sweeper_runs_and_stops() {
        let clock = FakeRelativeClock::default();
        let l = Limits::with_fake_clock(
            &LimitsConfig {
                sweep_interval: 0.01,
                message_rate: rates(rate(1, 1.0, None), None),
                ..base()
            },
            clock.clone(),
        );
        l.spawn_sweeper();
        assert_eq!(l.message(ip("192.0.2.1")), None);
        assert_eq!(l.tracked_keys(), 1);
        clock.advance(Duration::from_secs(3));
        let deadline = Instant::now() + Duration::from_secs(5);
        while l.tracked_keys() != 0 {
            assert!(Instant::now() < deadline, "sweeper did not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let weak = Arc::downgrade(&l);
        drop(l);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(weak.upgrade().is_none());
    }
    #[test]
    fn reload_carries_the_global_count_with_the_new_cap() {
        // No cap at first: sessions are counted all the same.
        let l = Limits::new(&base());
        let held: Vec<_> = (0..2).map(|_| l.try_global().unwrap()).collect();
        let capped = l.reload(&LimitsConfig {
            max_connections: 3,
            ..base()
        });
        l.retire();
        let third = capped.try_global().unwrap();
        assert!(capped.try_global().is_none());
        assert_eq!(capped.global_in_use(), 3);
        // Old permits release into the same count.
        drop(held);
        assert_eq!(capped.global_in_use(), 1);
        let lower = capped.reload(&LimitsConfig {
            max_connections: 1,
            ..base()
        });
        assert!(lower.try_global().is_none());
        drop(third);
        assert!(lower.try_global().is_some());
        assert_eq!(lower.global_in_use(), 0);
    }

    #[test]
    fn reload_keeps_concurrency_counts_with_new_thresholds() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(2, 0),
            ..base()
        });
        let a = ip("192.0.2.1");
        let old: Vec<_> = (0..2).map(|_| l.connect(a)).collect();
        assert!(old.iter().all(|(_, h)| h.is_none()));
        let n = l.reload(&LimitsConfig {
            concurrency: conc(3, 4),
            ..base()
        });
        let (kept, fresh) = n.carried_from(&l);
        assert!(kept.contains(&"concurrency.per_ip"), "{kept:?}");
        // The prefix counter was not kept before: it starts now.
        assert_eq!(fresh, vec!["concurrency.per_prefix"]);
        let (p3, h) = n.connect(a);
        assert_eq!(h, None);
        let (p4, h) = n.connect(a);
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        drop(p4);
        // Old permits release into the counter they incremented.
        drop(old);
        assert_eq!(n.tracked_keys(), 2); // 192.0.2.1 and its /24, once each
        drop(p3);
        assert_eq!(n.tracked_keys(), 0);
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn reload_with_a_new_prefix_length_keeps_per_ip_counts_only() {
        let l = Limits::new(&LimitsConfig {
            concurrency: conc(1, 1),
            ..base()
        });
        let (old, _) = l.connect(ip("192.0.2.1"));
        let n = l.reload(&LimitsConfig {
            ipv4_prefix: 16,
            concurrency: conc(1, 1),
            ..base()
        });
        let (_, fresh) = n.carried_from(&l);
        assert_eq!(fresh, vec!["concurrency.per_prefix"]);
        let (_p, h) = n.connect(ip("192.0.2.1"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        drop(_p);
        // Not in the new /16 counter: the old session is not counted there.
        let (_q, h) = n.connect(ip("192.0.3.1"));
        assert_eq!(h, None);
        drop(old);
        drop(_q);
        assert_eq!(n.tracked_keys(), 0);
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn reload_turning_concurrency_off_and_on_keeps_counts() {
        let on = LimitsConfig {
            concurrency: conc(1, 0),
            ..base()
        };
        let l = Limits::new(&on);
        let (held, _) = l.connect(ip("192.0.2.1"));
        let off = l.reload(&base());
        let (p, h) = off.connect(ip("192.0.2.1"));
        assert_eq!(h, None);
        drop(p);
        let again = off.reload(&on);
        let (_p, h) = again.connect(ip("192.0.2.1"));
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
        drop((_p, held));
        assert_eq!(again.tracked_keys(), 0);
    }

    #[test]
    fn reload_keeps_unchanged_rate_limiters_only() {
        let clock = FakeRelativeClock::default();
        let cfg = LimitsConfig {
            connection_rate: rates(rate(5, 60.0, None), None),
            message_rate: rates(rate(1, 60.0, None), rate(100, 60.0, None)),
            recipient_rate: rates(rate(1, 60.0, None), None),
            ..base()
        };
        let l = Limits::with_fake_clock(&cfg, clock.clone());
        let a = ip("192.0.2.1");
        assert_eq!(l.message(a), None);
        assert_eq!(l.recipient(a), None);
        assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        let n = l.reload(&LimitsConfig {
            // Same rate, another action: the same limiter.
            message_rate: RateConfig {
                action: Action::Observe,
                ..cfg.message_rate.clone()
            },
            // Another rate: a fresh limiter.
            recipient_rate: rates(rate(2, 60.0, None), None),
            // Turned off: gone.
            connection_rate: RateConfig {
                action: Action::Off,
                ..cfg.connection_rate.clone()
            },
            ..cfg.clone()
        });
        let (kept, fresh) = n.carried_from(&l);
        assert_eq!(
            kept,
            vec!["sessions", "message_rate.per_ip", "message_rate.per_prefix"]
        );
        assert_eq!(fresh, vec!["recipient_rate.per_ip"]);
        assert_eq!(n.message(a), hit(LimitKind::MessageRate, Scope::Ip));
        assert_eq!(n.recipient(a), None);
        // The carried limiter runs on the same clock.
        clock.advance(Duration::from_secs(60));
        assert_eq!(n.message(a), None);
        // A new prefix length drops the per-prefix limiter's state only;
        // a new max_tracked_keys drops them all.
        let p = n.reload(&LimitsConfig {
            ipv4_prefix: 16,
            ..cfg.clone()
        });
        let (kept, _) = p.carried_from(&n);
        assert!(kept.contains(&"message_rate.per_ip"), "{kept:?}");
        assert!(!kept.contains(&"message_rate.per_prefix"), "{kept:?}");
        let q = p.reload(&LimitsConfig {
            max_tracked_keys: 10,
            ..cfg.clone()
        });
        let (kept, _) = q.carried_from(&p);
        assert_eq!(kept, vec!["sessions"]);
    }

    fn redis_cfg(url: &str) -> Option<crate::policy::settings::RedisConfig> {
        Some(crate::policy::settings::RedisConfig {
            url: Some(url.into()),
            ..Default::default()
        })
    }

    /// Without a runtime to run the Redis client on (as here) the link is
    /// degraded from the start: the local limiter decides (on_failure =
    /// local), counted as fallback checks. A reload keeps a Redis-backed
    /// limiter only on the same link.
    #[test]
    fn redis_store_falls_back_and_reloads_by_link() {
        let clock = FakeRelativeClock::default();
        let cfg = LimitsConfig {
            connection_rate: RateConfig {
                store: Store::Redis,
                ..rates(rate(2, 60.0, None), None)
            },
            message_rate: rates(rate(1, 60.0, None), None),
            redis: redis_cfg("redis://127.0.0.1:1"),
            ..base()
        };
        let l = Limits::with_fake_clock(&cfg, clock.clone());
        let a = ip("192.0.2.1");
        let hits: Vec<_> = (0..3).map(|_| l.connect(a).1).collect();
        assert_eq!(
            hits,
            [None, None, hit(LimitKind::ConnectionRate, Scope::Ip)]
        );
        let st = l.redis_status().unwrap();
        assert!(st.degraded);
        assert_eq!(st.fallback_checks, 3);
        // Unchanged: the same limiter on the same link, state kept.
        let same = l.reload(&cfg);
        let (kept, _) = same.carried_from(&l);
        assert!(kept.contains(&"connection_rate.per_ip"), "{kept:?}");
        assert_eq!(same.connect(a).1, hit(LimitKind::ConnectionRate, Scope::Ip));
        // The counters carry over.
        assert_eq!(same.redis_status().unwrap().fallback_checks, 4);
        // Another Redis, or the local store: a fresh limiter.
        for next in [
            LimitsConfig {
                redis: redis_cfg("redis://127.0.0.1:2"),
                ..cfg.clone()
            },
            LimitsConfig {
                connection_rate: rates(rate(2, 60.0, None), None),
                ..cfg.clone()
            },
        ] {
            let n = same.reload(&next);
            let (_, fresh) = n.carried_from(&same);
            assert_eq!(fresh, ["connection_rate.per_ip"]);
            assert!(n.redis_status().is_some());
        }
        // No Redis-backed rate: no link, no client.
        let local = same.reload(&LimitsConfig {
            connection_rate: rates(rate(2, 60.0, None), None),
            ..cfg.clone()
        });
        assert!(local.redis.is_none());
        let never = Limits::new(&base());
        assert!(never.redis_status().is_none());
    }

    #[tokio::test]
    async fn retired_sweeper_stops() {
        let clock = FakeRelativeClock::default();
        let cfg = LimitsConfig {
            sweep_interval: 0.01,
            message_rate: rates(rate(1, 1.0, None), None),
            ..base()
        };
        let l = Limits::with_fake_clock(&cfg, clock.clone());
        l.spawn_sweeper();
        // The sweeper task holds the only weak reference.
        assert_eq!(Arc::weak_count(&l), 1);
        let n = l.reload(&cfg);
        n.spawn_sweeper();
        l.retire();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::weak_count(&l) != 0 {
            assert!(Instant::now() < deadline, "retired sweeper still runs");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The new one sweeps the limiter they share.
        assert_eq!(l.message(ip("192.0.2.1")), None);
        assert_eq!(n.tracked_keys(), 1);
        clock.advance(Duration::from_secs(3));
        while n.tracked_keys() != 0 {
            assert!(Instant::now() < deadline, "sweeper did not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(Arc::weak_count(&n), 1);
    }
}
