//! The load generator (`smtp-load run`): closed loop (N workers, each sending
//! its next message as soon as the last one is answered) or open loop (a fixed
//! arrival schedule t0 + i/R, latency measured from the scheduled time, so a
//! slow server cannot hide its latency: no coordinated omission).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};

use crate::chart::Timeline;
use crate::conn::{Caps, Conn, Error, ErrorKind, TlsClient};
use crate::message::{Envelope, MessagePlan, MessageTemplate, Seq, SizeDist, SplitMix64};
use crate::net::BindPool;
use crate::outcome::{stamped, Decision, Ids};
use crate::procstat::UsageStart;
use crate::stats::{
    errors_map, ConfigEcho, ConnCounts, Histograms, MessageCounts, Phase, Progress, Recorder,
    Report, Stage, Tally,
};

/// Settings of one run (the `run` subcommand's flags).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: SocketAddr,
    /// Concurrent connections (closed loop), or the most connections the
    /// open loop uses.
    pub connections: usize,
    /// 1 = a new connection per message; 0 = one connection for the whole run.
    pub messages_per_conn: u64,
    /// Messages to send (after the warmup); `None` with `duration`.
    pub messages: Option<u64>,
    /// How long to send (after the warmup).
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub rcpts: usize,
    pub sizes: SizeDist,
    pub starttls: bool,
    pub tls_resume: bool,
    /// Offer TLS 1.2 only.
    pub tls12: bool,
    pub sni: Option<String>,
    /// Pipeline MAIL + RCPTs + DATA when the server offers PIPELINING.
    pub pipelining: bool,
    /// Sessions without mail: connect, EHLO, [STARTTLS, EHLO], QUIT.
    pub churn: bool,
    /// After the reply to QUIT, close at once instead of waiting (at most
    /// 500 ms) for the server to close first.
    pub no_wait_close: bool,
    pub helo: String,
    pub from: String,
    pub to: String,
    /// The first number a `{seq}` in `to` takes (then +1 per recipient).
    pub seq_start: u64,
    /// Source addresses (`--bind`), empty for none.
    pub bind: Option<String>,
    /// Open loop: arrivals per second.
    pub rate: Option<f64>,
    /// Open loop: at most this many messages queued or in progress.
    pub max_inflight: usize,
    /// Per-operation timeout (connect, each reply, each write).
    pub timeout: Duration,
    /// Progress line on stderr every second.
    pub progress: bool,
    /// Server processes whose CPU and RSS to report.
    pub watch_pids: Vec<u32>,
    /// Runtime worker threads (echoed in the report only).
    pub threads: usize,
    /// Per-message ids (`X-Load-Id: <prefix>-<n>`) and the outcome log
    /// written to this file (see [`crate::outcome`]).
    pub outcomes: Option<PathBuf>,
    pub id_prefix: String,
    /// The per-second SVG chart (see [`crate::chart`]), and the fault
    /// moments to mark on it.
    pub chart: Option<PathBuf>,
    pub faults: Option<PathBuf>,
}

impl RunConfig {
    /// Defaults for a target: 20 connections, new connection per message,
    /// 1 000 messages of 4 KiB to one recipient, pipelining on.
    pub fn new(target: SocketAddr) -> RunConfig {
        RunConfig {
            target,
            connections: 20,
            messages_per_conn: 1,
            messages: Some(1000),
            duration: None,
            warmup: Duration::ZERO,
            rcpts: 1,
            sizes: SizeDist::fixed(4096),
            starttls: false,
            tls_resume: false,
            tls12: false,
            sni: None,
            pipelining: true,
            churn: false,
            no_wait_close: false,
            helo: "loadgen.example.com".into(),
            from: "sender@example.com".into(),
            to: "rcpt@example.org".into(),
            seq_start: 1,
            bind: None,
            rate: None,
            max_inflight: 1000,
            timeout: Duration::from_secs(30),
            progress: false,
            watch_pids: Vec::new(),
            threads: 0,
            outcomes: None,
            id_prefix: "load".into(),
            chart: None,
            faults: None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.messages.is_none() && self.duration.is_none() {
            return Err("give --messages or --duration".into());
        }
        if self.messages == Some(0) {
            return Err("--messages must be at least 1".into());
        }
        if self.rcpts == 0 || self.rcpts > 10_000 {
            return Err("--rcpts must be between 1 and 10000".into());
        }
        let month = Duration::from_secs(30 * 86_400);
        if self.warmup > month || self.duration.is_some_and(|d| d > month) {
            return Err("--warmup and --duration are limited to 30 days".into());
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && (0.01..=10_000_000.0).contains(&r)) {
                return Err("--rate must be between 0.01 and 10000000 messages/s".into());
            }
            if self.max_inflight == 0 {
                return Err("--max-inflight must be at least 1".into());
            }
        }
        if self.faults.is_some() && self.chart.is_none() {
            return Err("--faults needs --chart".into());
        }
        if self.id_prefix.is_empty() || !self.id_prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("--id-prefix must be printable ASCII without spaces".into());
        }
        for s in [&self.helo, &self.from, &self.to] {
            if s.bytes()
                .any(|b| b == b'\r' || b == b'\n' || b == b'<' || b == b'>')
            {
                return Err(format!("{s:?} contains CR, LF, '<' or '>'"));
            }
        }
        Ok(())
    }
}

