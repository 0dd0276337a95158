//! Slowloris (`smtp-load slow`): opens N connections, reads the greeting,
//! then never speaks or sends one byte of a command line that never ends
//! every `--every` seconds, and reports how the server dealt with them:
//! greeted or refused (by the first reply, e.g. `421 4.7.0`), closed by the
//! server and after how long, the last reply before the close, and with
//! `--watch-pid` the server's RSS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::net::BindPool;
use crate::procstat;

/// Settings of the `slow` subcommand.
#[derive(Debug, Clone)]
pub struct SlowConfig {
    pub target: SocketAddr,
    pub connections: usize,
    /// How long each greeted connection is kept (unless the server closes it).
    pub hold: Duration,
    /// One byte every this long; None: never a byte.
    pub every: Option<Duration>,
    pub bind: Option<String>,
    /// Connect and greeting timeout.
    pub timeout: Duration,
    pub open_parallel: usize,
    pub watch_pids: Vec<u32>,
}

/// Result of `smtp-load slow` (`--json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlowReport {
    /// Always "smtp-load-slow".
    pub tool: String,
    pub target: String,
    pub requested: u64,
    /// Seconds between bytes (0: silent).
    pub every_s: f64,
    /// Connections greeted with 220.
    pub greeted: u64,
    /// Connections whose first reply was not 220, by its code and enhanced
    /// code (`421 4.7.0`).
    pub refused: BTreeMap<String, u64>,
    /// Connect or read failures before any reply.
    pub failed: u64,
    /// Greeted connections the server closed within the hold.
    pub closed_by_server: u64,
    /// Seconds from the greeting to the server's close: median and largest.
    pub closed_after_p50_s: f64,
    pub closed_after_max_s: f64,
    /// The last reply line before the server's close, by code and enhanced
    /// code (`421 4.4.2`; `none` when it closed silently).
    pub last_reply: BTreeMap<String, u64>,
    /// Bytes dribbled in all.
    pub bytes_sent: u64,
    /// Summed RSS of the watched pids before opening and at its peak, KiB.
    pub rss_kib_before: Option<u64>,
    pub rss_kib_peak: Option<u64>,
    pub elapsed_s: f64,
}

impl SlowReport {
    pub fn to_table(&self) -> String {
        format!(
            "smtp-load slow -> {}: requested {}, a byte every {} s\n\
             greeted {}, refused {:?}, failed {}\n\
             closed by server {} (after p50 {:.1} s, max {:.1} s), last replies {:?}\n\
             bytes sent {}, server RSS {:?} -> {:?} KiB, {:.1} s\n",
            self.target,
            self.requested,
            self.every_s,
            self.greeted,
            self.refused,
            self.failed,
            self.closed_by_server,
            self.closed_after_p50_s,
            self.closed_after_max_s,
            self.last_reply,
            self.bytes_sent,
            self.rss_kib_before,
            self.rss_kib_peak,
            self.elapsed_s
        )
    }
}

/// What happened to one connection.
enum End {
    Failed,
    Refused(String),
    /// Greeted; Some((seconds, last reply)) when the server closed it.
    Greeted(Option<(f64, String)>, u64),
}

/// `421 4.4.2` from a reply line (code and enhanced code).
fn reply_key(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    let code = words.next().unwrap_or("none").get(..3).unwrap_or("none");
    match words.next() {
        Some(e) if e.chars().next().is_some_and(|c| c.is_ascii_digit()) => format!("{code} {e}"),
        _ => code.to_string(),
    }
}

