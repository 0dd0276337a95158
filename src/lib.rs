//! smtp-edge: an inbound SMTP edge proxy. It answers clients itself (EHLO,
//! STARTTLS), and relays each transaction to backend MTAs over pooled
//! connections, never answering 250 before the backend did.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod otlp_metrics;
pub mod otlp_traces;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod session;
pub mod smtp;
pub mod telemetry;
pub mod timer;
pub mod tls;
