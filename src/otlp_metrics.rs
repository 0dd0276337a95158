//! The Prometheus metrics pushed over OTLP too, when `[telemetry]
//! otlp_endpoint` is set: every `metrics_interval` seconds the registry's
//! exposition is parsed and converted to one OTLP metrics export
//! (cumulative monotonic sums for counters, gauges, explicit-bucket
//! histograms), sent over the trace export's protocol. Owns the conversion
//! and the push loop; what is counted is `metrics.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_parse::{Scrape, Value};
use tokio::sync::watch;

use crate::config::{OtlpProtocol, TelemetryConfig};
use crate::metrics::Metrics;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn attributes(labels: &HashMap<String, String>) -> Vec<KeyValue> {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted.into_iter().map(|(k, v)| kv(k, v)).collect()
}

/// A label set as a map key.
fn key(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    format!("{sorted:?}")
}

/// One export request from a Prometheus text exposition.
pub fn convert(
    text: &str,
    service: &str,
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap_or(Scrape {
        docs: HashMap::new(),
        samples: Vec::new(),
    });
    // Histogram sums come as untyped `<name>_sum` samples.
    let mut sums: HashMap<(String, String), f64> = HashMap::new();
    for s in &scrape.samples {
        if let (Some(base), Value::Untyped(v)) = (s.metric.strip_suffix("_sum"), &s.value) {
            sums.insert((base.to_string(), key(&s.labels)), *v);
        }
    }
    let mut metrics: BTreeMap<String, Metric> = BTreeMap::new();
    let point = |labels: &HashMap<String, String>, v: f64| NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    for s in &scrape.samples {
        let (name, data) = match &s.value {
            Value::Counter(v) => (
                s.metric.trim_end_matches("_total").to_string(),
                metric::Data::Sum(Sum {
                    data_points: vec![point(&s.labels, *v)],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
            ),
            Value::Gauge(v) => (
                s.metric.clone(),
                metric::Data::Gauge(Gauge {
                    data_points: vec![point(&s.labels, *v)],
                }),
            ),
            Value::Histogram(buckets) => {
                let mut bounds = Vec::new();
                let mut counts = Vec::new();
                let mut below = 0.0;
                for b in buckets {
                    if b.less_than.is_finite() {
                        bounds.push(b.less_than);
                    }
                    counts.push((b.count - below).max(0.0) as u64);
                    below = b.count;
                }
                if counts.len() == bounds.len() {
                    counts.push(0);
                }
                let sum = sums.get(&(s.metric.clone(), key(&s.labels))).copied();
                (
                    s.metric.clone(),
                    metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            attributes: attributes(&s.labels),
                            start_time_unix_nano: start_ns,
                            time_unix_nano: now_ns,
                            count: below as u64,
                            sum,
                            bucket_counts: counts,
                            explicit_bounds: bounds,
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    }),
                )
            }
            Value::Untyped(_) | Value::Summary(_) => continue,
        };
        let description = scrape.docs.get(&s.metric).cloned().unwrap_or_default();
        let entry = metrics.entry(name.clone()).or_insert_with(|| Metric {
            name,
            description,
            unit: String::new(),
            data: None,
            metadata: Vec::new(),
        });
        match (&mut entry.data, data) {
            (None, d) => entry.data = Some(d),
            (Some(metric::Data::Sum(a)), metric::Data::Sum(b)) => {
                a.data_points.extend(b.data_points)
            }
            (Some(metric::Data::Gauge(a)), metric::Data::Gauge(b)) => {
                a.data_points.extend(b.data_points)
            }
            (Some(metric::Data::Histogram(a)), metric::Data::Histogram(b)) => {
                a.data_points.extend(b.data_points)
            }
            _ => {}
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "smtp-edge".into(),
                    ..Default::default()
                }),
                metrics: metrics.into_values().collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// POSTs a protobuf body to `url` (OTLP/HTTP) with hyper's client.
async fn post(url: &hyper::Uri, body: Vec<u8>) -> Result<(), String> {
    let mut send = http1_connect(url).await?;
    http1_post(&mut send, url, bytes::Bytes::from(body)).await
}

/// An HTTP/1.1 client connection to `url`'s host and port (its task runs
/// on the current runtime until the connection closes).
pub(crate) async fn http1_connect(
    url: &hyper::Uri,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// POSTs an OTLP protobuf `body` to `url` over `send`; an error for
/// anything but a 2xx.
pub(crate) async fn http1_post(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    url: &hyper::Uri,
    body: bytes::Bytes,
) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    send.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::post(url.path())
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/x-protobuf")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the body off, so the connection can carry the next request.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// Pushes the metrics every `metrics_interval` until `stop` turns true
/// (one last push then). Failures are logged once per state change.
pub fn spawn(cfg: &TelemetryConfig, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let (Some(ep), true) = (cfg.otlp_endpoint.clone(), cfg.metrics_interval > 0.0) else {
        return;
    };
    let every = Duration::from_secs_f64(cfg.metrics_interval);
    let protocol = cfg.otlp_protocol;
    let service = cfg.service_name.clone();
    tokio::spawn(async move {
        let start = now_ns();
        let mut grpc: Option<MetricsServiceClient<tonic::transport::Channel>> = None;
        let http: Option<hyper::Uri> = match protocol {
            OtlpProtocol::Http => format!("{}/v1/metrics", ep.trim_end_matches('/'))
                .parse()
                .ok(),
            OtlpProtocol::Grpc => None,
        };
        let mut failing = false;
        loop {
            let last = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = async { let _ = stop.wait_for(|v| *v).await; } => true,
            };
            let req = convert(&metrics.encode(), &service, start, now_ns());
            let sent = match protocol {
                OtlpProtocol::Grpc => {
                    if grpc.is_none() {
                        grpc = MetricsServiceClient::connect(ep.clone()).await.ok();
                    }
                    match grpc.as_mut() {
                        Some(c) => c.export(req).await.map(drop).map_err(|e| {
                            grpc = None;
                            e.to_string()
                        }),
                        None => Err("cannot connect".into()),
                    }
                }
                OtlpProtocol::Http => match &http {
                    Some(url) => post(url, prost::Message::encode_to_vec(&req)).await,
                    None => Err("bad endpoint".into()),
                },
            };
            match sent {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(endpoint = %ep, "OTLP metrics export failing: {e}");
                }
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(endpoint = %ep, "OTLP metrics export works again");
                }
                _ => {}
            }
            if last {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_convert() {
        let text = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{k=\"a\"} 3\nx_total{k=\"b\"} 4\n\
                    # TYPE g gauge\ng 7\n\
                    # TYPE h_seconds histogram\nh_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"1\"} 3\nh_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 2.5\nh_seconds_count 4\n";
        let req = convert(text, "svc", 1, 2);
        let ms = &req.resource_metrics[0].scope_metrics[0].metrics;
        let by = |n: &str| ms.iter().find(|m| m.name == n).unwrap();
        match by("x").data.as_ref().unwrap() {
            metric::Data::Sum(s) => {
                assert!(s.is_monotonic);
                assert_eq!(s.data_points.len(), 2);
            }
            d => panic!("{d:?}"),
        }
        assert!(matches!(by("g").data, Some(metric::Data::Gauge(_))));
        match by("h_seconds").data.as_ref().unwrap() {
            metric::Data::Histogram(h) => {
                let p = &h.data_points[0];
                assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
                assert_eq!(p.bucket_counts, vec![1, 2, 1]);
                assert_eq!((p.count, p.sum), (4, Some(2.5)));
            }
            d => panic!("{d:?}"),
        }
        // Never a panic on text that is not an exposition.
        let _ = convert("garbage {{{ \n", "svc", 0, 0);
    }
}
