//! Micro-benchmarks of the admission policy's hot paths: the limiters
//! (global cap, concurrency counters, keyed GCRA rates). One function per
//! group; add further groups (e.g. DNS cache hits) as their own function
//! and list them in `criterion_group!` below.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smtp_edge::policy::limits::Limits;
use smtp_edge::policy::settings::{Action, ConcurrencyConfig, LimitsConfig, Rate, RateConfig};

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
    }
}

fn limiters(c: &mut Criterion) {
    let limits = Limits::new(&LimitsConfig {
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

criterion_group!(benches, limiters);
criterion_main!(benches);
