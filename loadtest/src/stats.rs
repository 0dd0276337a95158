//! Measurement: per-worker tallies (counts, reply codes by stage, errors),
//! shared hdrhistogram latency histograms fed in batches, live progress
//! counters, and the final [`Report`] (JSON and the human table).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::conn::ErrorKind;
use crate::procstat::ServerUsage;

/// Latency phases, in the order of [`PHASE_NAMES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Start of the TCP connect → greeting read.
    ConnectToGreeting = 0,
    /// The TLS handshake after the 220 reply to STARTTLS.
    TlsHandshake = 1,
    /// MAIL written → reply to the final dot read.
    MailToFinal = 2,
    /// Connect start (first message on a connection) or MAIL written (later
    /// ones) → final reply; with `--churn`, connect → reply to QUIT.
    Transaction = 3,
    /// Open loop only: scheduled arrival time → final reply.
    ScheduledToFinal = 4,
}

/// JSON names of the latency phases (keys of `latency_us`).
pub const PHASE_NAMES: [&str; 5] = [
    "connect_to_greeting",
    "tls_handshake",
    "mail_to_final",
    "transaction",
    "scheduled_to_final",
];

/// Stages whose replies are counted by code (keys of `replies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting = 0,
    Ehlo = 1,
    Starttls = 2,
    Mail = 3,
    Rcpt = 4,
    Data = 5,
    Final = 6,
    Rset = 7,
    Quit = 8,
}

pub const STAGE_NAMES: [&str; 9] = [
    "greeting", "ehlo", "starttls", "mail", "rcpt", "data", "final", "rset", "quit",
];

/// Error kinds, in the order of [`ERROR_NAMES`] (keys of `errors`).
pub const ERROR_NAMES: [&str; 5] = ["connect", "io", "timeout", "protocol", "tls"];

fn error_index(k: ErrorKind) -> usize {
    match k {
        ErrorKind::Connect => 0,
        ErrorKind::Io => 1,
        ErrorKind::Timeout => 2,
        ErrorKind::Protocol => 3,
        ErrorKind::Tls => 4,
    }
}

/// Largest latency recorded (1 hour); longer values are clamped.
const MAX_US: u64 = 3_600_000_000;

/// Counts kept by one worker during the measured interval, merged at the end.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub attempted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    /// Content bytes of messages whose data was written and got a 2xx.
    pub bytes: u64,
    pub conns_opened: u64,
    pub conns_failed: u64,
    pub errors: [u64; 5],
    /// Messages whose MAIL, RCPTs and DATA went out in one write.
    pub pipelined: u64,
    /// TLS handshakes completed (with `--starttls`).
    pub tls: TlsCounts,
    codes: [Vec<(u16, u64)>; 9],
    pub last_completion: Option<Instant>,
}

impl Tally {
    pub fn code(&mut self, stage: Stage, code: u16) {
        let v = &mut self.codes[stage as usize];
        match v.iter_mut().find(|e| e.0 == code) {
            Some(e) => e.1 += 1,
            None => v.push((code, 1)),
        }
    }

    pub fn error(&mut self, k: ErrorKind) {
        self.errors[error_index(k)] += 1;
    }

    pub fn tls_handshake(&mut self, resumed: bool, tls13: bool) {
        self.tls.handshakes += 1;
        self.tls.resumed += resumed as u64;
        if tls13 {
            self.tls.tls13 += 1;
        } else {
            self.tls.tls12 += 1;
        }
    }

