//! Prometheus metrics that others write into: the counters and histograms
//! updated where things happen (accept loop, session, pool). Owns the
//! prometheus-client registry (prefix `smtp_edge`) and its text encoding.
//!
//! Who writes what: the accept loop (`server`) counts accepted and refused
//! connections and PROXY headers and times sessions; `Shared::serve_tls`
//! counts handshakes (and resumed ones); `Session::message_done` counts
//! final replies by class, messages, bytes, recipients and transaction
//! time; each pool holds its `BackendMetrics` (connections created, reused
//! and failed, the pool wait, the final-reply latency). What every message
//! or session writes is `sharded` (a cache line per core); the rest is
//! prometheus-client's own types. One `Metrics` per
//! `Server`, not a global: tests run several proxies in one process and
//! read exact values.
//!
//! It knows none of the subsystems: the values read at scrape time from
//! the live objects (policy verdicts, DNS caches, rate limiters, Redis,
//! pools) are `server::live_stats`, encoded after this registry; the HTTP
//! endpoint is `server::admin`. Labels are bounded by construction: check
//! names, reply classes, TLS versions and configured backend addresses,
//! never a client address, domain or envelope address.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::sharded::{self, Histogram};

/// A metric's labels: bounded names and values.
pub type Labels = Vec<(&'static str, String)>;

fn histogram() -> Histogram {
    Histogram::new(sharded::latency_bounds())
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
    pub reused: sharded::Counter,
    /// Failed connects or greetings.
    pub connect_failures: Counter,
    /// Time a transaction waited for a connection (checkouts that waited
    /// in line, and those served at once).
    pub pool_wait: Histogram,
    /// Backend's final reply after the message's final dot.
    pub reply: Histogram,
    /// TLS handshakes with the backend that succeeded.
    pub tls_handshakes: Counter,
    /// Of those, the ones that resumed a session.
    pub tls_resumed: Counter,
    /// TLS failures by reason (the family, and this backend's label).
    tls_failures: Family<Labels, Counter>,
    addr: String,
    group: String,
}

impl BackendMetrics {
    /// A TLS failure with the backend; `reason` is one of a fixed few
    /// (not_offered, refused, certificate, handshake, timeout).
    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_failures
            .get_or_create(&vec![
                ("backend", self.addr.clone()),
                ("group", self.group.clone()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }
}

/// Everything the proxy counts. Cheap to clone pieces out of (each metric
/// is reference counted); one per server.
#[derive(Debug)]
pub struct Metrics {
    pub connections_accepted: sharded::Counter,
    /// Connections each core's accept loops took (thread-per-core: how
    /// evenly `SO_REUSEPORT` spreads them; one core otherwise).
    pub core_connections: Family<Labels, Counter>,
    pub connections_refused: Family<Labels, Counter>,
    pub proxy_headers: Family<Labels, Counter>,
    pub sessions_active: sharded::Gauge,
    pub session_duration: Histogram,
    pub tls_handshakes: Family<Labels, Counter>,
    /// Successful handshakes that resumed a session (ticket or cache).
    pub tls_resumed: Counter,
    pub transactions: Family<Labels, sharded::Counter>,
    transaction_classes: std::sync::OnceLock<[sharded::Counter; 3]>,
    pub transaction_duration: Histogram,
    pub messages_relayed: sharded::Counter,
    pub bytes_relayed: sharded::Counter,
    pub recipients: sharded::Counter,
    /// RCPTs answered from the edge's memory of unknown recipients.
    pub recipients_unknown_cached: Counter,
    route_refusals: Family<Labels, Counter>,
    pub draining: Gauge,
    backend_created: Family<Labels, Counter>,
    backend_reused: Family<Labels, sharded::Counter>,
    backend_failures: Family<Labels, Counter>,
    backend_pool_wait: Family<Labels, Histogram>,
    backend_reply: Family<Labels, Histogram>,
    backend_tls: Family<Labels, Counter>,
    backend_tls_resumed: Family<Labels, Counter>,
    backend_tls_failures: Family<Labels, Counter>,
    registry: Registry,
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
            connections_accepted: sharded::Counter::default(),
            core_connections: Family::default(),
            connections_refused: Family::default(),
            proxy_headers: Family::default(),
            sessions_active: sharded::Gauge::default(),
            session_duration: histogram(),
            tls_handshakes: Family::default(),
            tls_resumed: Counter::default(),
            transactions: Family::default(),
            transaction_classes: std::sync::OnceLock::new(),
            transaction_duration: histogram(),
            messages_relayed: sharded::Counter::default(),
            bytes_relayed: sharded::Counter::default(),
            recipients: sharded::Counter::default(),
            recipients_unknown_cached: Counter::default(),
            route_refusals: Family::default(),
            draining: Gauge::default(),
            backend_created: Family::default(),
            backend_reused: Family::default(),
            backend_failures: Family::default(),
            backend_pool_wait: histograms(),
            backend_reply: histograms(),
            backend_tls: Family::default(),
            backend_tls_resumed: Family::default(),
            backend_tls_failures: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "connections_accepted",
            "Client connections admitted (a session started)",
            m.connections_accepted.clone(),
        );
        r.register(
            "core_connections",
            "Client connections accepted by each core's listening sockets (before admission)",
            m.core_connections.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections refused at accept, by policy check",
            m.connections_refused.clone(),
        );
        r.register(
            "proxy_headers",
            "Connections on PROXY protocol listeners by header outcome: accepted, local (v2 LOCAL / v1 UNKNOWN: a health check, served as a session of the balancer's own address), or why closed before a greeting (untrusted, timeout, malformed, too_long, unsupported, closed, busy)",
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
            "recipients_unknown_cached",
            "RCPTs the edge refused itself because a backend refused that recipient as unknown a short while ago ([policy.recipients] cache_unknown)",
            m.recipients_unknown_cached.clone(),
        );
        r.register(
            "route_refusals",
            "Recipients the edge refused by its [[route]]s, by reason: no_route (550 5.7.1, no route takes the domain), other_route (452 4.5.3, the transaction is on another route), size (552 5.3.4, SIZE above the route's backends' limit)",
            m.route_refusals.clone(),
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
        r.register(
            "backend_tls_handshakes",
            "TLS handshakes with backends that succeeded (new backend connections with tls set)",
            m.backend_tls.clone(),
        );
        r.register(
            "backend_tls_resumed",
            "Backend TLS handshakes that resumed a session; part of backend_tls_handshakes",
            m.backend_tls_resumed.clone(),
        );
        r.register(
            "backend_tls_failures",
            "Backend connections that failed TLS, by reason: not_offered (no STARTTLS where required), refused (STARTTLS answered with other than 220), certificate (untrusted, wrong name, expired), handshake, timeout",
            m.backend_tls_failures.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The metrics of the backend at `addr` (created on first use).
    pub fn backend(&self, addr: &str, group: &str) -> BackendMetrics {
        let l: Labels = vec![("backend", addr.to_string()), ("group", group.to_string())];
        BackendMetrics {
            created: self.backend_created.get_or_create(&l).clone(),
            reused: self.backend_reused.get_or_create(&l).clone(),
            connect_failures: self.backend_failures.get_or_create(&l).clone(),
            pool_wait: self.backend_pool_wait.get_or_create(&l).clone(),
            reply: self.backend_reply.get_or_create(&l).clone(),
            tls_handshakes: self.backend_tls.get_or_create(&l).clone(),
            tls_resumed: self.backend_tls_resumed.get_or_create(&l).clone(),
            tls_failures: self.backend_tls_failures.clone(),
            addr: addr.to_string(),
            group: group.to_string(),
        }
    }

    /// A recipient refused by routing (`reason`: no_route, other_route,
    /// size).
    pub fn route_refusal(&self, reason: &'static str) {
        self.route_refusals
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// A connection refused at accept by `check`.
    pub fn refused(&self, check: &'static str) {
        self.connections_refused
            .get_or_create(&vec![("reason", check.to_string())])
            .inc();
    }

    /// The counter of connections core `k` accepts (taken once per
    /// accept loop).
    pub fn core(&self, k: usize) -> Counter {
        self.core_connections
            .get_or_create(&vec![("core", k.to_string())])
            .clone()
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

    /// The Prometheus text exposition (format 0.0.4) of what is counted
    /// here.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        self.encode_into(&mut out);
        out
    }

    /// Appends the exposition of this registry to `out` (another registry's
    /// may follow: the format has no end marker).
    pub fn encode_into(&self, out: &mut String) {
        let _ = prometheus_client::encoding::prometheus_text::encode(out, &self.registry);
    }
}
