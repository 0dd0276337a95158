//! The OTLP span exporter: encodes a batch of the SDK's `SpanData` straight
//! into the protobuf wire form of an `ExportTraceServiceRequest` and sends
//! it over gRPC (tonic, with a codec that passes the encoded bytes) or
//! HTTP/protobuf (hyper, one kept-alive connection).
//!
//! Why not `opentelemetry-otlp`'s exporter: per span it clones the
//! `SpanData` (kept for a retry), converts it into the owned structs of
//! `opentelemetry-proto` (a `String` per key and value) and lets prost
//! compute the length of each nested message once per level it is nested
//! in. With every message traced that was half of the export's cost in
//! the proxy (callgrind: 45k against 26k instructions per traced message;
//! loadtest/RESULTS.md section 9). Here each span is written once into one
//! buffer; a nested message's length is patched in after its content. The
//! output decodes to what `opentelemetry-proto`'s own conversion gives,
//! byte for byte with prost's encoding of it (a unit test holds the two
//! together).
//!
//! Its limits, on purpose: plain `http://` to a collector nearby (a local
//! OpenTelemetry Collector or agent, which does TLS, auth and retries
//! onwards); no TLS, no custom headers, no compression; no retry of a
//! failed batch (its spans are counted in `failed_spans` and the failure is
//! logged once per change of state). Sends run on `rt`, a runtime of their
//! own, never on a session's worker. Crate-private: only `telemetry`
//! installs it.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::settings::OtlpProtocol;

use super::http::{http1_connect, http1_post};

/// Protobuf wire types used here.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `v` as a protobuf varint in a buffer of its own, and its length.
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut out = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        out[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    out[n] = v as u8;
    (out, n + 1)
}

fn varint(buf: &mut Vec<u8>, v: u64) {
    let (b, n) = varint_bytes(v);
    buf.extend_from_slice(&b[..n]);
}

fn key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from(field << 3 | wire));
}

/// A length-delimited field whose content `f` writes: one byte is kept for
/// the length, which most nested messages here fit.
fn nested(buf: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    nested_sized(buf, field, 1, f)
}

/// `nested` keeping `room` bytes for the length (2 for a span, 3 for the
/// messages that hold the whole batch); a length that needs more or fewer
/// bytes moves the content once.
fn nested_sized(buf: &mut Vec<u8>, field: u32, room: usize, f: impl FnOnce(&mut Vec<u8>)) {
    key(buf, field, LEN);
    let at = buf.len();
    buf.resize(at + room, 0);
    f(buf);
    let (head, n) = varint_bytes((buf.len() - at - room) as u64);
    if n > room {
        buf.splice(at + room..at + room, std::iter::repeat_n(0, n - room));
    } else if n < room {
        buf.drain(at + n..at + room);
    }
    buf[at..at + n].copy_from_slice(&head[..n]);
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(buf, field, LEN);
    varint(buf, v.len() as u64);
    buf.extend_from_slice(v);
}

/// A proto3 string: omitted when empty (its default).
fn str_field(buf: &mut Vec<u8>, field: u32, v: &str) {
    if !v.is_empty() {
        bytes_field(buf, field, v.as_bytes());
    }
}

fn u32_field(buf: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        key(buf, field, VARINT);
        varint(buf, u64::from(v));
    }
}

fn fixed64_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, FIXED64);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32_field(buf: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        key(buf, field, FIXED32);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `AnyValue` (common.v1): a oneof, so written even when it is a default.
fn any_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Bool(b) => {
            key(buf, 2, VARINT);
            varint(buf, u64::from(*b));
        }
        Value::I64(i) => {
            key(buf, 3, VARINT);
            varint(buf, *i as u64);
        }
        Value::F64(f) => {
            key(buf, 4, FIXED64);
            buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::String(s) => bytes_field(buf, 1, s.as_str().as_bytes()),
        Value::Array(a) => nested(buf, 5, |buf| array(buf, a)),
        // A kind of value added to the API later: its text.
        other => bytes_field(buf, 1, other.as_str().as_bytes()),
    }
}

/// `ArrayValue`: `values` (1) one `AnyValue` per element.
fn array(buf: &mut Vec<u8>, a: &Array) {
    fn each<T>(buf: &mut Vec<u8>, xs: &[T], f: impl Fn(&T) -> Value) {
        for x in xs {
            nested(buf, 1, |buf| any_value(buf, &f(x)));
        }
    }
    match a {
        Array::Bool(xs) => each(buf, xs, |x| Value::Bool(*x)),
        Array::I64(xs) => each(buf, xs, |x| Value::I64(*x)),
        Array::F64(xs) => each(buf, xs, |x| Value::F64(*x)),
        Array::String(xs) => each(buf, xs, |x| Value::String(x.clone())),
        other => nested(buf, 1, |buf| {
            bytes_field(buf, 1, other.to_string().as_bytes())
        }),
    }
}

