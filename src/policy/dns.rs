//! DNS for the policy: reverse DNS with forward confirmation (FCrDNS),
//! DNSBL/DNSWL scoring and HELO name resolution over hickory-resolver, each
//! behind a bounded concurrent cache (moka) with TTLs from the answers and
//! single-flight lookups. Decides nothing about replies.
//!
//! Queries go straight to hickory's name server pool (with its retry
//! handle), not through `TokioResolver`: the resolver's own response cache
//! would hide queries from our caches, and its RFC 6761 special-casing
//! answers PTR queries for 127.0.0.0/8 with `localhost` without asking
//! anyone. Every name is queried as an absolute name (no search domains).
//!
//! Cache lifetimes: positive answers live for the smallest TTL of the
//! records used; negative answers (NXDOMAIN, no data) for the RFC 2308
//! negative TTL of the SOA in the answer (`min(SOA TTL, SOA minimum)`), or
//! `negative_ttl` when there is none; both clamped to
//! `[min_ttl, max_ttl]`. Temporary failures (SERVFAIL, timeouts, I/O) are
//! cached for `min(negative_ttl, max_ttl, 30 s)`, unclamped by `min_ttl`,
//! so a DNS outage is not hammered by every connection yet clears quickly.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hickory_resolver::config::{NameServerConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::xfer::{DnsHandle, FirstAnswer, RetryDnsHandle};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{DnsRequestOptions, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::{NameServerPool, PoolContext, TlsConfig};
use moka::future::Cache;
use moka::Expiry;
use prometheus_client::metrics::histogram::Histogram;
use tracing::Instrument;

use super::dnsbl_health::{is_error_answer, ZoneHealth};
use super::settings::{parse_code_range, DnsConfig, DnsblConfig, RdnsConfig};

/// Outcome of the reverse DNS check for one client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdns {
    /// A PTR name that resolves back to the address (without trailing dot).
    Pass(Arc<str>),
    /// No PTR record (NXDOMAIN or no data).
    NoPtr,
    /// PTR names exist but none of those tried resolves back; the first name.
    Mismatch(Arc<str>),
    /// SERVFAIL, timeout, or any other temporary failure.
    TempError,
}

impl Rdns {
    /// The outcome's name in spans and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Rdns::Pass(_) => "pass",
            Rdns::NoPtr => "no_ptr",
            Rdns::Mismatch(_) => "mismatch",
            Rdns::TempError => "temp_error",
        }
    }
}

/// DNSBL/DNSWL outcome for one client address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsblResult {
    /// Sum of the weights of the zones that listed the client.
    pub score: i32,
    /// The zones that listed it, with the answer that counted.
    pub listed: Vec<(Arc<str>, Ipv4Addr)>,
}

/// Whether a HELO name has A, AAAA or MX records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolves {
    Yes,
    No,
    TempError,
}

/// Cache counters (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub rdns_hits: u64,
    pub rdns_misses: u64,
    pub dnsbl_hits: u64,
    pub dnsbl_misses: u64,
    pub helo_hits: u64,
    pub helo_misses: u64,
}

/// Upper bound on how long a temporary failure is cached.
pub const TEMP_ERROR_TTL_MAX: Duration = Duration::from_secs(30);

/// Longest CNAME chain followed inside one answer.
const MAX_CNAME_CHAIN: usize = 8;

type Client = RetryDnsHandle<NameServerPool<TokioRuntimeProvider>>;

/// A cached verdict with its lifetime.
#[derive(Clone)]
struct Cached<V> {
    value: V,
    ttl: Duration,
    expires: Instant,
}

/// Per-entry expiry: the lifetime computed from the answers.
struct ByTtl;