    pub fn complete(&mut self, at: Instant) {
        if self.last_completion.is_none_or(|t| t < at) {
            self.last_completion = Some(at);
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.attempted += o.attempted;
        self.accepted += o.accepted;
        self.rejected += o.rejected;
        self.failed += o.failed;
        self.bytes += o.bytes;
        self.conns_opened += o.conns_opened;
        self.conns_failed += o.conns_failed;
        self.pipelined += o.pipelined;
        self.tls.handshakes += o.tls.handshakes;
        self.tls.resumed += o.tls.resumed;
        self.tls.tls12 += o.tls.tls12;
        self.tls.tls13 += o.tls.tls13;
        for i in 0..self.errors.len() {
            self.errors[i] += o.errors[i];
        }
        for (s, v) in o.codes.iter().enumerate() {
            for &(c, n) in v {
                match self.codes[s].iter_mut().find(|e| e.0 == c) {
                    Some(e) => e.1 += n,
                    None => self.codes[s].push((c, n)),
                }
            }
        }
        if let Some(t) = o.last_completion {
            self.complete(t);
        }
    }

    /// Reply counts as `{stage: {code: n}}`, every stage present.
    pub fn replies(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        STAGE_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let m = self.codes[i]
                    .iter()
                    .map(|&(c, n)| (c.to_string(), n))
                    .collect();
                (name.to_string(), m)
            })
            .collect()
    }
}

/// The shared latency histograms (microseconds), one per phase.
pub struct Histograms {
    h: Mutex<Vec<Histogram<u64>>>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self::new()
    }
}

impl Histograms {
    pub fn new() -> Histograms {
        let h = (0..PHASE_NAMES.len())
            .map(|_| Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
            .collect();
        Histograms { h: Mutex::new(h) }
    }

    fn record_batch(&self, batch: &[(u8, u64)]) {
        let mut h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        for &(phase, us) in batch {
            h[phase as usize].saturating_record(us.clamp(1, MAX_US));
        }
    }

    /// Summaries of every phase, keyed by phase name.
    pub fn summaries(&self) -> BTreeMap<String, LatencySummary> {
        let h = self.h.lock().unwrap_or_else(|p| p.into_inner());
        PHASE_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), LatencySummary::of(&h[i])))
            .collect()
    }
}

/// A worker's buffer of latency samples, flushed to [`Histograms`] in batches
/// (one lock per 128 samples).
pub struct Recorder<'a> {
    shared: &'a Histograms,
    pending: Vec<(u8, u64)>,
}

impl<'a> Recorder<'a> {
    pub fn new(shared: &'a Histograms) -> Recorder<'a> {
        Recorder {
            shared,
            pending: Vec::with_capacity(128),
        }
    }

    pub fn record(&mut self, phase: Phase, d: Duration) {
        self.pending
            .push((phase as u8, d.as_micros().min(u64::MAX as u128) as u64));
        if self.pending.len() >= 128 {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.shared.record_batch(&self.pending);
            self.pending.clear();
        }
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Live counters for the progress line (all messages, warmup included).
#[derive(Debug, Default)]
pub struct Progress {
    pub attempted: AtomicU64,
    pub accepted: AtomicU64,
    pub not_accepted: AtomicU64,
    pub conns: AtomicU64,
    pub inflight: AtomicU64,
    pub dropped: AtomicU64,
}

impl Progress {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// One phase's latency distribution, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        LatencySummary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Message counts (`messages` in the JSON report).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageCounts {
    /// Messages (sessions with `--churn`) begun in the measured interval.
    pub attempted: u64,
    /// Those whose final reply (to the dot; to QUIT with `--churn`) was 2xx.
    pub accepted: u64,
    /// Refused by the server: a 4xx/5xx to MAIL, every RCPT, DATA or the dot
    /// (or to greeting/EHLO/STARTTLS for a session's first message).
    pub rejected: u64,
    /// Lost to an error (connect, io, timeout, protocol, tls).
    pub failed: u64,
    /// Open loop: arrivals not sent because `--max-inflight` were in flight.
    pub dropped: u64,
    /// Sent during `--warmup` (not in any other figure).
    pub warmup: u64,
    /// Of `attempted`, those sent with MAIL, RCPTs and DATA in one write:
    /// pipelining asked for and offered by the server. 0 with
    /// `--no-pipelining`, and also when the server does not offer
    /// PIPELINING (the generator then waits for every reply).
    #[serde(default)]
    pub pipelined: u64,
}

/// TLS handshakes of the measured interval (`tls` in the JSON report, with
/// `--starttls`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsCounts {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Of those, resumed sessions (only possible with `--tls-resume`).
    pub resumed: u64,
    /// Of those, TLS 1.2 and TLS 1.3.
    pub tls12: u64,
    pub tls13: u64,
}

/// Connection counts (`connections` in the JSON report).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnCounts {
    /// TCP connections established.
    pub opened: u64,
    /// Connection attempts that failed (connect error or timeout).
    pub failed: u64,
}

/// The run's settings, echoed in the report (`config`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigEcho {
    pub connections: usize,
    pub messages_per_conn: u64,
    pub messages: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup_s: f64,
    pub rcpts: usize,
    /// `[[size, weight], ...]`
    pub sizes: Vec<(usize, u32)>,
    pub starttls: bool,
    #[serde(default)]
    pub tls_resume: bool,
    #[serde(default)]
    pub tls12: bool,
    pub pipelining: bool,
    pub churn: bool,
    #[serde(default)]
    pub wait_close: bool,
    pub rate: Option<f64>,
    pub max_inflight: Option<usize>,
    pub bind_addresses: usize,
    pub threads: usize,
}