/// `KeyValue`s as the repeated field `field`.
fn attributes<'a>(buf: &mut Vec<u8>, field: u32, kvs: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in kvs {
        nested(buf, field, |buf| {
            str_field(buf, 1, kv.key.as_str());
            nested(buf, 2, |buf| any_value(buf, &kv.value));
        });
    }
}

/// `Span.flags`: the W3C trace flags, and that the parent's remoteness is
/// known (and whether it is remote), as opentelemetry-proto writes them.
fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

fn trace_state(buf: &mut Vec<u8>, field: u32, ts: &TraceState) {
    str_field(buf, field, &ts.header());
}

fn span(buf: &mut Vec<u8>, s: &SpanData) {
    let cx = &s.span_context;
    bytes_field(buf, 1, &cx.trace_id().to_bytes());
    bytes_field(buf, 2, &cx.span_id().to_bytes());
    trace_state(buf, 3, cx.trace_state());
    if s.parent_span_id != SpanId::INVALID {
        bytes_field(buf, 4, &s.parent_span_id.to_bytes());
    }
    str_field(buf, 5, &s.name);
    let kind = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    u32_field(buf, 6, kind);
    fixed64_field(buf, 7, nanos(s.start_time));
    fixed64_field(buf, 8, nanos(s.end_time));
    attributes(buf, 9, &s.attributes);
    u32_field(buf, 10, s.dropped_attributes_count);
    for e in s.events.iter() {
        nested(buf, 11, |buf| {
            fixed64_field(buf, 1, nanos(e.timestamp));
            str_field(buf, 2, &e.name);
            attributes(buf, 3, &e.attributes);
            u32_field(buf, 4, e.dropped_attributes_count);
        });
    }
    u32_field(buf, 12, s.events.dropped_count);
    for l in s.links.iter() {
        nested(buf, 13, |buf| {
            let lc = &l.span_context;
            bytes_field(buf, 1, &lc.trace_id().to_bytes());
            bytes_field(buf, 2, &lc.span_id().to_bytes());
            trace_state(buf, 3, lc.trace_state());
            attributes(buf, 4, &l.attributes);
            u32_field(buf, 5, l.dropped_attributes_count);
            fixed32_field(buf, 6, span_flags(lc.is_remote(), lc.trace_flags().to_u8()));
        });
    }
    u32_field(buf, 14, s.links.dropped_count);
    // Always present, as opentelemetry-proto writes it.
    nested(buf, 15, |buf| {
        let (code, message) = match &s.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        str_field(buf, 2, message);
        u32_field(buf, 3, code);
    });
    fixed32_field(
        buf,
        16,
        span_flags(s.parent_span_is_remote, cx.trace_flags().to_u8()),
    );
}

fn scope(buf: &mut Vec<u8>, sc: &InstrumentationScope) {
    str_field(buf, 1, sc.name());
    str_field(buf, 2, sc.version().unwrap_or_default());
    attributes(buf, 3, sc.attributes());
}

/// The `Resource` message (resource.v1) of `r`.
fn resource(r: &Resource) -> Vec<u8> {
    let mut buf = Vec::new();
    for (k, v) in r.iter() {
        nested(&mut buf, 1, |buf| {
            str_field(buf, 1, k.as_str());
            nested(buf, 2, |buf| any_value(buf, v));
        });
    }
    buf
}

/// What the request needs of the resource, encoded once.
#[derive(Debug, Default, Clone)]
struct EncodedResource {
    message: Vec<u8>,
    schema_url: String,
}

/// The `ExportTraceServiceRequest` for `spans`: one `ResourceSpans`, one
/// `ScopeSpans` per instrumentation scope in order of first appearance.
fn request(res: &EncodedResource, spans: &[SpanData]) -> Vec<u8> {
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    for s in spans {
        if !scopes.contains(&&s.instrumentation_scope) {
            scopes.push(&s.instrumentation_scope);
        }
    }
    let mut buf = Vec::with_capacity(spans.len() * 320 + res.message.len() + 64);
    nested_sized(&mut buf, 1, 3, |buf| {
        bytes_field(buf, 1, &res.message);
        let one = scopes.len() == 1;
        for sc in &scopes {
            nested_sized(buf, 2, 3, |buf| {
                nested(buf, 1, |buf| scope(buf, sc));
                for s in spans
                    .iter()
                    .filter(|s| one || &s.instrumentation_scope == *sc)
                {
                    nested_sized(buf, 2, 2, |buf| span(buf, s));
                }
                str_field(buf, 3, sc.schema_url().unwrap_or_default());
            });
        }
        str_field(buf, 3, &res.schema_url);
    });
    buf
}