impl<K, V> Expiry<K, Cached<V>> for ByTtl {
    fn expire_after_create(&self, _: &K, value: &Cached<V>, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// One configured DNSBL zone, normalized.
struct Zone {
    /// As configured, without trailing dot (reported in `listed`).
    name: Arc<str>,
    weight: i32,
    /// Inclusive ranges; empty = any answer counts.
    codes: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Error answers seen and whether it is in scoring (`dnsbl_health`).
    health: ZoneHealth,
}

impl Zone {
    /// Whether answer `a` lists the client: never a list's error code
    /// (127.255.255.0/24), else as `codes` say.
    fn counts(&self, a: Ipv4Addr) -> bool {
        !is_error_answer(a)
            && (self.codes.is_empty() || self.codes.iter().any(|&(lo, hi)| lo <= a && a <= hi))
    }
}

/// Cache lifetime bounds.
#[derive(Clone, Copy)]
struct Ttls {
    min: Duration,
    max: Duration,
    negative: Duration,
    temp: Duration,
}

impl Ttls {
    /// Clamps without panicking even when min > max (max wins).
    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.max(self.min).min(self.max)
    }
    fn positive(&self, ttl_secs: u32) -> Duration {
        self.clamp(Duration::from_secs(u64::from(ttl_secs)))
    }
    fn negative(&self, soa_ttl: Option<u32>) -> Duration {
        self.clamp(soa_ttl.map_or(self.negative, |s| Duration::from_secs(u64::from(s))))
    }
}

/// The outcome of one query, reduced to what the checks need.
enum Answer {
    /// Records of the queried type (CNAMEs followed), and their smallest TTL.
    Records(Vec<Record>, u32),
    /// NXDOMAIN or no data, with the SOA negative TTL when given.
    NoData(Option<u32>),
    /// SERVFAIL, REFUSED, timeout, I/O error, referral, ...
    Temp,
}

/// Reverse DNS, DNSBL and HELO lookups with their caches.
pub struct Dns {
    client: Client,
    max_names: usize,
    zones: Vec<Zone>,
    ttls: Ttls,
    rdns_cache: Cache<IpAddr, Cached<Rdns>>,
    dnsbl_cache: Cache<(u32, IpAddr), Cached<Option<Ipv4Addr>>>,
    helo_cache: Cache<Box<str>, Cached<Resolves>>,
    /// Time of the lookups behind cache misses, per cache.
    rdns_latency: Histogram,
    dnsbl_latency: Histogram,
    helo_latency: Histogram,
    rdns_hits: AtomicU64,
    rdns_misses: AtomicU64,
    dnsbl_hits: AtomicU64,
    dnsbl_misses: AtomicU64,
    helo_hits: AtomicU64,
    helo_misses: AtomicU64,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("zones", &self.zones.len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Seconds from the config as a Duration; anything odd (NaN, negative,
/// absurdly large) is made harmless instead of panicking.
fn secs(v: f64) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::from_secs_f64(v.min(1e9))
    } else {
        Duration::ZERO
    }
}

/// `name` as ASCII, lowercase, without the trailing dot.
fn display_name(name: &Name) -> String {
    let mut s = name.to_ascii();
    while s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

/// The reversed-address label sequence (`d.c.b.a` or 32 nibbles) for DNSBLs.
fn reversed_labels(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut s = String::with_capacity(63);
            for byte in v6.octets().iter().rev() {
                for nib in [byte & 0x0f, byte >> 4] {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push(char::from(HEX[usize::from(nib)]));
                }
            }
            s
        }
    }
}

impl Dns {
    /// Builds the resolver (explicit nameservers or the system's).
    pub fn new(
        dns: &DnsConfig,
        rdns: &RdnsConfig,
        dnsbl: &DnsblConfig,
    ) -> Result<Arc<Dns>, String> {
        let (servers, mut opts): (Vec<NameServerConfig>, ResolverOpts) =
            if dns.nameservers.is_empty() {
                let (conf, opts) = hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| format!("reading the system DNS configuration: {e}"))?;
                (conf.name_servers().to_vec(), opts)
            } else {
                let servers = dns
                    .nameservers
                    .iter()
                    .map(|sa| {
                        let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                        for c in &mut ns.connections {
                            c.port = sa.port();
                        }
                        ns
                    })
                    .collect();
                (servers, ResolverOpts::default())
            };
        if servers.is_empty() {
            return Err(
                "no DNS nameservers configured or found in the system configuration".into(),
            );
        }
        opts.timeout = secs(dns.timeout).max(Duration::from_millis(1));
        opts.attempts = dns.attempts.max(1);
        // hickory's response cache is not used at all (the pool is queried
        // directly); keep its size minimal in case anything consults it.
        opts.cache_size = 0;
        let attempts = opts.attempts;
        let tls = TlsConfig::new().map_err(|e| format!("DNS client setup: {e}"))?;
        let cx = Arc::new(PoolContext::new(opts, tls));
        let pool = NameServerPool::from_config(servers, cx, TokioRuntimeProvider::default());
        // RetryDnsHandle counts retries after the first try.
        let client = RetryDnsHandle::new(pool, attempts - 1);

