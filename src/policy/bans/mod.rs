//! Bans: addresses and networks refused at connect until their expiry,
//! whoever added them: the admin API (`source = admin`), an error budget
//! gone over (`unknown_recipients`, `bad_commands`, see `budget.rs`) or
//! pregreet's `remember`. One list per process ([`Bans`]), kept across
//! reloads; with `[policy.bans] store = "redis"` it is also the local copy
//! of the fleet's list on Redis (`shared.rs`), where each ban is a key
//! with its own TTL.
//!
//! # Lookup cost
//! [`Bans::find`] runs in the accept loop for every connection: with no ban
//! it is one atomic load; otherwise one hash lookup per prefix length in
//! use (a bit set that only grows until the list is emptied), the client's
//! address masked to each. IPv4-mapped IPv6 addresses are their IPv4
//! address, here as in the limits.
//!
//! # Expiry
//! Every ban has one (`expires`, Unix milliseconds: they travel between
//! instances). An expired ban never matches; a sweep every few seconds
//! removes it and counts it. Bounded by `[policy.bans] max_bans`.
//!
//! Writes no bytes and decides no reply: `Policy` turns a match into its
//! 421 (see `Generation::admit`).

pub mod budget;
mod shared;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ipnet::IpNet;
use tracing::{info, warn};

use super::settings::{BansConfig, RedisConfig, Store};

/// Who added a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Admin,
    UnknownRecipients,
    BadCommands,
    Pregreet,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::Admin,
        Source::UnknownRecipients,
        Source::BadCommands,
        Source::Pregreet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::UnknownRecipients => "unknown_recipients",
            Source::BadCommands => "bad_commands",
            Source::Pregreet => "pregreet",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The address (a /32 or /128) or network, host bits cleared.
    pub net: IpNet,
    pub source: Source,
    /// Free text for the operator (API, logs); never sent to the client.
    pub reason: String,
    /// Unix milliseconds.
    pub created: u64,
    pub expires: u64,
}

impl Ban {
    /// The address as the API shows it: a single address without its
    /// prefix length, a network with it.
    pub fn address(&self) -> String {
        if self.net.prefix_len() == self.net.max_prefix_len() {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        }
    }

    /// The ban as the API's JSON (times in Unix seconds).
    pub fn to_json(&self, now: u64) -> serde_json::Value {
        serde_json::json!({
            "address": self.address(),
            "source": self.source.name(),
            "reason": self.reason,
            "created": self.created / 1000,
            "expires": self.expires.div_ceil(1000),
            "expires_in": self.expires.saturating_sub(now).div_ceil(1000),
        })
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An address or CIDR as a ban's key: host bits cleared, IPv4-mapped IPv6
/// as IPv4. None for text that is neither.
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(s.parse::<IpAddr>().ok()?),
    };
    Some(canonical(net))
}

fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
            Some(v4) if n.prefix_len() >= 96 => {
                IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).map_or(net, |n| n.trunc())
            }
            _ => net.trunc(),
        },
        IpNet::V4(_) => net.trunc(),
    }
}

/// Why a ban was not added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddError {
    /// `max_bans` reached.
    Full(usize),
    /// A TTL that is not a positive number of seconds.
    BadTtl,
}

impl std::fmt::Display for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddError::Full(n) => {
                write!(f, "the ban list is full ({n} bans, [policy.bans] max_bans)")
            }
            AddError::BadTtl => write!(f, "ttl must be seconds > 0"),
        }
    }
}

/// Counters per source, for the metrics.
#[derive(Default)]
struct Stats {
    added: [AtomicU64; 4],
    expired: [AtomicU64; 4],
    refused: [AtomicU64; 4],
    /// Automatic bans not added because the list was full.
    dropped: AtomicU64,
}

/// What `/metrics` shows of the bans.
#[derive(Debug, Clone, Default)]
pub struct BanStats {
    /// Per source: active, added, expired, refusals.
    pub by_source: Vec<(Source, u64, u64, u64, u64)>,
    pub dropped: u64,
    /// `Some(up)` with `store = "redis"`: whether Redis answers.
    pub shared_up: Option<bool>,
}

/// The ban list (see the module doc).
pub struct Bans {
    map: DashMap<IpNet, Ban>,
    /// `map.len()`, read without locking the shards.
    len: AtomicUsize,
    /// Prefix lengths in use: bit n of `v4` for an IPv4 /n, bit n of
    /// `v6[n / 64]` for an IPv6 /n.
    v4: AtomicU64,
    v6: [AtomicU64; 3],
    max: AtomicUsize,
    stats: Stats,
    shared: Mutex<Option<shared::Shared>>,
}

impl std::fmt::Debug for Bans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bans")
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How often expired bans are removed (they never match meanwhile).
const SWEEP_EVERY: Duration = Duration::from_secs(2);

impl Bans {
    pub fn new() -> Arc<Bans> {
        Arc::new(Bans {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            v4: AtomicU64::new(0),
            v6: Default::default(),
            max: AtomicUsize::new(BansConfig::default().max_bans),
            stats: Stats::default(),
            shared: Mutex::new(None),
        })
    }

