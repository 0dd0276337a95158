//! Short in-process runs of the generator against the in-process sink: exact
//! counts (sent == sink received == 2xx replies), ordered non-zero
//! percentiles, the JSON fields, STARTTLS, the open loop, misbehaving
//! servers, the binary's exit codes, and the OTLP sink's span counts.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_load::message::SizeDist;
use smtp_load::stats::{LatencySummary, PHASE_NAMES, STAGE_NAMES};
use smtp_load::{run, Report, RunConfig, SinkConfig, SinkServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn sink(tls: bool) -> SinkServer {
    let mut cfg = SinkConfig::new("127.0.0.1:0".parse().unwrap());
    if tls {
        cfg.tls = Some(smtp_load::tls::self_signed_server_config().unwrap());
    }
    SinkServer::start(cfg).await.unwrap()
}

fn config(target: SocketAddr, messages: u64, connections: usize, per_conn: u64) -> RunConfig {
    let mut c = RunConfig::new(target);
    c.messages = Some(messages);
    c.connections = connections;
    c.messages_per_conn = per_conn;
    c.timeout = Duration::from_secs(10);
    c
}

async fn go(cfg: RunConfig) -> Report {
    run(cfg, Arc::new(AtomicBool::new(false))).await.unwrap()
}

/// Waits until the sink has counted `n` messages (its counter is bumped just
/// before the reply goes out).
async fn sink_messages(s: &SinkServer, n: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let got = s.stats().messages.load(Ordering::Relaxed);
        if got >= n || Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ordered(l: &LatencySummary, what: &str) {
    assert!(l.count > 0, "{what}: no samples");
    assert!(l.min > 0, "{what}: {l:?}");
    assert!(
        l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
        "{what}: {l:?}"
    );
}

fn code(r: &Report, stage: &str, code: &str) -> u64 {
    r.replies[stage].get(code).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_new_connection_per_message() {
    let s = sink(false).await;
    let r = go(config(s.local_addr(), 300, 4, 1)).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(r.messages.attempted, 300);
    assert_eq!(r.messages.accepted, 300);
    assert_eq!(sink_messages(&s, 300).await, 300);
    assert_eq!(code(&r, "final", "250"), 300);
    assert_eq!(code(&r, "mail", "250"), 300);
    assert_eq!(code(&r, "data", "354"), 300);
    assert_eq!(code(&r, "quit", "221"), 300);
    assert_eq!(r.connections.opened, 300);
    assert_eq!(s.stats().connections.load(Ordering::Relaxed), 300);
    assert_eq!(r.bytes, 300 * 4096);
    assert_eq!(s.stats().bytes.load(Ordering::Relaxed), 300 * 4096);
    // The sink offers PIPELINING: every message went pipelined.
    assert_eq!(r.messages.pipelined, 300);
    assert!(r.tls.is_none());
    for p in ["connect_to_greeting", "mail_to_final", "transaction"] {
        ordered(&r.latency_us[p], p);
        assert_eq!(r.latency_us[p].count, 300);
    }
    // A new connection per message: the transaction includes the connect.
    assert!(r.latency_us["transaction"].p50 >= r.latency_us["mail_to_final"].p50);
    assert_eq!(r.latency_us["tls_handshake"].count, 0);
    assert!(r.msgs_per_sec > 0.0 && r.conns_per_sec > 0.0 && r.bytes_per_sec > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_persistent_without_pipelining() {
    let s = sink(false).await;
    let mut c = config(s.local_addr(), 300, 4, 0);
    c.pipelining = false;
    c.rcpts = 3;
    c.sizes = SizeDist::parse("1000:1,20000:1").unwrap();
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!((r.messages.attempted, r.messages.accepted), (300, 300));
    assert_eq!(sink_messages(&s, 300).await, 300);
    assert_eq!(code(&r, "final", "250"), 300);
    assert_eq!(code(&r, "rcpt", "250"), 900);
    assert_eq!(r.messages.pipelined, 0);
    assert_eq!(s.stats().rcpts.load(Ordering::Relaxed), 900);
    // One connection per worker for the whole run, closed with QUIT.
    assert_eq!(r.connections.opened, 4);
    assert_eq!(s.stats().connections.load(Ordering::Relaxed), 4);
    assert_eq!(code(&r, "quit", "221"), 4);
    assert_eq!(r.bytes, s.stats().bytes.load(Ordering::Relaxed));
    ordered(&r.latency_us["mail_to_final"], "mail_to_final");
    ordered(&r.latency_us["transaction"], "transaction");
    assert_eq!(r.latency_us["connect_to_greeting"].count, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_messages_per_connection_with_pipelined_quit() {
    let s = sink(false).await;
    let r = go(config(s.local_addr(), 100, 3, 10)).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(sink_messages(&s, 100).await, 100);
    assert_eq!(code(&r, "final", "250"), 100);
    // 100 messages, 10 per connection, over 3 workers: at least 10 connections.
    assert!(
        (10..=13).contains(&r.connections.opened),
        "{}",
        r.connections.opened
    );
    assert_eq!(code(&r, "quit", "221"), r.connections.opened);

    // The same, closing right after the 221 instead of waiting for the
    // server to close.
    let s = sink(false).await;
    let mut c = config(s.local_addr(), 100, 3, 10);
    c.no_wait_close = true;
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(sink_messages(&s, 100).await, 100);
    assert_eq!(code(&r, "quit", "221"), r.connections.opened);
    assert!(!r.config.wait_close);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_at_500_per_second() {
    let s = sink(false).await;
    let mut c = config(s.local_addr(), 0, 8, 0);
    c.messages = None;
    c.duration = Some(Duration::from_secs(1));
    c.rate = Some(500.0);
    c.max_inflight = 200;
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(r.mode, "open");
    assert_eq!(r.messages.dropped, 0);
    assert_eq!(r.messages.attempted, 500);
    assert_eq!(r.messages.accepted, 500);
    assert_eq!(sink_messages(&s, 500).await, 500);
    assert_eq!(code(&r, "final", "250"), 500);
    let l = &r.latency_us["scheduled_to_final"];
    ordered(l, "scheduled_to_final");
    assert_eq!(l.count, 500);
    // The schedule, not the server, sets the pace.
    assert!(r.elapsed_s > 0.9 && r.elapsed_s < 3.0, "{}", r.elapsed_s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_drops_over_max_inflight() {
    // A server that greets and then never answers: every message stays in flight.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"220 slow\r\n").await;
            held.push(s);
        }
    });
    let mut c = config(addr, 50, 2, 0);
    c.rate = Some(1000.0);
    c.max_inflight = 5;
    c.timeout = Duration::from_millis(300);
    let r = go(c).await;
    assert!(!r.ok);
    assert!(r.messages.dropped >= 40, "{}", r.to_table());
    assert_eq!(r.messages.attempted + r.messages.dropped, 50);
    assert_eq!(r.messages.failed, r.messages.attempted);
    assert!(r.errors["timeout"] > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_against_the_tls_sink() {
    let s = sink(true).await;
    let mut c = config(s.local_addr(), 40, 2, 5);
    c.starttls = true;
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(sink_messages(&s, 40).await, 40);
    assert_eq!(code(&r, "final", "250"), 40);
    // 5 messages per connection, 2 workers sharing 40: 8 or 9 connections.
    let conns = r.connections.opened;
    assert!((8..=9).contains(&conns), "{conns}");
    assert_eq!(code(&r, "starttls", "220"), conns);
    assert_eq!(s.stats().tls_handshakes.load(Ordering::Relaxed), conns);
    let hs = &r.latency_us["tls_handshake"];
    ordered(hs, "tls_handshake");
    assert_eq!(hs.count, conns);
    // Two EHLOs per connection (before and after STARTTLS).
    assert_eq!(code(&r, "ehlo", "250"), 2 * conns);
    // Without --tls-resume every handshake is a full one; TLS 1.3 by default.
    let t = r.tls.as_ref().unwrap();
    assert_eq!(
        (t.handshakes, t.resumed, t.tls12, t.tls13),
        (conns, 0, 0, conns)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_resumption_and_tls12_are_counted() {
    for tls12 in [false, true] {
        let s = sink(true).await;
        // One worker, a new connection per message: each handshake after
        // the first can resume the session of an earlier one.
        let mut c = config(s.local_addr(), 10, 1, 1);
        c.starttls = true;
        c.tls_resume = true;
        c.tls12 = tls12;
        let r = go(c).await;
        assert!(r.ok, "{}", r.to_table());
        let t = r.tls.as_ref().unwrap();
        assert_eq!(t.handshakes, 10, "{t:?}");
        assert_eq!(t.resumed, 9, "tls12 {tls12}: {t:?}");
        let want = if tls12 { (10, 0) } else { (0, 10) };
        assert_eq!((t.tls12, t.tls13), want);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["tls"]["resumed"], 9);
        assert_eq!(v["config"]["tls12"], tls12);
        assert_eq!(v["config"]["tls_resume"], true);
    }
}

/// A server that does not offer PIPELINING and answers each command line
/// as it comes; a command that arrives before the reply to the one before
/// it (a pipelined client) gets a 503.
async fn lockstep_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 lockstep ESMTP\r\n").await;
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                let mut in_data = false;
                loop {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    loop {
                        let reply: &[u8] = if in_data {
                            let Some(p) = memchr::memmem::find(&buf, b"\r\n.\r\n") else {
                                break;
                            };
                            buf.drain(..p + 5);
                            in_data = false;
                            b"250 queued\r\n"
                        } else {
                            let Some(p) = memchr::memmem::find(&buf, b"\r\n") else {
                                break;
                            };
                            let line: Vec<u8> = buf.drain(..p + 2).collect();
                            let verb = line[..4.min(line.len())].to_ascii_uppercase();
                            if !buf.is_empty() {
                                b"503 pipelined without PIPELINING\r\n"
                            } else if verb == b"EHLO" {
                                b"250-lockstep\r\n250 8BITMIME\r\n"
                            } else if verb == b"DATA" {
                                in_data = true;
                                b"354 go\r\n"
                            } else if verb == b"QUIT" {
                                let _ = s.write_all(b"221 bye\r\n").await;
                                return;
                            } else {
                                b"250 ok\r\n"
                            }
                        };
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_asked_but_not_offered_falls_back_to_lockstep() {
    let addr = lockstep_server().await;
    for per_conn in [1, 0] {
        // Pipelining on (the default), but the server does not offer it.
        let r = go(config(addr, 20, 2, per_conn)).await;
        assert!(r.ok, "{}", r.to_table());
        assert_eq!(r.messages.accepted, 20);
        assert_eq!(r.messages.pipelined, 0);
        assert!(r.config.pipelining);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_not_offered_is_an_error() {
    let s = sink(false).await;
    let mut c = config(s.local_addr(), 5, 1, 1);
    c.starttls = true;
    let r = go(c).await;
    assert!(!r.ok);
    assert_eq!(r.messages.failed, 5);
    assert_eq!(r.errors["tls"], 5);
    assert_eq!(s.stats().messages.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_sessions_and_warmup() {
    let s = sink(false).await;
    let mut c = config(s.local_addr(), 100, 4, 1);
    c.churn = true;
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(code(&r, "quit", "221"), 100);
    assert_eq!(r.connections.opened, 100);
    assert_eq!(s.stats().messages.load(Ordering::Relaxed), 0);
    ordered(&r.latency_us["transaction"], "transaction");

    let s = sink(false).await;
    let mut c = config(s.local_addr(), 50, 2, 0);
    c.warmup = Duration::from_millis(200);
    let r = go(c).await;
    assert!(r.ok, "{}", r.to_table());
    assert!(r.messages.warmup > 0);
    assert_eq!(r.messages.attempted, 50);
    let total = 50 + r.messages.warmup;
    assert_eq!(sink_messages(&s, total).await, total);
    assert_eq!(code(&r, "final", "250"), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_has_the_documented_fields() {
    let s = sink(false).await;
    let r = go(config(s.local_addr(), 20, 2, 1)).await;
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    for k in [
        "tool",
        "version",
        "mode",
        "target",
        "config",
        "elapsed_s",
        "messages",
        "connections",
        "msgs_per_sec",
        "conns_per_sec",
        "bytes",
        "bytes_per_sec",
        "replies",
        "errors",
        "latency_us",
        "server",
        "tls",
        "ok",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["tool"], "smtp-load");
    assert_eq!(v["mode"], "closed");
    for k in [
        "attempted",
        "accepted",
        "rejected",
        "failed",
        "dropped",
        "warmup",
        "pipelined",
    ] {
        assert!(v["messages"][k].is_u64(), "messages.{k}");
    }
    assert_eq!(v["messages"]["accepted"], 20);
    for k in ["opened", "failed"] {
        assert!(v["connections"][k].is_u64());
    }
    for k in ["connect", "io", "timeout", "protocol", "tls"] {
        assert_eq!(v["errors"][k], 0, "errors.{k}");
    }
    for st in STAGE_NAMES {
        assert!(v["replies"][st].is_object(), "replies.{st}");
    }
    assert_eq!(v["replies"]["final"]["250"], 20);
    for p in PHASE_NAMES {
        for f in ["count", "min", "p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_us"][p][f].is_u64(), "latency_us.{p}.{f}");
        }
        assert!(v["latency_us"][p]["mean"].is_number());
    }
    for k in [
        "connections",
        "messages_per_conn",
        "messages",
        "duration_s",
        "warmup_s",
        "rcpts",
        "sizes",
        "starttls",
        "tls_resume",
        "tls12",
        "pipelining",
        "churn",
        "wait_close",
        "rate",
        "max_inflight",
        "bind_addresses",
        "threads",
    ] {
        assert!(v["config"].get(k).is_some(), "config.{k}");
    }
    assert_eq!(v["config"]["sizes"][0][0], 4096);
    assert_eq!(v["ok"], true);
    assert!(v["tls"].is_null());
    // It reads back (floats may differ in the last digit).
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(
        (&back.messages, &back.replies, &back.errors),
        (&r.messages, &r.replies, &r.errors)
    );
}

/// A scripted bad server: each connection gets `script` (after reading
/// whatever the client sends first, if `wait`), then is closed.
async fn bad_server(script: &'static [u8], wait: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 bad ESMTP\r\n").await;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await; // EHLO
                let _ = s.write_all(b"250-bad\r\n250 PIPELINING\r\n").await;
                if wait {
                    let _ = s.read(&mut buf).await;
                }
                let _ = s.write_all(script).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_servers_are_counted_not_fatal() {
    let cases: [(&[u8], bool, &str); 5] = [
        (b"garbage\r\n", true, "protocol"),
        (b"", true, "io"),
        (b"250 ok\r\n250 ok\r\n354 go\r\n", true, "io"),
        (b"421 4.3.2 bye\r\n", true, ""),
        (b"250 ok\r\n550 no\r\n554 no rcpt\r\n", true, ""),
    ];
    for (script, wait, err) in cases {
        let addr = bad_server(script, wait).await;
        let mut c = config(addr, 6, 2, 1);
        c.timeout = Duration::from_secs(2);
        let r = go(c).await;
        assert!(!r.ok, "{script:?}");
        assert_eq!(r.messages.attempted, 6);
        assert_eq!(r.messages.accepted, 0);
        assert_eq!(r.messages.rejected + r.messages.failed, 6, "{script:?}");
        if err.is_empty() {
            assert_eq!(r.messages.rejected, 6, "{script:?}: {}", r.to_table());
        } else {
            assert_eq!(r.errors[err], 6, "{script:?}: {}", r.to_table());
        }
    }
    // Nothing listening: connect errors.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = go(config(addr, 5, 2, 1)).await;
    assert_eq!(
        (r.messages.failed, r.errors["connect"], r.connections.failed),
        (5, 5, 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_batches_pipelined_replies_and_handles_odd_input() {
    let s = sink(false).await;
    let mut c = TcpStream::connect(s.local_addr()).await.unwrap();
    let mut long = b"NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 10_000));
    long.extend_from_slice(b"\r\n");
    c.write_all(&long).await.unwrap();
    c.write_all(
        b"EHLO me\r\nXFORWARD NAME=x ADDR=1.2.3.4\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n\
          MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n..\r\n.\r\nBOGUS\r\nQUIT\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let got = String::from_utf8(got).unwrap();
    let codes: Vec<&str> = got
        .lines()
        .map(|l| &l[..4])
        .filter(|c| c.ends_with(' '))
        .collect();
    assert_eq!(
        codes,
        [
            "220 ", "500 ", "250 ", "250 ", "503 ", "250 ", "250 ", "354 ", "250 ", "250 ", "250 ",
            "354 ", "250 ", "502 ", "221 "
        ],
        "{got}"
    );
    assert!(got.contains("250-XFORWARD NAME ADDR PORT PROTO HELO SOURCE\r\n"));
    assert!(got.contains("250-PIPELINING\r\n"));
    assert_eq!(s.stats().messages.load(Ordering::Relaxed), 2);
    assert_eq!(s.stats().bytes.load(Ordering::Relaxed), 7); // "" and "x\r\n..\r\n" (raw, still dot-stuffed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_stops_after_max_messages() {
    let mut cfg = SinkConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.max_messages = Some(30);
    let s = SinkServer::start(cfg).await.unwrap();
    let r = go(config(s.local_addr(), 30, 3, 0)).await;
    assert!(r.ok);
    tokio::time::timeout(Duration::from_secs(5), s.reached())
        .await
        .unwrap();
    s.drain(Duration::from_secs(2)).await;
    let rep = s.report();
    assert_eq!(rep.messages, 30);
    // Under load one worker may send all 30 before the others connect:
    // the sink counts exactly what the generator opened.
    assert!((1..=3).contains(&rep.connections), "{}", rep.connections);
    assert_eq!(rep.connections, r.connections.opened);
    assert!(rep.msgs_per_sec > 0.0);
}

/// Reads a greeting line (the sink has accepted the connection by then).
async fn greeted(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"220 "));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_reports_the_most_connections_open_at_once() {
    let s = sink(false).await;
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(greeted(s.local_addr()).await);
    }
    assert_eq!(s.stats().active.load(Ordering::Relaxed), 7);
    assert_eq!(s.stats().peak_active.load(Ordering::Relaxed), 7);
    drop(held);
    s.drain(Duration::from_secs(5)).await;
    assert_eq!(s.stats().active.load(Ordering::Relaxed), 0);
    // Fewer at once later: the peak stays.
    let a = greeted(s.local_addr()).await;
    let b = greeted(s.local_addr()).await;
    drop((a, b));
    // Persistent load over 3 connections adds messages, not to the peak.
    let r = go(config(s.local_addr(), 60, 3, 0)).await;
    assert!(r.ok, "{}", r.to_table());
    assert_eq!(sink_messages(&s, 60).await, 60);
    s.drain(Duration::from_secs(5)).await;
    let rep = s.report();
    assert_eq!(rep.peak_connections, 7);
    // The sink counts exactly what the generator opened: up to 3 (one
    // worker may send all 60 before the others connect).
    assert!((1..=3).contains(&r.connections.opened), "{}", r.to_table());
    assert_eq!(rep.connections, 7 + 2 + r.connections.opened);
    assert_eq!(rep.messages, 60);
    let v: serde_json::Value = serde_json::to_value(&rep).unwrap();
    assert_eq!(v["peak_connections"], 7);
    assert!(rep.to_table().contains("(at most 7 at once)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_greets_a_burst_of_connects() {
    // 600 connects at once overflow a listen backlog of 128: with SYN
    // cookies some connects then complete on the client's side only and
    // never see a greeting. (Fewer when somaxconn or the fd limit is lower.)
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(128);
    let (nofile, _) = smtp_load::procstat::raise_nofile();
    let n = 600
        .min(somaxconn.saturating_sub(8))
        .min(nofile.saturating_sub(100) / 2);
    let s = sink(false).await;
    let addr = s.local_addr();
    let conns: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.ok()?;
                let mut buf = [0u8; 256];
                let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                buf[..n].starts_with(b"220 ").then_some(c)
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in conns {
        held.extend(c.await.unwrap());
    }
    assert_eq!(held.len() as u64, n);
    assert_eq!(s.report().peak_connections, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections() {
    let s = sink(false).await;
    let mut cfg = smtp_load::idle::IdleConfig::new(s.local_addr(), 50, Duration::from_millis(300));
    cfg.watch_pids = vec![std::process::id()];
    let r = smtp_load::idle::idle(cfg).await.unwrap();
    assert!(r.ok, "{}", r.to_table());
    assert_eq!((r.opened, r.peak_open, r.closed_by_server), (50, 50, 0));
    assert!(r.server.is_some());
    assert_eq!(s.stats().connections.load(Ordering::Relaxed), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exit_codes_and_json() {
    let s = sink(false).await;
    let addr = s.local_addr().to_string();
    let bin = env!("CARGO_BIN_EXE_smtp-load");
    let out = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            Command::new(bin)
                .args([
                    "run",
                    "--target",
                    &addr,
                    "-n",
                    "50",
                    "-c",
                    "2",
                    "--json",
                    "-q",
                    "--threads",
                    "1",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["messages"]["accepted"], 50);
    assert_eq!(v["ok"], true);
    assert_eq!(sink_messages(&s, 50).await, 50);

    // Nothing listening: exit 1 with the counts on stderr.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["run", "--target", &dead, "-n", "3", "-q"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));
    let out = Command::new(bin)
        .args(["run", "--target", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// An OTLP trace export with `names.len()` spans, one resource and scope.
fn export_request(
    names: &[&str],
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let spans = names
        .iter()
        .enumerate()
        .map(|(i, n)| Span {
            trace_id: vec![1; 16],
            span_id: vec![i as u8 + 1; 8],
            name: n.to_string(),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sink_counts_the_spans_of_grpc_exports() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let s = smtp_load::OtlpSink::start(
        "127.0.0.1:0".parse().unwrap(),
        smtp_load::OtlpProtocol::Grpc,
    )
    .await
    .unwrap();
    let mut client = TraceServiceClient::connect(format!("http://{}", s.local_addr()))
        .await
        .unwrap();
    let names = ["smtp.session", "smtp.transaction", "smtp.backend"];
    client.export(export_request(&names)).await.unwrap();
    let r = s.report();
    assert_eq!(
        (r.exports, r.spans, r.errors),
        (1, 3, 0),
        "{}",
        r.to_table()
    );
    client
        .export(export_request(&["smtp.transaction", "smtp.backend"]))
        .await
        .unwrap();
    let r = s.report();
    assert_eq!((r.exports, r.spans), (2, 5));
    assert_eq!(r.spans_by_name["smtp.session"], 1);
    assert_eq!(r.spans_by_name["smtp.backend"], 2);
    assert_eq!(r.tool, "smtp-load-otlp-sink");
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["protocol"], "grpc");
    assert!(
        r.to_table().contains("5 spans in 2 exports"),
        "{}",
        r.to_table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sink_counts_the_spans_of_http_exports() {
    use prost::Message;
    let s = smtp_load::OtlpSink::start(
        "127.0.0.1:0".parse().unwrap(),
        smtp_load::OtlpProtocol::Http,
    )
    .await
    .unwrap();
    let post = |path: &str, body: Vec<u8>| {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    };
    for (path, body, status) in [
        (
            "/v1/traces",
            export_request(&["a", "b"]).encode_to_vec(),
            "200",
        ),
        ("/v1/traces", b"\xff\xff\xff".to_vec(), "400"),
        ("/v1/logs", Vec::new(), "404"),
    ] {
        let mut c = TcpStream::connect(s.local_addr()).await.unwrap();
        c.write_all(&post(path, body)).await.unwrap();
        let mut resp = Vec::new();
        c.read_to_end(&mut resp).await.unwrap();
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{resp}");
    }
    let r = s.report();
    assert_eq!(
        (r.exports, r.spans, r.errors),
        (1, 2, 2),
        "{}",
        r.to_table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sink_binary_prints_the_count_on_sigterm() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_smtp-load"))
        .args(["otlp-sink", "-l", "127.0.0.1:0", "--json", "--threads", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open to the end: a closed stderr would fail the binary's writes.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // "smtp-load otlp-sink: listening on 127.0.0.1:PORT (OTLP/grpc)"
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let mut client = TraceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .export(export_request(&["smtp.session", "smtp.transaction"]))
        .await
        .unwrap();
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(
        out.status.success(),
        "{:?}, stdout {:?}, stderr {rest:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tool"], "smtp-load-otlp-sink");
    assert_eq!(v["spans"], 2);
    assert_eq!(v["exports"], 1);
    assert_eq!(v["spans_by_name"]["smtp.session"], 1);
    assert!(v["cpu_s"].as_f64().is_some());
}