/// A gRPC codec for a request already encoded; the reply
/// (`ExportTraceServiceResponse`, a partial success at most) is read for
/// its rejected-span count.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = i64;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = i64;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<i64>, tonic::Status> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
        let r = <ExportTraceServiceResponse as prost::Message>::decode(
            src.copy_to_bytes(src.remaining()),
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Some(r.partial_success.map_or(0, |p| p.rejected_spans)))
    }
}

/// Spans that did not reach the collector although they left the queue:
/// their batch failed (no connection, an error or no answer in time), or
/// the collector rejected them (a partial success).
static FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Spans whose export failed so far (`smtp_edge_trace_spans_failed_total`).
pub fn failed_spans() -> u64 {
    FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Why a batch did not (wholly) arrive, with the spans lost.
struct Failure {
    lost: u64,
    why: String,
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

enum Transport {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    Http {
        url: hyper::Uri,
        conn: tokio::sync::Mutex<
            Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>>,
        >,
    },
}

/// The exporter the batch span processor calls from its thread: encodes
/// there, sends on the export runtime (`rt`), waits at most `timeout`.
pub(crate) struct OtlpSpanExporter {
    transport: std::sync::Arc<Transport>,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    resource: EncodedResource,
    /// Whether the last export failed (a change is logged once).
    failing: Mutex<bool>,
}

impl std::fmt::Debug for OtlpSpanExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpSpanExporter")
    }
}

impl OtlpSpanExporter {
    /// An exporter to `endpoint` (for HTTP, the full URL of the traces
    /// path). gRPC connects lazily, on `rt`.
    pub(crate) fn new(
        protocol: OtlpProtocol,
        endpoint: &str,
        timeout: Duration,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        let transport = match protocol {
            OtlpProtocol::Grpc => {
                let _g = rt.enter();
                let ch = tonic::transport::Channel::from_shared(endpoint.to_string())
                    .map_err(|e| format!("endpoint {endpoint}: {e}"))?
                    .connect_timeout(timeout)
                    .connect_lazy();
                Transport::Grpc(tonic::client::Grpc::new(ch))
            }
            OtlpProtocol::Http => {
                let url: hyper::Uri = endpoint
                    .parse()
                    .map_err(|e| format!("endpoint {endpoint}: {e}"))?;
                if url.scheme_str() != Some("http") || url.host().is_none() {
                    return Err(format!(
                        "endpoint {endpoint}: only http://host:port is supported"
                    ));
                }
                Transport::Http {
                    url,
                    conn: tokio::sync::Mutex::new(None),
                }
            }
        };
        Ok(OtlpSpanExporter {
            transport: std::sync::Arc::new(transport),
            rt,
            timeout,
            resource: EncodedResource::default(),
            failing: Mutex::new(false),
        })
    }

    fn note(&self, result: &Result<(), Failure>) {
        let Ok(mut failing) = self.failing.lock() else {
            return;
        };
        match result {
            Err(e) if !*failing => {
                *failing = true;
                tracing::warn!("OTLP trace export failing: {}", e.why);
            }
            Ok(()) if *failing => {
                *failing = false;
                tracing::info!("OTLP trace export works again");
            }
            _ => {}
        }
    }
}

impl Transport {
    /// Sends one request; the spans the collector rejected are in `Ok`.
    async fn send(&self, body: Bytes) -> Result<u64, String> {
        match self {
            Transport::Grpc(client) => {
                let mut client = client.clone();
                client.ready().await.map_err(|e| e.to_string())?;
                let rejected = client
                    .unary(
                        tonic::Request::new(body),
                        tonic::codegen::http::uri::PathAndQuery::from_static(EXPORT_PATH),
                        Raw,
                    )
                    .await
                    .map_err(|e| format!("{}: {}", e.code(), e.message()))?
                    .into_inner();
                Ok(rejected.max(0) as u64)
            }
            Transport::Http { url, conn } => {
                let mut conn = conn.lock().await;
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    *conn = Some(http1_connect(url).await?);
                }
                let Some(send) = conn.as_mut() else {
                    return Err("no connection".into());
                };
                let r = http1_post(send, url, body).await;
                if r.is_err() {
                    // A connection that failed once is not trusted again.
                    *conn = None;
                }
                // A partial success's count is not read over HTTP.
                r.map(|()| 0)
            }
        }
    }
}