/// One message to send (or one session, with `--churn`).
#[derive(Debug, Clone, Copy)]
struct Job {
    /// Open loop: when it was due.
    scheduled: Option<Instant>,
    /// False during the warmup.
    measure: bool,
}

struct Shared {
    cfg: RunConfig,
    plan: MessagePlan,
    bind: BindPool,
    tls: Option<TlsClient>,
    hists: Histograms,
    progress: Progress,
    claimed: AtomicU64,
    warmup_msgs: AtomicU64,
    dropped: AtomicU64,
    /// The `{seq}` numbers of the recipients.
    seq: Seq,
    measure_start: Instant,
    deadline: Option<Instant>,
    stop: Arc<AtomicBool>,
    queue: Option<Mutex<mpsc::UnboundedReceiver<Job>>>,
    ehlo_cmd: Vec<u8>,
    /// With `--outcomes`: the ids handed out and the outcomes collected.
    ids: Option<Ids>,
    /// With `--chart`: the per-second counts and latencies.
    timeline: Option<Timeline>,
    t0: Instant,
}

impl Shared {
    /// How long to wait for the server to close after QUIT.
    fn close_wait(&self) -> Duration {
        if self.cfg.no_wait_close {
            Duration::ZERO
        } else {
            self.cfg.timeout.min(Duration::from_millis(500))
        }
    }

    async fn next_job(&self) -> Option<Job> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(q) = &self.queue {
            return q.lock().await.recv().await;
        }
        let now = Instant::now();
        if now < self.measure_start {
            return Some(Job {
                scheduled: None,
                measure: false,
            });
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return None;
        }
        if let Some(total) = self.cfg.messages {
            if self.claimed.fetch_add(1, Ordering::Relaxed) >= total {
                return None;
            }
        }
        Some(Job {
            scheduled: None,
            measure: true,
        })
    }
}

/// An open SMTP session, greeted and EHLO'd (and TLS'd).
struct Session {
    conn: Conn,
    caps: Caps,
    /// Messages started on it.
    msgs: u64,
    /// When its connect started (for the first transaction's latency).
    connect_start: Instant,
    /// With `{seq}` recipients: the message's commands, built per message.
    env: Envelope,
}

/// How one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Accepted,
    Rejected,
    Failed(ErrorKind),
}

fn is_2xx(code: u16) -> bool {
    (200..300).contains(&code)
}

/// Where a worker records: the measured tally and recorder, or the warmup's;
/// and how the message at hand is being decided.
struct Out<'a, 'b> {
    t: &'a mut Tally,
    rec: Option<&'a mut Recorder<'b>>,
    decision: Decision,
    /// With `--outcomes`: the message's id and its wire form.
    stamp: Option<(&'a str, &'a mut Vec<u8>)>,
}

impl Out<'_, '_> {
    fn lat(&mut self, p: Phase, d: Duration) {
        if let Some(r) = self.rec.as_deref_mut() {
            r.record(p, d);
        }
    }

    /// Counts a reply and notes it in the decision.
    fn code(&mut self, stage: Stage, code: u16) {
        self.t.code(stage, code);
        self.decision.reply(stage, code);
    }
}

