//! The limiters' clock: [`TimeSource`], governor's real clock or a fake one
//! that tests (and simulations) advance by hand, read in ns since start;
//! and the once-a-second throttle of emergency evictions that the local and
//! the Redis-backed limiters both take their turn from. Knows no limiter.

use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock, FakeRelativeClock, Reference};
use governor::nanos::Nanos;

/// The rate limiters' clock: governor's default (quanta) clock, or a fake
/// one for tests. Readings are ns since construction.
#[derive(Clone)]
pub(super) enum TimeSource {
    Real(DefaultClock, <DefaultClock as Clock>::Instant),
    Fake(FakeRelativeClock),
}

impl TimeSource {
    pub(super) fn real() -> TimeSource {
        let clock = DefaultClock::default();
        let start = clock.now();
        TimeSource::Real(clock, start)
    }
}

impl Clock for TimeSource {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            TimeSource::Real(clock, start) => clock.now().duration_since(*start),
            TimeSource::Fake(clock) => clock.now(),
        }
    }
}

/// Spacing of emergency evictions of one limiter from the checking path.
const EMERGENCY_SWEEP_EVERY: u64 = 1_000_000_000;

/// Whether the caller at `now` (nanoseconds) runs an emergency sweep: true
/// for one caller per `EMERGENCY_SWEEP_EVERY`, whose time `next` holds.
pub(super) fn claim_emergency_sweep(next: &AtomicU64, now: u64) -> bool {
    let at = next.load(Ordering::Relaxed);
    now >= at
        && next
            .compare_exchange(
                at,
                now.saturating_add(EMERGENCY_SWEEP_EVERY),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}
