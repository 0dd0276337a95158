//! Rate limits shared on Redis as a fleet runs them: a real redis-server
//! started on a free port, two real smtp-edge binaries sharing one limit
//! (a client alternating between them is held at the fleet rate, not twice
//! it; a SIGHUP reload keeps the shared state), and Redis stopped, slowed
//! and started again mid-test (no session hangs; the fallback and the
//! recovery show in /metrics and in the log, once each).
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

/// Every session in these tests must end within this.
const SESSION_BOUND: Duration = Duration::from_secs(10);

/// One smtp-edge binary with an admin listener and a Maildir backend.
struct Edge {
    proc: Running,
    addr: SocketAddr,
    admin: SocketAddr,
    file: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn config(addr: SocketAddr, admin: SocketAddr, mail: &Path, policy: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n[admin]\naddress = \"{admin}\"\n\
         [[listener]]\naddress = \"{addr}\"\n\
         [[backend]]\nmaildir = \"{}\"\n{policy}\n",
        mail.display()
    )
}

impl Edge {
    async fn start(policy: &str) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let file = dir.path().join("smtp-edge.toml");
        std::fs::write(&file, config(addr, admin, &dir.path().join("mail"), policy)).unwrap();
        let log = dir.path().join("smtp-edge.log");
        let proc = Running::edge(&file, "info", &log, addr).await;
        Edge {
            proc,
            addr,
            admin,
            file,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Rewrites the file with `policy` and sends SIGHUP; waits for the
    /// reload to be logged.
    async fn reload(&self, policy: &str) {
        let mail = self._dir.path().join("mail");
        std::fs::write(&self.file, config(self.addr, self.admin, &mail, policy)).unwrap();
        let before = self.log().matches("configuration reloaded").count();
        let st = Command::new("kill")
            .args(["-HUP", &self.proc.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let end = Instant::now() + Duration::from_secs(10);
        while self.log().matches("configuration reloaded").count() == before {
            assert!(Instant::now() < end, "no reload logged:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of metric `name` (0 when absent).
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        metric_value(&parse_metrics(&body), name, labels)
    }

    /// Waits until metric `name` satisfies `ok`; its last value.
    async fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.metric(name, &[]).await;
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{name} stayed at {v}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The first reply a client from `src` gets, then QUIT; bounded.
async fn connect_code(src: &str, addr: SocketAddr) -> u16 {
    let session = async {
        let mut c = Raw::connect_from(ip(src), addr).await;
        let g = c.reply().await;
        if g.code == 220 {
            assert_eq!(c.cmd("QUIT").await.code, 221);
        }
        g.code
    };
    tokio::time::timeout(SESSION_BOUND, session)
        .await
        .expect("a session hung")
}

/// A whole session from `src` delivering one message; the final reply's
/// code (or the first refusal's); bounded.
async fn deliver(src: &str, addr: SocketAddr) -> u16 {
    let session = async {
        let mut c = Raw::connect_from(ip(src), addr).await;
        let g = c.reply().await;
        if g.code != 220 {
            return g.code;
        }
        assert_eq!(c.cmd("EHLO client.example.org").await.code, 250);
        let r = transaction(&mut c, b"Subject: fleet\r\n\r\nshared limits\r\n").await;
        assert_eq!(c.cmd("QUIT").await.code, 221);
        r.code
    };
    tokio::time::timeout(SESSION_BOUND, session)
        .await
        .expect("a session hung")
}

fn shared_policy(url: &str, connections: u32, messages: u32) -> String {
    format!(
        "[policy.limits.redis]\nurl = \"{url}\"\ntimeout = 0.05\non_failure = \"local\"\n\
         [policy.limits.connection_rate]\naction = \"reject\"\nstore = \"redis\"\n\
         per_ip = {{ count = {connections}, period = 3600 }}\n\
         [policy.limits.message_rate]\naction = \"defer\"\nstore = \"redis\"\n\
         per_ip = {{ count = {messages}, period = 3600 }}\n"
    )
}

/// Two instances share one connection rate and one message rate: a client
/// alternating between them gets the fleet's 4 connections and 3 messages
/// (twice that with per-instance limits). The state is in Redis under
/// bounded keys, and a SIGHUP reload keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_limit() {
    let Some(redis) = Redis::start() else { return };
    let policy = shared_policy(&redis.url(), 4, 3);
    let a = Edge::start(&policy).await;
    let b = Edge::start(&policy).await;

    // Connections: 10 from one client, alternating A, B, A, ...
    let mut codes = Vec::new();
    for i in 0..10 {
        let edge = if i % 2 == 0 { &a } else { &b };
        codes.push(connect_code("127.0.0.2", edge.addr).await);
        // Time for the instance's background Redis call (well under a
        // millisecond here; generous for a loaded CI machine). The exact
        // count relies on it: an instance that has not heard back decides
        // provisionally (see src/policy/limits/redis.rs).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        codes,
        [220, 220, 220, 220, 421, 421, 421, 421, 421, 421],
        "A log:\n{}\nB log:\n{}",
        a.log(),
        b.log()
    );

    // Messages: one session on each, MAIL alternating between them.
    let mut sa = Raw::connect_from(ip("127.0.0.3"), a.addr).await;
    let mut sb = Raw::connect_from(ip("127.0.0.3"), b.addr).await;
    for s in [&mut sa, &mut sb] {
        assert_eq!(s.reply().await.code, 220);
        assert_eq!(s.cmd("EHLO client.example.org").await.code, 250);
    }
    let mut mails = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { &mut sa } else { &mut sb };
        let r = tokio::time::timeout(SESSION_BOUND, s.cmd("MAIL FROM:<a@example.org>"))
            .await
            .expect("MAIL hung");
        if r.code == 450 {
            assert!(r.text.starts_with("4.7.28 "), "{r:?}");
        }
        mails.push(r.code);
        assert_eq!(s.cmd("RSET").await.code, 250);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(mails, [250, 250, 250, 450, 450, 450, 450, 450]);

    // The state is in Redis: one key per limited address (127.0.0.1 is
    // the harness waiting for the listeners), with a TTL of at most the
    // time until its bucket is full again (an hour).
    let keys = redis.cli(&["--scan", "--pattern", "smtp-edge:rl:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "smtp-edge:rl:connection_rate:127.0.0.1",
            "smtp-edge:rl:connection_rate:127.0.0.2",
            "smtp-edge:rl:connection_rate:127.0.0.3",
            "smtp-edge:rl:message_rate:127.0.0.3",
        ]
    );
    for k in keys {
        let ttl: i64 = redis.cli(&["PTTL", k]).trim().parse().unwrap();
        assert!(ttl > 0 && ttl <= 3_600_000, "{k}: {ttl}");
    }

    // Redis lost its scripts (a restart or SCRIPT FLUSH): reloaded on
    // NOSCRIPT, still limited.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(connect_code("127.0.0.2", a.addr).await, 421);
    assert_eq!(connect_code("127.0.0.4", b.addr).await, 220);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.metric("smtp_edge_redis_failures_total", &[]).await, 0.0);

    // SIGHUP on A with another message rate: its limiters are rebuilt on
    // the same Redis, and the client stays at its limit on both.
    a.reload(&shared_policy(&redis.url(), 4, 5)).await;
    assert_eq!(connect_code("127.0.0.2", a.addr).await, 421);
    assert_eq!(connect_code("127.0.0.2", b.addr).await, 421);
    assert!(
        a.log().contains("connection_rate.per_ip") && a.log().contains("kept"),
        "{}",
        a.log()
    );
    for e in [&a, &b] {
        assert_eq!(e.metric("smtp_edge_redis_degraded", &[]).await, 0.0);
        assert!(e.metric("smtp_edge_redis_calls_total", &[]).await > 0.0);
        assert_eq!(e.metric("smtp_edge_redis_outages_total", &[]).await, 0.0);
        let enforced = e
            .metric(
                "smtp_edge_policy_verdicts_total",
                &[("check", "connection_rate"), ("action", "enforced")],
            )
            .await;
        assert!(enforced > 0.0);
    }
}

/// Redis stopped mid-test and started again: every session ends, mail is
/// delivered throughout (on_failure = "local" with room in the limits),
/// the fallback and the recovery show in /metrics, and each is logged
/// once. Redis slowed past `timeout` (DEBUG SLEEP) never slows a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_and_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let edge = Edge::start(&shared_policy(&redis.url(), 1000, 1000)).await;
    assert_eq!(deliver("127.0.0.5", edge.addr).await, 250);
    edge.wait_metric("smtp_edge_redis_calls_total", |v| v > 0.0)
        .await;
    assert_eq!(edge.metric("smtp_edge_redis_degraded", &[]).await, 0.0);

    // Down: sessions go on, judged by the local limiters.
    redis.stop();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(deliver("127.0.0.5", edge.addr).await, 250);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    edge.wait_metric("smtp_edge_redis_degraded", |v| v == 1.0)
        .await;
    assert_eq!(deliver("127.0.0.5", edge.addr).await, 250);
    assert_eq!(edge.metric("smtp_edge_redis_outages_total", &[]).await, 1.0);
    assert!(edge.metric("smtp_edge_redis_failures_total", &[]).await >= 1.0);
    assert!(
        edge.metric("smtp_edge_redis_fallback_checks_total", &[])
            .await
            >= 1.0
    );

    // Back: the link recovers by itself, and the shared limits count again.
    redis.resume();
    edge.wait_metric("smtp_edge_redis_degraded", |v| v == 0.0)
        .await;
    let calls = edge.metric("smtp_edge_redis_calls_total", &[]).await;
    assert_eq!(deliver("127.0.0.5", edge.addr).await, 250);
    edge.wait_metric("smtp_edge_redis_calls_total", |v| v > calls)
        .await;
    assert!(redis
        .cli(&["EXISTS", "smtp-edge:rl:message_rate:127.0.0.5"])
        .trim()
        .ends_with('1'));

    // Slow: Redis blocked for 2 s; sessions meanwhile are not slowed, the
    // link degrades (a second outage) and comes back.
    let port = redis.port.to_string();
    let sleeper = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "DEBUG", "SLEEP", "2"])
            .output()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(deliver("127.0.0.6", edge.addr).await, 250);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    edge.wait_metric("smtp_edge_redis_outages_total", |v| v == 2.0)
        .await;
    let _ = sleeper.join();
    edge.wait_metric("smtp_edge_redis_degraded", |v| v == 0.0)
        .await;
    assert!(
        edge.metric("smtp_edge_redis_failures_total", &[("reason", "timeout")])
            .await
            >= 1.0
    );

    // Logged once per outage and once per recovery.
    let log = edge.log();
    assert_eq!(log.matches("redis: unreachable").count(), 2, "{log}");
    assert_eq!(
        log.matches("shared rate limits restored").count(),
        2,
        "{log}"
    );
}