/// Runs the load and returns the report. Must run inside a (multi-thread)
/// tokio runtime. `stop` ends the run early (e.g. on Ctrl-C).
pub async fn run(cfg: RunConfig, stop: Arc<AtomicBool>) -> Result<Report, String> {
    cfg.validate()?;
    let plan = MessagePlan::new(cfg.sizes.clone(), &cfg.from, &cfg.to, cfg.rcpts);
    let bind = match &cfg.bind {
        Some(b) => BindPool::parse(b)?,
        None => BindPool::none(),
    };
    let tls = if cfg.starttls {
        let c = crate::tls::client_config(cfg.tls_resume, cfg.tls12).map_err(|e| e.to_string())?;
        Some(TlsClient::new(c, cfg.sni.as_deref(), cfg.target)?)
    } else {
        None
    };
    let t0 = Instant::now();
    let measure_start = t0 + cfg.warmup;
    let deadline = cfg.duration.map(|d| measure_start + d);
    let (tx, queue) = if cfg.rate.is_some() {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(Mutex::new(rx)))
    } else {
        (None, None)
    };
    let ehlo_cmd = format!("EHLO {}\r\n", cfg.helo).into_bytes();
    let ids = cfg.outcomes.as_ref().map(|_| Ids::new(&cfg.id_prefix));
    let timeline = cfg.chart.as_ref().map(|_| Timeline::new(t0));
    let sh = Arc::new(Shared {
        ids,
        timeline,
        t0,
        plan,
        bind,
        tls,
        hists: Histograms::new(),
        progress: Progress::default(),
        claimed: AtomicU64::new(0),
        warmup_msgs: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        seq: Seq::new(cfg.seq_start),
        measure_start,
        deadline,
        stop,
        queue,
        ehlo_cmd,
        cfg,
    });

    let progress = if sh.cfg.progress {
        Some(tokio::spawn(progress_loop(sh.clone(), t0)))
    } else {
        None
    };
    let scheduler = tx.map(|tx| {
        let sh = sh.clone();
        tokio::task::spawn_blocking(move || scheduler(sh, tx, t0))
    });
    // The server's usage is sampled when the warmup ends.
    let usage = {
        let sh = sh.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(sh.measure_start.into()).await;
            UsageStart::take(&sh.cfg.watch_pids)
        })
    };

    let workers: Vec<_> = (0..sh.cfg.connections)
        .map(|id| tokio::spawn(worker(sh.clone(), id)))
        .collect();
    let mut total = Tally::default();
    let mut panicked = 0;
    for w in workers {
        match w.await {
            Ok(t) => total.merge(&t),
            Err(_) => panicked += 1,
        }
    }
    if let Some(s) = scheduler {
        let _ = s.await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    if panicked > 0 {
        return Err(format!("{panicked} worker tasks panicked"));
    }
    let end = Instant::now();
    let usage_start = usage.await.map_err(|e| e.to_string())?;
    if let (Some(ids), Some(path)) = (&sh.ids, &sh.cfg.outcomes) {
        ids.write(path)?;
    }
    if let (Some(tl), Some(path)) = (&sh.timeline, &sh.cfg.chart) {
        let faults = match &sh.cfg.faults {
            Some(f) => crate::chart::read_faults(f, tl.start_unix)?,
            None => Vec::new(),
        };
        let title = format!(
            "{} connections to {}: messages and latency per second, faults in orange",
            sh.cfg.connections, sh.cfg.target
        );
        crate::chart::draw(path, &title, &tl.seconds(), &faults)?;
    }
    let elapsed = total
        .last_completion
        .unwrap_or(end)
        .saturating_duration_since(sh.measure_start)
        .as_secs_f64()
        .max(1e-6);
    let cfg = &sh.cfg;
    let messages = MessageCounts {
        attempted: total.attempted,
        accepted: total.accepted,
        rejected: total.rejected,
        failed: total.failed,
        dropped: sh.dropped.load(Ordering::Relaxed),
        warmup: sh.warmup_msgs.load(Ordering::Relaxed),
        pipelined: total.pipelined,
    };
    let ok =
        messages.attempted > 0 && messages.accepted == messages.attempted && messages.dropped == 0;
    let report = Report {
        tool: "smtp-load".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        mode: if cfg.rate.is_some() { "open" } else { "closed" }.into(),
        target: cfg.target.to_string(),
        config: ConfigEcho {
            connections: cfg.connections,
            messages_per_conn: cfg.messages_per_conn,
            messages: cfg.messages,
            duration_s: cfg.duration.map(|d| d.as_secs_f64()),
            warmup_s: cfg.warmup.as_secs_f64(),
            rcpts: cfg.rcpts,
            sizes: cfg.sizes.entries.clone(),
            starttls: cfg.starttls,
            tls_resume: cfg.tls_resume,
            tls12: cfg.tls12,
            pipelining: cfg.pipelining,
            churn: cfg.churn,
            wait_close: !cfg.no_wait_close,
            rate: cfg.rate,
            max_inflight: cfg.rate.map(|_| cfg.max_inflight),
            bind_addresses: sh.bind.len(),
            threads: cfg.threads,
        },
        elapsed_s: elapsed,
        msgs_per_sec: total.accepted as f64 / elapsed,
        conns_per_sec: total.conns_opened as f64 / elapsed,
        bytes: total.bytes,
        bytes_per_sec: total.bytes as f64 / elapsed,
        connections: ConnCounts {
            opened: total.conns_opened,
            failed: total.conns_failed,
        },
        replies: total.replies(),
        errors: errors_map(&total),
        latency_us: sh.hists.summaries(),
        server: usage_start.finish(total.accepted),
        tls: cfg.starttls.then(|| total.tls.clone()),
        messages,
        ok,
    };
    Ok(report)
}

