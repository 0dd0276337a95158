//! Unit tests of the limiter set on the fake clock: global cap,
//! concurrency, rates, key grouping, sweeping and the key bound, reloads
//! that carry state over, and the Redis store's fallback.

use super::*;
use crate::policy::settings::{Action, ConcurrencyConfig};
use std::time::Instant;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rate(count: u32, period: f64, burst: Option<u32>) -> Option<Rate> {
    Some(Rate {
        count,
        period,
        burst,
    })
}

fn rates(per_ip: Option<Rate>, per_prefix: Option<Rate>) -> RateConfig {
    RateConfig {
        action: Action::Defer,
        per_ip,
        per_prefix,
        store: Store::Local,
    }
}

fn conc(per_ip: u32, per_prefix: u32) -> ConcurrencyConfig {
    ConcurrencyConfig {
        action: Action::Reject,
        per_ip,
        per_prefix,
    }
}

fn base() -> LimitsConfig {
    LimitsConfig {
        max_connections: 0,
        ..LimitsConfig::default()
    }
}

fn hit(kind: LimitKind, scope: Scope) -> Option<LimitHit> {
    Some(LimitHit { kind, scope })
}

#[test]
fn global_cap_acquire_release() {
    let l = Limiters::new(&LimitsConfig {
        max_connections: 2,
        ..base()
    });
    let a = l.try_global().unwrap();
    let b = l.try_global().unwrap();
    assert!(l.try_global().is_none());
    assert_eq!(l.global_in_use(), 2);
    drop(a);
    let c = l.try_global().unwrap();
    assert!(l.try_global().is_none());
    drop((b, c));
    assert_eq!(l.global_in_use(), 0);
}

#[test]
fn global_unlimited() {
    let l = Limiters::new(&base());
    let permits: Vec<_> = (0..1000).map(|_| l.try_global().unwrap()).collect();
    assert_eq!(permits.len(), 1000);
    // Counted all the same (for a reload that sets a cap).
    assert_eq!(l.global_in_use(), 1000);
    drop(permits);
    assert_eq!(l.global_in_use(), 0);
}

#[test]
fn concurrency_per_ip_released_on_drop() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(2, 0),
        ..base()
    });
    let a = ip("192.0.2.1");
    let (p1, h1) = l.connect(a);
    let (p2, h2) = l.connect(a);
    let (p3, h3) = l.connect(a);
    assert_eq!((h1, h2), (None, None));
    assert_eq!(h3, hit(LimitKind::Concurrency, Scope::Ip));
    // Another address is counted apart.
    let (p4, h4) = l.connect(ip("192.0.2.2"));
    assert_eq!(h4, None);
    // A rejected session releases its slot too.
    drop(p3);
    let (p5, h5) = l.connect(a);
    assert_eq!(h5, hit(LimitKind::Concurrency, Scope::Ip));
    drop((p1, p5));
    let (p6, h6) = l.connect(a);
    assert_eq!(h6, None);
    drop((p2, p4, p6));
    assert_eq!(l.tracked_keys(), 0);
}

