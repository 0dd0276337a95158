//! `smtp-load`: the load generator for smtp-edge (closed and open loop,
//! hdrhistogram latencies per phase, JSON report), a fast SMTP sink backend,
//! and an idle-connection holder. The binary in `main.rs` is a thin CLI over
//! [`run::run`], [`sink::SinkServer`] and [`idle::idle`].

pub mod cli;
pub mod conn;
pub mod idle;
pub mod message;
pub mod net;
pub mod procstat;
pub mod run;
pub mod sink;
pub mod stats;
pub mod tls;

pub use run::{run, RunConfig};
pub use sink::{SinkConfig, SinkReport, SinkServer};
pub use stats::Report;
