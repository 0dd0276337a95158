//! `[telemetry]`: the log format and the OTLP trace export's settings, as
//! the configuration file gives them (validated by `config`).

use serde::Deserialize;

/// `[telemetry]`: log format and OTLP trace export.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `http://host:port` of an OTLP receiver; absent: no export.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    pub service_name: String,
    /// Share of sessions traced (decided at accept), 0.0 to 1.0.
    pub sample_ratio: f64,
    pub log_format: LogFormat,
    /// Envelope local parts in span attributes (domains only when false).
    pub record_addresses: bool,
    /// Most spans waiting for export; past it spans are dropped and counted.
    pub export_queue: usize,
    /// Addresses (and as many prefixes) `/top` tracks; 0 = off.
    pub top_size: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            service_name: "smtp-edge".into(),
            sample_ratio: 1.0,
            log_format: LogFormat::Text,
            record_addresses: false,
            export_queue: 8192,
            top_size: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318; `/v1/traces` is added).
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    /// JSON lines, with the span fields (the session's trace_id) on each.
    Json,
}
