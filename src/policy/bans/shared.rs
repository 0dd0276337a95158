//! The fleet's ban list on Redis (`[policy.bans] store = "redis"`, on the
//! `[policy.limits.redis]` url): one task per process keeps the local list
//! (`Bans`) a copy of Redis' and writes this instance's changes there.
//!
//! # On Redis
//! Each ban is a key `smtp-edge:ban:<network>` (`smtp-edge:ban:192.0.2.7/32`)
//! holding JSON (`source`, `reason`, `created`, `expires` in Unix ms) with
//! the ban's remaining time as its TTL (`SET .. PX`): Redis expires it, and
//! memory there is the bans in force. Every write also increments
//! `smtp-edge:bans:version`.
//!
//! # Sync
//! Every `POLL` (0.5 s) the task reads the version; when it changed, it
//! reads the whole list (`SCAN` + `MGET`) and makes the local copy that
//! list (`Bans::sync_from`): a ban added or lifted on any instance is seen
//! by every other within about a second. Local changes are applied locally
//! at once (the instance that bans enforces it before Redis hears of it)
//! and queued to the task (never a wait on the session's side).
//!
//! # Redis down
//! Nothing blocks: the local copy keeps being enforced, new bans are
//! enforced locally and kept queued (bounded: `QUEUE`), and when Redis
//! answers again the queue is written first and the whole list read back.
//! That first read after an outage (and after a start) merges: bans this
//! instance holds that Redis lacks (a Redis restarted without its data)
//! are written back rather than lifted; a ban lifted elsewhere during the
//! outage may come back that way, until it expires or is lifted again.
//! Logged once per outage; `smtp_edge_bans_store_up` shows it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{now_ms, parse_net, Ban, Bans, Source};

const POLL: Duration = Duration::from_millis(500);
const QUEUE: usize = 10_000;
const KEY_PREFIX: &str = "smtp-edge:ban:";
const VERSION_KEY: &str = "smtp-edge:bans:version";
/// A whole-list read may take longer than a single call.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) enum Op {
    Put(Ban),
    Delete(IpNet),
}

/// The running Redis store of one url; dropping it stops its task.
pub(super) struct Shared {
    url: String,
    tx: mpsc::Sender<Op>,
    up: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Shared {
    /// Starts the task on the current runtime (without one, bans stay local).
    pub(super) fn start(bans: Weak<Bans>, url: String, timeout: f64) -> Shared {
        let (tx, rx) = mpsc::channel(QUEUE);
        let up = Arc::new(AtomicBool::new(false));
        let call_timeout = Duration::try_from_secs_f64(timeout)
            .unwrap_or(Duration::from_millis(50))
            .max(Duration::from_millis(500));
        let worker = Worker {
            bans,
            url: url.clone(),
            timeout: call_timeout,
            rx,
            up: up.clone(),
        };
        let task = match tokio::runtime::Handle::try_current() {
            Ok(rt) => Some(rt.spawn(worker.run())),
            Err(_) => {
                warn!("bans: no async runtime for the Redis store; bans stay local");
                None
            }
        };
        Shared { url, tx, up, task }
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    pub(super) fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(super) fn put(&self, ban: Ban) {
        self.send(Op::Put(ban));
    }

    pub(super) fn delete(&self, net: IpNet) {
        self.send(Op::Delete(net));
    }

    fn send(&self, op: Op) {
        if self.tx.try_send(op).is_err() {
            warn!("bans: the queue to Redis is full; a change stays local to this instance");
        }
    }
}

struct Worker {
    bans: Weak<Bans>,
    url: String,
    timeout: Duration,
    rx: mpsc::Receiver<Op>,
    up: Arc<AtomicBool>,
}

impl Worker {
    async fn run(mut self) {
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.timeout));
        let mut con = match redis::Client::open(self.url.as_str())
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, config))
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "bans: cannot use the Redis url; bans stay local");
                return;
            }
        };
        let mut pending: Vec<Op> = Vec::new();
        let mut version: Option<i64> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged_down = false;
        // The next full read merges (after a start or an outage).
        let mut merge = true;
        loop {
            tokio::select! {
                op = self.rx.recv() => match op {
                    Some(op) => pending.push(op),
                    None => return,
                },
                _ = tick.tick() => {}
            }
            while let Ok(op) = self.rx.try_recv() {
                pending.push(op);
            }
            let Some(bans) = self.bans.upgrade() else {
                return;
            };
            let round = async {
                if !pending.is_empty() {
                    within(self.timeout, write(&mut con, &pending)).await?;
                    pending.clear();
                }
                let v: Option<i64> = within(
                    self.timeout,
                    redis::cmd("GET").arg(VERSION_KEY).query_async(&mut con),
                )
                .await?;
                if version.is_none() || v != version {
                    let list = within(READ_TIMEOUT, read_all(&mut con)).await?;
                    // Changes queued during the read are applied to Redis
                    // first and the list read again next round.
                    while let Ok(op) = self.rx.try_recv() {
                        pending.push(op);
                    }
                    if pending.is_empty() {
                        let missing = bans.sync_from(list, merge);
                        merge = false;
                        pending.extend(missing.into_iter().map(Op::Put));
                        version = Some(v.unwrap_or(0));
                    }
                }
                Ok::<(), String>(())
            };
            match round.await {
                Ok(()) => {
                    if !self.up.swap(true, Ordering::Relaxed) {
                        info!("bans: Redis answering; the ban list is shared");
                        logged_down = false;
                    }
                }
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    // Read everything again when it answers, keeping what
                    // this instance holds.
                    version = None;
                    merge = true;
                    if !logged_down {
                        logged_down = true;
                        warn!(error = %e, "bans: Redis unreachable; bans are enforced from this instance's copy, changes are written when it answers");
                    }
                    if pending.len() > QUEUE {
                        pending.drain(..pending.len() - QUEUE);
                    }
                }
            }
        }
    }
}

