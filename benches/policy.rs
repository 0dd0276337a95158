//! Micro-benchmarks of the admission policy's hot paths: the limiters
//! (global cap, concurrency counters, keyed GCRA rates), the DNS verdict
//! caches on a hit, `Policy::admit` (also behind 10 000 bans), and what a
//! session costs the `/top` view. One function per group; add further
//! groups as their own function and list them in `criterion_group!` below.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smtp_edge::policy::dns::{Dns, Rdns};
use smtp_edge::policy::limits::Limiters;
use smtp_edge::policy::settings::{
    Action, ConcurrencyConfig, DnsConfig, DnsblConfig, DnsblZone, LimitsConfig, PolicyConfig, Rate,
    RateConfig, RdnsConfig,
};
use smtp_edge::policy::Policy;

/// The tests' in-process DNS server (hickory-server), see its docs.
#[allow(dead_code)]
#[path = "../tests/common/dns.rs"]
mod test_dns;

// ---------------------------------------------------------------------------
// Limiters
// ---------------------------------------------------------------------------

/// Per-IP and per-prefix rates high enough that every check is allowed (the
/// allow path, which updates the state, is the costlier one).
fn generous() -> RateConfig {
    let rate = Some(Rate {
        count: 1_000_000_000,
        period: 1.0,
        burst: None,
    });
    RateConfig {
        action: Action::Defer,
        per_ip: rate,
        per_prefix: rate,
        ..RateConfig::default()
    }
}

