//! The text log line when it is not for a terminal: the layout of
//! tracing-subscriber's default (`Full`) format without its colours
//! (`Plain`), and its time stamp (`CachedSeconds`: RFC 3339, UTC,
//! microseconds, `2026-12-07T06:37:10.319035Z`, as tracing-subscriber's
//! `SystemTime` writes it, with the date and time of day formatted once
//! per second per thread). At `RUST_LOG=info`, the default, a relayed
//! message logs one line, and that line doubled the instructions per
//! message (24 200 -> 48 400): the stamp's calendar and formatting were
//! 2 381 of them, and the default format runs every piece of the line
//! through its colour painter even with colours off (loadtest/RESULTS.md
//! section 30). A terminal still gets the default, coloured.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's `Full` format as `.with_target(false)` and
/// `.with_ansi(false)` set it, written piece by piece: the time stamp,
/// the level (five wide), each span of the event's scope from the root
/// (`name{fields}:`), then the event's fields, one line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if CachedSeconds.format_time(&mut w).is_err() {
            w.write_str("<unknown time>")?;
        }
        w.write_str(match *event.metadata().level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                w.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        w.write_char('{')?;
                        w.write_str(fields)?;
                        w.write_char('}')?;
                    }
                }
                w.write_char(':')?;
            }
            if seen {
                w.write_char(' ')?;
            }
        }
        ctx.format_fields(w.by_ref(), event)?;
        w.write_char('\n')
    }
}

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

    /// The same line as the default format with colours and targets off,
    /// for events in nested spans with and without fields, at each level,
    /// from the time stamp's end on.
    #[test]
    fn lays_out_lines_as_the_default_format() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::{Layer as _, SubscriberExt};

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = |plain: bool| {
            let buf = Buf::default();
            let out = buf.clone();
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(move || out.clone())
                .with_timer(CachedSeconds)
                .with_target(false)
                .with_ansi(false);
            let sub = tracing_subscriber::registry().with(if plain {
                fmt.event_format(Plain).boxed()
            } else {
                fmt.boxed()
            });
            tracing::subscriber::with_default(sub, || {
                let s =
                    tracing::info_span!("smtp.session", client.address = %"192.0.2.1", n = 3_i64);
                let _s = s.enter();
                tracing::warn!("no span fields below");
                let t = tracing::info_span!("smtp.transaction", code = tracing::field::Empty);
                t.record("code", 250_i64);
                let _t = t.enter();
                let e = tracing::info_span!("empty");
                let _e = e.enter();
                tracing::info!(
                    size = 4096_u64,
                    "message {} {}",
                    250,
                    "Ok: queued \u{1b}[31m"
                );
                tracing::error!(what = ?"x");
                tracing::debug!("debug too");
            });
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            // Past the time stamp (27 bytes), which differs by the moment.
            text.lines()
                .map(|l| l[27..].to_string())
                .collect::<Vec<_>>()
        };
        let (plain, full) = (lines(true), lines(false));
        assert_eq!(plain.len(), 4, "{plain:?}");
        assert_eq!(plain, full);
        assert!(plain[1].starts_with("  INFO smtp.session{client.address=192.0.2.1 n=3}:smtp.transaction{code=250}:empty: message 250"), "{plain:?}");
    }
}
