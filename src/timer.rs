//! A reusable read deadline: one tokio timer per connection that is armed
//! once and moved only when it fires early, instead of a timer entry put
//! into and taken out of tokio's wheel for every read that waits.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The deadline of one connection's reads. `within` bounds one wait; the
/// underlying timer keeps the earliest deadline set since it last fired,
/// and when it fires before the current wait's deadline it is re-armed to
/// it, so a read that completes costs no timer operation at all.
pub struct ReadTimer {
    sleep: Pin<Box<Sleep>>,
}

impl std::fmt::Debug for ReadTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTimer")
            .field("armed", &self.sleep.deadline())
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
            sleep: Box::pin(tokio::time::sleep_until(far)),
        }
    }

    /// `fut`'s output, or `None` when `d` passed first (as
    /// `tokio::time::timeout`, which polls `fut` first too).
    pub async fn within<F: Future>(&mut self, d: Duration, fut: F) -> Option<F::Output> {
        let deadline = Instant::now() + d;
        if self.sleep.deadline() > deadline {
            // Armed for later than this wait allows: move it earlier.
            self.sleep.as_mut().reset(deadline);
        }
        let mut fut = pin!(fut);
        let sleep = &mut self.sleep;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            loop {
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) if Instant::now() >= deadline => return Poll::Ready(None),
                    // Fired for an earlier wait's deadline: re-arm for ours.
                    Poll::Ready(()) => sleep.as_mut().reset(deadline),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Waits end at their own deadline, never earlier, and not much later
    /// (the bounds allow a loaded machine's scheduling delay).
    #[tokio::test]
    async fn fires_at_each_waits_own_deadline() {
        let mut t = ReadTimer::new();
        assert_eq!(t.within(ms(200), async { 7 }).await, Some(7));
        let t0 = Instant::now();
        let r = t.within(ms(100), std::future::pending::<()>()).await;
        assert_eq!(r, None);
        let e = t0.elapsed();
        assert!(e >= ms(100) && e < ms(1000), "{e:?}");
        // Armed for 200 ms, then a wait of 300 ms started ~100 ms later:
        // the timer fires early, is re-armed, and the wait ends at ~400.
        let t0 = Instant::now();
        let slow = async {
            tokio::time::sleep(ms(100)).await;
            1
        };
        assert_eq!(t.within(ms(200), slow).await, Some(1));
        let r = t.within(ms(300), std::future::pending::<()>()).await;
        assert_eq!(r, None);
        let e = t0.elapsed();
        assert!(e >= ms(400) && e < ms(1300), "{e:?}");
        // A shorter wait after a longer one moves the timer earlier.
        let t0 = Instant::now();
        assert_eq!(t.within(ms(5000), async {}).await, Some(()));
        let r = t.within(ms(100), std::future::pending::<()>()).await;
        assert_eq!(r, None);
        let e = t0.elapsed();
        assert!(e >= ms(100) && e < ms(1000), "{e:?}");
    }
}