        let mut zones = Vec::with_capacity(dnsbl.zones.len());
        for z in &dnsbl.zones {
            let name = z.name.trim().trim_end_matches('.');
            if name.is_empty() {
                return Err("a DNSBL zone name is empty".into());
            }
            let codes = z
                .codes
                .iter()
                .map(|c| {
                    parse_code_range(c)
                        .ok_or_else(|| format!("DNSBL zone {name}: bad answer filter {c:?}"))
                })
                .collect::<Result<Vec<_>, String>>()?;
            zones.push(Zone {
                name: Arc::from(name),
                weight: z.weight,
                codes,
                health: ZoneHealth::default(),
            });
        }

        let max = secs(dns.max_ttl);
        let negative = secs(dns.negative_ttl);
        let ttls = Ttls {
            min: secs(dns.min_ttl),
            max,
            negative,
            temp: negative.min(max).min(TEMP_ERROR_TTL_MAX),
        };
        fn cache<K, V>(size: u64) -> Cache<K, Cached<V>>
        where
            K: std::hash::Hash + Eq + Send + Sync + 'static,
            V: Clone + Send + Sync + 'static,
        {
            Cache::builder()
                .max_capacity(size)
                .expire_after(ByTtl)
                .build()
        }
        Ok(Arc::new(Dns {
            client,
            max_names: rdns.max_names.max(1),
            zones,
            ttls,
            rdns_cache: cache(dns.cache_size),
            dnsbl_cache: cache(dns.cache_size),
            helo_cache: cache(dns.cache_size),
            rdns_latency: latency_histogram(),
            dnsbl_latency: latency_histogram(),
            helo_latency: latency_histogram(),
            rdns_hits: AtomicU64::new(0),
            rdns_misses: AtomicU64::new(0),
            dnsbl_hits: AtomicU64::new(0),
            dnsbl_misses: AtomicU64::new(0),
            helo_hits: AtomicU64::new(0),
            helo_misses: AtomicU64::new(0),
        }))
    }

    /// FCrDNS for `ip`, cached; concurrent calls for one address share one lookup.
    pub async fn rdns(&self, ip: IpAddr) -> Rdns {
        let ip = ip.to_canonical();
        let span = lookup_span("rdns", "PTR", None);
        let v = cached(
            &self.rdns_cache,
            ip,
            (&self.rdns_hits, &self.rdns_misses, &self.rdns_latency),
            self.rdns_lookup(ip),
        )
        .instrument(span.clone())
        .await;
        span.record("dns.verdict", v.name());
        v
    }

    /// Every configured zone queried in parallel, each answer cached.
    pub async fn dnsbl(&self, ip: IpAddr) -> DnsblResult {
        if self.zones.is_empty() {
            return DnsblResult::default();
        }
        let ip = ip.to_canonical();
        let labels = reversed_labels(ip);
        // A zone a health check took out of scoring is not asked.
        let labels = labels.as_str();
        let verdicts = join_all(self.zones.iter().enumerate().map(|(i, z)| async move {
            if z.health.in_scoring() {
                self.zone_verdict(i, z, ip, labels).await
            } else {
                None
            }
        }))
        .await;
        let mut out = DnsblResult::default();
        for (z, v) in self.zones.iter().zip(verdicts) {
            if let Some(a) = v {
                out.score = out.score.saturating_add(z.weight);
                out.listed.push((z.name.clone(), a));
            }
        }
        out
    }