async fn within<T>(
    t: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {t:?}")),
    }
}

/// Writes the queued changes and bumps the version, in one pipeline.
async fn write(con: &mut ConnectionManager, ops: &[Op]) -> redis::RedisResult<()> {
    let now = now_ms();
    let mut p = redis::pipe();
    for op in ops {
        match op {
            Op::Put(b) => {
                let ttl = b.expires.saturating_sub(now);
                if ttl == 0 {
                    continue;
                }
                let v = serde_json::json!({
                    "source": b.source.name(),
                    "reason": b.reason,
                    "created": b.created,
                    "expires": b.expires,
                });
                p.cmd("SET")
                    .arg(format!("{KEY_PREFIX}{}", b.net))
                    .arg(v.to_string())
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
            }
            Op::Delete(net) => {
                p.cmd("DEL").arg(format!("{KEY_PREFIX}{net}")).ignore();
            }
        }
    }
    p.cmd("INCR").arg(VERSION_KEY).ignore();
    p.query_async(con).await
}

/// Every ban on Redis (entries that do not parse are skipped).
async fn read_all(con: &mut ConnectionManager) -> redis::RedisResult<Vec<Ban>> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, mut batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{KEY_PREFIX}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        keys.append(&mut batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(con).await?;
        for (k, v) in chunk.iter().zip(values) {
            if let Some(b) = v.and_then(|v| parse_entry(k, &v)) {
                out.push(b);
            }
        }
    }
    Ok(out)
}

fn parse_entry(key: &str, value: &str) -> Option<Ban> {
    let net = parse_net(key.strip_prefix(KEY_PREFIX)?)?;
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    Some(Ban {
        net,
        source: Source::parse(v.get("source")?.as_str()?)?,
        reason: v.get("reason")?.as_str()?.to_string(),
        created: v.get("created")?.as_u64()?,
        expires: v.get("expires")?.as_u64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_back() {
        let b = parse_entry(
            "smtp-edge:ban:192.0.2.0/24",
            r#"{"source":"bad_commands","reason":"r","created":1,"expires":2}"#,
        )
        .unwrap();
        assert_eq!(b.address(), "192.0.2.0/24");
        assert_eq!(b.source, Source::BadCommands);
        assert!(parse_entry("smtp-edge:ban:x", "{}").is_none());
        assert!(parse_entry("smtp-edge:ban:192.0.2.1/32", "{").is_none());
    }
}
