//! `smtp-load`: the load generator for smtp-edge (closed and open loop,
//! hdrhistogram latencies per phase, JSON report), a fast SMTP sink backend,
//! an idle-connection holder, a slowloris and an OTLP trace receiver;
//! per-message ids with an outcome log ([`outcome`]), the no-loss
//! accounting against what backends stored ([`account`]) and a per-second
//! SVG chart ([`chart`]); and a plain TCP relay on tokio ([`copy`]), the
//! floor of a tokio proxy. The binary in `main.rs` is a thin CLI over
//! [`run::run`], [`sink::SinkServer`], [`idle::idle`], [`slow::slow`],
//! [`otlp::OtlpSink`], [`copy::copy`] and [`account::Accounting`].

pub mod account;
pub mod chart;
pub mod cli;
pub mod conn;
pub mod copy;
pub mod idle;
pub mod message;
pub mod net;
pub mod otlp;
pub mod outcome;
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