    /// The zones with their health: (index, name, health).
    pub fn zone_healths(&self) -> impl Iterator<Item = (usize, &str, &ZoneHealth)> {
        (self.zones.iter().enumerate()).map(|(i, z)| (i, &*z.name, &z.health))
    }

    /// The A answers of `<labels>.<zone i>`, asked now (uncached), for the
    /// zone health checks; None when the query failed (temporary).
    pub(super) async fn zone_probe(&self, i: usize, labels: &str) -> Option<Vec<Ipv4Addr>> {
        let z = self.zones.get(i)?;
        let qname = Name::from_ascii(format!("{labels}.{}.", z.name)).ok()?;
        match self.query(qname, RecordType::A).await {
            Answer::Records(recs, _) => Some(
                recs.iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect(),
            ),
            Answer::NoData(_) => Some(Vec::new()),
            Answer::Temp => None,
        }
    }

    /// Checks every zone once: its test entries' answers (uncached), judged
    /// by `ZoneHealth::checked`. A failed query changes nothing.
    pub async fn check_zones(&self) {
        for (i, name, health) in self.zone_healths() {
            let (Some(one), Some(two)) = (
                self.zone_probe(i, "1.0.0.127").await,
                self.zone_probe(i, "2.0.0.127").await,
            ) else {
                continue;
            };
            let counts = |answers: &[Ipv4Addr]| answers.iter().any(|a| !is_error_answer(*a));
            health.checked(name, counts(&one), counts(&two));
        }
    }