#[test]
fn concurrency_per_prefix() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(5, 3),
        ..base()
    });
    let mut held: Vec<_> = (1..=3)
        .map(|i| {
            let (p, h) = l.connect(ip(&format!("198.51.100.{i}")));
            assert_eq!(h, None);
            p
        })
        .collect();
    let (p, h) = l.connect(ip("198.51.100.200"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
    drop(p);
    // Another /24 is fine.
    let (p, h) = l.connect(ip("198.51.101.1"));
    assert_eq!(h, None);
    held.push(p);
    held.pop();
    held.pop();
    let (p, h) = l.connect(ip("198.51.100.9"));
    assert_eq!(h, None);
    held.push(p);
    assert_eq!(l.tracked_keys(), 4); // 3 IPs + 1 prefix
    held.clear();
    assert_eq!(l.tracked_keys(), 0);
}

#[test]
fn ip_hit_reported_before_prefix() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(1, 1),
        ..base()
    });
    let (_a, h) = l.connect(ip("192.0.2.1"));
    assert_eq!(h, None);
    let (_b, h) = l.connect(ip("192.0.2.1"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    let (_c, h) = l.connect(ip("192.0.2.2"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
}

#[test]
fn prefix_grouping() {
    let l = Limiters::new(&base());
    assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("192.0.2.0"));
    assert_eq!(
        l.prefix_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
        ip("2001:db8:1:2::")
    );
    let l = Limiters::new(&LimitsConfig {
        ipv4_prefix: 0,
        ipv6_prefix: 128,
        ..base()
    });
    assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("0.0.0.0"));
    assert_eq!(l.prefix_of(ip("2001:db8::1")), ip("2001:db8::1"));
    let l = Limiters::new(&LimitsConfig {
        ipv4_prefix: 32,
        ipv6_prefix: 0,
        ..base()
    });
    assert_eq!(l.prefix_of(ip("192.0.2.77")), ip("192.0.2.77"));
    assert_eq!(l.prefix_of(ip("2001:db8::1")), ip("::"));
}

#[test]
fn ipv6_64_grouping() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(0, 2),
        ..base()
    });
    let (_a, h) = l.connect(ip("2001:db8:0:1::1"));
    assert_eq!(h, None);
    let (_b, h) = l.connect(ip("2001:db8:0:1:ffff::2"));
    assert_eq!(h, None);
    let (_c, h) = l.connect(ip("2001:db8:0:1:1234:5678:9abc:def0"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
    let (_d, h) = l.connect(ip("2001:db8:0:2::1"));
    assert_eq!(h, None);
    // Two prefixes counted, no per-IP counters (per_ip = 0).
    assert_eq!(l.tracked_keys(), 2);
}

#[test]
fn ipv4_24_grouping_and_mapped() {
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            concurrency: conc(1, 2),
            message_rate: rates(rate(1, 60.0, None), None),
            ..base()
        },
        FakeRelativeClock::default(),
    );
    let (_a, h) = l.connect(ip("203.0.113.1"));
    assert_eq!(h, None);
    // The mapped form is the same client.
    let (b, h) = l.connect(ip("::ffff:203.0.113.1"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    drop(b);
    let (_c, h) = l.connect(ip("::ffff:203.0.113.250"));
    assert_eq!(h, None);
    let (_d, h) = l.connect(ip("203.0.113.99"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Prefix));
    // Rates share the key too.
    assert_eq!(l.message(ip("203.0.113.1")), None);
    assert_eq!(
        l.message(ip("::ffff:203.0.113.1")),
        hit(LimitKind::MessageRate, Scope::Ip)
    );
}

#[test]
fn rate_per_ip_burst_then_refill() {
    let clock = FakeRelativeClock::default();
    // 2 per 10 s (one cell every 5 s), 3 at once.
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            message_rate: rates(rate(2, 10.0, Some(3)), None),
            ..base()
        },
        clock.clone(),
    );
    let a = ip("192.0.2.1");
    for _ in 0..3 {
        assert_eq!(l.message(a), None);
    }
    assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    assert_eq!(l.message(ip("192.0.2.2")), None);
    clock.advance(Duration::from_millis(4_900));
    assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    clock.advance(Duration::from_millis(100));
    assert_eq!(l.message(a), None);
    assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    clock.advance(Duration::from_secs(15));
    for _ in 0..3 {
        assert_eq!(l.message(a), None);
    }
    assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    // Other kinds are separate (and off here).
    assert_eq!(l.recipient(a), None);
}

#[test]
fn rate_per_prefix_and_kinds() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            recipient_rate: rates(rate(100, 60.0, None), rate(3, 60.0, None)),
            connection_rate: rates(rate(1, 60.0, None), None),
            ..base()
        },
        clock,
    );
    for i in 1..=3 {
        assert_eq!(l.recipient(ip(&format!("192.0.2.{i}"))), None);
    }
    assert_eq!(
        l.recipient(ip("192.0.2.4")),
        hit(LimitKind::RecipientRate, Scope::Prefix)
    );
    assert_eq!(l.recipient(ip("192.0.3.4")), None);
    let (_p, h) = l.connect(ip("192.0.2.1"));
    assert_eq!(h, None);
    let (_p, h) = l.connect(ip("192.0.2.1"));
    assert_eq!(h, hit(LimitKind::ConnectionRate, Scope::Ip));
}