/// The open loop's arrivals: job i is due at t0 + i/rate. Runs on a thread
/// of its own, sleeping with a 1 µs timer slack: tokio's timer has 1 ms
/// granularity, which would release arrivals up to 1 ms late.
fn scheduler(sh: Arc<Shared>, tx: mpsc::UnboundedSender<Job>, t0: Instant) {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let rate = sh.cfg.rate.unwrap_or(1.0);
    let mut measured = 0u64;
    let mut i = 0u64;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(at) = Duration::try_from_secs_f64(i as f64 / rate)
            .ok()
            .and_then(|d| t0.checked_add(d))
        else {
            break;
        };
        let measure = at >= sh.measure_start;
        if measure {
            if sh.deadline.is_some_and(|d| at >= d) {
                break;
            }
            if sh.cfg.messages.is_some_and(|n| measured >= n) {
                break;
            }
        }
        let now = Instant::now();
        if at > now {
            // Sleep in slices so that a stop request is seen within 100 ms.
            std::thread::sleep((at - now).min(Duration::from_millis(100)));
            continue;
        }
        i += 1;
        if measure {
            measured += 1;
        }
        if Progress::get(&sh.progress.inflight) >= sh.cfg.max_inflight as u64 {
            Progress::add(&sh.progress.dropped, 1);
            if measure {
                sh.dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        Progress::add(&sh.progress.inflight, 1);
        if tx
            .send(Job {
                scheduled: Some(at),
                measure,
            })
            .is_err()
        {
            break;
        }
    }
}

async fn progress_loop(sh: Arc<Shared>, t0: Instant) {
    let mut tick =
        tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let mut last = 0u64;
    loop {
        tick.tick().await;
        let p = &sh.progress;
        let acc = Progress::get(&p.accepted);
        let secs = t0.elapsed().as_secs_f64();
        let mut line = format!(
            "[{secs:7.1}s] attempted {} accepted {} not-accepted {} | {:.0} msg/s (last 1 s: {}) | conns {}",
            Progress::get(&p.attempted),
            acc,
            Progress::get(&p.not_accepted),
            acc as f64 / secs,
            acc - last,
            Progress::get(&p.conns),
        );
        if sh.cfg.rate.is_some() {
            line.push_str(&format!(
                " | in flight {} dropped {}",
                Progress::get(&p.inflight),
                Progress::get(&p.dropped)
            ));
        }
        if Instant::now() < sh.measure_start {
            line.push_str(" (warmup)");
        }
        eprintln!("{line}");
        last = acc;
    }
}

async fn worker(sh: Arc<Shared>, id: usize) -> Tally {
    let mut tally = Tally::default();
    let mut warm = Tally::default();
    let mut rec = Recorder::new(&sh.hists);
    let mut rng = SplitMix64(0x5EED_0000 ^ (id as u64).wrapping_mul(0x9E37_79B9));
    let mut sess: Option<Session> = None;
    let mpc = sh.cfg.messages_per_conn;
    let mut wire = Vec::new();
    while let Some(job) = sh.next_job().await {
        let started = job.scheduled.unwrap_or_else(Instant::now);
        let msg_id = sh.ids.as_ref().map(Ids::next);
        let stamp = msg_id.as_deref().map(|id| (id, &mut wire));
        let mut out = if job.measure {
            Out {
                t: &mut tally,
                rec: Some(&mut rec),
                decision: Decision::default(),
                stamp,
            }
        } else {
            sh.warmup_msgs.fetch_add(1, Ordering::Relaxed);
            Out {
                t: &mut warm,
                rec: None,
                decision: Decision::default(),
                stamp,
            }
        };
        out.t.attempted += 1;
        Progress::add(&sh.progress.attempted, 1);
        let fate = if sh.cfg.churn {
            churn_session(&sh, &mut out).await
        } else {
            let tmpl = &sh.plan.templates[sh.plan.dist.pick(rng.next_u64())];
            message(&sh, &mut sess, tmpl, mpc, job, &mut out).await
        };
        match fate {
            Fate::Accepted => {
                out.t.accepted += 1;
                Progress::add(&sh.progress.accepted, 1);
            }
            Fate::Rejected => {
                out.t.rejected += 1;
                Progress::add(&sh.progress.not_accepted, 1);
            }
            Fate::Failed(k) => {
                out.t.failed += 1;
                out.t.error(k);
                Progress::add(&sh.progress.not_accepted, 1);
            }
        }
        let connect_failed = fate == Fate::Failed(ErrorKind::Connect);
        let done = Instant::now();
        out.t.complete(done);
        if let (Some(ids), Some(id)) = (&sh.ids, &msg_id) {
            let t = done.saturating_duration_since(sh.t0).as_secs_f64();
            let latency = done.saturating_duration_since(started).as_secs_f64();
            ids.record(out.decision.outcome(id.clone(), t, latency));
        }
        if let Some(tl) = &sh.timeline {
            tl.record(
                done,
                fate == Fate::Accepted,
                done.saturating_duration_since(started),
            );
        }
        if job.scheduled.is_some() {
            sh.progress.inflight.fetch_sub(1, Ordering::Relaxed);
        } else if connect_failed {
            // Closed loop against a dead target (or out of ports): don't spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if let Some(s) = sess.take() {
        let mut out = Out {
            t: &mut tally,
            rec: None,
            decision: Decision::default(),
            stamp: None,
        };
        quit(&sh, s, &mut out).await;
    }
    rec.flush();
    tally
}

/// Connect, greeting, EHLO, and STARTTLS + EHLO when asked. On failure, the
/// message's fate: `Failed(kind)` on an error, `Rejected` on a non-2xx
/// greeting/EHLO or a STARTTLS refusal.
async fn open_session(sh: &Shared, out: &mut Out<'_, '_>) -> Result<Session, Fate> {
    let connect_start = Instant::now();
    let mut conn = match Conn::connect(sh.cfg.target, sh.bind.next(), sh.cfg.timeout, 4096).await {
        Ok(c) => c,
        Err(e) => {
            out.t.conns_failed += 1;
            return Err(Fate::Failed(e.kind));
        }
    };
    out.t.conns_opened += 1;
    Progress::add(&sh.progress.conns, 1);
    match greet(sh, &mut conn, connect_start, out).await {
        Ok(Some(caps)) => Ok(Session {
            conn,
            caps,
            msgs: 0,
            connect_start,
            env: Envelope::default(),
        }),
        Ok(None) => Err(Fate::Rejected),
        Err(e) => Err(Fate::Failed(e.kind)),
    }
}

/// Greeting, EHLO, and STARTTLS + EHLO when asked; `None` when refused.
async fn greet(
    sh: &Shared,
    conn: &mut Conn,
    connect_start: Instant,
    out: &mut Out<'_, '_>,
) -> Result<Option<Caps>, Error> {
    let code = conn.read_reply().await?;
    out.code(Stage::Greeting, code);
    if code != 220 {
        return Ok(None);
    }
    out.lat(Phase::ConnectToGreeting, connect_start.elapsed());
    let Some(mut caps) = ehlo(sh, conn, out).await? else {
        return Ok(None);
    };
    if let Some(tls) = &sh.tls {
        if !caps.starttls {
            return Err(Error::new(ErrorKind::Tls, "server does not offer STARTTLS"));
        }
        conn.write_all(b"STARTTLS\r\n").await?;
        let code = conn.read_reply().await?;
        out.code(Stage::Starttls, code);
        if code != 220 {
            return Ok(None);
        }
        let hs = Instant::now();
        conn.upgrade_tls(&tls.connector, tls.name.clone()).await?;
        out.lat(Phase::TlsHandshake, hs.elapsed());
        if let Some((resumed, tls13)) = conn.tls_info() {
            out.t.tls_handshake(resumed, tls13);
        }
        match ehlo(sh, conn, out).await? {
            Some(c) => caps = c,
            None => return Ok(None),
        }
    }
    Ok(Some(caps))
}

/// EHLO; `None` when refused.
async fn ehlo(sh: &Shared, conn: &mut Conn, out: &mut Out<'_, '_>) -> Result<Option<Caps>, Error> {
    out.decision.reached = Stage::Ehlo;
    conn.write_all(&sh.ehlo_cmd).await?;
    let mut caps = Caps::default();
    let code = conn.read_ehlo_reply(&mut caps).await?;
    out.code(Stage::Ehlo, code);
    Ok(is_2xx(code).then_some(caps))
}

/// QUIT (the reply counted), then wait briefly for the server to close.
async fn quit(sh: &Shared, mut s: Session, out: &mut Out<'_, '_>) {
    if s.conn.write_all(b"QUIT\r\n").await.is_ok() {
        if let Ok(code) = s.conn.read_reply().await {
            out.code(Stage::Quit, code);
        }
    }
    s.conn.wait_close(sh.close_wait()).await;
}

/// `--churn`: one session without mail; accepted when QUIT gets 221.
async fn churn_session(sh: &Shared, out: &mut Out<'_, '_>) -> Fate {
    let mut s = match open_session(sh, out).await {
        Ok(s) => s,
        Err(f) => return f,
    };
    let r = async {
        s.conn.write_all(b"QUIT\r\n").await?;
        s.conn.read_reply().await
    }
    .await;
    match r {
        Ok(code) => {
            out.code(Stage::Quit, code);
            out.lat(Phase::Transaction, s.connect_start.elapsed());
            s.conn.wait_close(sh.close_wait()).await;
            if code == 221 {
                Fate::Accepted
            } else {
                Fate::Rejected
            }
        }
        Err(e) => Fate::Failed(e.kind),
    }
}

/// One message: opens a session when there is none, sends, and closes the
/// session when it has had its `messages_per_conn`.
async fn message(
    sh: &Shared,
    sess: &mut Option<Session>,
    tmpl: &MessageTemplate,
    mpc: u64,
    job: Job,
    out: &mut Out<'_, '_>,
) -> Fate {
    let mut first = false;
    if sess.is_none() {
        match open_session(sh, out).await {
            Ok(s) => *sess = Some(s),
            Err(f) => return f,
        }
        first = true;
    }
    let Some(s) = sess.as_mut() else {
        return Fate::Failed(ErrorKind::Io);
    };
    s.msgs += 1;
    let last = mpc > 0 && s.msgs >= mpc;
    match transaction(sh, s, tmpl, last, first, job, out).await {
        Ok((fate, keep)) => {
            if !keep {
                if let Some(s) = sess.take() {
                    s.conn.wait_close(sh.close_wait()).await;
                }
            } else if last {
                if let Some(s) = sess.take() {
                    quit(sh, s, out).await;
                }
            }
            fate
        }
        Err(e) => {
            *sess = None;
            Fate::Failed(e.kind)
        }
    }
}

/// Sends one message on an open session. Returns the fate and whether the
/// session is still usable (false after a 421 or a pipelined QUIT).
async fn transaction(
    sh: &Shared,
    s: &mut Session,
    tmpl: &MessageTemplate,
    last: bool,
    first: bool,
    job: Job,
    out: &mut Out<'_, '_>,
) -> Result<(Fate, bool), Error> {
    let pipelining = sh.cfg.pipelining && s.caps.pipelining;
    let mail_line = if s.caps.size {
        &tmpl.mail_size
    } else {
        &tmpl.mail
    };
    // The commands: the template's, or with `{seq}` recipients this
    // message's own.
    let (mail, rcpts, block): (&[u8], &[Vec<u8>], &[u8]) = match &sh.plan.seq_rcpts {
        Some(addrs) => {
            s.env.fill(mail_line, addrs, &sh.seq);
            (s.env.mail(), s.env.rcpts(), s.env.pipelined())
        }
        None if s.caps.size => (&tmpl.mail_size, &tmpl.rcpts, &tmpl.pipelined_size),
        None => (&tmpl.mail, &tmpl.rcpts, &tmpl.pipelined),
    };
    let conn = &mut s.conn;
    let mail_start = Instant::now();
    out.decision.reached = Stage::Mail;
    let mut ok_rcpts = 0usize;
    let mut rejected_early = false;
    let mut mail_ok = false;
    let mut closing = false;
    if pipelining {
        out.t.pipelined += 1;
        conn.write_all(block).await?;
        // After a 421 the server closes: the replies still due never come.
        let code = conn.read_reply().await?;
        out.code(Stage::Mail, code);
        mail_ok = is_2xx(code);
        closing |= code == 421;
        for _ in 0..rcpts.len() {
            if closing {
                break;
            }
            let code = conn.read_reply().await?;
            out.code(Stage::Rcpt, code);
            closing |= code == 421;
        }
        if !closing {
            let code = conn.read_reply().await?;
            out.code(Stage::Data, code);
            closing |= code == 421;
            rejected_early = code != 354;
        }
    } else {
        conn.write_all(mail).await?;
        let code = conn.read_reply().await?;
        out.code(Stage::Mail, code);
        closing |= code == 421;
        if is_2xx(code) {
            mail_ok = true;
            for r in rcpts {
                conn.write_all(r).await?;
                let code = conn.read_reply().await?;
                out.code(Stage::Rcpt, code);
                ok_rcpts += is_2xx(code) as usize;
                if code == 421 {
                    closing = true;
                    break;
                }
            }
            if ok_rcpts > 0 && !closing {
                conn.write_all(b"DATA\r\n").await?;
                let code = conn.read_reply().await?;
                out.code(Stage::Data, code);
                closing |= code == 421;
                rejected_early = code != 354;
            } else {
                rejected_early = true;
            }
        } else {
            rejected_early = true;
        }
    }
    if closing {
        return Ok((Fate::Rejected, false));
    }
    if rejected_early {
        // The message is refused whatever happens next; a failing RSET only
        // costs the connection (its error is still counted).
        if mail_ok {
            let rset = async {
                conn.write_all(b"RSET\r\n").await?;
                conn.read_reply().await
            }
            .await;
            match rset {
                Ok(code) => {
                    out.code(Stage::Rset, code);
                    if !is_2xx(code) {
                        return Ok((Fate::Rejected, false));
                    }
                }
                Err(e) => {
                    out.t.error(e.kind);
                    return Ok((Fate::Rejected, false));
                }
            }
        }
        return Ok((Fate::Rejected, true));
    }
    let quit_pipelined = last && pipelining;
    let data: &[u8] = match out.stamp.as_mut() {
        Some((id, wire)) => {
            stamped(tmpl, id, quit_pipelined, wire);
            wire
        }
        None if quit_pipelined => &tmpl.data_dot_quit,
        None => &tmpl.data_dot,
    };
    conn.write_all(data).await?;
    out.decision.reached = Stage::Final;
    let code = conn.read_reply().await?;
    let done = Instant::now();
    out.code(Stage::Final, code);
    out.lat(Phase::MailToFinal, done - mail_start);
    out.lat(
        Phase::Transaction,
        done - if first { s.connect_start } else { mail_start },
    );
    if let Some(at) = job.scheduled {
        out.lat(Phase::ScheduledToFinal, done.saturating_duration_since(at));
    }
    let fate = if is_2xx(code) {
        out.t.bytes += tmpl.size as u64;
        Fate::Accepted
    } else {
        Fate::Rejected
    };
    if quit_pipelined {
        match conn.read_reply().await {
            Ok(c) => out.code(Stage::Quit, c),
            Err(e) => out.t.error(e.kind),
        }
        return Ok((fate, false));
    }
    Ok((fate, code != 421))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{SinkConfig, SinkServer};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn config(target: SocketAddr, messages: u64, per_conn: u64) -> RunConfig {
        let mut c = RunConfig::new(target);
        c.messages = Some(messages);
        c.connections = 3;
        c.messages_per_conn = per_conn;
        c.timeout = Duration::from_secs(5);
        c
    }

    async fn go(c: RunConfig) -> Report {
        run(c, Arc::new(AtomicBool::new(false))).await.unwrap()
    }

    fn code(r: &Report, stage: &str, code: &str) -> u64 {
        r.replies[stage].get(code).copied().unwrap_or(0)
    }

    /// `{seq}` recipients against a sink that refuses them as unknown: every
    /// RCPT a new address, all refused, counted on both sides; the run goes
    /// on after each refused message (RSET), pipelined and in lockstep.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seq_recipients_refused_as_unknown() {
        let mut sc = SinkConfig::new("127.0.0.1:0".parse().unwrap());
        sc.unknown_prefix = Some("NoUser".into());
        let s = SinkServer::start(sc).await.unwrap();
        for (pipelining, per_conn) in [(true, 1), (false, 0)] {
            let mut c = config(s.local_addr(), 30, per_conn);
            c.pipelining = pipelining;
            c.rcpts = 4;
            c.to = "nouser{seq}@example.org".into();
            c.seq_start = if pipelining { 1 } else { 1001 };
            let r = go(c).await;
            assert_eq!((r.messages.attempted, r.messages.rejected), (30, 30));
            assert_eq!(code(&r, "rcpt", "550"), 120, "{}", r.to_table());
            assert_eq!(code(&r, "mail", "250"), 30);
            if pipelining {
                // DATA went out with the batch and was refused.
                assert_eq!(code(&r, "data", "554"), 30);
            }
            assert_eq!(code(&r, "rset", "250"), 30);
            assert_eq!(r.errors.values().sum::<u64>(), 0, "{}", r.to_table());
        }
        let rep = s.report();
        assert_eq!((rep.rcpts, rep.rcpts_unknown, rep.messages), (240, 240, 0));
        assert!(rep
            .to_table()
            .contains("(240 rcpts, 240 refused as unknown,"));
        // Known recipients still go through, and are not counted as unknown.
        let mut c = config(s.local_addr(), 10, 1);
        c.rcpts = 2;
        let r = go(c).await;
        assert!(r.ok, "{}", r.to_table());
        let rep = s.report();
        assert_eq!((rep.rcpts, rep.rcpts_unknown, rep.messages), (260, 240, 10));
    }

    /// A scripted server: each connection gets `greeting`; when that is a
    /// 220, EHLO gets a reply with PIPELINING and the next command lines get
    /// `replies` in turn, one per line, until a 421, which closes it.
    async fn scripted(greeting: &'static str, replies: &'static [&'static str]) -> SocketAddr {
        use tokio::io::AsyncBufReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut s = tokio::io::BufReader::new(s);
                    let _ = s.write_all(greeting.as_bytes()).await;
                    if !greeting.starts_with("220") {
                        return;
                    }
                    let mut line = String::new();
                    let _ = s.read_line(&mut line).await; // EHLO
                    let _ = s.write_all(b"250-edge\r\n250 PIPELINING\r\n").await;
                    for r in replies {
                        line.clear();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let _ = s.write_all(r.as_bytes()).await;
                        if r.starts_with("421") {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// The edge's answers to an attacker: 421 at the greeting (banned), or
    /// 421 after some RCPTs (budget gone over) and the close. Each message
    /// is a refusal with its code, the run goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_at_greeting_or_mid_transaction_and_going_on() {
        let banned = scripted("421 4.7.1 Client host [127.0.0.1] blocked\r\n", &[]).await;
        let r = go(config(banned, 20, 1)).await;
        assert!(!r.ok);
        assert_eq!((r.messages.attempted, r.messages.rejected), (20, 20));
        assert_eq!(code(&r, "greeting", "421"), 20);
        assert_eq!(r.connections.opened, 20);
        assert_eq!(r.errors.values().sum::<u64>(), 0, "{}", r.to_table());
        let budget = scripted(
            "220 edge ESMTP\r\n",
            &[
                "250 2.1.0 Ok\r\n",
                "550 5.1.1 <a>: User unknown\r\n",
                "421 4.7.1 Too many unknown recipients; banned\r\n",
            ],
        )
        .await;
        for pipelining in [true, false] {
            let mut c = config(budget, 20, 1);
            c.rcpts = 5;
            c.to = "nouser{seq}@example.org".into();
            c.pipelining = pipelining;
            let r = go(c).await;
            assert_eq!(
                (r.messages.attempted, r.messages.rejected),
                (20, 20),
                "{:?}",
                r.errors
            );
            assert_eq!(code(&r, "rcpt", "550"), 20, "{}", r.to_table());
            assert_eq!(code(&r, "rcpt", "421"), 20);
            assert_eq!(r.errors.values().sum::<u64>(), 0, "{:?}", r.errors);
        }
    }
}
