//! Micro-benchmark of what one relayed message writes into the metrics and
//! the live view (`/top`), from one thread and from two threads at once
//! (two cores serving sessions of one busy sender): prometheus-client's
//! own counter and histogram (one atomic or one mutex for all threads)
//! against `telemetry::sharded` (one cache line per core), and the
//! `/top` entries of one address (each event added at once, and in a
//! session's batches). Time per message per thread: with no
//! sharing, two threads take as long per message as one.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use prometheus_client::metrics::{counter, histogram};
use smtp_edge::telemetry::sharded;
use smtp_edge::telemetry::top::Top;

/// A counter of either kind.
trait Count: Sync {
    fn inc_by(&self, v: u64);
}

/// A histogram of either kind.
trait Observe: Sync {
    fn observe(&self, v: f64);
}

impl Count for counter::Counter {
    fn inc_by(&self, v: u64) {
        counter::Counter::inc_by(self, v);
    }
}

impl Count for sharded::Counter {
    fn inc_by(&self, v: u64) {
        sharded::Counter::inc_by(self, v);
    }
}

impl Observe for histogram::Histogram {
    fn observe(&self, v: f64) {
        histogram::Histogram::observe(self, v);
    }
}

impl Observe for sharded::Histogram {
    fn observe(&self, v: f64) {
        sharded::Histogram::observe(self, v);
    }
}

/// What `Session::message_done`, the pool's checkout and
/// `Txn::finish_data` write per message.
struct PerMessage<C, H> {
    counters: [C; 5],
    histograms: [H; 3],
}

impl<C: Count, H: Observe> PerMessage<C, H> {
    fn message(&self) {
        let [reused, class, messages, bytes, recipients] = &self.counters;
        let [pool_wait, reply, duration] = &self.histograms;
        reused.inc_by(1);
        pool_wait.observe(0.0);
        reply.observe(0.0004);
        class.inc_by(1);
        duration.observe(0.0012);
        messages.inc_by(1);
        bytes.inc_by(4096);
        recipients.inc_by(1);
    }
}

/// The live view's entry as it was before its counts became atomics (a
/// mutex over the six slots, as `telemetry/top.rs` had it), for the
/// comparison: a message and a recipient, on an address and its prefix.
#[derive(Default)]
struct LockedEntry {
    slots: std::sync::Mutex<[(u64, u32, u32); 6]>,
}

impl LockedEntry {
    fn with(&self, e: u64, f: impl FnOnce(&mut (u64, u32, u32))) {
        let mut slots = self.slots.lock().unwrap();
        let s = &mut slots[(e % 6) as usize];
        if s.0 != e {
            *s = (e, 0, 0);
        }
        f(s);
    }
}

/// `iters` messages on each of `threads` threads, started together: the
/// wall time per message per thread.
fn run<S>(
    threads: usize,
    iters: u64,
    init: &(dyn Fn() -> S + Sync),
    f: &(dyn Fn(&mut S) + Sync),
) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    // Each thread's own state (a session's `/top` place).
                    let mut state = init();
                    start.wait();
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        f(&mut state);
                    }
                    t0.elapsed()
                })
            })
            .collect();
        start.wait();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

fn metrics(c: &mut Criterion) {
    let shared: PerMessage<counter::Counter, _> = PerMessage {
        counters: Default::default(),
        histograms: std::array::from_fn(|_| histogram::Histogram::new(sharded::latency_bounds())),
    };
    let sharded: PerMessage<sharded::Counter, _> = PerMessage {
        counters: Default::default(),
        histograms: std::array::from_fn(|_| sharded::Histogram::new(sharded::latency_bounds())),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Made in a runtime: its ticker keeps the epoch, events read no clock
    // (as in the proxy).
    let top = rt.block_on(async { Top::new(1000, 24, 64) });
    let open = || top.open("192.0.2.7".parse().unwrap());
    let locked = (LockedEntry::default(), LockedEntry::default());
    let epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 10
    };
    let e = std::hint::black_box(epoch());
    let mut g = c.benchmark_group("per_message");
    for threads in [1, 2] {
        g.bench_function(format!("prometheus_client/{threads}"), |b| {
            b.iter_custom(|n| run(threads, n, &|| (), &|_| shared.message()))
        });
        g.bench_function(format!("sharded/{threads}"), |b| {
            b.iter_custom(|n| run(threads, n, &|| (), &|_| sharded.message()))
        });
        g.bench_function(format!("top_locked/{threads}"), |b| {
            b.iter_custom(|n| {
                run(threads, n, &|| (), &|_| {
                    for x in [&locked.0, &locked.1] {
                        x.with(e, |s| s.1 += 1);
                    }
                    for x in [&locked.0, &locked.1] {
                        x.with(e, |s| s.2 += 1);
                    }
                })
            })
        });
        // Each event added to the entries at once (a flush per message),
        // as before the batches.
        g.bench_function(format!("top/{threads}"), |b| {
            b.iter_custom(|n| {
                run(threads, n, &open, &|o| {
                    o.message();
                    o.recipient();
                    o.flush();
                })
            })
        });
        g.bench_function(format!("top_batched/{threads}"), |b| {
            b.iter_custom(|n| {
                run(threads, n, &open, &|o| {
                    o.message();
                    o.recipient();
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, metrics);
criterion_main!(benches);
