//! What `/metrics` reads at scrape time from the running proxy, beside the
//! counters that `telemetry::metrics` keeps: policy verdicts, rate-limiter
//! overflow and the Redis store's health, DNS cache lookups and latencies,
//! pool sizes and backend health, and the telemetry pipeline's own drop
//! counters. The only place that reads every subsystem for metrics (pull,
//! not push): the subsystems just keep their numbers. It reads the current
//! backends through the server's `ArcSwap`, so a reload needs no step here.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::policy::Policy;
use crate::relay::Backends;
use crate::telemetry;
use crate::telemetry::metrics::{Labels, Metrics};

/// The whole `/metrics` exposition: the counters of `Metrics`, then the
/// live values. One per server.
pub struct LiveStats {
    metrics: Arc<Metrics>,
    /// The live values, as a collector of a registry of their own (same
    /// prefix), encoded after `metrics`.
    registry: Registry,
}

impl std::fmt::Debug for LiveStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveStats")
    }
}

impl LiveStats {
    /// Reads `policy` and whatever backends `backends` holds at each scrape.
    pub fn new(
        metrics: Arc<Metrics>,
        policy: Arc<Policy>,
        backends: Arc<ArcSwap<Backends>>,
    ) -> Self {
        let mut registry = Registry::with_prefix("smtp_edge");
        registry.register_collector(Box::new(Live { policy, backends }));
        LiveStats { metrics, registry }
    }

    /// The Prometheus text exposition (format 0.0.4) that `/metrics` serves.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        self.metrics.encode_into(&mut out);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The collector: what a scrape reads.
struct Live {
    policy: Arc<Policy>,
    backends: Arc<ArcSwap<Backends>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

/// The objects of one scrape.
struct Current<'a> {
    policy: &'a Policy,
    backends: Arc<Backends>,
}

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

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = Current {
            policy: &self.policy,
            backends: self.backends.load_full(),
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
            &[(vec![], telemetry::dropped_spans())],
        )?;
        counter(
            &mut enc,
            "trace_spans_failed",
            "Spans that left the export queue but did not reach the collector (no connection, an error, no answer within 10 s, or rejected by it)",
            &[(vec![], telemetry::failed_spans())],
        )?;
        counter(
            &mut enc,
            "log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough (the log queue was full)",
            &[(vec![], telemetry::dropped_log_lines())],
        )?;
        let b = live.policy.bans().stats();
        let by = |f: fn(&(crate::policy::bans::Source, u64, u64, u64, u64)) -> u64| -> Vec<(Labels, u64)> {
            b.by_source
                .iter()
                .map(|r| (vec![("source", r.0.name().to_string())], f(r)))
                .collect()
        };
        let active: Vec<(Labels, i64)> = by(|r| r.1)
            .into_iter()
            .map(|(l, n)| (l, n as i64))
            .collect();
        gauge(
            &mut enc,
            "bans_active",
            "Bans in force, by who added them (admin, unknown_recipients, bad_commands, pregreet)",
            &active,
        )?;
        counter(
            &mut enc,
            "bans_added",
            "Bans added on this instance, by source",
            &by(|r| r.2),
        )?;
        counter(
            &mut enc,
            "bans_expired",
            "Bans that ran out, by source",
            &by(|r| r.3),
        )?;
        counter(
            &mut enc,
            "ban_refusals",
            "Connections refused at accept because the address was banned, by the ban's source",
            &by(|r| r.4),
        )?;
        counter(
            &mut enc,
            "bans_dropped",
            "Automatic bans not added because the list was full ([policy.bans] max_bans)",
            &[(vec![], b.dropped)],
        )?;
        if let Some(up) = b.shared_up {
            gauge(
                &mut enc,
                "bans_store_up",
                "1 while the shared ban list on Redis answers ([policy.bans] store = \"redis\")",
                &[(vec![], i64::from(up))],
            )?;
        }
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
            let (mut errors, mut scoring) = (Vec::new(), Vec::new());
            for (_, zone, h) in dns.zone_healths() {
                let l: Labels = vec![("zone", zone.to_string())];
                errors.push((l.clone(), h.error_answers()));
                scoring.push((l, i64::from(h.in_scoring())));
            }
            if !errors.is_empty() {
                counter(
                    &mut enc,
                    "dnsbl_error_answers",
                    "DNSBL answers in 127.255.255.0/24 (the list refused the query: public resolver, rate limit), never counted as a listing, by zone",
                    &errors,
                )?;
                gauge(
                    &mut enc,
                    "dnsbl_zone_in_scoring",
                    "1 while the zone counts; 0 while a health check found it listing 127.0.0.1 (it would list everyone)",
                    &scoring,
                )?;
            }
        }
        let pools = live.backends.pool_stats();
        let mut conns = Vec::new();
        let mut up = Vec::new();
        let mut waiting = Vec::new();
        for p in &pools {
            let backend =
                || -> Labels { vec![("backend", p.addr.clone()), ("group", p.group.clone())] };
            for (state, n) in [("idle", p.idle), ("in_use", p.in_use)] {
                let mut l = backend();
                l.push(("state", state.into()));
                conns.push((l, n as i64));
            }
            up.push((backend(), p.up as i64));
            waiting.push((backend(), p.waiting as i64));
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
