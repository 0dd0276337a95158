//! A reusable read deadline: one tokio timer per connection that is armed
//! once and moved only when it fires early, instead of a timer entry put
//! into and taken out of tokio's wheel for every read that waits, that
//! reads the clock only when a wait blocks and is not polled again while
//! it holds the waiting task's waker; `timeout` for futures mostly ready
//! at once; `Pace`, the minimum average rate of a message's data; and
//! `Stamp`, a clock reading for what is measured rather than awaited.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A reading of the monotonic clock (the one `Instant` reads) in
/// nanoseconds, for what is measured rather than awaited: ages, durations
/// for metrics. Two of them differ by a `u64` subtraction, where std
/// normalizes two `timespec`s (`Instant - Instant`: ~37 instructions) and
/// `as_millis` divides a `u128` (RESULTS.md section 36).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

impl Stamp {
    pub fn now() -> Stamp {
        let ts = clock(libc::CLOCK_MONOTONIC);
        Stamp(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// Seconds from this reading to now.
    pub fn elapsed_secs(self) -> f64 {
        Stamp::now().0.saturating_sub(self.0) as f64 * 1e-9
    }

    /// Tenths of a second, wrapping after 13 years: a 4-byte age
    /// (`relay::client::ticks`).
    pub fn ticks(self) -> u32 {
        (self.0 / 100_000_000) as u32
    }
}

/// Whole seconds since the Unix epoch (the clock `SystemTime` reads).
pub fn unix_secs() -> u64 {
    clock(libc::CLOCK_REALTIME).tv_sec as u64
}

fn clock(id: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec, the only memory the call writes;
    // both clocks exist on every Linux (std's `Instant` and `SystemTime`
    // read them the same way).
    let r = unsafe { libc::clock_gettime(id, &mut ts) };
    debug_assert_eq!(r, 0, "clock_gettime({id})");
    ts
}

/// The deadline of one connection's reads. `within` bounds one wait; the
/// underlying timer keeps the earliest deadline set since it last fired,
/// and when it fires before the current wait's deadline it is re-armed to
/// it, so a read that completes costs no timer operation at all.
///
/// The clock is read only when a wait blocks: a future ready at its first
/// poll (data already in the socket, a write the socket takes at once)
/// costs no clock read either. `blocked` tells the caller when the last
/// wait began to block and its deadline, for carrying a deadline over
/// several waits and for timing them without a clock read of its own.
pub struct ReadTimer {
    sleep: Pin<Box<Armed>>,
    blocked: Option<Blocked>,
}

pin_project_lite::pin_project! {
    /// The timer and the waker it was last polled with, in one box: the
    /// lines a wait reads anyway, and not 16 bytes more in every session
    /// (its box was at a size class's edge: RESULTS.md section 35).
    /// (`polled_by`: that waker's data and vtable addresses while the
    /// timer stays pending, the one it will wake; (0, 0) when none is
    /// known.)
    struct Armed {
        #[pin]
        sleep: Sleep,
        polled_by: (usize, usize),
    }
}

/// How long one wait may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// This long from when the wait first blocks.
    For(Duration),
    /// Until this instant (a deadline carried over from an earlier wait).
    Until(Instant),
}

impl Limit {
    /// `For(d)`, or `Until(deadline)` when an earlier wait set one.
    pub fn or_until(d: Duration, deadline: Option<Instant>) -> Limit {
        match deadline {
            None => Limit::For(d),
            Some(t) => Limit::Until(t),
        }
    }

    /// How long a wait may still last (an `Until` reads the clock).
    pub fn left(self) -> Duration {
        match self {
            Limit::For(d) => d,
            Limit::Until(t) => t.saturating_duration_since(Instant::now()),
        }
    }
}

impl From<Duration> for Limit {
    fn from(d: Duration) -> Limit {
        Limit::For(d)
    }
}

/// A wait that blocked: when it began to, and its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub since: Instant,
    pub until: Instant,
}

impl std::fmt::Debug for ReadTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTimer")
            .field("armed", &self.sleep.sleep.deadline())
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl Default for ReadTimer {
    fn default() -> ReadTimer {
        ReadTimer::new()
    }
}

