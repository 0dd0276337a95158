//! Which sessions are traced and how the proxy's own replies name their
//! trace: the head-sampling decision made at accept (`sample_session`, the
//! ratio reloadable), the `span!` macro that puts a traced session's spans
//! under the `TRACED` target (the only one, with policy events, that the
//! OpenTelemetry layer lets in), `in_traced` for children, and the trace id
//! helpers (`trace_id`, `own`, `own_text`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans of sessions chosen for tracing: only these reach
/// the OpenTelemetry layer, so an untraced session's spans cost no more
/// than with export off.
pub const TRACED: &str = "smtp_edge::traced";

/// An info span, under the `TRACED` target when `$traced`: the spans of a
/// session all follow the head-sampling decision made at accept
/// (`sample_session`), children by `in_traced`.
#[macro_export]
macro_rules! span {
    ($traced:expr, $($rest:tt)*) => {
        if $traced {
            tracing::info_span!(target: "smtp_edge::traced", $($rest)*)
        } else {
            tracing::info_span!($($rest)*)
        }
    };
}

/// True when trace export is on (an OTLP endpoint is configured).
pub(super) static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The head-sampling decision for a new session: export on and a draw
/// under the sample ratio.
pub fn sample_session() -> bool {
    if !EXPORTING.load(Ordering::Relaxed) {
        return false;
    }
    let r = f64::from_bits(RATIO.load(Ordering::Relaxed));
    r >= 1.0 || (r > 0.0 && draw() < r)
}

/// Whether the current span belongs to a traced session. Without trace
/// export none does, and the subscriber is not asked (its current-span
/// lookup, twice per message, was ~8 instruction-cache misses of it).
pub fn in_traced() -> bool {
    if !EXPORTING.load(Ordering::Relaxed) {
        return false;
    }
    tracing::Span::current()
        .metadata()
        .is_some_and(|m| m.target() == TRACED)
}

/// A uniform draw in [0, 1) from a per-thread xorshift generator.
fn draw() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (t ^ (&t as *const u64 as u64)) | 1
        });
    }
    STATE.with(|c| {
        let mut x = c.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// The share of new traces sampled, as f64 bits; a reload changes it.
static RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000); // 1.0

/// Sets the share of new traces sampled (0.0 to 1.0), at once.
pub fn set_sample_ratio(r: f64) {
    RATIO.store(r.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

/// The trace id of `span` (32 hex digits), or None when it is not traced
/// (no export configured, or not sampled).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// ` (trace <id>)` for a 4xx/5xx the proxy itself gives in a traced
/// session: a bounce or a sender's complaint quoting it leads to the trace.
fn trace_suffix(code: u16) -> Option<String> {
    if code < 400 {
        return None;
    }
    trace_id(&tracing::Span::current()).map(|id| format!(" (trace {id})"))
}

/// A reply the proxy itself gives (never a backend's passed through), with
/// the trace suffix on its last line.
pub fn own(mut reply: crate::smtp::Reply) -> crate::smtp::Reply {
    if let Some(suffix) = trace_suffix(reply.code) {
        reply.push_text(&suffix);
    }
    reply
}

/// The text of a reply the proxy itself gives, with the trace suffix.
pub fn own_text(code: u16, text: &str) -> std::borrow::Cow<'_, str> {
    match trace_suffix(code) {
        Some(suffix) => format!("{text}{suffix}").into(),
        None => text.into(),
    }
}