#[test]
fn connection_rate_not_spent_on_concurrency_hit() {
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            concurrency: conc(1, 0),
            connection_rate: rates(rate(2, 60.0, None), None),
            ..base()
        },
        FakeRelativeClock::default(),
    );
    let a = ip("192.0.2.1");
    let (p1, h) = l.connect(a);
    assert_eq!(h, None);
    for _ in 0..5 {
        let (_p, h) = l.connect(a);
        assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    }
    drop(p1);
    let (p2, h) = l.connect(a);
    assert_eq!(h, None); // second cell still there
    drop(p2);
    let (_p3, h) = l.connect(a);
    assert_eq!(h, hit(LimitKind::ConnectionRate, Scope::Ip));
}

#[test]
fn off_keeps_no_state() {
    let r = rate(1, 60.0, None);
    let off = RateConfig {
        action: Action::Off,
        per_ip: r,
        per_prefix: r,
        store: Store::Local,
    };
    let l = Limiters::new(&LimitsConfig {
        concurrency: ConcurrencyConfig {
            action: Action::Off,
            per_ip: 1,
            per_prefix: 1,
        },
        connection_rate: off.clone(),
        message_rate: off.clone(),
        // On, but no values.
        recipient_rate: rates(None, None),
        ..base()
    });
    let a = ip("192.0.2.1");
    let mut held = Vec::new();
    for _ in 0..10 {
        let (p, h) = l.connect(a);
        assert_eq!(h, None);
        held.push(p);
        assert_eq!(l.message(a), None);
        assert_eq!(l.recipient(a), None);
    }
    assert_eq!(l.tracked_keys(), 0);
    assert_eq!(l.rate_limiters().count(), 0);
    assert!(l.concurrency.is_none());
    // Concurrency on with both limits 0 keeps nothing either.
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(0, 0),
        ..base()
    });
    let (_p, h) = l.connect(a);
    assert_eq!(h, None);
    assert_eq!(l.tracked_keys(), 0);
}

#[test]
fn idle_keys_swept() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            message_rate: rates(rate(10, 60.0, None), rate(100, 60.0, None)),
            ..base()
        },
        clock.clone(),
    );
    assert_eq!(l.message(ip("192.0.2.1")), None);
    assert_eq!(l.message(ip("198.51.100.1")), None);
    assert_eq!(l.tracked_keys(), 4);
    l.sweep();
    assert_eq!(l.tracked_keys(), 4); // still within their window
    clock.advance(Duration::from_secs(30));
    assert_eq!(l.message(ip("192.0.2.1")), None);
    clock.advance(Duration::from_secs(5));
    l.sweep();
    // Only 192.0.2.1's per-IP state is still distinguishable from fresh.
    assert_eq!(l.tracked_keys(), 1);
    clock.advance(Duration::from_secs(60));
    l.sweep();
    assert_eq!(l.tracked_keys(), 0);
}

/// 1M distinct addresses: all tracked, then all evicted.
#[test]
fn million_distinct_keys_swept() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            max_tracked_keys: 2_000_000,
            message_rate: rates(rate(10, 60.0, None), rate(10_000, 60.0, None)),
            ..base()
        },
        clock.clone(),
    );
    let t = Instant::now();
    let base_ip = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    for i in 0..1_000_000u32 {
        let a = IpAddr::V4(Ipv4Addr::from(base_ip + i));
        assert_eq!(l.message(a), None);
    }
    let fed = t.elapsed();
    // 1M IPs + 3907 /24s.
    assert_eq!(l.tracked_keys(), 1_000_000 + 3_907);
    assert_eq!(l.overflow(), 0);
    clock.advance(Duration::from_secs(120));
    let t = Instant::now();
    l.sweep();
    assert_eq!(l.tracked_keys(), 0);
    eprintln!("fed 1M keys in {fed:?}, swept in {:?}", t.elapsed());
}