impl ReadTimer {
    /// A timer not armed yet (its first wait arms it). Needs a tokio
    /// runtime with time enabled.
    pub fn new() -> ReadTimer {
        // Far in the future: the first `within` moves it earlier.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        ReadTimer {
            sleep: Box::pin(Armed {
                sleep: tokio::time::sleep_until(far),
                polled_by: (0, 0),
            }),
            blocked: None,
        }
    }

    /// `fut`'s output, or `None` when the limit passed first (as
    /// `tokio::time::timeout`, which polls `fut` first too). The limit's
    /// clock starts when `fut` first returns pending.
    pub async fn within<F: Future>(
        &mut self,
        limit: impl Into<Limit>,
        fut: F,
    ) -> Option<F::Output> {
        let limit = limit.into();
        self.blocked = None;
        let mut fut = pin!(fut);
        let ReadTimer { sleep, blocked } = self;
        std::future::poll_fn(|cx| {
            let armed = sleep.as_mut().project();
            let (mut sleep, polled_by) = (armed.sleep, armed.polled_by);
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let waker = (
                cx.waker().data() as usize,
                cx.waker().vtable() as *const _ as usize,
            );
            let deadline = match blocked {
                Some(b) => b.until,
                None => {
                    let since = Instant::now();
                    let until = match limit {
                        Limit::For(d) => since + d,
                        Limit::Until(t) => t,
                    };
                    *blocked = Some(Blocked { since, until });
                    if sleep.deadline() > until {
                        // Armed for later than this wait allows: move it earlier.
                        sleep.as_mut().reset(until);
                    } else if *polled_by == waker && !sleep.is_elapsed() {
                        // Armed no later than this wait's deadline, still
                        // in tokio's wheel and holding this task's waker
                        // from an earlier wait: it will wake this task when
                        // it fires (or re-arm on the poll after). No poll
                        // of the timer (its waker check and coop budget),
                        // the usual case for a connection's every wait. A
                        // waker held keeps its task alive, so no other task
                        // can have the same addresses meanwhile.
                        return Poll::Pending;
                    }
                    until
                }
            };
            loop {
                // Unconstrained: a poll refused by the task's coop budget
                // returns Pending without taking the waker, which
                // `polled_by` must then not claim (tokio's
                // `has_budget_remaining` docs show the same for a delay).
                match pin!(tokio::task::coop::unconstrained(sleep.as_mut())).poll(cx) {
                    Poll::Pending => {
                        *polled_by = waker;
                        return Poll::Pending;
                    }
                    Poll::Ready(()) if Instant::now() >= deadline => {
                        // Fired: its waker was taken.
                        *polled_by = (0, 0);
                        return Poll::Ready(None);
                    }
                    // Fired for an earlier wait's deadline: re-arm for ours.
                    Poll::Ready(()) => sleep.as_mut().reset(deadline),
                }
            }
        })
        .await
    }

    /// The last `within`'s wait, when it blocked (None: its future was
    /// ready at the first poll, and no time passed).
    pub fn blocked(&self) -> Option<Blocked> {
        self.blocked
    }
}

/// `tokio::time::timeout` for futures that are mostly ready at their first
/// poll (a write the socket takes at once): the clock is read and a timer
/// entry made only when `fut` is pending. `None` when `d` passed first.
/// The timer is boxed: inline, tokio's `Sleep` would be in every caller's
/// future (a relayed message's DATA future among them) for a rare wait.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(v) => Some(v),
        Poll::Pending => Box::pin(tokio::time::timeout(d, fut)).await.ok(),
    }
}

/// A minimum average rate for a message's data (`[limits]
/// min_data_rate`): the time spent waiting for the client's data may not
/// exceed `data_block` of grace plus one second per `rate` bytes received.
/// A client that dribbles its message (a byte just inside every
/// `data_block`) is cut off once the grace is used up; one that sends at
/// least `rate` bytes a second on average never meets the limit, however
/// big the message. Only the client's time counts: waits for a slow
/// backend are not added.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    grace: Duration,
    /// Nanoseconds of allowance per byte received (1e9 / rate).
    ns_per_byte: f64,
    waited: Duration,
}

impl Pace {
    /// None when `rate` is 0 (no minimum rate).
    pub fn new(grace: Duration, rate: f64) -> Option<Pace> {
        (rate > 0.0).then_some(Pace {
            grace,
            ns_per_byte: 1e9 / rate,
            waited: Duration::ZERO,
        })
    }