    /// Checks the zones now and every `every`, for as long as `dns` lives
    /// (nothing without zones, `every` zero, or outside a runtime).
    pub fn spawn_health_checks(dns: &Arc<Dns>, every: Duration) {
        if every.is_zero() || dns.zones.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(dns);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(dns) = weak.upgrade() else { return };
                dns.check_zones().await;
            }
        });
    }

    /// A/AAAA/MX existence for a HELO name, cached.
    pub async fn helo_resolves(&self, name: &str) -> Resolves {
        let Some((key, qname)) = helo_key(name) else {
            return Resolves::No;
        };
        let span = lookup_span("helo", "A/AAAA/MX", Some(name));
        cached(
            &self.helo_cache,
            key,
            (&self.helo_hits, &self.helo_misses, &self.helo_latency),
            self.helo_lookup(qname),
        )
        .instrument(span)
        .await
    }

    /// Lookup time behind cache misses, per cache (rdns, dnsbl, helo).
    pub fn latencies(&self) -> [(&'static str, &Histogram); 3] {
        [
            ("rdns", &self.rdns_latency),
            ("dnsbl", &self.dnsbl_latency),
            ("helo", &self.helo_latency),
        ]
    }

    pub fn stats(&self) -> DnsStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            rdns_hits: l(&self.rdns_hits),
            rdns_misses: l(&self.rdns_misses),
            dnsbl_hits: l(&self.dnsbl_hits),
            dnsbl_misses: l(&self.dnsbl_misses),
            helo_hits: l(&self.helo_hits),
            helo_misses: l(&self.helo_misses),
        }
    }

    /// Remaining cache lifetime of the rDNS verdict for `ip`; None when not
    /// cached. For diagnostics and tests: not counted in `stats()`.
    pub async fn rdns_cache_ttl(&self, ip: IpAddr) -> Option<Duration> {
        remaining(self.rdns_cache.get(&ip.to_canonical()).await)
    }

    /// Remaining cache lifetime of the answer of DNSBL zone `zone` (index in
    /// the configuration) for `ip`; None when not cached. Not counted.
    pub async fn dnsbl_cache_ttl(&self, zone: usize, ip: IpAddr) -> Option<Duration> {
        let zone = u32::try_from(zone).ok()?;
        remaining(self.dnsbl_cache.get(&(zone, ip.to_canonical())).await)
    }

    /// Remaining cache lifetime of the HELO verdict for `name`; None when
    /// not cached. Not counted.
    pub async fn helo_cache_ttl(&self, name: &str) -> Option<Duration> {
        let (key, _) = helo_key(name)?;
        remaining(self.helo_cache.get(&key).await)
    }

    async fn rdns_lookup(&self, ip: IpAddr) -> (Rdns, Duration) {
        let mut ptr_name = Name::from(ip);
        ptr_name.set_fqdn(true);
        let (ptrs, ptr_ttl) = match self.query(ptr_name, RecordType::PTR).await {
            Answer::Temp => return (Rdns::TempError, self.ttls.temp),
            Answer::NoData(soa) => return (Rdns::NoPtr, self.ttls.negative(soa)),
            Answer::Records(recs, ttl) => (recs, ttl),
        };
        let mut names: Vec<Name> = Vec::with_capacity(self.max_names.min(ptrs.len()));
        for r in &ptrs {
            if let RData::PTR(p) = &r.data {
                if !p.0.is_root() && !names.contains(&p.0) {
                    names.push(p.0.clone());
                    if names.len() == self.max_names {
                        break;
                    }
                }
            }
        }
        let Some(first) = names.first() else {
            return (Rdns::NoPtr, self.ttls.positive(ptr_ttl));
        };
        let first = Arc::<str>::from(display_name(first));
        let rtype = if ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        let forward = join_all(names.iter().map(|n| {
            let span = lookup_span(
                "fcrdns_forward",
                rtype.to_string().as_str(),
                Some(&display_name(n)),
            );
            let mut n = n.clone();
            n.set_fqdn(true);
            self.query(n, rtype).instrument(span)
        }))
        .await;
        let mut ttl = ptr_ttl;
        let mut negative: Option<Duration> = None;
        let mut temp = false;
        for (name, answer) in names.iter().zip(forward) {
            match answer {
                Answer::Records(recs, t) => {
                    if recs.iter().any(|r| record_ip(r) == Some(ip)) {
                        let verdict = Rdns::Pass(Arc::from(display_name(name)));
                        return (verdict, self.ttls.positive(ttl.min(t)));
                    }
                    ttl = ttl.min(t);
                }
                Answer::NoData(soa) => {
                    let n = self.ttls.negative(soa);
                    negative = Some(negative.map_or(n, |m| m.min(n)));
                }
                Answer::Temp => temp = true,
            }
        }
        if temp {
            return (Rdns::TempError, self.ttls.temp);
        }
        let life = self.ttls.positive(ttl);
        (
            Rdns::Mismatch(first),
            negative.map_or(life, |n| n.min(life)),
        )
    }

    async fn zone_verdict(&self, i: usize, z: &Zone, ip: IpAddr, labels: &str) -> Option<Ipv4Addr> {
        let idx = u32::try_from(i).ok()?;
        let span = lookup_span("dnsbl", "A", None);
        span.record("dns.zone", &*z.name);
        let listed = cached(
            &self.dnsbl_cache,
            (idx, ip),
            (&self.dnsbl_hits, &self.dnsbl_misses, &self.dnsbl_latency),
            async move {
                // The query name is only built on a miss.
                let Ok(qname) = Name::from_ascii(format!("{labels}.{}.", z.name)) else {
                    return (None, self.ttls.temp);
                };
                match self.query(qname, RecordType::A).await {
                    Answer::Records(recs, ttl) => {
                        let hit = recs.iter().find_map(|r| match &r.data {
                            RData::A(a) if z.counts(a.0) => Some(a.0),
                            RData::A(a) if is_error_answer(a.0) => {
                                z.health.error_answer(&z.name, a.0);
                                None
                            }
                            _ => None,
                        });
                        (hit, self.ttls.positive(ttl))
                    }
                    Answer::NoData(soa) => (None, self.ttls.negative(soa)),
                    // Not listed, but only briefly remembered.
                    Answer::Temp => (None, self.ttls.temp),
                }
            },
        )
        .instrument(span.clone())
        .await;
        span.record(
            "dns.verdict",
            if listed.is_some() {
                "listed"
            } else {
                "not_listed"
            },
        );
        listed
    }

    async fn helo_lookup(&self, qname: Name) -> (Resolves, Duration) {
        let mut pending: FuturesUnordered<_> = [RecordType::A, RecordType::AAAA, RecordType::MX]
            .into_iter()
            .map(|t| self.query(qname.clone(), t))
            .collect();
        let mut temp = false;
        let mut negative: Option<Duration> = None;
        while let Some(answer) = pending.next().await {
            match answer {
                Answer::Records(_, ttl) => return (Resolves::Yes, self.ttls.positive(ttl)),
                Answer::NoData(soa) => {
                    let n = self.ttls.negative(soa);
                    negative = Some(negative.map_or(n, |m| m.min(n)));
                }
                Answer::Temp => temp = true,
            }
        }
        if temp {
            (Resolves::TempError, self.ttls.temp)
        } else {
            (Resolves::No, negative.unwrap_or(self.ttls.negative(None)))
        }
    }

    /// One query of `name` (absolute) for `rtype`, classified.
    async fn query(&self, name: Name, rtype: RecordType) -> Answer {
        let mut opts = DnsRequestOptions::default();
        opts.recursion_desired = true;
        let query = Query::query(name.clone(), rtype);
        match self.client.lookup(query, opts).first_answer().await {
            Ok(resp) => match resp.response_code {
                ResponseCode::NoError => {
                    let (recs, ttl) = matching_records(&name, rtype, &resp.answers);
                    if recs.is_empty() {
                        Answer::NoData(resp.negative_ttl().or(ttl))
                    } else {
                        Answer::Records(recs, ttl.unwrap_or(0))
                    }
                }
                ResponseCode::NXDomain => Answer::NoData(resp.negative_ttl()),
                _ => Answer::Temp,
            },
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
                let code_ok = matches!(
                    nr.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                );
                // A bare referral (NS, no SOA) proves nothing.
                let referral = nr.soa.is_none() && nr.ns.is_some();
                if code_ok && !referral {
                    Answer::NoData(nr.negative_ttl)
                } else {
                    Answer::Temp
                }
            }
            Err(_) => Answer::Temp,
        }
    }
}

