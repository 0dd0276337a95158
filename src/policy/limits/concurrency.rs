//! Sessions at once: the global session count and its [`GlobalPermit`],
//! the live-session counters per IP and per prefix and the [`ConnPermit`]
//! that releases into them. Counts and compares against thresholds; the
//! limiter set (`mod.rs`) decides which counters a reload keeps.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::hit::Scope;

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

/// A global slot, or None when `max` sessions (0: no cap) hold one.
pub(super) fn try_global(global: &Arc<AtomicUsize>, max: usize) -> Option<GlobalPermit> {
    if max == 0 {
        global.fetch_add(1, Ordering::AcqRel);
    } else {
        global
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
    }
    Some(GlobalPermit {
        slot: global.clone(),
    })
}

impl ConnPermit {
    /// A permit that holds no slot (concurrency keeps no counter).
    pub(super) fn none() -> ConnPermit {
        ConnPermit { held: None }
    }
}

/// Concurrency thresholds.
#[derive(Clone, Copy)]
pub(super) struct Concurrency {
    pub(super) per_ip: u32,
    pub(super) per_prefix: u32,
}

impl Concurrency {
    /// Counts a new session from `ip` (in `prefix`) in `counts`, and the
    /// scope whose limit it goes over, per IP first, then per prefix,
    /// counting this session. A limit of 0 keeps no counter.
    pub(super) fn enter(
        &self,
        counts: &Arc<ConcCounts>,
        ip: IpAddr,
        prefix: IpAddr,
    ) -> (ConnPermit, Option<Scope>) {
        let c = self;
        let mut hit = None;
        // A limit of 0 keeps no counter.
        let n_ip = if c.per_ip > 0 {
            acquire(&counts.ips, ip)
        } else {
            0
        };
        let n_prefix = if c.per_prefix > 0 {
            acquire(&counts.prefixes, prefix)
        } else {
            0
        };
        if n_ip > c.per_ip {
            hit = Some(Scope::Ip);
        } else if n_prefix > c.per_prefix {
            hit = Some(Scope::Prefix);
        }
        let permit = ConnPermit {
            held: Some(Held {
                counts: counts.clone(),
                ip: (c.per_ip > 0).then_some(ip),
                prefix: (c.per_prefix > 0).then_some(prefix),
            }),
        };
        (permit, hit)
    }
}

/// Live sessions per IP and per prefix. Each map is its own Arc so that a
/// reload can keep one (per IP) and replace the other (a new prefix length).
pub(super) struct ConcCounts {
    pub(super) ips: Arc<DashMap<IpAddr, u32>>,
    pub(super) prefixes: Arc<DashMap<IpAddr, u32>>,
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
