//! The admin listener as an operator uses it: `/metrics` scraped and parsed
//! by a Prometheus text parser after a known workload (exact counters),
//! `/livez`, `/readyz` turning 503 when no backend is in rotation and while
//! draining, and sessions still accepted during the drain delay.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn admin_proxy_config(backend: &str, extra: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n{extra}\n[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{backend}\"\n"
    )
}

/// Scrapes `/metrics` and parses it.
async fn scrape(proxy: &Proxy) -> prometheus_parse::Scrape {
    let (status, body) = http_get(proxy.admin.expect("admin address"), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

/// The value of `name` whose labels include all of `labels` (0 when absent).
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(s, name, labels)
}

async fn session(proxy: &Proxy, bodies: &[&[u8]]) -> Vec<u16> {
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO metrics.client.test").await.code, 250);
    let mut codes = Vec::new();
    for b in bodies {
        codes.push(transaction(&mut c, b).await.code);
    }
    assert_eq!(c.cmd("QUIT").await.code, 221);
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_known_workload() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&admin_proxy_config(
        &rec.addr,
        "[policy]\ndeny = [\"127.0.0.3/32\"]",
    ))
    .await;
    // Three accepted messages over two sessions, one refused for a bare LF
    // (proxy's own 550 after the dot), one connection denied at accept.
    assert_eq!(
        session(
            &proxy,
            &[b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"]
        )
        .await,
        [250, 250]
    );
    assert_eq!(
        session(
            &proxy,
            &[
                b"Subject: 3\r\n\r\nthree\r\n",
                b"Subject: 4\r\n\r\nbare\nLF\r\n"
            ]
        )
        .await,
        [250, 550]
    );
    let mut denied = Raw::connect_from("127.0.0.3".parse().unwrap(), proxy.addr).await;
    assert_eq!(denied.reply().await.code, 554);
    assert!(denied.closed(Duration::from_secs(2)).await);

    // The session tasks end just after their 221.
    let end = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = scrape(&proxy).await;
        if value(&s, "smtp_edge_sessions_active", &[]) == 0.0 || Instant::now() > end {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let b = [("backend", rec.addr.as_str())];
    let expect = [
        ("smtp_edge_connections_accepted_total", &[][..], 2.0),
        (
            "smtp_edge_connections_refused_total",
            &[("reason", "deny_list")][..],
            1.0,
        ),
        ("smtp_edge_sessions_active", &[][..], 0.0),
        ("smtp_edge_session_duration_seconds_count", &[][..], 2.0),
        ("smtp_edge_transactions_total", &[("class", "2xx")][..], 3.0),
        ("smtp_edge_transactions_total", &[("class", "5xx")][..], 1.0),
        ("smtp_edge_transactions_total", &[("class", "4xx")][..], 0.0),
        ("smtp_edge_transaction_duration_seconds_count", &[][..], 4.0),
        ("smtp_edge_messages_relayed_total", &[][..], 3.0),
        ("smtp_edge_recipients_total", &[][..], 3.0),
        (
            "smtp_edge_policy_verdicts_total",
            &[("check", "deny_list"), ("action", "enforced")][..],
            1.0,
        ),
        ("smtp_edge_backend_connections_created_total", &b[..], 1.0),
        ("smtp_edge_backend_connections_reused_total", &b[..], 3.0),
        ("smtp_edge_backend_connect_failures_total", &b[..], 0.0),
        ("smtp_edge_backend_pool_wait_seconds_count", &b[..], 4.0),
        ("smtp_edge_backend_reply_seconds_count", &b[..], 3.0),
        // The refused message's connection was dropped (no final dot).
        (
            "smtp_edge_backend_connections",
            &[("backend", rec.addr.as_str()), ("state", "idle")][..],
            0.0,
        ),
        (
            "smtp_edge_backend_connections",
            &[("backend", rec.addr.as_str()), ("state", "in_use")][..],
            0.0,
        ),
        ("smtp_edge_backend_up", &b[..], 1.0),
        ("smtp_edge_draining", &[][..], 0.0),
    ];
    let mut wrong = Vec::new();
    for (name, labels, want) in expect {
        let got = value(&s, name, labels);
        if got != want {
            wrong.push(format!("{name}{labels:?} = {got}, expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", proxy.stats.encode());
    // The bytes relayed are those of the three accepted messages at least.
    let bytes = value(&s, "smtp_edge_relayed_bytes_total", &[]);
    assert!(bytes >= 36.0, "{bytes}");
    // Bounded labels: no client address anywhere.
    let (_, text) = http_get(proxy.admin.unwrap(), "/metrics").await;
    assert!(!text.contains("127.0.0.3"), "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_readyz_and_unknown_paths() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&admin_proxy_config(&rec.addr, "")).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(http_get(admin, "/livez").await, (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(admin, "/nothing").await.0, 404);
    proxy.stop().await;

    // The only backend hangs: once marked down, not ready.
    let dead = format!("127.0.0.1:{}", free_port());
    let _hang = std::net::TcpListener::bind(&dead).unwrap();
    let proxy = Proxy::start(&admin_proxy_config(
        &dead,
        "[timeouts]\nbackend_connect = 0.3",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    for _ in 0..3 {
        let mut c = Raw::greeted(proxy.addr).await;
        assert_eq!(c.cmd("EHLO a.test").await.code, 250);
        assert_eq!(c.cmd("MAIL FROM:<a@a.test>").await.code, 451);
    }
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: no backend in rotation\n")
    );
    let s = scrape(&proxy).await;
    assert_eq!(value(&s, "smtp_edge_backend_up", &[]), 0.0);
    assert_eq!(
        value(&s, "smtp_edge_backend_connect_failures_total", &[]),
        3.0
    );
    proxy.stop().await;
}

/// SIGTERM's drain, as `Proxy::stop` starts it: `/readyz` answers 503 at
/// once while the listener still takes sessions for `drain_delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_503_while_draining_and_sessions_still_served() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&admin_proxy_config(
        &rec.addr,
        "[timeouts]\ndrain_delay = 1.5",
    ))
    .await;
    let (admin, addr) = (proxy.admin.unwrap(), proxy.addr);
    let stats = proxy.stats.clone();
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    assert!(stats.encode().contains("smtp_edge_draining 1"));
    // Still accepting during the delay: a whole session gets through.
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO late.test").await.code, 250);
    assert_eq!(
        transaction(&mut c, b"Subject: late\r\n\r\nlate\r\n")
            .await
            .code,
        250
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);
    stopping.await.unwrap();
    assert_eq!(rec.messages().len(), 1);
    // After the drain, the listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
