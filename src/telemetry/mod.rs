//! Logs and traces: the `tracing` subscriber (text or JSON lines to stderr,
//! filtered by `RUST_LOG`, default `info`) and, with `[telemetry]
//! otlp_endpoint`, the OpenTelemetry export of the same spans over OTLP
//! (gRPC or HTTP/protobuf) through a bounded queue that never blocks a
//! session: spans that do not fit are dropped and counted. Owns the span
//! processor and the trace id helpers; the spans themselves are made where
//! the work is (session, relay, policy). Metrics are `metrics` (pulled by
//! `/metrics`; nothing is pushed).
//!
//! # The pipeline
//! `install` (called by `main` inside the runtime) sets up one subscriber:
//! - the fmt layer, writing through tracing-appender's non-blocking writer
//!   (`logwriter`: a log thread of its own, started by the first line, 64
//!   KiB buffered writes; past `LOG_QUEUE` lines it drops and counts them,
//!   `dropped_log_lines`, rather than stall a session; `Telemetry` holds
//!   `logwriter::Flush`, which flushes when dropped).
//!   Its time stamp is `logline::CachedSeconds` (the text of
//!   tracing-subscriber's own, its seconds formatted once per second);
//!   text lines not for a terminal are laid out by `logline::Plain` (the
//!   default format's layout without its colour painter).
//!   It filters out `smtp.backend`: that span is entered only around the
//!   checkout (so a new connection's `tls.handshake` is its child), no log
//!   line needs its fields, and the layer need not format them per message;
//! - with an endpoint only, tracing-opentelemetry over an SDK tracer
//!   provider: `Bounded` in front of the SDK's `BatchSpanProcessor`, whose
//!   exporter is our own (`otlp`, sends on `export_runtime`, a
//!   current-thread runtime on a thread of its own) wrapped in `Counted`.
//!   Together they know how many spans are queued, so a span that would
//!   overflow the SDK's queue is dropped and counted (`dropped_spans`)
//!   instead of overflowing it silently. The layer (with its per-layer
//!   target filter inside) is wrapped in `Unentered`, which forwards every
//!   hook but span enter and exit: with context activation and inactivity
//!   tracking off those only took a lock and read the clock on every poll
//!   of a session, and spans end at their close.
//!
//! Without an endpoint the OpenTelemetry layer is left out of the
//! subscriber rather than added as a `None` in `.with(Option<..>)`: a
//! `None` layer enables every span callsite, so at `RUST_LOG=warn` every
//! session's spans would be built and entered in the registry for nothing
//! (figures: loadtest/README.md, "Performance notes for developers").
//!
//! # Sampling
//! Head sampling is decided once per session, at accept (`sample_session`,
//! the ratio reloadable by `set_sample_ratio`). A traced session's spans are
//! made by the `span!` macro under the `TRACED` target, the only one (with
//! the policy's events) that the OpenTelemetry layer's filter lets in, so
//! an untraced session's spans cost what they cost with export off;
//! children follow their parent (`in_traced`), and the SDK keeps every span
//! it sees (`Sampler::AlwaysOn`). There is one instrumentation API:
//! `tracing` spans become OpenTelemetry spans with their fields as
//! attributes (`otel.kind` and `otel.status_code` are tracing-opentelemetry's
//! special fields). `trace_id` gives a span's 32-hex trace id, used in the
//! `Received:` header, the session span's `trace_id` field (so every log
//! line of a traced session carries it) and the proxy's own 4xx/5xx
//! replies (`own`).
//!
//! # The spans
//! - `smtp.session` (`session::session_span`): made in the accept loop
//!   before `Policy::admit`, so the admission's lookups and a refusal
//!   belong to it; `client.*`, `server.*`, `network.peer.*` (the balancer,
//!   when a PROXY header named the client), `smtp.helo`, `tls.*`, the
//!   policy verdict (`smtp.policy.check`, `smtp.policy.action`,
//!   `error.type`) and `trace_id`.
//! - `dns.lookup` (`policy::dns`): rdns, fcrdns_forward, dnsbl per zone,
//!   helo; `cache.hit` recorded by the cache.
//! - `tls.handshake` (`session::tls`): `tls.resumed`, `error.type`; and
//!   (`relay::tls`) a new TLS connection to a backend, under `smtp.backend`:
//!   `server.address`, `tls.resumed`, `tls.protocol.version`, `error.type`.
//! - `smtp.transaction` (`session::span`): made at MAIL, so the wait for a
//!   backend is inside it; sender domain (the address only with
//!   `record_addresses`), recipients, size, final reply, `smtp.chunking`
//!   when the message came by BDAT.
//! - `smtp.backend` (`relay::select`): from before the checkout to the end
//!   of the transaction (held by the `Txn`); backend address, its group
//!   (`smtp.backend.group`), connection id, reused, pool wait.
//!
//! In-process tests install no OpenTelemetry layer; tests/traces.rs runs
//! the binary against a real OTLP receiver.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::span::Id;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use settings::{LogFormat, OtlpProtocol, TelemetryConfig};

