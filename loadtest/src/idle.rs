//! Idle concurrency (`smtp-load idle`): opens N connections (greeting read,
//! EHLO said), holds them idle, and reports how many were open at the peak,
//! the failures, and with `--watch-pid` the server's RSS per connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::conn::{Caps, Conn, ErrorKind};
use crate::net::BindPool;
use crate::procstat;

/// Settings of the `idle` subcommand.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    pub target: SocketAddr,
    pub connections: usize,
    pub hold: Duration,
    pub bind: Option<String>,
    pub helo: String,
    pub timeout: Duration,
    /// Connection attempts in progress at once while opening.
    pub open_parallel: usize,
    pub progress: bool,
    pub watch_pids: Vec<u32>,
}

impl IdleConfig {
    pub fn new(target: SocketAddr, connections: usize, hold: Duration) -> IdleConfig {
        IdleConfig {
            target,
            connections,
            hold,
            bind: None,
            helo: "loadgen.example.com".into(),
            timeout: Duration::from_secs(30),
            open_parallel: 256,
            progress: false,
            watch_pids: Vec::new(),
        }
    }
}

/// The watched server's memory (`server` in the idle JSON report).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdleServer {
    pub pids: Vec<u32>,
    /// Summed RSS before opening, KiB.
    pub rss_kib_before: u64,
    /// Highest summed RSS sampled while the connections were held, KiB.
    pub rss_kib_peak: u64,
    /// (peak - before) / peak_open, bytes.
    pub rss_bytes_per_conn: f64,
}

/// Result of `smtp-load idle` (`--json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdleReport {
    /// Always "smtp-load-idle".
    pub tool: String,
    pub target: String,
    pub requested: u64,
    /// Connections that got through greeting and EHLO.
    pub opened: u64,
    /// Most connections open at the same time.
    pub peak_open: u64,
    /// Failures while opening: `{connect, io, timeout, protocol, tls, refused}`.
    pub failed: BTreeMap<String, u64>,
    /// Connections the server closed (or wrote to) while they were held.
    pub closed_by_server: u64,
    /// Seconds from the first attempt until every attempt had finished.
    pub open_s: f64,
    pub hold_s: f64,
    /// Our RLIMIT_NOFILE soft limit after raising it.
    pub nofile_limit: u64,
    pub server: Option<IdleServer>,
    /// Every connection opened and none closed by the server.
    pub ok: bool,
}

impl IdleReport {
    pub fn to_table(&self) -> String {
        let failed: u64 = self.failed.values().sum();
        let mut s = format!(
            "smtp-load idle -> {}: requested {}, opened {}, peak open {}, failed {} {:?}, closed by server {}\n\
             opening took {:.2} s, held {:.1} s, fd limit {}\n",
            self.target,
            self.requested,
            self.opened,
            self.peak_open,
            failed,
            self.failed,
            self.closed_by_server,
            self.open_s,
            self.hold_s,
            self.nofile_limit
        );
        if let Some(sv) = &self.server {
            s.push_str(&format!(
                "server rss {} -> {} KiB: {:.0} bytes per connection (pids {:?})\n",
                sv.rss_kib_before, sv.rss_kib_peak, sv.rss_bytes_per_conn, sv.pids
            ));
        }
        s.push_str(if self.ok {
            "result OK\n"
        } else {
            "result FAILED\n"
        });
        s
    }
}

#[derive(Default)]
struct Counters {
    open: AtomicU64,
    peak: AtomicU64,
    opened: AtomicU64,
    finished_opening: AtomicU64,
    closed_by_server: AtomicU64,
    failed: [AtomicU64; 6],
}

const FAIL_NAMES: [&str; 6] = ["connect", "io", "timeout", "protocol", "tls", "refused"];

fn fail_index(k: ErrorKind) -> usize {
    match k {
        ErrorKind::Connect => 0,
        ErrorKind::Io => 1,
        ErrorKind::Timeout => 2,
        ErrorKind::Protocol => 3,
        ErrorKind::Tls => 4,
    }
}