fn limiters(c: &mut Criterion) {
    let limits = Limiters::new(&LimitsConfig {
        max_connections: 10_000,
        concurrency: ConcurrencyConfig {
            action: Action::Defer,
            per_ip: 100,
            per_prefix: 1_000,
        },
        connection_rate: generous(),
        message_rate: generous(),
        ..LimitsConfig::default()
    });
    let hot = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let keys: Vec<IpAddr> = (0..10_000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7)))
        .collect();

    let mut g = c.benchmark_group("limits");
    g.throughput(Throughput::Elements(1));
    g.bench_function("message_hot_key", |b| {
        b.iter(|| black_box(limits.message(black_box(hot))))
    });
    let mut i = 0;
    g.bench_function("message_rotating_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(limits.message(black_box(keys[i])))
        })
    });
    g.bench_function("connect_drop", |b| {
        b.iter(|| {
            let (permit, hit) = limits.connect(black_box(hot));
            drop(black_box(permit));
            hit
        })
    });
    g.bench_function("try_global_drop", |b| {
        b.iter(|| {
            let permit = limits.try_global();
            black_box(permit.is_some())
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// DNS verdict caches
// ---------------------------------------------------------------------------

/// `Dns::rdns` and `Dns::dnsbl` answered from their caches, which were
/// filled once from real answers of the in-process test DNS server. Each
/// sample runs all its lookups inside one `block_on`, so the figure is the
/// cost of one cached lookup (moka get, clone of the verdict), not of
/// entering the runtime.
fn dns_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = rt.block_on(test_dns::TestDns::standard());
    let zone = |name: &str| DnsblZone {
        name: name.into(),
        weight: 1,
        codes: Vec::new(),
    };
    let dns = rt.block_on(async {
        Dns::new(
            &DnsConfig {
                nameservers: vec![server.addr],
                timeout: 2.0,
                attempts: 1,
                ..DnsConfig::default()
            },
            &RdnsConfig::default(),
            &DnsblConfig {
                action: Action::Reject,
                zones: vec![zone("bl.test"), zone("bl2.test"), zone("wl.test")],
                ..DnsblConfig::default()
            },
        )
        .expect("Dns::new")
    });
    // 127.0.0.2 has a forward-confirmed PTR; 127.0.0.7 is listed in
    // bl.test and bl2.test (see TestDns::standard).
    let good = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let listed = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
    let (rdns, bl) = rt.block_on(async { (dns.rdns(good).await, dns.dnsbl(listed).await) });
    assert_eq!(rdns, Rdns::Pass(Arc::from("good.example.test")));
    assert_eq!(bl.score, 2, "DNSBL warm-up answer: {bl:?}");
    let queries = server.total_queries();
    assert!(queries >= 5, "the caches were not filled from DNS");

    let mut g = c.benchmark_group("dns_cache");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rdns_hit", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    black_box(dns.rdns(black_box(good)).await);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("dnsbl_hit_3_zones", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    black_box(dns.dnsbl(black_box(listed)).await);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    assert_eq!(server.total_queries(), queries, "a lookup missed the cache");
    let s = dns.stats();
    assert_eq!((s.rdns_misses, s.dnsbl_misses), (1, 3), "{s:?}");
}

// ---------------------------------------------------------------------------
// Admission
// ---------------------------------------------------------------------------

/// `Policy::admit` + drop of the `ClientPolicy` (which releases its slots):
/// the default policy (global cap only, no DNS), and one with per-IP
/// concurrency and a connection rate that always allows. Inside the runtime
/// context since `admit` may spawn lookups.
fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _guard = rt.enter();
    let default = Policy::new(&PolicyConfig::default(), "edge.test").expect("policy");
    let limited = Policy::new(
        &PolicyConfig {
            limits: LimitsConfig {
                concurrency: ConcurrencyConfig {
                    action: Action::Reject,
                    per_ip: 100,
                    per_prefix: 1_000,
                },
                connection_rate: generous(),
                ..LimitsConfig::default()
            },
            ..PolicyConfig::default()
        },
        "edge.test",
    )
    .expect("policy");
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    let mut g = c.benchmark_group("admit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("default_admit_drop", |b| {
        b.iter(|| {
            let client = default.admit(black_box(ip));
            black_box(client.is_ok())
        })
    });
    g.bench_function("limits_admit_drop", |b| {
        b.iter(|| {
            let client = limited.admit(black_box(ip));
            black_box(client.is_ok())
        })
    });
    let banned = Policy::new(&PolicyConfig::default(), "edge.test").expect("policy");
    for i in 0..10_000u32 {
        let net = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)).into();
        let ttl = std::time::Duration::from_secs(3600);
        let src = smtp_edge::policy::bans::Source::Admin;
        banned.bans().add(net, ttl, src, "bench").expect("ban");
    }
    banned
        .bans()
        .add(
            "198.51.100.0/24".parse().unwrap(),
            std::time::Duration::from_secs(3600),
            smtp_edge::policy::bans::Source::Admin,
            "a /24",
        )
        .expect("ban");
    g.bench_function("admit_drop_10k_bans", |b| {
        b.iter(|| {
            let client = banned.admit(black_box(ip));
            black_box(client.is_ok())
        })
    });
    g.finish();
    assert_eq!(
        default.limits().global_in_use(),
        0,
        "a slot was not released"
    );
    assert_eq!(
        limited.limits().global_in_use(),
        0,
        "a slot was not released"
    );
}

// ---------------------------------------------------------------------------
// The /top view
// ---------------------------------------------------------------------------

/// One session as the view sees it: open, a recipient, a message, closed;
/// from one busy address, and from a new address each time (a flood).
fn top_view(c: &mut Criterion) {
    use smtp_edge::telemetry::top::Top;
    let top = Top::new(10_000, 24, 64);
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut g = c.benchmark_group("top");
    g.throughput(Throughput::Elements(1));
    g.bench_function("session_same_address", |b| {
        b.iter(|| {
            let mut open = top.open(black_box(ip));
            open.recipient();
            open.message();
            drop(open);
        })
    });
    let mut n = 0u32;
    g.bench_function("session_new_address", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 | (n & 0x00ff_ffff)));
            let mut open = top.open(black_box(ip));
            open.recipient();
            open.message();
            drop(open);
        })
    });
    g.finish();
}

criterion_group!(benches, limiters, dns_cache, admission, top_view);
criterion_main!(benches);