mod http;
mod logline;
mod logwriter;
pub mod metrics;
mod otlp;
pub mod settings;
pub mod sharded;
mod span;
pub mod top;

pub use otlp::failed_spans;
use span::EXPORTING;
pub use span::{in_traced, own, own_text, sample_session, set_sample_ratio, trace_id, TRACED};

/// Spans the export queue could not take (collector slow, full or down).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans dropped so far because the export queue was full.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Keeps the trace pipeline; `shutdown` flushes what is queued (call it from
/// a blocking thread: the exporters block).
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Flushes the log lines still queued when dropped.
    _log: logwriter::Flush,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("trace export shutdown: {e}");
            }
        }
    }
}

/// Log lines dropped because the log queue was full (stderr not read fast
/// enough).
pub fn dropped_log_lines() -> u64 {
    logwriter::dropped_lines()
}

/// Installs the global subscriber for `cfg`, with OTLP export when an
/// endpoint is set. Call inside the tokio runtime (the gRPC exporter needs
/// it). An exporter that cannot be built is reported and mail goes on.
pub fn install(cfg: &TelemetryConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Lines go to stderr from a thread of their own, started by the first
    // line (`logwriter`: until then the process may stay one thread).
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(logwriter::LateStderr)
        .with_timer(logline::CachedSeconds)
        .with_target(false);
    // No log line needs the `smtp.backend` span's fields (it is entered
    // only around the checkout): the log layer need not format them for
    // every message.
    let filter = filter.and(tracing_subscriber::filter::filter_fn(|m| {
        m.name() != "smtp.backend"
    }));
    // RUST_LOG filters the log output only: trace export takes the
    // proxy's spans at info whatever the log level.
    let fmt = match cfg.log_format {
        // A terminal gets the default format, coloured; a pipe or a file
        // the same layout without colours, at a third of its cost
        // (`logline::Plain`).
        LogFormat::Text if std::io::stderr().is_terminal() => {
            fmt.with_ansi(true).with_filter(filter).boxed()
        }
        LogFormat::Text => fmt
            .with_ansi(false)
            .event_format(logline::Plain)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match cfg.otlp_endpoint.as_deref() {
        Some(ep) => match provider(cfg, ep) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("trace export to {ep} disabled: {e}");
                None
            }
        },
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        // Unentered outside the per-layer filter: the filter would look the
        // span up in the registry on every enter and exit (every poll of
        // an instrumented future) only for the hooks to do nothing.
        Unentered(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("smtp-edge"))
                .with_tracked_inactivity(false)
                // Parents come from the tracing span tree; nothing here reads
                // the active OpenTelemetry context, and activating it on every
                // poll of a session cost CPU per message.
                .with_context_activation(false)
                .with_threads(false)
                .with_location(false)
                // The target of every exported span is `smtp_edge::traced`: no
                // information, an attribute per span to build, ship and store.
                .with_target(false)
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target(TRACED, tracing::Level::INFO)
                        .with_target("smtp_edge::policy", tracing::Level::INFO),
                ),
        )
    });
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    // Not `.with(Option<layer>)`: a `None` layer answers "always" for
    // every callsite, so at `RUST_LOG=warn` every session and transaction
    // span would still be built in the registry (and entered on every
    // poll) only for the log layer's own filter to drop it: about a tenth
    // of the proxy's user-space instructions per message (callgrind).
    let _ = match otel {
        Some(otel) => tracing_subscriber::registry()
            .with(fmt)
            .with(otel)
            .try_init(),
        None => tracing_subscriber::registry().with(fmt).try_init(),
    };
    Telemetry {
        provider,
        _log: logwriter::Flush,
    }
}