/// The records of `rtype` that answer `qname` (following CNAMEs within the
/// answer section), and the smallest TTL of the records used.
fn matching_records(
    qname: &Name,
    rtype: RecordType,
    answers: &[Record],
) -> (Vec<Record>, Option<u32>) {
    let mut owner = qname.clone();
    let mut ttl: Option<u32> = None;
    for _ in 0..MAX_CNAME_CHAIN {
        if rtype == RecordType::CNAME {
            break;
        }
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if r.name == owner => Some((c.0.clone(), r.ttl)),
            _ => None,
        });
        match next {
            Some((target, t)) => {
                owner = target;
                ttl = Some(ttl.map_or(t, |m| m.min(t)));
            }
            None => break,
        }
    }
    let recs: Vec<Record> = answers
        .iter()
        .filter(|r| r.record_type() == rtype && r.name == owner)
        .cloned()
        .collect();
    for r in &recs {
        ttl = Some(ttl.map_or(r.ttl, |m| m.min(r.ttl)));
    }
    (recs, ttl)
}

fn record_ip(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// Cache key (lowercase, no trailing dot) and absolute query name for a
/// HELO name; None when it cannot be a DNS name.
fn helo_key(name: &str) -> Option<(Box<str>, Name)> {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.is_empty() || n.len() > 253 || n.starts_with('.') || n.contains("..") {
        return None;
    }
    let key = n.to_ascii_lowercase();
    let mut qname = Name::from_ascii(&key).ok()?;
    qname.set_fqdn(true);
    Some((key.into_boxed_str(), qname))
}

fn remaining<V>(c: Option<Cached<V>>) -> Option<Duration> {
    c.map(|c| c.expires.saturating_duration_since(Instant::now()))
}

/// Single-flight cached lookup: `init` runs at most once at a time per key;
/// a call whose `init` ran is a miss, any other a hit.
async fn cached<K, V>(
    cache: &Cache<K, Cached<V>>,
    key: K,
    (hits, misses, latency): (&AtomicU64, &AtomicU64, &Histogram),
    init: impl Future<Output = (V, Duration)>,
) -> V
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let mut ran = false;
    let entry = cache
        .get_with(key, async {
            ran = true;
            let t0 = Instant::now();
            let (value, ttl) = init.await;
            latency.observe(t0.elapsed().as_secs_f64());
            Cached {
                value,
                ttl,
                expires: Instant::now() + ttl,
            }
        })
        .await;
    if ran {
        misses.fetch_add(1, Ordering::Relaxed);
    } else {
        hits.fetch_add(1, Ordering::Relaxed);
    }
    tracing::Span::current().record("cache.hit", !ran);
    entry.value
}