/// The last complete reply line in `buf`, if any.
fn last_line(buf: &[u8]) -> Option<&[u8]> {
    let end = buf.iter().rposition(|&b| b == b'\n')?;
    let start = buf[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Some(&buf[start..end])
}

async fn one(cfg: Arc<SlowConfig>, bind: Arc<BindPool>, sem: Arc<Semaphore>) -> End {
    let permit = sem.acquire().await.ok();
    let Ok(Ok(mut s)) =
        tokio::time::timeout(cfg.timeout, crate::net::connect(cfg.target, bind.next())).await
    else {
        return End::Failed;
    };
    let mut buf = Vec::new();
    let mut b = [0u8; 512];
    let greet_end = tokio::time::Instant::now() + cfg.timeout;
    while !buf.contains(&b'\n') {
        match tokio::time::timeout_at(greet_end, s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => return End::Failed,
        }
    }
    drop(permit);
    if !buf.starts_with(b"220") {
        return End::Refused(reply_key(&buf));
    }
    buf.clear();
    let t0 = Instant::now();
    let end = tokio::time::Instant::now() + cfg.hold;
    let line = b"NOOP slowloris never ends this line ";
    let mut sent = 0u64;
    let mut next = cfg.every.map(|e| tokio::time::Instant::now() + e);
    loop {
        let drip = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = s.read(&mut b) => match r {
                Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
                _ => {
                    let last = last_line(&buf).map_or_else(|| "none".to_string(), reply_key);
                    return End::Greeted(Some((t0.elapsed().as_secs_f64(), last)), sent);
                }
            },
            _ = drip => {
                let byte = line[sent as usize % line.len()];
                if s.write_all(&[byte]).await.is_ok() {
                    sent += 1;
                }
                next = cfg.every.map(|e| tokio::time::Instant::now() + e);
            }
            _ = tokio::time::sleep_until(end) => return End::Greeted(None, sent),
        }
    }
}

/// Opens, dribbles, reports.
pub async fn slow(cfg: SlowConfig) -> Result<SlowReport, String> {
    if cfg.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    procstat::raise_nofile();
    let bind = Arc::new(match &cfg.bind {
        Some(b) => BindPool::parse(b)?,
        None => BindPool::none(),
    });
    let rss_before = procstat::sum(&cfg.watch_pids, procstat::rss_kib);
    let peak = Arc::new(Mutex::new(rss_before));
    let sampler = {
        let (pids, peak) = (cfg.watch_pids.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Some(r) = procstat::sum(&pids, procstat::rss_kib) {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = Some(p.map_or(r, |x| x.max(r)));
                }
            }
        })
    };
    let sem = Arc::new(Semaphore::new(cfg.open_parallel.max(1)));
    let cfg = Arc::new(cfg);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..cfg.connections)
        .map(|_| tokio::spawn(one(cfg.clone(), bind.clone(), sem.clone())))
        .collect();
    let mut r = SlowReport {
        tool: "smtp-load-slow".into(),
        target: cfg.target.to_string(),
        requested: cfg.connections as u64,
        every_s: cfg.every.map_or(0.0, |e| e.as_secs_f64()),
        greeted: 0,
        refused: BTreeMap::new(),
        failed: 0,
        closed_by_server: 0,
        closed_after_p50_s: 0.0,
        closed_after_max_s: 0.0,
        last_reply: BTreeMap::new(),
        bytes_sent: 0,
        rss_kib_before: rss_before,
        rss_kib_peak: None,
        elapsed_s: 0.0,
    };
    let mut after = Vec::new();
    for t in tasks {
        match t.await {
            Ok(End::Greeted(closed, sent)) => {
                r.greeted += 1;
                r.bytes_sent += sent;
                if let Some((secs, last)) = closed {
                    after.push(secs);
                    *r.last_reply.entry(last).or_default() += 1;
                }
            }
            Ok(End::Refused(k)) => *r.refused.entry(k).or_default() += 1,
            Ok(End::Failed) | Err(_) => r.failed += 1,
        }
    }
    sampler.abort();
    after.sort_by(f64::total_cmp);
    r.closed_by_server = after.len() as u64;
    r.closed_after_p50_s = after.get(after.len() / 2).copied().unwrap_or(0.0);
    r.closed_after_max_s = after.last().copied().unwrap_or(0.0);
    r.rss_kib_peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    r.elapsed_s = t0.elapsed().as_secs_f64();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_keys() {
        assert_eq!(reply_key(b"421 4.4.2 Timeout\r\n"), "421 4.4.2");
        assert_eq!(reply_key(b"421 Too many\r\n"), "421");
        assert_eq!(
            last_line(b"220 hi\r\n421 4.4.2 bye\r\n"),
            Some(&b"421 4.4.2 bye\r"[..])
        );
        assert_eq!(last_line(b"no end"), None);
    }
}
