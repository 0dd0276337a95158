//! The `/top` view under a flood of distinct client addresses: the process's
//! resident memory before and after one session each from `N` addresses
//! (default 1 000 000) through `telemetry::top::Top` at `top_size = 10000`,
//! with one busy sender among them, and whether the view still shows it.
//! Run: `cargo run --release --example top_flood [N]` (loadtest/RESULTS.md).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use smtp_edge::telemetry::top::{By, Top};

/// Resident set size in KiB (`/proc/self/statm`, 4 KiB pages).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let top = Top::new(10_000, 24, 64);
    let busy = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let before = rss_kib();
    let t0 = Instant::now();
    let mut peak = before;
    for i in 0..n {
        // Spread over the whole IPv4 space: as many prefixes as addresses.
        let ip = IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)));
        let mut open = top.open(ip);
        open.recipient();
        open.message();
        drop(open);
        if i % 50 == 0 {
            drop(top.open(busy));
        }
        if i % 100_000 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let took = t0.elapsed();
    let (addrs, prefixes) = top.tracked();
    let after = rss_kib();
    let (first, _) = top.read(By::Sessions, 1);
    println!(
        "addresses={n} ns_per_session={:.0} rss_before_kib={before} rss_after_kib={after} rss_peak_kib={} tracked_addresses={addrs} tracked_prefixes={prefixes} busiest={}",
        took.as_nanos() as f64 / f64::from(n),
        peak.max(after),
        first.first().map_or("-".to_string(), |(ip, c)| format!("{ip}({} sessions)", c.sessions)),
    );
}
