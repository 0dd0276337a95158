//! `policy::dns` against the in-process test DNS server: rDNS outcomes,
//! caching, single-flight, TTLs, DNSBL scoring and HELO resolution.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::{TestDns, SOA_MINIMUM, STANDARD_TTL};
use smtp_edge::policy::dns::{Dns, DnsStats, Rdns, Resolves};
use smtp_edge::policy::settings::{DnsConfig, DnsblConfig, DnsblZone, RdnsConfig};

/// Query timeout for the silent-server cases.
const TIMEOUT: f64 = 0.3;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn dns_cfg(addr: SocketAddr) -> DnsConfig {
    DnsConfig {
        nameservers: vec![addr],
        timeout: TIMEOUT,
        attempts: 1,
        cache_size: 10_000,
        min_ttl: 0.0,
        max_ttl: 86_400.0,
        negative_ttl: 300.0,
    }
}

fn zone(name: &str, weight: i32, codes: &[&str]) -> DnsblZone {
    DnsblZone {
        name: name.into(),
        weight,
        codes: codes.iter().map(|c| c.to_string()).collect(),
    }
}

fn dnsbl_cfg(zones: Vec<DnsblZone>) -> DnsblConfig {
    DnsblConfig {
        zones,
        ..DnsblConfig::default()
    }
}

fn build(cfg: &DnsConfig, zones: Vec<DnsblZone>) -> Arc<Dns> {
    Dns::new(cfg, &RdnsConfig::default(), &dnsbl_cfg(zones)).expect("Dns::new")
}

fn pass(name: &str) -> Rdns {
    Rdns::Pass(Arc::from(name))
}

fn mismatch(name: &str) -> Rdns {
    Rdns::Mismatch(Arc::from(name))
}

