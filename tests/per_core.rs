//! `[runtime] flavor = "thread_per_core"` as a user sees it: more client
//! sessions than pooled connections and more clients than cores, every
//! message delivered exactly once into Postfix's smtp-sink while the
//! backend never sees more than `max_connections` (the cores' shares add
//! up to it; a counting TCP tap checks), connections spread over the cores
//! (`smtp_edge_core_connections_total`); the policy's global cap holding in
//! total across cores; a reload moving every core to the new backend; the
//! real binary with one named thread per core, stopping on SIGTERM. Skips
//! without Postfix (fails under CI=true).
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use lettre::message::Mailbox;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

const BIN: &str = env!("CARGO_BIN_EXE_smtp-edge");

fn per_core(cores: usize, extra: &str, backend: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n{extra}\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{backend}\"\n\
         max_connections = 4\n[runtime]\nflavor = \"thread_per_core\"\nworker_threads = {cores}\n"
    )
}

fn mailer(port: u16) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .hello_name(ClientId::Domain("cores.client.test".into()))
        .timeout(Some(Duration::from_secs(60)))
        .build()
}

fn message(subject: &str) -> Message {
    Message::builder()
        .from("Alice <alice@client.example>".parse::<Mailbox>().unwrap())
        .to("Bob <bob@example.org>".parse::<Mailbox>().unwrap())
        .subject(subject)
        .body(format!("body of {subject}\n"))
        .unwrap()
}

/// Sends `n` messages at once, a lettre session each; the failures.
async fn burst(port: u16, tag: &str, n: usize) -> Vec<String> {
    let sends: Vec<_> = (0..n)
        .map(|i| {
            let subject = format!("{tag} {i}");
            tokio::spawn(async move { (i, mailer(port).send(message(&subject)).await) })
        })
        .collect();
    let mut failed = Vec::new();
    for s in sends {
        match s.await.unwrap() {
            (_, Ok(r)) if r.code().to_string() == "250" => {}
            (i, r) => failed.push(format!("{i}: {r:?}")),
        }
    }
    failed
}

/// How often each subject arrived.
fn subjects(messages: &[String]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in messages {
        if let Some(s) = m.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *seen.entry(s.trim().to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// 300 sessions at once over 3 cores and a pool of 4 (shares 2 + 1 + 1):
/// each message is accepted and arrives exactly once, the backend never
/// sees more than 4 connections, and the connections were spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_over_three_cores_through_four_connections() {
    let Some(sink) = Sink::start(&[]) else { return };
    let tap = Tap::start(&sink.addr).await;
    let proxy = Proxy::start(&per_core(3, "", &tap.addr.to_string())).await;
    let failed = burst(proxy.addr.port(), "core burst", 300).await;
    assert!(
        failed.is_empty(),
        "{} refused: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let got = subjects(&sink.wait_messages(300, Duration::from_secs(10)));
    for i in 0..300 {
        assert_eq!(got.get(&format!("core burst {i}")), Some(&1), "message {i}");
    }
    assert_eq!(got.len(), 300);
    assert!(
        tap.max_open() <= 4,
        "the backend saw {} at once",
        tap.max_open()
    );
    let (_, body) = http_get(proxy.admin.unwrap(), "/metrics").await;
    let m = parse_metrics(&body);
    let per: Vec<f64> = (0..3)
        .map(|k| {
            metric_value(
                &m,
                "smtp_edge_core_connections_total",
                &[("core", &k.to_string())],
            )
        })
        .collect();
    assert_eq!(per.iter().sum::<f64>(), 300.0, "{per:?}");
    assert!(
        per.iter().filter(|&&n| n > 0.0).count() >= 2,
        "one core took all: {per:?}"
    );
    eprintln!(
        "connections per core: {per:?}; backend connections {} (at most {} at once)",
        tap.total(),
        tap.max_open()
    );
    proxy.stop().await;
}

/// `[policy.limits] max_connections = 5` over 3 cores: 8 clients holding
/// their sessions, 5 greeted and 3 refused, whichever core took them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_holds_across_cores() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::start(&per_core(
        3,
        "[policy.limits]\nmax_connections = 5\n",
        &sink.addr,
    ))
    .await;
    let mut held = Vec::new();
    let (mut greeted, mut refused) = (0, 0);
    for _ in 0..8 {
        let mut c = Raw::connect(proxy.addr).await;
        match c.reply().await.code {
            220 => greeted += 1,
            421 => refused += 1,
            other => panic!("unexpected {other}"),
        }
        held.push(c);
    }
    assert_eq!((greeted, refused), (5, 3));
    drop(held);
    proxy.stop().await;
}

/// A reload to another backend: every core's sessions go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_every_core_to_the_new_backend() {
    let Some(old) = Sink::start(&[]) else { return };
    let Some(new) = Sink::start(&[]) else { return };
    let proxy = Proxy::start(&per_core(2, "", &old.addr)).await;
    assert!(burst(proxy.addr.port(), "before", 10).await.is_empty());
    assert_eq!(old.wait_messages(10, Duration::from_secs(5)).len(), 10);
    proxy.reload(&per_core(2, "", &new.addr)).unwrap();
    assert!(burst(proxy.addr.port(), "after", 40).await.is_empty());
    let got = subjects(&new.wait_messages(40, Duration::from_secs(5)));
    assert_eq!(got.len(), 40, "{got:?}");
    assert_eq!(old.messages().len(), 10, "nothing more at the old backend");
    proxy.stop().await;
}

/// The binary: one thread per core, named; a message relayed; SIGTERM
/// stops it with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_a_thread_per_core_and_stops_on_sigterm() {
    let Some(sink) = Sink::start(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        per_core(2, "", &sink.addr).replace(
            "127.0.0.1:0\"\n[[backend]]",
            &format!("127.0.0.1:{port}\"\n[[backend]]"),
        ),
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dir.path().join("edge.log");
    let mut proc =
        Running::listening(Command::new(BIN).arg("--config").arg(&cfg), &log, addr).await;
    let pid = proc.0.id();
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO cores.client.test").await.code, 250);
    assert_eq!(
        transaction(&mut c, b"Subject: t\r\n\r\nper core\r\n")
            .await
            .code,
        250
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);
    assert_eq!(sink.wait_messages(1, Duration::from_secs(5)).len(), 1);
    // A session served: the cores run (the sockets listen from the bind).
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("edge-core-"))
        .collect();
    names.sort();
    assert_eq!(names, ["edge-core-0", "edge-core-1"]);
    let status = proc.terminated(Duration::from_secs(15), &log).await;
    assert!(
        status.success(),
        "{status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
