//! Metrics that every core writes on the hot path without sharing a cache
//! line: a counter, a gauge and a latency histogram, each one atomic (or
//! one row of buckets) per `cores::SHARDS` shard, padded to its own cache
//! line(s), summed when `/metrics` is read. prometheus-client's own types
//! are one atomic (a counter) or one mutex (a histogram) for all threads:
//! with a core per thread, each message's updates would move those lines
//! between cores (loadtest/RESULTS.md section 28).
//!
//! They encode as prometheus-client's `Counter`, `Gauge` and `Histogram`
//! do (the same `MetricEncoder` calls: names, types, buckets and values
//! unchanged), so they register in the same `Registry` and `Family`.
//! A histogram's count is the sum of its buckets, so the two never
//! disagree in one scrape.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::cores::{shard, SHARDS};

/// One `u64` per shard, each on its own cache line; the value is their
/// wrapping sum (so a gauge's decrements, adds of `u64::MAX`, come out
/// right as an `i64` even when taken on another shard than their
/// increments).
#[derive(Clone, Debug, Default)]
struct Shards(Arc<[CachePadded<AtomicU64>; SHARDS]>);

impl Shards {
    #[inline]
    fn add(&self, v: u64) {
        self.0[shard()].fetch_add(v, Relaxed);
    }

    fn sum(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |s, x| s.wrapping_add(x.load(Relaxed)))
    }
}

/// A monotonic counter (clones share the value).
#[derive(Clone, Debug, Default)]
pub struct Counter(Shards);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.add(1);
    }

    #[inline]
    pub fn inc_by(&self, v: u64) {
        self.0.add(v);
    }

    /// The sum over the shards.
    pub fn get(&self) -> u64 {
        self.0.sum()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge that goes up and down (clones share the value); a thread may
/// take back what another added.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Shards);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.add(1);
    }

    #[inline]
    pub fn dec(&self) {
        self.0.add(u64::MAX);
    }

    /// The sum over the shards.
    pub fn get(&self) -> i64 {
        self.0.sum() as i64
    }
}

impl TypedMetric for Gauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Gauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Finite upper bounds of a `Histogram`; a last bucket (`+Inf`) follows.
pub const BOUNDS: usize = 18;

/// The latency buckets every histogram of the proxy has, in seconds:
/// 0.5 ms doubling to about 65 s.
pub fn latency_bounds() -> [f64; BOUNDS] {
    std::array::from_fn(|i| 0.0005 * 2f64.powi(i as i32))
}

/// One shard's row: the sum of what it observed (an `f64`'s bits) and its
/// bucket counts, not cumulative (the encoder adds them up).
#[derive(Default)]
struct Row {
    sum: AtomicU64,
    buckets: [AtomicU64; BOUNDS + 1],
}

struct HistogramInner {
    bounds: [f64; BOUNDS],
    rows: [CachePadded<Row>; SHARDS],
}

/// A histogram of `BOUNDS` finite buckets and `+Inf` (clones share the
/// values).
#[derive(Clone)]
pub struct Histogram(Arc<HistogramInner>);

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sum, buckets) = self.snapshot();
        f.debug_struct("Histogram")
            .field("sum", &sum)
            .field("buckets", &buckets)
            .finish()
    }
}

impl Histogram {
    /// Bounds in increasing order.
    pub fn new(bounds: [f64; BOUNDS]) -> Histogram {
        Histogram(Arc::new(HistogramInner {
            bounds,
            rows: Default::default(),
        }))
    }

    /// Counts `v` in the first bucket whose bound is at least `v` (`+Inf`
    /// past the last, and for NaN, as prometheus-client does).
    #[inline]
    pub fn observe(&self, v: f64) {
        let h = &*self.0;
        let i = h.bounds.iter().position(|&b| b >= v).unwrap_or(BOUNDS);
        let row = &h.rows[shard()];
        row.buckets[i].fetch_add(1, Relaxed);
        // One writer per shard but for threads past SHARDS: the update
        // nearly always succeeds at once.
        let _ = row.sum.fetch_update(Relaxed, Relaxed, |cur| {
            Some((f64::from_bits(cur) + v).to_bits())
        });
    }

