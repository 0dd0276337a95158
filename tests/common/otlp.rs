//! A real OTLP trace receiver for the tests: the OpenTelemetry collector
//! protocol's TraceService over gRPC (tonic, opentelemetry-proto) and
//! `POST /v1/traces` with a protobuf body over HTTP (hyper, prost), both
//! keeping every span they receive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A received span, flattened: name, ids as hex, attributes as strings.
#[derive(Debug, Clone)]
pub struct Got {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    pub attrs: Vec<(String, String)>,
    /// The keys of the attributes that are integers (`IntValue`).
    pub ints: Vec<String>,
    pub service: String,
}

impl Got {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|a| a.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn flatten(req: ExportTraceServiceRequest, out: &Mutex<Vec<Got>>) {
    let mut out = out.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| value(&a.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let Span {
                    name,
                    trace_id,
                    span_id,
                    parent_span_id,
                    attributes,
                    ..
                } = s;
                out.push(Got {
                    name,
                    trace_id: hex(&trace_id),
                    span_id: hex(&span_id),
                    parent: hex(&parent_span_id),
                    attrs: attributes
                        .iter()
                        .map(|a| (a.key.clone(), value(&a.value)))
                        .collect(),
                    ints: attributes
                        .iter()
                        .filter(|a| {
                            matches!(
                                a.value.as_ref().and_then(|v| v.value.as_ref()),
                                Some(Value::IntValue(_))
                            )
                        })
                        .map(|a| a.key.clone())
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
}

/// The receiver; `spans` holds every span received so far.
pub struct Receiver {
    pub endpoint: String,
    pub spans: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Svc(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        flatten(req.into_inner(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// OTLP/gRPC on a free loopback port.
    pub async fn grpc() -> Receiver {
        let port = super::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let svc = TraceServiceServer::new(Svc(spans.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve(addr)
                .await;
        });
        super::wait_port(&addr.to_string());
        Receiver {
            endpoint: format!("http://{addr}"),
            spans,
            task,
        }
    }

    /// OTLP/HTTP (protobuf) on a free loopback port; answers after `delay`.
    pub async fn http(delay: Duration) -> Receiver {
        use http_body_util::{BodyExt, Full};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let keep = keep.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let keep = keep.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                if let ("/v1/traces", Ok(b)) = (path.as_str(), body) {
                                    if let Ok(r) = ExportTraceServiceRequest::decode(b) {
                                        flatten(r, &keep);
                                    }
                                }
                                tokio::time::sleep(delay).await;
                                let mut resp = hyper::Response::new(Full::new(bytes::Bytes::from(
                                    ExportTraceServiceResponse::default().encode_to_vec(),
                                )));
                                resp.headers_mut().insert(
                                    "content-type",
                                    "application/x-protobuf".parse().unwrap(),
                                );
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Receiver {
            endpoint: format!("http://{addr}"),
            spans,
            task,
        }
    }

    pub fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the spans received (or `t` passes).
    pub async fn wait(&self, t: Duration, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let end = Instant::now() + t;
        loop {
            let s = self.spans();
            if pred(&s) || Instant::now() > end {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
