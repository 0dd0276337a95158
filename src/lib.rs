//! smtp-edge: an inbound SMTP edge proxy. It answers clients itself (EHLO,
//! STARTTLS), and relays each transaction to backend MTAs over pooled
//! connections, never answering 250 before the backend did.

pub mod config;
pub mod cores;
pub mod policy;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod session;
pub mod smtp;
pub mod telemetry;
pub mod timer;
pub mod tls;