    /// Applies `[policy.bans]` (at start and at each reload): the bound,
    /// and the Redis store started, moved or stopped as `store` and
    /// `[policy.limits.redis]` say. Needs a tokio runtime for Redis.
    pub fn configure(self: &Arc<Self>, cfg: &BansConfig, redis: Option<&RedisConfig>) {
        self.max.store(cfg.max_bans, Ordering::Relaxed);
        let want = match (cfg.store, redis) {
            (Store::Redis, Some(r)) => r.url.clone(),
            _ => None,
        };
        let mut cur = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().map(|s| s.url()) == want.as_deref() {
            return;
        }
        *cur = want.map(|url| {
            let timeout = redis.map_or(0.05, |r| r.timeout);
            shared::Shared::start(Arc::downgrade(self), url, timeout)
        });
    }

    /// Starts the sweep of expired bans (once, for the process).
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let weak: Weak<Bans> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { return };
                b.sweep(now_ms());
            }
        });
    }

    /// The ban covering `ip`, if any (the one found first: the longest
    /// prefix is not sought).
    pub fn find(&self, ip: IpAddr) -> Option<Ban> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let ip = ip.to_canonical();
        let now = now_ms();
        let check = |len: u8| -> Option<Ban> {
            let net = IpNet::new(ip, len).ok()?.trunc();
            let b = self.map.get(&net)?;
            (b.expires > now).then(|| b.clone())
        };
        match ip {
            IpAddr::V4(_) => {
                let bits = self.v4.load(Ordering::Relaxed);
                (0..=32u8)
                    .rev()
                    .filter(|l| bits >> l & 1 == 1)
                    .find_map(check)
            }
            IpAddr::V6(_) => (0..=128u8)
                .rev()
                .filter(|&l| {
                    self.v6[usize::from(l / 64)].load(Ordering::Relaxed) >> (l % 64) & 1 == 1
                })
                .find_map(check),
        }
    }

    /// Counts a connection refused by `source`'s ban.
    pub fn count_refusal(&self, source: Source) {
        self.stats.refused[source as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Bans `net` for `ttl` (replacing a ban of the same network), shared
    /// on Redis with `store = "redis"`.
    pub fn add(
        &self,
        net: IpNet,
        ttl: Duration,
        source: Source,
        reason: &str,
    ) -> Result<Ban, AddError> {
        if ttl.is_zero() {
            return Err(AddError::BadTtl);
        }
        let net = canonical(net);
        let now = now_ms();
        let ban = Ban {
            net,
            source,
            reason: clean_reason(reason),
            created: now,
            expires: now.saturating_add(ttl.as_millis() as u64),
        };
        self.insert(ban.clone(), true)?;
        self.stats.added[source as usize].fetch_add(1, Ordering::Relaxed);
        info!(
            client = %ban.address(),
            source = source.name(),
            ttl = ttl.as_secs(),
            reason = %ban.reason,
            "ban: added"
        );
        if let Some(s) = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.put(ban.clone());
        }
        Ok(ban)
    }

    /// Inserts a ban (from `add` or from Redis); `limit`: refuse past
    /// `max_bans`.
    fn insert(&self, ban: Ban, limit: bool) -> Result<(), AddError> {
        let max = self.max.load(Ordering::Relaxed);
        if limit && self.len.load(Ordering::Relaxed) >= max && !self.map.contains_key(&ban.net) {
            if ban.source != Source::Admin {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(client = %ban.address(), source = ban.source.name(), max, "ban: not added, the list is full ([policy.bans] max_bans)");
            }
            return Err(AddError::Full(max));
        }
        let len = ban.net.prefix_len();
        match ban.net {
            IpNet::V4(_) => self.v4.fetch_or(1 << len, Ordering::Relaxed),
            IpNet::V6(_) => {
                self.v6[usize::from(len / 64)].fetch_or(1 << (len % 64), Ordering::Relaxed)
            }
        };
        if self.map.insert(ban.net, ban).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Lifts the ban of exactly `net`; the ban it was, if any.
    pub fn remove(&self, net: IpNet) -> Option<Ban> {
        let net = canonical(net);
        let (_, ban) = self.map.remove(&net)?;
        self.len.fetch_sub(1, Ordering::Relaxed);
        info!(client = %ban.address(), source = ban.source.name(), "ban: lifted");
        if let Some(s) = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.delete(net);
        }
        Some(ban)
    }

    /// Lifts every ban (of `source` only, when given); how many.
    pub fn clear(&self, source: Option<Source>) -> usize {
        self.sweep(now_ms());
        let nets: Vec<IpNet> = self
            .map
            .iter()
            .filter(|b| source.is_none_or(|s| b.source == s))
            .map(|b| b.net)
            .collect();
        nets.into_iter().filter_map(|n| self.remove(n)).count()
    }

    /// Every ban in force, by expiry.
    pub fn list(&self) -> Vec<Ban> {
        let now = now_ms();
        let mut v: Vec<Ban> = self
            .map
            .iter()
            .filter(|b| b.expires > now)
            .map(|b| b.clone())
            .collect();
        v.sort_by_key(|b| (b.expires, b.net));
        v
    }

    /// Removes the bans expired by `now`, counting them.
    pub fn sweep(&self, now: u64) {
        self.map.retain(|_, b| {
            let keep = b.expires > now;
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
                self.stats.expired[b.source as usize].fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
        if self.len.load(Ordering::Relaxed) == 0 {
            // Racing an insert, a bit cleared here is set again by it
            // only if the insert comes after: inserts set their bit
            // before the entry, so at worst one lookup misses a ban
            // added in this very instant.
            self.v4.store(0, Ordering::Relaxed);
            for w in &self.v6 {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Makes the local list the fleet's (`fleet`, read from Redis): adds
    /// and replaces what differs and removes what is gone there, except
    /// with `merge` (the first read after a start or an outage: Redis may
    /// have restarted empty, or this instance banned meanwhile), when local
    /// bans missing there are kept and returned, to be written back.
    fn sync_from(&self, fleet: Vec<Ban>, merge: bool) -> Vec<Ban> {
        let now = now_ms();
        let mut seen = std::collections::HashSet::with_capacity(fleet.len());
        for b in fleet {
            seen.insert(b.net);
            if b.expires <= now {
                continue;
            }
            let same = self.map.get(&b.net).is_some_and(|m| *m == b);
            if !same {
                let _ = self.insert(b, false);
            }
        }
        let missing: Vec<Ban> = self
            .map
            .iter()
            .filter(|b| !seen.contains(&b.net) && b.expires > now)
            .map(|b| b.clone())
            .collect();
        if merge {
            return missing;
        }
        for b in missing {
            if self.map.remove(&b.net).is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Vec::new()
    }

    /// Counters and active bans per source, for `/metrics`.
    pub fn stats(&self) -> BanStats {
        let now = now_ms();
        let mut active = [0u64; 4];
        for b in self.map.iter() {
            if b.expires > now {
                active[b.source as usize] += 1;
            }
        }
        let s = &self.stats;
        BanStats {
            by_source: Source::ALL
                .iter()
                .map(|&src| {
                    let i = src as usize;
                    (
                        src,
                        active[i],
                        s.added[i].load(Ordering::Relaxed),
                        s.expired[i].load(Ordering::Relaxed),
                        s.refused[i].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            dropped: s.dropped.load(Ordering::Relaxed),
            shared_up: self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|s| s.up()),
        }
    }
}

/// A reason as stored and logged: printable ASCII, at most 200 bytes.
fn clean_reason(r: &str) -> String {
    r.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_networks_match_and_expire() {
        let b = Bans::new();
        assert!(b.find(ip("192.0.2.7")).is_none());
        let hour = Duration::from_secs(3600);
        b.add(parse_net("192.0.2.7").unwrap(), hour, Source::Admin, "x")
            .unwrap();
        b.add(
            parse_net("198.51.100.9/24").unwrap(),
            hour,
            Source::Admin,
            "y",
        )
        .unwrap();
        b.add(
            parse_net("2001:db8::/48").unwrap(),
            hour,
            Source::Pregreet,
            "",
        )
        .unwrap();
        assert_eq!(b.find(ip("192.0.2.7")).unwrap().reason, "x");
        assert_eq!(b.find(ip("::ffff:192.0.2.7")).unwrap().reason, "x");
        assert!(b.find(ip("192.0.2.8")).is_none());
        assert_eq!(
            b.find(ip("198.51.100.200")).unwrap().address(),
            "198.51.100.0/24"
        );
        assert!(b.find(ip("2001:db8:0:1::1")).is_some());
        assert!(b.find(ip("2001:db8:1::1")).is_none());
        assert_eq!(b.list().len(), 3);
        assert!(b.remove(parse_net("192.0.2.7/32").unwrap()).is_some());
        assert!(b.find(ip("192.0.2.7")).is_none());
        assert_eq!(b.clear(Some(Source::Pregreet)), 1);
        assert_eq!(b.list().len(), 1);
        // Expired: never matches; swept and counted.
        b.sweep(now_ms() + 3_600_001);
        assert!(b.find(ip("198.51.100.1")).is_none());
        let s = b.stats();
        assert_eq!(s.by_source[0], (Source::Admin, 0, 2, 1, 0));
    }

    #[test]
    fn parse_net_canonical_forms() {
        assert_eq!(
            parse_net("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_net("10.1.2").is_none());
        assert!(parse_net("").is_none());
        assert_eq!(clean_reason("a\r\nb"), "a??b");
    }

    #[test]
    fn full_list_refuses_new_bans_but_replaces() {
        let b = Bans::new();
        b.max.store(1, Ordering::Relaxed);
        let t = Duration::from_secs(60);
        b.add(parse_net("192.0.2.1").unwrap(), t, Source::Admin, "a")
            .unwrap();
        assert_eq!(
            b.add(parse_net("192.0.2.2").unwrap(), t, Source::BadCommands, ""),
            Err(AddError::Full(1))
        );
        b.add(parse_net("192.0.2.1").unwrap(), t, Source::Admin, "b")
            .unwrap();
        assert_eq!(b.list()[0].reason, "b");
        assert_eq!(b.stats().dropped, 1);
    }
}
