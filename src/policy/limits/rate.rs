//! Keyed GCRA rates: the per-IP and per-prefix limiters of one kind of
//! event ([`RatePair`]), each a governor limiter ([`Tracked`]) on a bounded
//! key store ([`KeyStore`]) that evicts idle keys when swept and judges
//! new keys unstored when full; with `store = "redis"`, a [`Remote`] in
//! front of it. The limiter set (`mod.rs`) decides which limiters a reload
//! keeps.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use super::clock::{claim_emergency_sweep, TimeSource};
use super::hit::{LimitHit, LimitKind, Scope};
use super::redis::{Link, Remote};
use crate::policy::settings::{Rate, RateConfig, Store};

/// The per-IP and per-prefix limiters of one kind of event.
pub(super) struct RatePair {
    kind: LimitKind,
    pub(super) ip: Option<Arc<Tracked>>,
    pub(super) prefix: Option<Arc<Tracked>>,
}

/// What every rate limiter of one `Limiters` is built with.
pub(super) struct RateEnv<'a> {
    pub(super) cap: usize,
    pub(super) clock: &'a TimeSource,
    pub(super) overflow: &'a Arc<AtomicU64>,
    /// Prefix lengths (IPv4, IPv6): named in Redis prefix keys.
    pub(super) prefixes: (u8, u8),
    /// The link for `store = "redis"` rates.
    pub(super) redis: Option<&'a Arc<Link>>,
}

impl RatePair {
    /// `reuse(rate, by_prefix)` offers a running limiter to keep instead of
    /// a new one.
    pub(super) fn new(
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
                        by_prefix.then_some(env.prefixes),
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

    pub(super) fn check(&self, ip: IpAddr, prefix: IpAddr) -> Option<LimitHit> {
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

pub(super) type Keyed = RateLimiter<IpAddr, KeyStore, TimeSource, NoOpMiddleware<Nanos>>;

/// One keyed GCRA limiter with its key bound; with a Redis store, the
/// local allowance in front of the shared bucket (the local limiter then
/// judges provisional and fallback checks).
pub(super) struct Tracked {
    pub(super) lim: Keyed,
    pub(super) remote: Option<Arc<Remote>>,
    /// As configured (compared on reload).
    pub(super) rate: Rate,
    pub(super) cap: usize,
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
pub(super) struct KeyStore {
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
