//! Prometheus metrics: the counters and histograms updated where things
//! happen (accept loop, session, pool), and the values read at scrape time
//! from the live objects (policy verdict counts, DNS caches, rate-limiter
//! overflow, the Redis store's calls, failures and health, pool sizes,
//! backend health). Owns the registry and its text encoding; the HTTP
//! endpoint is `admin.rs`. Labels are bounded: check
//! names, reply classes, TLS versions and configured backend addresses,
//! never a client address, domain or envelope address.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::policy::Policy;
use crate::relay::Relay;

type Labels = Vec<(&'static str, String)>;

/// Latency buckets in seconds: 0.5 ms to about 65 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 18)
}

fn histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

fn histograms() -> Family<Labels, Histogram> {
    Family::new_with_constructor(histogram as fn() -> Histogram)
}

/// The metrics of one backend, held by its pool (clones share the values).
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// Connections opened (connected, greeted, EHLO'd).
    pub created: Counter,
    /// Checkouts served by an idle connection.
    pub reused: Counter,
    /// Failed connects or greetings.
    pub connect_failures: Counter,
    /// Time a transaction waited for a connection (checkouts that waited
    /// in line, and those served at once).
    pub pool_wait: Histogram,
    /// Backend's final reply after the message's final dot.
    pub reply: Histogram,
}