/// `ttl` is within a second below `secs`.
fn about(ttl: Option<Duration>, secs: u64) -> bool {
    let Some(t) = ttl else { return false };
    t <= Duration::from_secs(secs) && t + Duration::from_secs(1) >= Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_outcomes() {
    let srv = TestDns::standard().await;
    let dns = build(&dns_cfg(srv.addr), vec![]);
    let start = Instant::now();
    let (p, n, m, sf, to) = tokio::join!(
        dns.rdns(ip("127.0.0.2")),
        dns.rdns(ip("127.0.0.3")),
        dns.rdns(ip("127.0.0.4")),
        dns.rdns(ip("127.0.0.5")),
        dns.rdns(ip("127.0.0.6")),
    );
    let took = start.elapsed();
    assert_eq!(p, pass("good.example.test"));
    assert_eq!(n, Rdns::NoPtr);
    assert_eq!(m, mismatch("mismatch.example.test"));
    assert_eq!(sf, Rdns::TempError);
    assert_eq!(to, Rdns::TempError);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // attempts = 1: one query each, also for the failures.
    assert_eq!(srv.queries("5.0.0.127.in-addr.arpa", "PTR"), 1);
    assert_eq!(srv.queries("6.0.0.127.in-addr.arpa", "PTR"), 1);
    assert_eq!(srv.queries("good.example.test", "A"), 1);
    assert_eq!(srv.queries("mismatch.example.test", "A"), 1);

    // Cache lifetimes: record TTLs, the SOA negative TTL, the temp-error cap.
    assert!(about(
        dns.rdns_cache_ttl(ip("127.0.0.2")).await,
        STANDARD_TTL.into()
    ));
    assert!(about(
        dns.rdns_cache_ttl(ip("127.0.0.3")).await,
        SOA_MINIMUM.into()
    ));
    assert!(about(
        dns.rdns_cache_ttl(ip("127.0.0.4")).await,
        STANDARD_TTL.into()
    ));
    assert!(about(dns.rdns_cache_ttl(ip("127.0.0.5")).await, 30));
    assert!(about(dns.rdns_cache_ttl(ip("127.0.0.6")).await, 30));
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_attempts_retry_servfail() {
    let srv = TestDns::standard().await;
    let mut cfg = dns_cfg(srv.addr);
    cfg.attempts = 3;
    let dns = build(&cfg, vec![]);
    assert_eq!(dns.rdns(ip("127.0.0.5")).await, Rdns::TempError);
    assert_eq!(srv.queries("5.0.0.127.in-addr.arpa", "PTR"), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_is_cached() {
    let srv = TestDns::standard().await;
    let dns = build(&dns_cfg(srv.addr), vec![]);
    assert_eq!(dns.rdns(ip("127.0.0.2")).await, pass("good.example.test"));
    let before = dns.stats();
    assert_eq!(before.rdns_misses, 1);
    assert_eq!(before.rdns_hits, 0);
    // IPv4-mapped IPv6 is the same client.
    assert_eq!(dns.rdns(ip("127.0.0.2")).await, pass("good.example.test"));
    assert_eq!(
        dns.rdns(ip("::ffff:127.0.0.2")).await,
        pass("good.example.test")
    );
    assert_eq!(srv.queries("2.0.0.127.in-addr.arpa", "PTR"), 1);
    assert_eq!(srv.queries("good.example.test", "A"), 1);
    assert_eq!(
        dns.stats(),
        DnsStats {
            rdns_hits: 2,
            rdns_misses: 1,
            ..DnsStats::default()
        }
    );
    // Negative answers are cached too.
    assert_eq!(dns.rdns(ip("127.0.0.3")).await, Rdns::NoPtr);
    assert_eq!(dns.rdns(ip("127.0.0.3")).await, Rdns::NoPtr);
    assert_eq!(srv.queries("3.0.0.127.in-addr.arpa", "PTR"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_single_flight() {
    let srv = TestDns::standard().await;
    let dns = build(&dns_cfg(srv.addr), vec![]);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let dns = dns.clone();
            tokio::spawn(async move { dns.rdns(ip("127.0.0.7")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), pass("good7.example.test"));
    }
    assert_eq!(srv.queries("7.0.0.127.in-addr.arpa", "PTR"), 1);
    assert_eq!(srv.queries("good7.example.test", "A"), 1);
    assert_eq!(srv.total_queries(), 2);
    let s = dns.stats();
    assert_eq!((s.rdns_misses, s.rdns_hits), (1, 999));
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_clamped_to_max_and_min() {
    let srv = TestDns::standard().await;
    let mut cfg = dns_cfg(srv.addr);
    cfg.max_ttl = 1.0;
    let dns = build(&cfg, vec![]);
    assert_eq!(dns.rdns(ip("127.0.0.2")).await, pass("good.example.test"));
    assert!(dns.rdns_cache_ttl(ip("127.0.0.2")).await.unwrap() <= Duration::from_secs(1));
    assert_eq!(dns.rdns(ip("127.0.0.2")).await, pass("good.example.test"));
    assert_eq!(srv.queries("2.0.0.127.in-addr.arpa", "PTR"), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(dns.rdns(ip("127.0.0.2")).await, pass("good.example.test"));
    assert_eq!(srv.queries("2.0.0.127.in-addr.arpa", "PTR"), 2);
    assert_eq!(dns.stats().rdns_misses, 2);

    // min_ttl lifts short lifetimes (SOA minimum 60 → 600).
    let mut cfg = dns_cfg(srv.addr);
    cfg.min_ttl = 600.0;
    let dns = build(&cfg, vec![]);
    assert_eq!(dns.rdns(ip("127.0.0.3")).await, Rdns::NoPtr);
    assert!(about(dns.rdns_cache_ttl(ip("127.0.0.3")).await, 600));
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_forward_confirmation_details() {
    let srv = TestDns::start(
        &[
            // Three names, only the third confirms.
            ("10.0.0.127.in-addr.arpa", "PTR", "a.multi.test", 300),
            ("10.0.0.127.in-addr.arpa", "PTR", "b.multi.test", 300),
            ("10.0.0.127.in-addr.arpa", "PTR", "c.multi.test", 300),
            ("a.multi.test", "A", "127.0.0.1", 300),
            ("c.multi.test", "A", "127.0.0.10", 120),
            // The forward lookup fails temporarily.
            ("11.0.0.127.in-addr.arpa", "PTR", "sf.multi.test", 300),
            // One name fails temporarily, another confirms.
            ("12.0.0.127.in-addr.arpa", "PTR", "sf.multi.test", 300),
            ("12.0.0.127.in-addr.arpa", "PTR", "ok12.multi.test", 300),
            ("ok12.multi.test", "A", "127.0.0.12", 300),
            // Upper case and IPv6.
            ("13.0.0.127.in-addr.arpa", "PTR", "UPPER.Multi.TEST", 300),
            ("upper.multi.test", "A", "127.0.0.13", 300),
            (
                "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
                "PTR",
                "v6.multi.test",
                300,
            ),
            ("v6.multi.test", "AAAA", "2001:db8::25", 300),
            ("v6.multi.test", "A", "127.0.0.25", 300),
        ],
        &["sf.multi.test"],
        &[],
    )
    .await;
    let cfg = dns_cfg(srv.addr);
    let two = build(&cfg, vec![]);
    let three = Dns::new(
        &cfg,
        &RdnsConfig {
            max_names: 3,
            ..RdnsConfig::default()
        },
        &DnsblConfig::default(),
    )
    .unwrap();
    assert_eq!(two.rdns(ip("127.0.0.10")).await, mismatch("a.multi.test"));
    assert_eq!(srv.queries("c.multi.test", "A"), 0, "max_names = 2");
    assert_eq!(three.rdns(ip("127.0.0.10")).await, pass("c.multi.test"));
    assert!(about(three.rdns_cache_ttl(ip("127.0.0.10")).await, 120));
    assert_eq!(two.rdns(ip("127.0.0.11")).await, Rdns::TempError);
    assert_eq!(two.rdns(ip("127.0.0.12")).await, pass("ok12.multi.test"));
    assert_eq!(two.rdns(ip("127.0.0.13")).await, pass("upper.multi.test"));
    assert_eq!(two.rdns(ip("2001:db8::25")).await, pass("v6.multi.test"));
    assert_eq!(srv.queries("v6.multi.test", "A"), 0, "AAAA for IPv6");
    assert_eq!(two.rdns(ip("2001:db8::26")).await, Rdns::NoPtr);
}

#[tokio::test(flavor = "multi_thread")]
async fn dnsbl_scores() {
    let srv = TestDns::standard().await;
    let dns = build(
        &dns_cfg(srv.addr),
        vec![
            zone("bl.test", 2, &["127.0.0.2..127.0.0.11"]),
            zone("bl2.test.", 1, &[]),
            zone("wl.test", -5, &["127.0.0.5"]),
        ],
    );
    let r = dns.dnsbl(ip("127.0.0.7")).await;
    assert_eq!(r.score, 3);
    assert_eq!(
        r.listed,
        vec![
            (Arc::from("bl.test"), "127.0.0.2".parse().unwrap()),
            (Arc::from("bl2.test"), "127.0.0.10".parse().unwrap()),
        ]
    );
    let r = dns.dnsbl(ip("127.0.0.9")).await;
    assert_eq!(r.score, 0, "127.0.0.200 is outside the filter");
    assert!(r.listed.is_empty());
    let r = dns.dnsbl(ip("127.0.0.8")).await;
    assert_eq!(r.score, -5);
    assert_eq!(
        r.listed,
        vec![(Arc::from("wl.test"), "127.0.0.5".parse().unwrap())]
    );
    assert_eq!(dns.dnsbl(ip("127.0.0.2")).await.score, 0);
    assert_eq!(dns.stats().dnsbl_misses, 12);

    // Cached per zone and address, with the answers' lifetimes.
    let total = srv.total_queries();
    assert_eq!(dns.dnsbl(ip("127.0.0.7")).await.score, 3);
    assert_eq!(srv.total_queries(), total);
    assert_eq!(dns.stats().dnsbl_hits, 3);
    assert_eq!(srv.queries("7.0.0.127.bl.test", "A"), 1);
    assert!(about(
        dns.dnsbl_cache_ttl(0, ip("127.0.0.7")).await,
        STANDARD_TTL.into()
    ));
    assert!(about(
        dns.dnsbl_cache_ttl(2, ip("127.0.0.7")).await,
        SOA_MINIMUM.into()
    ));

    // Without a filter any answer counts.
    let any = build(&dns_cfg(srv.addr), vec![zone("bl.test", 1, &[])]);
    let r = any.dnsbl(ip("127.0.0.9")).await;
    assert_eq!(r.score, 1);
    assert_eq!(
        r.listed,
        vec![(Arc::from("bl.test"), "127.0.0.200".parse().unwrap())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dnsbl_zones_in_parallel() {
    let srv = TestDns::standard().await;
    // Two zones that never answer (both under slow.test) and a real one.
    let dns = build(
        &dns_cfg(srv.addr),
        vec![
            zone("a.slow.test", 10, &[]),
            zone("bl.test", 2, &[]),
            zone("b.slow.test", 10, &[]),
        ],
    );
    let start = Instant::now();
    let r = dns.dnsbl(ip("127.0.0.7")).await;
    let took = start.elapsed();
    assert_eq!(r.score, 2, "timeouts count as not listed");
    assert!(
        took < Duration::from_secs_f64(TIMEOUT * 1.8),
        "zones were not queried in parallel: {took:?}"
    );
    assert_eq!(srv.queries("7.0.0.127.a.slow.test", "A"), 1);
    assert_eq!(srv.queries("7.0.0.127.b.slow.test", "A"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn dnsbl_ipv6() {
    let srv = TestDns::start(
        &[(
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl6.test",
            "A",
            "127.0.0.4",
            300,
        )],
        &[],
        &[],
    )
    .await;
    let dns = build(&dns_cfg(srv.addr), vec![zone("bl6.test", 4, &[])]);
    assert_eq!(dns.dnsbl(ip("2001:db8::1")).await.score, 4);
    assert_eq!(dns.dnsbl(ip("2001:db8::2")).await.score, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn helo_names() {
    let srv = TestDns::standard().await;
    let dns = build(&dns_cfg(srv.addr), vec![]);
    assert_eq!(dns.helo_resolves("mail.example.test").await, Resolves::Yes);
    assert_eq!(
        dns.helo_resolves("mx-only.example.test").await,
        Resolves::Yes
    );
    assert_eq!(dns.helo_resolves("nohost.example.test").await, Resolves::No);
    assert_eq!(
        dns.helo_resolves("servfail.example.test").await,
        Resolves::TempError
    );
    assert!(about(
        dns.helo_cache_ttl("nohost.example.test").await,
        SOA_MINIMUM.into()
    ));
    // Trailing dot and case select the same cached entry; no search domains.
    assert_eq!(dns.helo_resolves("MAIL.Example.Test.").await, Resolves::Yes);
    assert_eq!(
        dns.stats(),
        DnsStats {
            helo_hits: 1,
            helo_misses: 4,
            ..DnsStats::default()
        }
    );
    assert_eq!(srv.queries("mail.example.test", "A"), 1);
    assert_eq!(srv.queries("mx-only.example.test", "MX"), 1);
    // What cannot be a DNS name is "No" without a query.
    let before = srv.total_queries();
    for bad in ["", ".", "a..b", ".example.test"] {
        assert_eq!(dns.helo_resolves(bad).await, Resolves::No, "{bad:?}");
    }
    assert_eq!(srv.total_queries(), before);
}