/// A flood of distinct addresses within their window: the per-IP map
/// stays at the bound, new keys pass uncounted, the prefix still limits.
#[test]
fn flood_is_bounded() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            max_tracked_keys: 10_000,
            message_rate: rates(rate(10, 60.0, None), rate(1_000, 60.0, None)),
            ..base()
        },
        clock.clone(),
    );
    let mut prefix_hits = 0;
    for i in 0..100_000u128 {
        // One /64, distinct interface ids.
        let a = IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8u128 << 96) | (i + 1)));
        match l.message(a) {
            None => {}
            Some(h) => {
                assert_eq!(
                    h,
                    LimitHit {
                        kind: LimitKind::MessageRate,
                        scope: Scope::Prefix
                    }
                );
                prefix_hits += 1;
            }
        }
        assert!(l.message_rate.ip.as_ref().unwrap().lim.len() <= 10_000);
        assert!(l.tracked_keys() <= 10_001);
    }
    assert_eq!(prefix_hits, 100_000 - 1_000);
    assert_eq!(l.overflow(), 90_000);
    // Keys already held are still limited per IP.
    let first = IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8u128 << 96) | 1));
    for _ in 0..9 {
        let _ = l.message(first);
    }
    assert_eq!(l.message(first), hit(LimitKind::MessageRate, Scope::Ip));
}

/// A full limiter evicts idle keys from the checking path, at most once
/// a second.
#[test]
fn full_limiter_sweeps_itself() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            max_tracked_keys: 100,
            recipient_rate: rates(rate(1, 1.0, None), None),
            ..base()
        },
        clock.clone(),
    );
    let key = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
    for i in 0..100 {
        assert_eq!(l.recipient(key(i)), None);
    }
    assert_eq!(l.tracked_keys(), 100);
    // Full and all recent: the first check sweeps (nothing to evict)...
    assert_eq!(l.recipient(key(100)), None);
    assert_eq!(l.overflow(), 1);
    // ... and the next sweep waits a second even once keys are idle.
    clock.advance(Duration::from_millis(900));
    assert_eq!(l.recipient(key(101)), None);
    assert_eq!(l.overflow(), 2);
    assert_eq!(l.tracked_keys(), 100);
    clock.advance(Duration::from_millis(1200));
    assert_eq!(l.recipient(key(102)), None);
    assert_eq!(l.overflow(), 2);
    assert_eq!(l.tracked_keys(), 1);
}

