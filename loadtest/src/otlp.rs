//! An OTLP trace receiver for load tests (`smtp-load otlp-sink`): the
//! OpenTelemetry collector protocol's `TraceService` over gRPC (tonic,
//! opentelemetry-proto), or with `--http` `POST /v1/traces` with a protobuf
//! body (hyper, prost). It decodes every export, counts the exports and the
//! spans (in all and per span name) and throws them away, so a proxy under
//! load has somewhere to send its spans, and the count says how many arrived.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Largest export accepted (tonic's default is 4 MiB; the SDK's batches of
/// 512 spans stay far below either).
const MAX_EXPORT: usize = 64 << 20;

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (the collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies on `/v1/traces` (port 4318).
    Http,
}

impl OtlpProtocol {
    pub fn name(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::Http => "http",
        }
    }
}

/// Live counters of an OTLP sink.
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// Export requests decoded and answered with success.
    pub exports: AtomicU64,
    /// Spans in those exports.
    pub spans: AtomicU64,
    /// Requests refused (HTTP: wrong path or method, undecodable body).
    pub errors: AtomicU64,
    by_name: Mutex<BTreeMap<String, u64>>,
    base: OnceLock<Instant>,
    /// Nanoseconds after `base` (+1, 0 = none yet): first and last export.
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl OtlpStats {
    fn ns(&self) -> u64 {
        let base = *self.base.get_or_init(Instant::now);
        base.elapsed().as_nanos() as u64 + 1
    }

    /// Counts one decoded export.
    fn count(&self, req: &ExportTraceServiceRequest) {
        let mut names: BTreeMap<&str, u64> = BTreeMap::new();
        let mut n = 0;
        for rs in &req.resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    *names.entry(s.name.as_str()).or_default() += 1;
                    n += 1;
                }
            }
        }
        {
            let mut by = self.by_name.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in names {
                match by.get_mut(k) {
                    Some(c) => *c += v,
                    None => {
                        by.insert(k.to_string(), v);
                    }
                }
            }
        }
        self.spans.fetch_add(n, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        let now = self.ns();
        let _ = self
            .first_ns
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
    }

    /// Spans received so far, per span name.
    pub fn spans_by_name(&self) -> BTreeMap<String, u64> {
        self.by_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Counts printed when the OTLP sink stops (`--json` prints this object).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OtlpSinkReport {
    /// Always "smtp-load-otlp-sink".
    pub tool: String,
    pub listen: String,
    pub protocol: OtlpProtocol,
    /// Export requests received.
    pub exports: u64,
    /// Spans in them.
    pub spans: u64,
    /// Spans per span name.
    pub spans_by_name: BTreeMap<String, u64>,
    /// Requests refused.
    pub errors: u64,
    /// First export → last export.
    pub elapsed_s: f64,
    pub spans_per_sec: f64,
    /// CPU seconds (user + system) this process used since it started.
    pub cpu_s: Option<f64>,
}

impl OtlpSinkReport {
    pub fn to_table(&self) -> String {
        let names = self
            .spans_by_name
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "smtp-load otlp-sink {} ({}): {} spans in {} exports ({}) in {:.3} s: {:.1} spans/s; {} errors; CPU {}\n",
            self.listen,
            self.protocol.name(),
            self.spans,
            self.exports,
            if names.is_empty() { "none" } else { &names },
            self.elapsed_s,
            self.spans_per_sec,
            self.errors,
            self.cpu_s.map_or("?".into(), |c| format!("{c:.3} s")),
        )
    }
}

struct Svc(Arc<OtlpStats>);

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.count(req.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running OTLP sink.
pub struct OtlpSink {
    addr: SocketAddr,
    protocol: OtlpProtocol,
    stats: Arc<OtlpStats>,
    task: JoinHandle<()>,
}

impl OtlpSink {
    /// Binds and starts serving (inside a tokio runtime).
    pub async fn start(listen: SocketAddr, protocol: OtlpProtocol) -> io::Result<OtlpSink> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(OtlpStats::default());
        stats.ns();
        let task = match protocol {
            OtlpProtocol::Grpc => {
                let svc = TraceServiceServer::new(Svc(stats.clone()))
                    .max_decoding_message_size(MAX_EXPORT);
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(async move {
                    if let Err(e) = tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(incoming)
                        .await
                    {
                        eprintln!("smtp-load otlp-sink: {e}");
                    }
                })
            }
            OtlpProtocol::Http => tokio::spawn(http_loop(listener, stats.clone())),
        };
        Ok(OtlpSink {
            addr,
            protocol,
            stats,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &OtlpStats {
        &self.stats
    }

    pub fn report(&self) -> OtlpSinkReport {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (first, last) = (get(&s.first_ns), get(&s.last_ns));
        let elapsed = if first > 0 && last > first {
            (last - first) as f64 / 1e9
        } else {
            0.0
        };
        let spans = get(&s.spans);
        OtlpSinkReport {
            tool: "smtp-load-otlp-sink".into(),
            listen: self.addr.to_string(),
            protocol: self.protocol,
            exports: get(&s.exports),
            spans,
            spans_by_name: s.spans_by_name(),
            errors: get(&s.errors),
            elapsed_s: elapsed,
            spans_per_sec: if elapsed > 0.0 {
                spans as f64 / elapsed
            } else {
                0.0
            },
            cpu_s: crate::procstat::cpu_seconds(std::process::id()),
        }
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn http_loop(listener: TcpListener, stats: Arc<OtlpStats>) {
    loop {
        let sock = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of fds and the like: back off a little.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let stats = stats.clone();
                async move { Ok::<_, Infallible>(http_export(req, &stats).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
        });
    }
}

async fn http_export(req: Request<Incoming>, stats: &OtlpStats) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        r
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return reply(StatusCode::NOT_FOUND, Bytes::new());
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_EXPORT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return reply(StatusCode::BAD_REQUEST, Bytes::new());
        }
    };
    match ExportTraceServiceRequest::decode(body) {
        Ok(r) => {
            stats.count(&r);
            reply(
                StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec().into(),
            )
        }
        Err(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            reply(StatusCode::BAD_REQUEST, Bytes::new())
        }
    }
}