/// Everything the proxy counts. Cheap to clone pieces out of (each metric
/// is reference counted); one per server.
#[derive(Debug)]
pub struct Metrics {
    pub connections_accepted: Counter,
    pub connections_refused: Family<Labels, Counter>,
    pub proxy_headers: Family<Labels, Counter>,
    pub sessions_active: Gauge,
    pub session_duration: Histogram,
    pub tls_handshakes: Family<Labels, Counter>,
    /// Successful handshakes that resumed a session (ticket or cache).
    pub tls_resumed: Counter,
    pub transactions: Family<Labels, Counter>,
    transaction_classes: std::sync::OnceLock<[Counter; 3]>,
    pub transaction_duration: Histogram,
    pub messages_relayed: Counter,
    pub bytes_relayed: Counter,
    pub recipients: Counter,
    pub draining: Gauge,
    backend_created: Family<Labels, Counter>,
    backend_reused: Family<Labels, Counter>,
    backend_failures: Family<Labels, Counter>,
    backend_pool_wait: Family<Labels, Histogram>,
    backend_reply: Family<Labels, Histogram>,
    registry: Registry,
    live: Arc<std::sync::Mutex<Option<Live>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("smtp_edge");
        let m = Metrics {
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            proxy_headers: Family::default(),
            sessions_active: Gauge::default(),
            session_duration: histogram(),
            tls_handshakes: Family::default(),
            tls_resumed: Counter::default(),
            transactions: Family::default(),
            transaction_classes: std::sync::OnceLock::new(),
            transaction_duration: histogram(),
            messages_relayed: Counter::default(),
            bytes_relayed: Counter::default(),
            recipients: Counter::default(),
            draining: Gauge::default(),
            backend_created: Family::default(),
            backend_reused: Family::default(),
            backend_failures: Family::default(),
            backend_pool_wait: histograms(),
            backend_reply: histograms(),
            registry: Registry::default(),
            live: Arc::default(),
        };
        r.register(
            "connections_accepted",
            "Client connections admitted (a session started)",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections refused at accept, by policy check",
            m.connections_refused.clone(),
        );
        r.register(
            "proxy_headers",
            "Connections on PROXY protocol listeners by header outcome: accepted, local (health check), or why closed before a greeting (untrusted, timeout, malformed, too_long, unsupported, closed, busy)",
            m.proxy_headers.clone(),
        );
        r.register(
            "sessions_active",
            "Client sessions open now",
            m.sessions_active.clone(),
        );
        r.register_with_unit(
            "session_duration",
            "Client session duration, accept to close",
            Unit::Seconds,
            m.session_duration.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes (STARTTLS and implicit) by outcome and version",
            m.tls_handshakes.clone(),
        );
        r.register(
            "tls_resumed",
            "TLS handshakes that resumed a session (ticket or session cache); part of tls_handshakes{outcome=\"ok\"}",
            m.tls_resumed.clone(),
        );
        r.register(
            "transactions",
            "Messages answered after their final dot, by reply class",
            m.transactions.clone(),
        );
        r.register_with_unit(
            "transaction_duration",
            "Transaction time, MAIL to the final reply",
            Unit::Seconds,
            m.transaction_duration.clone(),
        );
        r.register(
            "messages_relayed",
            "Messages the backend accepted (250 after the dot)",
            m.messages_relayed.clone(),
        );
        r.register_with_unit(
            "relayed",
            "Message bytes relayed to backends (wire form) for accepted messages",
            Unit::Bytes,
            m.bytes_relayed.clone(),
        );
        r.register(
            "recipients",
            "Recipients the backend accepted",
            m.recipients.clone(),
        );
        r.register(
            "draining",
            "1 while shutting down (readyz answers 503)",
            m.draining.clone(),
        );
        r.register(
            "backend_connections_created",
            "Backend connections opened (connected, greeted, EHLO'd)",
            m.backend_created.clone(),
        );
        r.register(
            "backend_connections_reused",
            "Checkouts served by an idle pooled connection",
            m.backend_reused.clone(),
        );
        r.register(
            "backend_connect_failures",
            "Failed backend connects or greetings",
            m.backend_failures.clone(),
        );
        r.register_with_unit(
            "backend_pool_wait",
            "Time a transaction waited for a backend connection",
            Unit::Seconds,
            m.backend_pool_wait.clone(),
        );
        r.register_with_unit(
            "backend_reply",
            "Backend's final reply latency after the message's dot",
            Unit::Seconds,
            m.backend_reply.clone(),
        );
        r.register_collector(Box::new(LiveCollector(m.live.clone())));
        Metrics { registry: r, ..m }
    }

    /// The metrics of the backend at `addr` (created on first use).
    pub fn backend(&self, addr: &str) -> BackendMetrics {
        let l: Labels = vec![("backend", addr.to_string())];
        BackendMetrics {
            created: self.backend_created.get_or_create(&l).clone(),
            reused: self.backend_reused.get_or_create(&l).clone(),
            connect_failures: self.backend_failures.get_or_create(&l).clone(),
            pool_wait: self.backend_pool_wait.get_or_create(&l).clone(),
            reply: self.backend_reply.get_or_create(&l).clone(),
        }
    }

    /// Lets a scrape read the policy and the pools (again after a reload
    /// replaced the backends).
    pub fn attach(&self, policy: Arc<Policy>, relay: Arc<Relay>) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(Live { policy, relay });
    }

    /// A connection refused at accept by `check`.
    pub fn refused(&self, check: &'static str) {
        self.connections_refused
            .get_or_create(&vec![("reason", check.to_string())])
            .inc();
    }

    /// A connection on a PROXY protocol listener: how its header went.
    pub fn proxy_header(&self, result: &'static str) {
        self.proxy_headers
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
    }

    /// A TLS handshake: `outcome` ok | failed | timeout.
    pub fn tls(&self, outcome: &'static str, version: &'static str) {
        self.tls_handshakes
            .get_or_create(&vec![
                ("outcome", outcome.to_string()),
                ("version", version.to_string()),
            ])
            .inc();
    }

    /// A successful TLS handshake that resumed a session.
    pub fn tls_resumed(&self) {
        self.tls_resumed.inc();
    }

    /// A message's final reply `code` (2xx, 4xx or 5xx). The three series
    /// are made at the first message: no label vector per message.
    pub fn transaction(&self, code: u16) {
        let counters = self.transaction_classes.get_or_init(|| {
            ["2xx", "4xx", "5xx"].map(|c| {
                self.transactions
                    .get_or_create(&vec![("class", c.to_string())])
                    .clone()
            })
        });
        let i = match code {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        counters[i].inc();
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// What a scrape reads from the running proxy.
#[derive(Clone)]
struct Live {
    policy: Arc<Policy>,
    relay: Arc<Relay>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

#[derive(Debug)]
struct LiveCollector(Arc<std::sync::Mutex<Option<Live>>>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for LiveCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(live) = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mut verdicts = Vec::new();
        for c in live.policy.counts() {
            for (action, n) in [("observed", c.observed), ("enforced", c.enforced)] {
                let l: Labels = vec![
                    ("check", c.check.name().to_string()),
                    ("action", action.to_string()),
                ];
                verdicts.push((l, n));
            }
        }
        counter(
            &mut enc,
            "policy_verdicts",
            "Policy verdicts by check: enforced, or only observed (observe mode)",
            &verdicts,
        )?;
        counter(
            &mut enc,
            "trace_spans_dropped",
            "Spans dropped because the OTLP export queue was full (collector slow or down)",
            &[(vec![], crate::telemetry::dropped_spans())],
        )?;
        counter(
            &mut enc,
            "trace_spans_failed",
            "Spans that left the export queue but did not reach the collector (no connection, an error, no answer within 10 s, or rejected by it)",
            &[(vec![], crate::otlp_traces::failed_spans())],
        )?;
        counter(
            &mut enc,
            "log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough (the log queue was full)",
            &[(vec![], crate::telemetry::dropped_log_lines())],
        )?;
        counter(
            &mut enc,
            "ratelimit_overflow",
            "Rate-limit checks passed unstored because a limiter map was full",
            &[(vec![], live.policy.limits().overflow())],
        )?;
        if let Some(r) = live.policy.limits().redis_status() {
            counter(
                &mut enc,
                "redis_calls",
                "Redis round trips answered for the shared rate limits (each carries the updates of many keys)",
                &[(vec![], r.calls)],
            )?;
            let failures: Vec<(Labels, u64)> = r
                .failures
                .iter()
                .map(|(why, n)| (vec![("reason", why.name().to_string())], *n))
                .collect();
            counter(
                &mut enc,
                "redis_failures",
                "Redis calls that failed or timed out (probes included), and updates not sent because the queue was full",
                &failures,
            )?;
            counter(
                &mut enc,
                "redis_outages",
                "Times the shared rate limits went from working to degraded (Redis unreachable)",
                &[(vec![], r.outages)],
            )?;
            counter(
                &mut enc,
                "redis_fallback_checks",
                "Rate-limit checks decided by on_failure because Redis was unreachable",
                &[(vec![], r.fallback_checks)],
            )?;
            gauge(
                &mut enc,
                "redis_degraded",
                "1 while Redis is unreachable and the shared rate limits follow on_failure",
                &[(vec![], i64::from(r.degraded))],
            )?;
        }
        if let Some(dns) = live.policy.dns() {
            let s = dns.stats();
            let mut rows = Vec::new();
            for (cache, hits, misses) in [
                ("rdns", s.rdns_hits, s.rdns_misses),
                ("dnsbl", s.dnsbl_hits, s.dnsbl_misses),
                ("helo", s.helo_hits, s.helo_misses),
            ] {
                for (result, n) in [("hit", hits), ("miss", misses)] {
                    let l: Labels = vec![("cache", cache.into()), ("result", result.into())];
                    rows.push((l, n));
                }
            }
            counter(
                &mut enc,
                "dns_cache_lookups",
                "DNS verdict cache lookups by cache and result (a miss queries DNS)",
                &rows,
            )?;
            let lat = dns.latencies();
            let mut m = enc.encode_descriptor(
                "dns_lookup_duration",
                "Time of the DNS lookups behind cache misses, by cache",
                Some(&Unit::Seconds),
                lat[0].1.metric_type(),
            )?;
            for (cache, h) in lat {
                let l: Labels = vec![("cache", cache.into())];
                h.encode(m.encode_family(&l)?)?;
            }
        }
        let pools = live.relay.pool_stats();
        let mut conns = Vec::new();
        let mut up = Vec::new();
        let mut waiting = Vec::new();
        for p in &pools {
            for (state, n) in [("idle", p.idle), ("in_use", p.in_use)] {
                let l: Labels = vec![("backend", p.addr.clone()), ("state", state.into())];
                conns.push((l, n as i64));
            }
            up.push((vec![("backend", p.addr.clone())], p.up as i64));
            waiting.push((vec![("backend", p.addr.clone())], p.waiting as i64));
        }
        gauge(
            &mut enc,
            "backend_connections",
            "Pooled backend connections by state",
            &conns,
        )?;
        gauge(
            &mut enc,
            "backend_waiting",
            "Transactions waiting in line for a backend connection",
            &waiting,
        )?;
        gauge(
            &mut enc,
            "backend_up",
            "1 when the backend is in rotation, 0 while marked down",
            &up,
        )?;
        Ok(())
    }
}