    /// The sum of the observations and each bucket's (bound, count), the
    /// last bound `+Inf`, all over the shards.
    pub fn snapshot(&self) -> (f64, Vec<(f64, u64)>) {
        let h = &*self.0;
        let mut sum = 0.0;
        let mut buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        for row in &h.rows {
            sum += f64::from_bits(row.sum.load(Relaxed));
            for (b, n) in buckets.iter_mut().zip(&row.buckets) {
                b.1 += n.load(Relaxed);
            }
        }
        (sum, buckets)
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.snapshot().1.iter().map(|b| b.1).sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (sum, buckets) = self.snapshot();
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::{Registry, Unit};

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, r).unwrap();
        s
    }

    /// The same updates, from several threads, give the exposition
    /// prometheus-client's own types give.
    #[test]
    fn encodes_as_prometheus_clients_own_types() {
        use prometheus_client::metrics::{counter, gauge, histogram};
        let ours = (
            Counter::default(),
            Gauge::default(),
            Histogram::new(latency_bounds()),
        );
        let theirs = (
            counter::Counter::<u64>::default(),
            gauge::Gauge::<i64>::default(),
            histogram::Histogram::new(latency_bounds()),
        );
        let family: Family<Vec<(&str, String)>, Counter> = Family::default();
        let their_family: Family<Vec<(&str, String)>, counter::Counter> = Family::default();
        // Sums exact in any order (the shards add up in another order
        // than one histogram would).
        let values = [
            2f64.powi(-14),
            2f64.powi(-10),
            0.0,
            0.25,
            1.5,
            70.0,
            1e9,
            0.5,
        ];
        // The same updates on either kind of metric (thread `t`'s share).
        macro_rules! updates {
            ($m:expr, $family:expr, $t:expr) => {
                for (k, &v) in values.iter().enumerate() {
                    $m.0.inc_by(k as u64);
                    $m.1.inc();
                    if k % 2 == 0 {
                        $m.1.dec();
                    }
                    $m.2.observe(v);
                    $family
                        .get_or_create(&vec![("class", format!("{}", $t))])
                        .inc();
                }
            };
        }
        std::thread::scope(|s| {
            for t in 0..4 {
                let (ours, family) = (&ours, &family);
                s.spawn(move || updates!(ours, family, t));
            }
        });
        for t in 0..4 {
            updates!(theirs, their_family, t);
        }
        let mut a = Registry::with_prefix("x");
        a.register("c", "a counter", ours.0.clone());
        a.register("g", "a gauge", ours.1.clone());
        a.register_with_unit("h", "a histogram", Unit::Seconds, ours.2.clone());
        a.register("f", "a family", family);
        let mut b = Registry::with_prefix("x");
        b.register("c", "a counter", theirs.0.clone());
        b.register("g", "a gauge", theirs.1.clone());
        b.register_with_unit("h", "a histogram", Unit::Seconds, theirs.2.clone());
        b.register("f", "a family", their_family);
        let (a, b) = (text(&a), text(&b));
        // A family's series come in its map's order: compare line sets.
        let lines = |t: &str| {
            let mut v: Vec<String> = t.lines().map(str::to_string).collect();
            v.sort();
            v
        };
        assert_eq!(lines(&a), lines(&b));
        assert!(a.contains("x_h_seconds_count 32\n"), "{a}");
        assert!(a.contains("x_h_seconds_bucket{le=\"+Inf\"} 32\n"), "{a}");
        assert_eq!(ours.0.get(), 4 * 28);
        assert_eq!(ours.1.get(), 4 * 4);
        assert_eq!(ours.2.count(), 32);
    }

    /// A bound's own value is in its bucket; NaN and anything past the
    /// last bound in `+Inf`.
    #[test]
    fn bucket_edges() {
        let b = latency_bounds();
        let h = Histogram::new(b);
        h.observe(b[0]);
        h.observe(b[3]);
        h.observe(b[3] * 1.000001);
        h.observe(b[BOUNDS - 1] * 2.0);
        h.observe(f64::NAN);
        let (_, buckets) = h.snapshot();
        let n: Vec<u64> = buckets.iter().map(|x| x.1).collect();
        assert_eq!(n[0], 1);
        assert_eq!(n[3], 1);
        assert_eq!(n[4], 1);
        assert_eq!(n[BOUNDS], 2);
        assert_eq!(h.count(), 5);
    }

    /// A thread may give back what another took (a session's gauge), and
    /// more threads than shards still count everything.
    #[test]
    fn more_threads_than_shards() {
        let g = Gauge::default();
        let c = Counter::default();
        let h = Histogram::new(latency_bounds());
        std::thread::scope(|s| {
            for _ in 0..(SHARDS * 2 + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.inc();
                        h.observe(0.001);
                    }
                    g.inc();
                });
            }
        });
        std::thread::spawn({
            let g = g.clone();
            move || {
                for _ in 0..(SHARDS * 2 + 3) {
                    g.dec();
                }
            }
        })
        .join()
        .unwrap();
        assert_eq!(g.get(), 0);
        assert_eq!(c.get(), (SHARDS as u64 * 2 + 3) * 1000);
        let (sum, buckets) = h.snapshot();
        assert_eq!(buckets[1], (0.001, (SHARDS as u64 * 2 + 3) * 1000));
        assert!((sum - (SHARDS as f64 * 2.0 + 3.0)).abs() < 1e-6, "{sum}");
    }
}