/// Opens, holds, releases; returns the report.
pub async fn idle(cfg: IdleConfig) -> Result<IdleReport, String> {
    if cfg.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let (nofile, _) = procstat::raise_nofile();
    if nofile > 0 && (cfg.connections as u64) + 64 > nofile {
        eprintln!(
            "smtp-load idle: warning: {} connections need more fds than RLIMIT_NOFILE {nofile}",
            cfg.connections
        );
    }
    let bind = Arc::new(match &cfg.bind {
        Some(b) => BindPool::parse(b)?,
        None => BindPool::none(),
    });
    let rss_before = procstat::sum(&cfg.watch_pids, procstat::rss_kib);
    let counters = Arc::new(Counters::default());
    let sem = Arc::new(Semaphore::new(cfg.open_parallel.max(1)));
    let (release_tx, release_rx) = watch::channel(false);
    let ehlo = Arc::new(format!("EHLO {}\r\n", cfg.helo).into_bytes());
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        let (c, sem, bind, ehlo, mut release) = (
            counters.clone(),
            sem.clone(),
            bind.clone(),
            ehlo.clone(),
            release_rx.clone(),
        );
        let (target, timeout) = (cfg.target, cfg.timeout);
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let _permit = sem.acquire().await.ok();
                let mut conn = Conn::connect(target, bind.next(), timeout, 1024).await?;
                let code = conn.read_reply().await?;
                if code != 220 {
                    return Ok(None);
                }
                conn.write_all(&ehlo).await?;
                let code = conn.read_ehlo_reply(&mut Caps::default()).await?;
                Ok::<_, crate::conn::Error>((200..300).contains(&code).then_some(conn))
            }
            .await;
            c.finished_opening.fetch_add(1, Ordering::Relaxed);
            let mut conn = match opened {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    c.failed[5].fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    c.failed[fail_index(e.kind)].fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            c.opened.fetch_add(1, Ordering::Relaxed);
            let now_open = c.open.fetch_add(1, Ordering::Relaxed) + 1;
            c.peak.fetch_max(now_open, Ordering::Relaxed);
            let released = tokio::select! {
                _ = async { let _ = release.wait_for(|r| *r).await; } => true,
                _ = conn.read_some() => false,
            };
            c.open.fetch_sub(1, Ordering::Relaxed);
            if released {
                if conn.write_all(b"QUIT\r\n").await.is_ok() {
                    let _ = conn.read_reply().await;
                }
            } else {
                c.closed_by_server.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Opening.
    let n = cfg.connections as u64;
    let mut last_print = Instant::now();
    while counters.finished_opening.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if cfg.progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            progress_line(&counters, t0, "opening");
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    // Holding: sample the server's RSS every 250 ms.
    let hold_start = Instant::now();
    let mut rss_peak = procstat::sum(&cfg.watch_pids, procstat::rss_kib);
    while hold_start.elapsed() < cfg.hold {
        let left = cfg.hold.saturating_sub(hold_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        if let Some(r) = procstat::sum(&cfg.watch_pids, procstat::rss_kib) {
            rss_peak = Some(rss_peak.map_or(r, |p| p.max(r)));
        }
        if cfg.progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            progress_line(&counters, t0, "holding");
        }
    }
    let hold_s = hold_start.elapsed().as_secs_f64();
    let _ = release_tx.send(true);
    let _ = tokio::time::timeout(cfg.timeout + Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let peak_open = get(&counters.peak);
    let failed: BTreeMap<String, u64> = FAIL_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), get(&counters.failed[i])))
        .collect();
    let server = match (cfg.watch_pids.is_empty(), rss_before, rss_peak) {
        (false, Some(b), Some(p)) => Some(IdleServer {
            pids: cfg.watch_pids.clone(),
            rss_kib_before: b,
            rss_kib_peak: p,
            rss_bytes_per_conn: if peak_open > 0 {
                (p.saturating_sub(b) * 1024) as f64 / peak_open as f64
            } else {
                0.0
            },
        }),
        _ => None,
    };
    let closed_by_server = get(&counters.closed_by_server);
    Ok(IdleReport {
        tool: "smtp-load-idle".into(),
        target: cfg.target.to_string(),
        requested: n,
        opened: get(&counters.opened),
        ok: peak_open == n && closed_by_server == 0,
        peak_open,
        failed,
        closed_by_server,
        open_s,
        hold_s,
        nofile_limit: nofile,
        server,
    })
}

fn progress_line(c: &Counters, t0: Instant, what: &str) {
    let failed: u64 = c.failed.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    eprintln!(
        "[{:7.1}s] {what}: open {} (peak {}) failed {} closed by server {}",
        t0.elapsed().as_secs_f64(),
        c.open.load(Ordering::Relaxed),
        c.peak.load(Ordering::Relaxed),
        failed,
        c.closed_by_server.load(Ordering::Relaxed)
    );
}
