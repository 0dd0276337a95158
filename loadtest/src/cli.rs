//! Command line (clap derive): `run`, `sink`, `idle`, `slow` and `otlp-sink`, and
//! their mapping to the library's configurations.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::idle::IdleConfig;
use crate::message::{parse_size, SizeDist};
use crate::otlp::OtlpProtocol;
use crate::run::RunConfig;
use crate::sink::SinkConfig;
use crate::slow::SlowConfig;

#[derive(Debug, Parser)]
#[command(
    name = "smtp-load",
    version,
    about = "SMTP load generator, fast sink backend, idle-connection holder and OTLP trace receiver for smtp-edge load tests"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Send mail at a target and report rates, reply codes and latencies.
    Run(Box<RunArgs>),
    /// A fast SMTP sink: accepts and discards mail, counts it.
    Sink(SinkArgs),
    /// Open many connections, say EHLO, and hold them idle.
    Idle(IdleArgs),
    /// Slowloris: open many connections and never finish a command (one
    /// byte every --every seconds, or nothing); report how the server
    /// refused and reclaimed them.
    Slow(SlowArgs),
    /// An OTLP trace receiver (gRPC, or HTTP/protobuf): counts the spans
    /// exported to it and prints the counts when stopped.
    OtlpSink(OtlpSinkArgs),
    /// Compare what the clients of a `run --outcomes` were told with what
    /// the backends stored: lost, duplicated, explained.
    Account(AccountArgs),
    /// A plain TCP relay on one current-thread tokio runtime (nothing
    /// parsed): the floor of a tokio proxy, for cores.sh.
    Copy(CopyArgs),
}

/// Flags of `smtp-load copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Address to listen on.
    #[arg(long, short = 'l')]
    pub listen: String,
    /// Where every connection is relayed, HOST:PORT.
    #[arg(long, short = 't')]
    pub target: String,
}

/// Flags of `smtp-load run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Server to load, HOST:PORT.
    #[arg(long, short = 't')]
    pub target: String,
    /// Concurrent connections (closed loop); the most connections the open
    /// loop uses.
    #[arg(long, short = 'c', default_value_t = 20)]
    pub connections: usize,
    /// Messages per connection: 1 = a new connection per message, 0 = keep
    /// each connection for the whole run.
    #[arg(long, short = 'm', default_value_t = 1)]
    pub messages_per_conn: u64,
    /// Messages to send after the warmup (default, without --duration: 1000).
    #[arg(long, short = 'n')]
    pub messages: Option<u64>,
    /// Send for this many seconds after the warmup (instead of --messages).
    #[arg(long, short = 'd')]
    pub duration: Option<f64>,
    /// Send for this many seconds before measuring (not in the report's figures).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Recipients per message.
    #[arg(long, short = 'r', default_value_t = 1)]
    pub rcpts: usize,
    /// Message size in bytes (k/m suffixes allowed).
    #[arg(
        long,
        short = 's',
        default_value = "4096",
        conflicts_with = "size_dist"
    )]
    pub size: String,
    /// Weighted sizes, e.g. "4096:70,102400:30".
    #[arg(long)]
    pub size_dist: Option<String>,
    /// Say STARTTLS after EHLO (any certificate is accepted).
    #[arg(long)]
    pub starttls: bool,
    /// Allow TLS session resumption (default: a full handshake every time).
    #[arg(long, requires = "starttls")]
    pub tls_resume: bool,
    /// Offer TLS 1.2 only (default: TLS 1.3 and 1.2).
    #[arg(long, requires = "starttls")]
    pub tls12: bool,
    /// TLS server name to send (default: none, the target's IP address).
    #[arg(long, requires = "starttls")]
    pub sni: Option<String>,
    /// Wait for each reply, even when the server offers PIPELINING.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Sessions without mail: connect, EHLO, [STARTTLS, EHLO], QUIT. Each
    /// counts as one "message".
    #[arg(long)]
    pub churn: bool,
    /// After the reply to QUIT, close at once (default: wait up to 500 ms
    /// for the server to close first, so that the TIME_WAIT is its).
    #[arg(long)]
    pub no_wait_close: bool,
    /// EHLO name.
    #[arg(long, default_value = "loadgen.example.com")]
    pub helo: String,
    /// Envelope sender.
    #[arg(long, default_value = "sender@example.com")]
    pub from: String,
    /// Envelope recipient; "{n}" is replaced by the recipient's index, or
    /// with --rcpts > 1 the index goes before the '@'; "{seq}" by a number
    /// unique per recipient across the run (never repeated).
    #[arg(long, default_value = "rcpt@example.org")]
    pub to: String,
    /// The first number "{seq}" takes (then one more per recipient).
    #[arg(long, default_value_t = 1)]
    pub seq_start: u64,
    /// Source addresses to rotate through, e.g. 127.0.0.2-127.0.0.20 (or a list).
    #[arg(long)]
    pub bind: Option<String>,
    /// Open loop: messages per second on a fixed schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: most messages queued or in progress; arrivals over it are
    /// dropped by the generator (and counted).
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
    /// Timeout in seconds for connect, each reply and each write.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Runtime worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Report this server process's CPU and RSS (repeat for several).
    #[arg(long = "watch-pid")]
    pub watch_pid: Vec<u32>,
    /// Give each message an id (an `X-Load-Id` header and a `load-end`
    /// last line) and write what it was told, per id, to this file.
    #[arg(long)]
    pub outcomes: Option<PathBuf>,
    /// Ids are `<prefix>-<n>`.
    #[arg(long, default_value = "load", requires = "outcomes")]
    pub id_prefix: String,
    /// Write an SVG chart of messages/s and latency per second.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Fault moments to mark on the chart: lines of `<unix seconds> <label>`
    /// (read when the run ends).
    #[arg(long, requires = "chart")]
    pub faults: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Flags of `smtp-load account`.