impl SpanExporter for OtlpSpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let body = Bytes::from(request(&self.resource, &batch));
        let n = batch.len() as u64;
        drop(batch);
        let transport = self.transport.clone();
        let timeout = self.timeout;
        let sent = self.rt.spawn(async move {
            match tokio::time::timeout(timeout, transport.send(body)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        let result = match sent.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(0) => Ok(()),
            Ok(rejected) => Err(Failure {
                lost: rejected.min(n),
                why: format!("the collector rejected {rejected} span(s)"),
            }),
            Err(why) => Err(Failure { lost: n, why }),
        };
        if let Err(f) = &result {
            FAILED.fetch_add(f.lost, std::sync::atomic::Ordering::Relaxed);
        }
        self.note(&result);
        result.map_err(|f| OTelSdkError::InternalFailure(f.why))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, r: &Resource) {
        self.resource = EncodedResource {
            message: resource(r),
            schema_url: r.schema_url().unwrap_or_default().to_string(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId};
    use opentelemetry::{KeyValue, StringValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message;
    use std::borrow::Cow;

    fn cx(t: u128, s: u64, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(t),
            SpanId::from(s),
            TraceFlags::SAMPLED,
            remote,
            state.parse().unwrap_or_default(),
        )
    }

    fn spans() -> Vec<SpanData> {
        let scope = InstrumentationScope::builder("smtp-edge").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2")
            .with_schema_url("https://example.org/schema")
            .with_attributes([KeyValue::new("scope.k", 7)])
            .build();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
        let long = "x".repeat(300);
        let attrs = vec![
            KeyValue::new("client.address", "192.0.2.7"),
            KeyValue::new("smtp.reply.code", 250i64),
            KeyValue::new("neg", -5i64),
            KeyValue::new("zero", 0i64),
            KeyValue::new("empty", ""),
            KeyValue::new("ok", false),
            KeyValue::new("ms", 0.25f64),
            KeyValue::new("long", long.clone()),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ints", Value::Array(Array::I64(vec![1, -1, 300]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
            KeyValue::new(
                "strs",
                Value::Array(Array::String(vec![
                    StringValue::from("a"),
                    StringValue::from(""),
                ])),
            ),
        ];
        let mut events = SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            "ev",
            t0,
            vec![KeyValue::new("e", 1)],
            2,
        ));
        events.dropped_count = 3;
        let mut links = SpanLinks::default();
        links.links.push(opentelemetry::trace::Link::new(
            cx(9, 8, true, "k=v"),
            vec![KeyValue::new("l", "x")],
            1,
        ));
        let base = SpanData {
            span_context: cx(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, 42, false, ""),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed("smtp.session"),
            start_time: t0,
            end_time: t0 + Duration::from_micros(1500),
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
        let mut child = base.clone();
        child.span_context = cx(1, 43, false, "a=b,c=d");
        child.parent_span_id = SpanId::from(42);
        child.parent_span_is_remote = true;
        child.span_kind = SpanKind::Client;
        child.name = Cow::Owned(long);
        child.attributes.truncate(2);
        child.dropped_attributes_count = 4;
        child.events = events;
        child.links = links;
        child.status = Status::error("451 4.4.1");
        let mut third = base.clone();
        third.instrumentation_scope = other;
        third.span_kind = SpanKind::Internal;
        third.status = Status::Ok;
        third.attributes.clear();
        let mut fourth = base.clone();
        fourth.span_kind = SpanKind::Producer;
        let mut fifth = base.clone();
        fifth.span_kind = SpanKind::Consumer;
        fifth.start_time = SystemTime::UNIX_EPOCH;
        fifth.end_time = SystemTime::UNIX_EPOCH;
        vec![base, child, third, fourth, fifth]
    }

    /// What we write decodes to what opentelemetry-proto's conversion
    /// gives, for every field this exporter writes.
    #[test]
    fn encodes_as_opentelemetry_proto_does() {
        let res = Resource::builder()
            .with_service_name("smtp-edge")
            .with_attribute(KeyValue::new("host.name", "edge-1"))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.0")
            .build();
        let ours = request(
            &EncodedResource {
                message: resource(&res),
                schema_url: res.schema_url().unwrap_or_default().to_string(),
            },
            &spans(),
        );
        let ours = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans(),
                &ResourceAttributesWithSchema::from(&res),
            ),
        };
        assert_eq!(ours, theirs);
        // And byte for byte, prost's encoding of the same (field order and
        // lengths), so no reader can tell them apart.
        assert_eq!(
            request(
                &EncodedResource {
                    message: resource(&res),
                    schema_url: res.schema_url().unwrap_or_default().to_string(),
                },
                &spans()
            ),
            theirs.encode_to_vec()
        );
    }

    #[test]
    fn lengths_of_every_size_class() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut want = Vec::new();
            prost::encoding::bytes::encode(1, &vec![7u8; n], &mut want);
            for room in 1..=4 {
                let mut buf = vec![9u8];
                nested_sized(&mut buf, 1, room, |b| b.extend(std::iter::repeat_n(7u8, n)));
                assert_eq!(buf[0], 9);
                assert!(buf[1..] == want[..], "{n} bytes, room {room}");
            }
        }
    }
}