fn provider(cfg: &TelemetryConfig, ep: &str) -> Result<SdkTracerProvider, String> {
    let timeout = Duration::from_secs(10);
    let endpoint = match cfg.otlp_protocol {
        OtlpProtocol::Grpc => ep.to_string(),
        OtlpProtocol::Http if ep.trim_end_matches('/').ends_with("/v1/traces") => ep.to_string(),
        OtlpProtocol::Http => format!("{}/v1/traces", ep.trim_end_matches('/')),
    };
    // Sends (and the gRPC channel's tasks) run on the export runtime.
    let exporter = otlp::OtlpSpanExporter::new(
        cfg.otlp_protocol,
        &endpoint,
        timeout,
        export_runtime()?.clone(),
    )?;
    let inflight = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::new(
        Counted {
            inner: exporter,
            inflight: inflight.clone(),
        },
        BatchConfigBuilder::default()
            .with_max_queue_size(cfg.export_queue)
            .with_max_export_batch_size(512.min(cfg.export_queue))
            .with_scheduled_delay(Duration::from_millis(500))
            .build(),
    );
    Ok(SdkTracerProvider::builder()
        .with_span_processor(Bounded {
            batch,
            inflight,
            capacity: cfg.export_queue,
        })
        // The head-sampling decision is made at accept (`sample_session`);
        // the spans that reach the SDK are those of traced sessions.
        .with_sampler({
            set_sample_ratio(cfg.sample_ratio);
            Sampler::AlwaysOn
        })
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build())
}

/// The OpenTelemetry layer without its enter and exit hooks. With context
/// activation and inactivity tracking off, all that is left of them is the
/// span's end time, taken on every exit: a lock, a clock read and two map
/// lookups on every poll of a session (its future is instrumented). A span
/// closed without it ends at its close, which here is right after its last
/// exit.
struct Unentered<L>(L);

impl<S, L> Layer<S> for Unentered<L>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: LayerContext<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }
    fn on_new_span(&self, a: &tracing::span::Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        self.0.on_new_span(a, id, ctx);
    }
    fn on_record(&self, id: &Id, values: &tracing::span::Record<'_>, ctx: LayerContext<'_, S>) {
        self.0.on_record(id, values, ctx);
    }
    fn on_follows_from(&self, span: &Id, follows: &Id, ctx: LayerContext<'_, S>) {
        self.0.on_follows_from(span, follows, ctx);
    }
    fn event_enabled(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }
    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        self.0.on_event(event, ctx);
    }
    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        self.0.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &Id, new: &Id, ctx: LayerContext<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }
    // `span.context()` (the trace id) finds the inner layer through this.
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded to the inner layer, whose pointers stay valid
        // as long as `self` does.
        unsafe { self.0.downcast_raw(id) }
    }
}

/// In front of the SDK's batch processor: counts the spans handed to it
/// and not yet exported, and drops (counting) what would not fit its queue,
/// so its queue never overflows and every drop is known.
#[derive(Debug)]
struct Bounded {
    batch: BatchSpanProcessor,
    inflight: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.batch.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.batch.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.batch.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.batch.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.batch.set_resource(resource);
    }
}

/// The exporter, telling `Bounded` when spans left the queue.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    inflight: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let r = self.inner.export(batch).await;
        self.inflight.fetch_sub(n, Ordering::AcqRel);
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The runtime of the span exporter's sends (its gRPC channel's or HTTP
/// connection's tasks), on a thread of its own so that they never run on
/// a session's worker. An error (no thread or runtime could be made)
/// disables trace export.
fn export_runtime() -> Result<&'static tokio::runtime::Handle, String> {
    static RT: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    if let Some(h) = RT.get() {
        return Ok(h);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the exporter: {e}"))?;
    let h = rt.handle().clone();
    std::thread::Builder::new()
        .name("otlp-grpc".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .map_err(|e| format!("the exporter's thread: {e}"))?;
    Ok(RT.get_or_init(|| h))
}