#[derive(Debug, Args)]
pub struct AccountArgs {
    /// The outcome log of `run --outcomes`.
    #[arg(long)]
    pub outcomes: PathBuf,
    /// A directory of stored messages (smtp-sink dumps, a Maildir), read
    /// recursively; repeat for every backend.
    #[arg(long, required = true)]
    pub store: Vec<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `smtp-load sink`.
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Address to listen on (port 0: any free port, printed on stderr).
    #[arg(long, short = 'l', default_value = "127.0.0.1:2525")]
    pub listen: String,
    /// Exit after this many messages.
    #[arg(long, short = 'n')]
    pub messages: Option<u64>,
    /// Offer STARTTLS (self-signed certificate for "localhost" unless
    /// --tls-cert/--tls-key are given).
    #[arg(long)]
    pub tls: bool,
    /// PEM certificate chain for --tls.
    #[arg(long, requires_all = ["tls", "tls_key"])]
    pub tls_cert: Option<String>,
    /// PEM private key for --tls.
    #[arg(long, requires_all = ["tls", "tls_cert"])]
    pub tls_key: Option<String>,
    /// Also advertise XCLIENT (answered with a new greeting either way).
    #[arg(long)]
    pub xclient: bool,
    /// Name in the greeting and EHLO reply.
    #[arg(long, default_value = "sink.smtp-load.invalid")]
    pub hostname: String,
    /// Refuse a recipient whose address starts with this (ASCII case
    /// ignored) as an unknown user: 550 5.1.1, counted in rcpts_unknown.
    #[arg(long)]
    pub unknown_prefix: Option<String>,
    /// Close connections idle for this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// Runtime worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the counts as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Don't print the listening address on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Flags of `smtp-load idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Server to connect to, HOST:PORT.
    #[arg(long, short = 't')]
    pub target: String,
    /// Connections to open.
    #[arg(long, short = 'c')]
    pub connections: usize,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// EHLO name.
    #[arg(long, default_value = "loadgen.example.com")]
    pub helo: String,
    #[command(flatten)]
    pub held: HeldArgs,
    /// No progress line on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Flags of `smtp-load slow`.
#[derive(Debug, Args)]
pub struct SlowArgs {
    /// Server to connect to, HOST:PORT.
    #[arg(long, short = 't')]
    pub target: String,
    /// Connections to open.
    #[arg(long, short = 'c')]
    pub connections: usize,
    /// Seconds to keep each greeted connection (unless the server closes it).
    #[arg(long, default_value_t = 30.0)]
    pub hold: f64,
    /// Send one byte of a command line every this many seconds (0: never
    /// say anything).
    #[arg(long, default_value_t = 0.0)]
    pub every: f64,
    #[command(flatten)]
    pub held: HeldArgs,
}

/// Flags `idle` and `slow` share: where the connections come from, how
/// they are opened, what is watched and reported.
#[derive(Debug, Args)]
pub struct HeldArgs {
    /// Source addresses to rotate through, e.g. 127.0.0.2-127.0.0.20.
    #[arg(long)]
    pub bind: Option<String>,
    /// Timeout in seconds for connect and each reply while opening.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Connection attempts in progress at once while opening.
    #[arg(long, default_value_t = 256)]
    pub open_parallel: usize,
    /// Report this server process's RSS (repeat for several).
    #[arg(long = "watch-pid")]
    pub watch_pid: Vec<u32>,
    /// Runtime worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl SlowArgs {
    pub fn to_config(&self) -> Result<SlowConfig, String> {
        let every = secs(self.every, "--every")?;
        Ok(SlowConfig {
            target: resolve(&self.target)?,
            connections: self.connections,
            hold: secs(self.hold, "--hold")?,
            every: (!every.is_zero()).then_some(every),
            bind: self.held.bind.clone(),
            timeout: secs(self.held.timeout, "--timeout")?.max(Duration::from_millis(1)),
            open_parallel: self.held.open_parallel,
            watch_pids: self.held.watch_pid.clone(),
        })
    }
}

/// Flags of `smtp-load otlp-sink`.
#[derive(Debug, Args)]
pub struct OtlpSinkArgs {
    /// Address to listen on (port 0: any free port, printed on stderr).
    #[arg(long, short = 'l', default_value = "127.0.0.1:4317")]
    pub listen: String,
    /// OTLP/HTTP (`POST /v1/traces`, protobuf) instead of OTLP/gRPC.
    #[arg(long)]
    pub http: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the counts as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Don't print the listening address on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl OtlpSinkArgs {
    pub fn protocol(&self) -> OtlpProtocol {
        if self.http {
            OtlpProtocol::Http
        } else {
            OtlpProtocol::Grpc
        }
    }
}

/// Resolves HOST:PORT to its first address.
pub fn resolve(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn secs(v: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{flag} must be a non-negative number of seconds"))
}

/// Runtime worker threads: the flag, or one per core.
pub fn threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

impl RunArgs {
    pub fn to_config(&self) -> Result<RunConfig, String> {
        let mut c = RunConfig::new(resolve(&self.target)?);
        c.connections = self.connections;
        c.messages_per_conn = self.messages_per_conn;
        c.duration = self.duration.map(|d| secs(d, "--duration")).transpose()?;
        c.messages = match (self.messages, c.duration) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(1000),
        };
        c.warmup = secs(self.warmup, "--warmup")?;
        c.rcpts = self.rcpts;
        c.sizes = match &self.size_dist {
            Some(d) => SizeDist::parse(d)?,
            None => SizeDist::fixed(parse_size(&self.size)?),
        };
        c.starttls = self.starttls;
        c.tls_resume = self.tls_resume;
        c.tls12 = self.tls12;
        c.sni = self.sni.clone();
        c.pipelining = !self.no_pipelining;
        c.churn = self.churn;
        c.no_wait_close = self.no_wait_close;
        c.helo = self.helo.clone();
        c.from = self.from.clone();
        c.to = self.to.clone();
        c.seq_start = self.seq_start;
        c.bind = self.bind.clone();
        c.rate = self.rate;
        c.max_inflight = self.max_inflight;
        c.timeout = secs(self.timeout, "--timeout")?.max(Duration::from_millis(1));
        c.progress = !self.quiet;
        c.watch_pids = self.watch_pid.clone();
        c.threads = threads(self.threads);
        c.outcomes = self.outcomes.clone();
        c.id_prefix = self.id_prefix.clone();
        c.chart = self.chart.clone();
        c.faults = self.faults.clone();
        c.validate()?;
        Ok(c)
    }
}

impl SinkArgs {
    pub fn to_config(&self) -> Result<SinkConfig, String> {
        let mut c = SinkConfig::new(resolve(&self.listen)?);
        c.hostname = self.hostname.clone();
        c.xclient = self.xclient;
        c.max_messages = self.messages;
        c.unknown_prefix = self.unknown_prefix.clone().filter(|p| !p.is_empty());
        c.idle_timeout = secs(self.idle_timeout, "--idle-timeout")?.max(Duration::from_millis(1));
        if self.tls {
            c.tls = Some(match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => crate::tls::server_config_from_pem(cert, key)?,
                _ => crate::tls::self_signed_server_config()?,
            });
        }
        Ok(c)
    }
}