/// Many threads connect and drop the same keys: the counters end empty.
#[test]
fn concurrent_connect_drop() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(3, 5),
        ..base()
    });
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..5_000u32 {
                    let a = if i % 3 == 0 {
                        ip("192.0.2.1")
                    } else {
                        IpAddr::V4(Ipv4Addr::new(192, 0, 2, (t * 2 + i % 2) as u8))
                    };
                    held.push(l.connect(a).0);
                    if held.len() > (i as usize % 4) {
                        held.remove(0);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(l.tracked_keys(), 0);
    assert!(l.counts.ips.is_empty() && l.counts.prefixes.is_empty());
}

#[tokio::test]
async fn sweeper_runs_and_stops() {
    let clock = FakeRelativeClock::default();
    let l = Limiters::with_fake_clock(
        &LimitsConfig {
            sweep_interval: 0.01,
            message_rate: rates(rate(1, 1.0, None), None),
            ..base()
        },
        clock.clone(),
    );
    l.spawn_sweeper();
    assert_eq!(l.message(ip("192.0.2.1")), None);
    assert_eq!(l.tracked_keys(), 1);
    clock.advance(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.tracked_keys() != 0 {
        assert!(Instant::now() < deadline, "sweeper did not run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let weak = Arc::downgrade(&l);
    drop(l);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(weak.upgrade().is_none());
}
#[test]
fn reload_carries_the_global_count_with_the_new_cap() {
    // No cap at first: sessions are counted all the same.
    let l = Limiters::new(&base());
    let held: Vec<_> = (0..2).map(|_| l.try_global().unwrap()).collect();
    let capped = l.reload(&LimitsConfig {
        max_connections: 3,
        ..base()
    });
    l.retire();
    let third = capped.try_global().unwrap();
    assert!(capped.try_global().is_none());
    assert_eq!(capped.global_in_use(), 3);
    // Old permits release into the same count.
    drop(held);
    assert_eq!(capped.global_in_use(), 1);
    let lower = capped.reload(&LimitsConfig {
        max_connections: 1,
        ..base()
    });
    assert!(lower.try_global().is_none());
    drop(third);
    assert!(lower.try_global().is_some());
    assert_eq!(lower.global_in_use(), 0);
}

#[test]
fn reload_keeps_concurrency_counts_with_new_thresholds() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(2, 0),
        ..base()
    });
    let a = ip("192.0.2.1");
    let old: Vec<_> = (0..2).map(|_| l.connect(a)).collect();
    assert!(old.iter().all(|(_, h)| h.is_none()));
    let n = l.reload(&LimitsConfig {
        concurrency: conc(3, 4),
        ..base()
    });
    let (kept, fresh) = n.carried_from(&l);
    assert!(kept.contains(&"concurrency.per_ip"), "{kept:?}");
    // The prefix counter was not kept before: it starts now.
    assert_eq!(fresh, vec!["concurrency.per_prefix"]);
    let (p3, h) = n.connect(a);
    assert_eq!(h, None);
    let (p4, h) = n.connect(a);
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    drop(p4);
    // Old permits release into the counter they incremented.
    drop(old);
    assert_eq!(n.tracked_keys(), 2); // 192.0.2.1 and its /24, once each
    drop(p3);
    assert_eq!(n.tracked_keys(), 0);
    assert_eq!(l.tracked_keys(), 0);
}

#[test]
fn reload_with_a_new_prefix_length_keeps_per_ip_counts_only() {
    let l = Limiters::new(&LimitsConfig {
        concurrency: conc(1, 1),
        ..base()
    });
    let (old, _) = l.connect(ip("192.0.2.1"));
    let n = l.reload(&LimitsConfig {
        ipv4_prefix: 16,
        concurrency: conc(1, 1),
        ..base()
    });
    let (_, fresh) = n.carried_from(&l);
    assert_eq!(fresh, vec!["concurrency.per_prefix"]);
    let (_p, h) = n.connect(ip("192.0.2.1"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    drop(_p);
    // Not in the new /16 counter: the old session is not counted there.
    let (_q, h) = n.connect(ip("192.0.3.1"));
    assert_eq!(h, None);
    drop(old);
    drop(_q);
    assert_eq!(n.tracked_keys(), 0);
    assert_eq!(l.tracked_keys(), 0);
}

#[test]
fn reload_turning_concurrency_off_and_on_keeps_counts() {
    let on = LimitsConfig {
        concurrency: conc(1, 0),
        ..base()
    };
    let l = Limiters::new(&on);
    let (held, _) = l.connect(ip("192.0.2.1"));
    let off = l.reload(&base());
    let (p, h) = off.connect(ip("192.0.2.1"));
    assert_eq!(h, None);
    drop(p);
    let again = off.reload(&on);
    let (_p, h) = again.connect(ip("192.0.2.1"));
    assert_eq!(h, hit(LimitKind::Concurrency, Scope::Ip));
    drop((_p, held));
    assert_eq!(again.tracked_keys(), 0);
}

#[test]
fn reload_keeps_unchanged_rate_limiters_only() {
    let clock = FakeRelativeClock::default();
    let cfg = LimitsConfig {
        connection_rate: rates(rate(5, 60.0, None), None),
        message_rate: rates(rate(1, 60.0, None), rate(100, 60.0, None)),
        recipient_rate: rates(rate(1, 60.0, None), None),
        ..base()
    };
    let l = Limiters::with_fake_clock(&cfg, clock.clone());
    let a = ip("192.0.2.1");
    assert_eq!(l.message(a), None);
    assert_eq!(l.recipient(a), None);
    assert_eq!(l.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    let n = l.reload(&LimitsConfig {
        // Same rate, another action: the same limiter.
        message_rate: RateConfig {
            action: Action::Observe,
            ..cfg.message_rate.clone()
        },
        // Another rate: a fresh limiter.
        recipient_rate: rates(rate(2, 60.0, None), None),
        // Turned off: gone.
        connection_rate: RateConfig {
            action: Action::Off,
            ..cfg.connection_rate.clone()
        },
        ..cfg.clone()
    });
    let (kept, fresh) = n.carried_from(&l);
    assert_eq!(
        kept,
        vec!["sessions", "message_rate.per_ip", "message_rate.per_prefix"]
    );
    assert_eq!(fresh, vec!["recipient_rate.per_ip"]);
    assert_eq!(n.message(a), hit(LimitKind::MessageRate, Scope::Ip));
    assert_eq!(n.recipient(a), None);
    // The carried limiter runs on the same clock.
    clock.advance(Duration::from_secs(60));
    assert_eq!(n.message(a), None);
    // A new prefix length drops the per-prefix limiter's state only;
    // a new max_tracked_keys drops them all.
    let p = n.reload(&LimitsConfig {
        ipv4_prefix: 16,
        ..cfg.clone()
    });
    let (kept, _) = p.carried_from(&n);
    assert!(kept.contains(&"message_rate.per_ip"), "{kept:?}");
    assert!(!kept.contains(&"message_rate.per_prefix"), "{kept:?}");
    let q = p.reload(&LimitsConfig {
        max_tracked_keys: 10,
        ..cfg.clone()
    });
    let (kept, _) = q.carried_from(&p);
    assert_eq!(kept, vec!["sessions"]);
}

fn redis_cfg(url: &str) -> Option<crate::policy::settings::RedisConfig> {
    Some(crate::policy::settings::RedisConfig {
        url: Some(url.into()),
        ..Default::default()
    })
}

/// Without a runtime to run the Redis client on (as here) the link is
/// degraded from the start: the local limiter decides (on_failure =
/// local), counted as fallback checks. A reload keeps a Redis-backed
/// limiter only on the same link.
#[test]
fn redis_store_falls_back_and_reloads_by_link() {
    let clock = FakeRelativeClock::default();
    let cfg = LimitsConfig {
        connection_rate: RateConfig {
            store: Store::Redis,
            ..rates(rate(2, 60.0, None), None)
        },
        message_rate: rates(rate(1, 60.0, None), None),
        redis: redis_cfg("redis://127.0.0.1:1"),
        ..base()
    };
    let l = Limiters::with_fake_clock(&cfg, clock.clone());
    let a = ip("192.0.2.1");
    let hits: Vec<_> = (0..3).map(|_| l.connect(a).1).collect();
    assert_eq!(
        hits,
        [None, None, hit(LimitKind::ConnectionRate, Scope::Ip)]
    );
    let st = l.redis_status().unwrap();
    assert!(st.degraded);
    assert_eq!(st.fallback_checks, 3);
    // Unchanged: the same limiter on the same link, state kept.
    let same = l.reload(&cfg);
    let (kept, _) = same.carried_from(&l);
    assert!(kept.contains(&"connection_rate.per_ip"), "{kept:?}");
    assert_eq!(same.connect(a).1, hit(LimitKind::ConnectionRate, Scope::Ip));
    // The counters carry over.
    assert_eq!(same.redis_status().unwrap().fallback_checks, 4);
    // Another Redis, or the local store: a fresh limiter.
    for next in [
        LimitsConfig {
            redis: redis_cfg("redis://127.0.0.1:2"),
            ..cfg.clone()
        },
        LimitsConfig {
            connection_rate: rates(rate(2, 60.0, None), None),
            ..cfg.clone()
        },
    ] {
        let n = same.reload(&next);
        let (_, fresh) = n.carried_from(&same);
        assert_eq!(fresh, ["connection_rate.per_ip"]);
        assert!(n.redis_status().is_some());
    }
    // No Redis-backed rate: no link, no client.
    let local = same.reload(&LimitsConfig {
        connection_rate: rates(rate(2, 60.0, None), None),
        ..cfg.clone()
    });
    assert!(local.redis.is_none());
    let never = Limiters::new(&base());
    assert!(never.redis_status().is_none());
}

#[tokio::test]
async fn retired_sweeper_stops() {
    let clock = FakeRelativeClock::default();
    let cfg = LimitsConfig {
        sweep_interval: 0.01,
        message_rate: rates(rate(1, 1.0, None), None),
        ..base()
    };
    let l = Limiters::with_fake_clock(&cfg, clock.clone());
    l.spawn_sweeper();
    // The sweeper task holds the only weak reference.
    assert_eq!(Arc::weak_count(&l), 1);
    let n = l.reload(&cfg);
    n.spawn_sweeper();
    l.retire();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::weak_count(&l) != 0 {
        assert!(Instant::now() < deadline, "retired sweeper still runs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The new one sweeps the limiter they share.
    assert_eq!(l.message(ip("192.0.2.1")), None);
    assert_eq!(n.tracked_keys(), 1);
    clock.advance(Duration::from_secs(3));
    while n.tracked_keys() != 0 {
        assert!(Instant::now() < deadline, "sweeper did not run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(Arc::weak_count(&n), 1);
}
