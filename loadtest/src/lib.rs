//! `smtp-load`: the load generator for smtp-edge (closed and open loop,
//! hdrhistogram latencies per phase, JSON report), a fast SMTP sink backend,
//! an idle-connection holder, a slowloris and an OTLP trace receiver. The
//! binary in `main.rs` is a thin CLI over [`run::run`],
//! [`sink::SinkServer`], [`idle::idle`], [`slow::slow`] and
//! [`otlp::OtlpSink`].

pub mod cli;
pub mod conn;
pub mod idle;
pub mod message;
pub mod net;
pub mod otlp;
pub mod procstat;
pub mod run;
pub mod sink;
pub mod slow;
pub mod stats;
pub mod tls;

pub use otlp::{OtlpProtocol, OtlpSink, OtlpSinkReport};
pub use run::{run, RunConfig};
pub use sink::{SinkConfig, SinkReport, SinkServer};
pub use stats::Report;