/// A `dns.lookup` span: what is looked up (`kind`: rdns, fcrdns_forward,
/// dnsbl, helo), the record type, the name when it is not the client's
/// address, and (recorded later) whether the cache answered.
fn lookup_span(kind: &'static str, rtype: &str, name: Option<&str>) -> tracing::Span {
    crate::span!(
        crate::telemetry::in_traced(),
        "dns.lookup",
        "dns.lookup.kind" = kind,
        "dns.question.type" = rtype,
        "dns.question.name" = name,
        "dns.zone" = tracing::field::Empty,
        "dns.verdict" = tracing::field::Empty,
        "cache.hit" = tracing::field::Empty,
    )
}

/// DNS latency buckets: 1 ms to about 8 s.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 14,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed() {
        assert_eq!(reversed_labels("192.0.2.1".parse().unwrap()), "1.2.0.192");
        let v6 = reversed_labels("2001:db8::1".parse().unwrap());
        assert_eq!(
            v6,
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn helo_keys() {
        assert_eq!(
            &*helo_key("Mail.Example.COM.").unwrap().0,
            "mail.example.com"
        );
        assert!(helo_key("").is_none());
        assert!(helo_key(".").is_none());
        assert!(helo_key("a..b").is_none());
        assert!(helo_key(&"a".repeat(300)).is_none());
    }

    #[test]
    fn new_never_panics() {
        use crate::policy::settings::DnsblZone;
        // System configuration: Ok, or an error when there is none.
        let _ = Dns::new(
            &DnsConfig::default(),
            &RdnsConfig::default(),
            &DnsblConfig::default(),
        );
        let odd = DnsConfig {
            nameservers: vec!["127.0.0.1:5353".parse().unwrap()],
            timeout: f64::NAN,
            attempts: 0,
            cache_size: 0,
            min_ttl: 100.0,
            max_ttl: -1.0,
            negative_ttl: f64::INFINITY,
        };
        let rdns = RdnsConfig {
            max_names: 0,
            ..RdnsConfig::default()
        };
        assert!(Dns::new(&odd, &rdns, &DnsblConfig::default()).is_ok());
        let bad_codes = DnsblConfig {
            zones: vec![DnsblZone {
                name: "bl.example".into(),
                weight: 1,
                codes: vec!["nope".into()],
            }],
            ..DnsblConfig::default()
        };
        assert!(Dns::new(&odd, &rdns, &bad_codes).is_err());
    }

    #[test]
    fn ttl_clamp_never_panics() {
        let t = Ttls {
            min: secs(10.0),
            max: secs(5.0),
            negative: secs(f64::NAN),
            temp: Duration::ZERO,
        };
        assert_eq!(t.positive(100), Duration::from_secs(5));
        assert_eq!(t.negative(None), Duration::from_secs(5));
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::INFINITY), Duration::ZERO);
    }
}