impl IdleArgs {
    pub fn to_config(&self) -> Result<IdleConfig, String> {
        let mut c = IdleConfig::new(
            resolve(&self.target)?,
            self.connections,
            secs(self.hold, "--hold")?,
        );
        c.bind = self.held.bind.clone();
        c.helo = self.helo.clone();
        c.timeout = secs(self.held.timeout, "--timeout")?.max(Duration::from_millis(1));
        c.open_parallel = self.held.open_parallel;
        c.progress = !self.quiet;
        c.watch_pids = self.held.watch_pid.clone();
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunConfig, String> {
        let mut v = vec!["smtp-load", "run", "--target", "127.0.0.1:25"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).map_err(|e| e.to_string())?.cmd {
            Cmd::Run(r) => r.to_config(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn run_flags() {
        let c = run_args(&[]).unwrap();
        assert_eq!(c.messages, Some(1000));
        assert_eq!(c.sizes, SizeDist::fixed(4096));
        assert!(c.pipelining && c.progress);
        let c = run_args(&[
            "-c",
            "7",
            "-m",
            "0",
            "-d",
            "2.5",
            "--size-dist",
            "4096:70,102400:30",
            "--no-pipelining",
            "--rate",
            "100",
            "--bind",
            "127.0.0.2-127.0.0.3",
            "-q",
            "--starttls",
            "--tls12",
            "--tls-resume",
            "--no-wait-close",
            "--watch-pid",
            "1",
            "--watch-pid",
            "2",
        ])
        .unwrap();
        assert_eq!(
            (c.connections, c.messages_per_conn, c.messages),
            (7, 0, None)
        );
        assert_eq!(c.duration, Some(Duration::from_millis(2500)));
        assert_eq!(c.sizes.entries.len(), 2);
        assert!(!c.pipelining && !c.progress && c.starttls && c.tls12 && c.tls_resume);
        assert!(c.no_wait_close);
        assert!(!run_args(&[]).unwrap().tls12);
        assert_eq!(c.rate, Some(100.0));
        assert_eq!(c.watch_pids, vec![1, 2]);
        assert!(run_args(&["--size", "1k", "--size-dist", "1:1"]).is_err());
        assert!(run_args(&["--tls-resume"]).is_err());
        assert!(run_args(&["--tls12"]).is_err());
        assert!(run_args(&["-c", "0"]).is_err());
        assert!(run_args(&["--rate", "-1"]).is_err());
        assert!(run_args(&["--from", "a>b"]).is_err());
        let c = run_args(&["--to", "nouser{seq}@x.org", "--seq-start", "1000"]).unwrap();
        assert_eq!((c.to.as_str(), c.seq_start), ("nouser{seq}@x.org", 1000));
        assert_eq!(run_args(&[]).unwrap().seq_start, 1);
        let c = run_args(&[
            "--outcomes",
            "o.tsv",
            "--id-prefix",
            "f1",
            "--chart",
            "c.svg",
        ])
        .unwrap();
        assert_eq!(c.outcomes, Some(PathBuf::from("o.tsv")));
        assert_eq!((c.id_prefix.as_str(), c.chart.is_some()), ("f1", true));
        assert!(run_args(&["--faults", "f.txt"]).is_err());
        assert!(run_args(&["--id-prefix", "x"]).is_err());
        assert!(run_args(&["--outcomes", "o", "--id-prefix", "a b"]).is_err());
    }

    #[test]
    fn sink_flags() {
        let parse = |args: &[&str]| {
            let mut v = vec!["smtp-load", "sink"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().cmd {
                Cmd::Sink(a) => a.to_config().unwrap(),
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]).unknown_prefix, None);
        let c = parse(&["--unknown-prefix", "nouser", "--json"]);
        assert_eq!(c.unknown_prefix.as_deref(), Some("nouser"));
    }

    #[test]
    fn otlp_sink_flags() {
        let parse = |args: &[&str]| {
            let mut v = vec!["smtp-load", "otlp-sink"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().cmd {
                Cmd::OtlpSink(a) => a,
                _ => unreachable!(),
            }
        };
        let a = parse(&[]);
        assert_eq!(
            (a.listen.as_str(), a.protocol()),
            ("127.0.0.1:4317", OtlpProtocol::Grpc)
        );
        let a = parse(&["-l", "127.0.0.1:0", "--http", "--json", "-q"]);
        assert_eq!(a.protocol(), OtlpProtocol::Http);
        assert!(a.json && a.quiet);
    }

    #[test]
    fn slow_flags() {
        let v = [
            "smtp-load",
            "slow",
            "-t",
            "127.0.0.1:25",
            "-c",
            "10",
            "--every",
            "2",
            "--bind",
            "127.0.0.2-127.0.0.3",
            "--json",
        ];
        let Cmd::Slow(a) = Cli::try_parse_from(v).unwrap().cmd else {
            unreachable!()
        };
        let c = a.to_config().unwrap();
        assert_eq!((c.connections, c.every), (10, Some(Duration::from_secs(2))));
        assert_eq!(c.hold, Duration::from_secs(30));
        assert!(a.held.json);
        let v = ["smtp-load", "slow", "-t", "127.0.0.1:25", "-c", "1"];
        let Cmd::Slow(a) = Cli::try_parse_from(v).unwrap().cmd else {
            unreachable!()
        };
        assert_eq!(a.to_config().unwrap().every, None);
    }
}