    /// How long the next read may wait with `received` bytes in so far:
    /// `block`, or less when the allowance runs out first; None when it
    /// has run out.
    pub fn wait(&self, received: u64, block: Duration) -> Option<Duration> {
        // A float to integer cast saturates (and a NaN is 0): no check, no
        // panic, whatever the rate.
        let earned = Duration::from_nanos((received as f64 * self.ns_per_byte) as u64);
        let left = (self.grace + earned).checked_sub(self.waited)?;
        (!left.is_zero()).then(|| left.min(block))
    }

    /// Counts a wait for the client.
    pub fn waited(&mut self, d: Duration) {
        self.waited += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `Stamp` reads the clock `Instant` reads, and `unix_secs` the one
    /// `SystemTime` reads: each reading lies between two of std's (exact
    /// bounds, whatever the machine's load).
    #[test]
    fn stamps_measure_as_instant_does() {
        use std::time::{Instant, SystemTime, UNIX_EPOCH};
        let (i0, s0, i1) = (Instant::now(), Stamp::now(), Instant::now());
        std::thread::sleep(ms(30));
        let (i2, s1, i3) = (Instant::now(), Stamp::now(), Instant::now());
        let d = Duration::from_nanos(s1.0 - s0.0);
        assert!(i2 - i1 <= d && d <= i3 - i0, "{d:?}");
        assert!(s0.elapsed_secs() >= 0.030);
        let ticks = u64::from(s1.ticks().wrapping_sub(s0.ticks()));
        let tenths = (s1.0 - s0.0) / 100_000_000;
        assert!(ticks == tenths || ticks == tenths + 1, "{ticks} {tenths}");
        let secs = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        let (a, u, b) = (secs(), unix_secs(), secs());
        assert!(a <= u && u <= b, "{a} {u} {b}");
    }

    /// A future that is pending for `d`, then gives `v`.
    async fn ready_after<T>(d: Duration, v: T) -> T {
        tokio::time::sleep(d).await;
        v
    }

    /// A wait for nothing under `limit` ends by its timer (within 5 s at
    /// most, not hanging), between `lo` and `hi` after `t0`.
    async fn ends_between(
        t: &mut ReadTimer,
        limit: impl Into<Limit>,
        t0: Instant,
        lo: Duration,
        hi: Duration,
    ) {
        let wait = t.within(limit, std::future::pending::<()>());
        let r = tokio::time::timeout(ms(5000), wait)
            .await
            .expect("the wait ended by its own timer");
        assert_eq!(r, None);
        let e = t0.elapsed();
        assert!(e >= lo && e < hi, "{e:?}");
    }

    #[test]
    fn a_limit_carries_a_deadline_over() {
        assert_eq!(Limit::or_until(ms(5), None), Limit::For(ms(5)));
        let t = Instant::now() + ms(30_000);
        assert_eq!(Limit::or_until(ms(5), Some(t)), Limit::Until(t));
        assert_eq!(Limit::For(ms(5)).left(), ms(5));
        let left = Limit::Until(t).left();
        assert!(left <= ms(30_000) && left > ms(20_000), "{left:?}");
        let past = Instant::now() - ms(10);
        assert_eq!(Limit::Until(past).left(), Duration::ZERO);
    }

    /// Waits end at their own deadline, never earlier, and not much later
    /// (the bounds allow a loaded machine's scheduling delay).
    #[tokio::test]
    async fn fires_at_each_waits_own_deadline() {
        let mut t = ReadTimer::new();
        assert_eq!(t.within(ms(200), async { 7 }).await, Some(7));
        let t0 = Instant::now();
        ends_between(&mut t, ms(100), t0, ms(100), ms(1000)).await;
        // Armed for 200 ms, then a wait of 300 ms started ~100 ms later:
        // the timer fires early, is re-armed, and the wait ends at ~400.
        let t0 = Instant::now();
        let slow = ready_after(ms(100), 1);
        assert_eq!(t.within(ms(200), slow).await, Some(1));
        ends_between(&mut t, ms(300), t0, ms(400), ms(1300)).await;
        // A shorter wait after a longer one moves the timer earlier.
        let t0 = Instant::now();
        assert_eq!(t.within(ms(5000), async {}).await, Some(()));
        ends_between(&mut t, ms(100), t0, ms(100), ms(1000)).await;
    }

    /// A wait ready at once reads no clock and reports no block; one that
    /// blocks reports when, and a deadline carried over ends it there.
    #[tokio::test]
    async fn blocked_waits_are_reported_and_deadlines_carry_over() {
        let mut t = ReadTimer::new();
        assert_eq!(t.within(ms(100), async { 1 }).await, Some(1));
        assert_eq!(t.blocked(), None);
        let t0 = Instant::now();
        let slow = ready_after(ms(50), 2);
        assert_eq!(t.within(ms(300), slow).await, Some(2));
        let b = t.blocked().expect("it blocked");
        assert!(b.since >= t0 && b.until == b.since + ms(300), "{b:?}");
        // The rest of that deadline, carried over: ends at ~300 ms from t0.
        ends_between(&mut t, Limit::Until(b.until), t0, ms(300), ms(1200)).await;
        assert_eq!(t.blocked().map(|b| b.until), Some(b.until));
    }

    /// A timer that fired between two waits (its waker taken) is polled
    /// again by the next wait, which still ends at its own deadline.
    #[tokio::test]
    async fn a_timer_fired_between_waits_still_bounds_the_next() {
        let mut t = ReadTimer::new();
        let slow = ready_after(ms(10), 1);
        // Armed for ~100 ms from now, polled by this task.
        assert_eq!(t.within(ms(100), slow).await, Some(1));
        tokio::time::sleep(ms(150)).await;
        let t0 = Instant::now();
        ends_between(&mut t, ms(100), t0, ms(100), ms(1000)).await;
    }

    /// A timer last polled by another task (a pooled backend connection's,
    /// taken by the next session) is polled by the new one, which it then
    /// wakes: the wait ends at its deadline instead of never.
    #[tokio::test]
    async fn a_timer_moved_to_another_task_wakes_that_task() {
        let mut t = ReadTimer::new();
        let slow = ready_after(ms(10), 1);
        // Armed for ~200 ms from now with this task's waker.
        assert_eq!(t.within(ms(200), slow).await, Some(1));
        let other = tokio::spawn(async move {
            let t0 = Instant::now();
            // A later deadline than the armed one: no reset, and the waker
            // held is the first task's.
            let r = t.within(ms(400), std::future::pending::<()>()).await;
            (r, t0.elapsed())
        });
        let (r, e) = tokio::time::timeout(ms(5000), other)
            .await
            .expect("the moved timer woke its new task")
            .unwrap();
        assert_eq!(r, None);
        assert!(e >= ms(400) && e < ms(1500), "{e:?}");
    }

    #[tokio::test]
    async fn timeout_is_tokios_for_pending_futures() {
        assert_eq!(timeout(ms(10), async { 3 }).await, Some(3));
        assert_eq!(timeout(ms(10), std::future::pending::<()>()).await, None);
        let slow = ready_after(ms(20), 4);
        assert_eq!(timeout(ms(2000), slow).await, Some(4));
    }

    #[test]
    fn pace_gives_grace_then_a_second_per_rate_bytes() {
        assert!(Pace::new(ms(100), 0.0).is_none());
        let mut p = Pace::new(ms(100), 1000.0).unwrap();
        // Within the grace, the block timeout is the bound when shorter.
        assert_eq!(p.wait(0, ms(10)), Some(ms(10)));
        assert_eq!(p.wait(0, ms(1000)), Some(ms(100)));
        // 500 bytes earn half a second.
        assert_eq!(p.wait(500, ms(10_000)), Some(ms(600)));
        p.waited(ms(100));
        assert_eq!(p.wait(0, ms(1000)), None);
        assert_eq!(p.wait(100, ms(1000)), Some(ms(100)));
        p.waited(ms(100));
        assert_eq!(p.wait(100, ms(1000)), None);
        // Absurd sizes and rates do not overflow.
        assert!(p.wait(u64::MAX, ms(5)).is_some());
        let tiny = Pace::new(ms(100), 1e-300).unwrap();
        assert_eq!(tiny.wait(1, ms(5)), Some(ms(5)));
        assert_eq!(tiny.wait(0, ms(500)), Some(ms(100)));
        // The default rate: 1 KiB earns a second.
        let k = Pace::new(Duration::ZERO, 1024.0).unwrap();
        assert_eq!(k.wait(1024, ms(5000)), Some(ms(1000)));
    }
}