/// The result of `smtp-load run` (printed by `--json`). Field names are
/// stable; see loadtest/README.draft.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Always "smtp-load".
    pub tool: String,
    pub version: String,
    /// "closed", "open" (with `--rate`); churn runs say so in `config.churn`.
    pub mode: String,
    pub target: String,
    pub config: ConfigEcho,
    /// Seconds from the end of the warmup to the last final reply.
    pub elapsed_s: f64,
    pub messages: MessageCounts,
    pub connections: ConnCounts,
    /// accepted / elapsed_s
    pub msgs_per_sec: f64,
    /// connections.opened / elapsed_s
    pub conns_per_sec: f64,
    /// Content bytes of the accepted messages.
    pub bytes: u64,
    pub bytes_per_sec: f64,
    /// `{stage: {code: count}}` for greeting, ehlo, starttls, mail, rcpt,
    /// data, final, rset, quit.
    pub replies: BTreeMap<String, BTreeMap<String, u64>>,
    /// `{connect, io, timeout, protocol, tls}` counts.
    pub errors: BTreeMap<String, u64>,
    /// `{phase: {count, min, mean, p50, p90, p99, p999, max}}`, microseconds,
    /// for every phase in [`PHASE_NAMES`] (count 0 when not measured).
    pub latency_us: BTreeMap<String, LatencySummary>,
    /// With `--watch-pid`: the server's CPU and RSS.
    pub server: Option<ServerUsage>,
    /// With `--starttls`: handshakes, resumed ones, TLS 1.2 / 1.3.
    #[serde(default)]
    pub tls: Option<TlsCounts>,
    /// True when every attempted message was accepted, none dropped, and at
    /// least one was attempted (the exit code is 0 exactly then).
    pub ok: bool,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let c = &self.config;
        let m = &self.messages;
        let mut s = String::new();
        let conn_mode = match c.messages_per_conn {
            0 => "persistent connections".to_string(),
            1 => "new connection per message".to_string(),
            n => format!("{n} messages per connection"),
        };
        let sizes = c
            .sizes
            .iter()
            .map(|(sz, w)| {
                if c.sizes.len() == 1 {
                    format!("{sz} B")
                } else {
                    format!("{sz} B:{w}")
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let loop_kind = match c.rate {
            Some(r) => format!(
                "open loop at {r} msg/s (max in flight {})",
                c.max_inflight.unwrap_or(0)
            ),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(
            s,
            "smtp-load run -> {}: {}{}, {} connections, {}, {} rcpt, {}, {}{}",
            self.target,
            loop_kind,
            if c.churn { ", churn (no mail)" } else { "" },
            c.connections,
            conn_mode,
            c.rcpts,
            sizes,
            if c.pipelining {
                "pipelining"
            } else {
                "no pipelining"
            },
            if c.starttls { ", STARTTLS" } else { "" },
        );
        let _ = writeln!(
            s,
            "elapsed   {:.3} s{}",
            self.elapsed_s,
            if m.warmup > 0 {
                format!(" (after {} warmup messages)", m.warmup)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "messages  attempted {}  accepted {}  rejected {}  failed {}  dropped {}  pipelined {}",
            m.attempted, m.accepted, m.rejected, m.failed, m.dropped, m.pipelined
        );
        if let Some(t) = &self.tls {
            let _ = writeln!(
                s,
                "tls       handshakes {}  resumed {}  TLS 1.2 {}  TLS 1.3 {}",
                t.handshakes, t.resumed, t.tls12, t.tls13
            );
        }
        let _ = writeln!(
            s,
            "rate      {:.1} msg/s   {:.1} conn/s   {:.2} MB/s   ({} connections, {} failed)",
            self.msgs_per_sec,
            self.conns_per_sec,
            self.bytes_per_sec / 1e6,
            self.connections.opened,
            self.connections.failed
        );
        let errs = ERROR_NAMES
            .iter()
            .map(|n| format!("{n} {}", self.errors.get(*n).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ");
        let _ = writeln!(s, "errors    {errs}");
        let replies = STAGE_NAMES
            .iter()
            .filter_map(|st| {
                let m = self.replies.get(*st)?;
                if m.is_empty() {
                    return None;
                }
                let codes = m
                    .iter()
                    .map(|(c, n)| format!("{c}:{n}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                Some(format!("{st} {codes}"))
            })
            .collect::<Vec<_>>()
            .join(" | ");
        let _ = writeln!(s, "replies   {replies}");
        if let Some(u) = &self.server {
            let _ = writeln!(
                s,
                "server    cpu {:.3} s ({:.4} s per 1000), rss {} -> {} KiB (pids {:?})",
                u.cpu_s, u.cpu_s_per_1000, u.rss_kib_start, u.rss_kib_end, u.pids
            );
        }
        let _ = writeln!(
            s,
            "latency (ms)            {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "count", "min", "p50", "p90", "p99", "p99.9", "max"
        );
        let ms = |us: u64| us as f64 / 1000.0;
        for name in PHASE_NAMES {
            let Some(l) = self.latency_us.get(name) else {
                continue;
            };
            if l.count == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "  {:<21} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                name,
                l.count,
                ms(l.min),
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
        let _ = writeln!(s, "result    {}", if self.ok { "OK" } else { "FAILED" });
        s
    }
}

/// Errors as `{kind: count}`, every kind present.
pub fn errors_map(t: &Tally) -> BTreeMap<String, u64> {
    ERROR_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), t.errors[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_merges_codes() {
        let mut a = Tally::default();
        a.code(Stage::Mail, 250);
        a.code(Stage::Mail, 250);
        a.code(Stage::Final, 451);
        let mut b = Tally::default();
        b.code(Stage::Mail, 250);
        b.code(Stage::Mail, 550);
        b.error(ErrorKind::Timeout);
        a.merge(&b);
        let r = a.replies();
        assert_eq!(r["mail"]["250"], 3);
        assert_eq!(r["mail"]["550"], 1);
        assert_eq!(r["final"]["451"], 1);
        assert!(r["rcpt"].is_empty());
        assert_eq!(errors_map(&a)["timeout"], 1);
    }

    #[test]
    fn histogram_summary_is_ordered() {
        let h = Histograms::new();
        {
            let mut r = Recorder::new(&h);
            for i in 1..=10_000u64 {
                r.record(Phase::MailToFinal, Duration::from_micros(i));
            }
        }
        let s = &h.summaries()["mail_to_final"];
        assert_eq!(s.count, 10_000);
        assert!(
            s.min <= s.p50
                && s.p50 <= s.p90
                && s.p90 <= s.p99
                && s.p99 <= s.p999
                && s.p999 <= s.max
        );
        assert!((4990..=5010).contains(&s.p50), "{s:?}");
        assert_eq!(h.summaries()["tls_handshake"].count, 0);
    }
}
