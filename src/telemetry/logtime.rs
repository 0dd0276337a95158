//! The text log lines' time stamp: what tracing-subscriber's `SystemTime`
//! writes (RFC 3339, UTC, microseconds: `2026-12-07T06:37:10.319035Z`),
//! with the date and time of day formatted once per second per thread
//! instead of on every line. At `RUST_LOG=info` a relayed message logs one
//! line, and the stamp's calendar arithmetic and formatting were ~2 400
//! of the ~24 000 instructions that line cost (loadtest/RESULTS.md
//! section 30); now the seconds' text is copied and the microseconds
//! written.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The log lines' time stamp (see the module's doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct CachedSeconds;

thread_local! {
    /// The second last formatted on this thread and its text, up to and
    /// including the `.` before the fraction.
    static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for CachedSeconds {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        stamp(SystemTime::now(), w)
    }
}

/// Writes `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (a time before 1970 as
/// 1970's first second: the clock is not that wrong).
fn stamp(t: SystemTime, w: &mut impl fmt::Write) -> fmt::Result {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let micros = d.subsec_micros();
    let head = LAST.try_with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            last.1.clear();
            seconds(secs, &mut last.1)?;
            last.0 = secs;
        }
        w.write_str(&last.1)
    });
    match head {
        Ok(r) => r?,
        // The thread's locals are gone (a line logged while it exits).
        Err(_) => {
            let mut s = String::with_capacity(20);
            seconds(secs, &mut s)?;
            w.write_str(&s)?;
        }
    }
    // The six digits by hand: `write!` with a width goes through the
    // formatting machinery's padding, a few hundred instructions a line.
    let mut frac = *b"000000Z";
    let mut n = micros;
    for d in frac[..6].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    w.write_str(std::str::from_utf8(&frac).unwrap_or("000000Z"))
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` after the epoch.
fn seconds(secs: u64, out: &mut String) -> fmt::Result {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(t: SystemTime) -> String {
        let mut s = String::new();
        stamp(t, &mut s).unwrap();
        s
    }

    /// The same text as tracing-subscriber's own `SystemTime` stamp.
    #[test]
    fn writes_what_tracing_subscriber_writes() {
        let t = UNIX_EPOCH + Duration::new(1_796_625_430, 319_035_123);
        assert_eq!(text(t), "2026-12-07T06:37:10.319035Z");
        // Leap day, a second's end, then the next second from the cache.
        let t = UNIX_EPOCH + Duration::new(951_868_799, 999_999_000);
        assert_eq!(text(t), "2000-02-29T23:59:59.999999Z");
        let t = UNIX_EPOCH + Duration::new(951_868_800, 5_000);
        assert_eq!(text(t), "2000-03-01T00:00:00.000005Z");
        assert_eq!(text(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    /// Against the formatter it replaces, now, on this thread and another
    /// (taken a moment apart: tried again if a second turned between).
    #[test]
    fn agrees_with_the_default_stamp() {
        let agrees = || {
            (0..3).any(|_| {
                let mut a = String::new();
                CachedSeconds.format_time(&mut Writer::new(&mut a)).unwrap();
                let mut b = String::new();
                tracing_subscriber::fmt::time::SystemTime
                    .format_time(&mut Writer::new(&mut b))
                    .unwrap();
                a.len() == b.len() && a[..20] == b[..20] && a.ends_with('Z')
            })
        };
        assert!(agrees());
        assert!(std::thread::spawn(agrees).join().unwrap());
    }
}
