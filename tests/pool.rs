//! The backend pool under overload, as a user sees it: more client sessions
//! than pooled connections all delivered (lettre into Postfix's smtp-sink,
//! XCLIENT into a private Postfix), waiters served first come first served,
//! a waiter that hangs up leaving no trace, and a dead backend marked down,
//! skipped, and probed back. A counting TCP tap in front of the backend
//! checks the connection cap. Pool hygiene against a `SeqRecorder`:
//! connections past `max_lifetime` replaced, a reload of `identity` or
//! `tls` giving new connections. Skips without Postfix (fails under
//! CI=true).
mod common;
mod postfix_instance;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lettre::message::Mailbox;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use postfix_instance::Postfix;

fn mailer(port: u16) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .hello_name(ClientId::Domain("burst.client.test".into()))
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

/// The subject of each dumped message, with how often it arrived.
fn subjects(messages: &[String]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in messages {
        if let Some(s) = m.lines().find_map(|l| l.strip_prefix("Subject: ")) {
            *seen.entry(s.trim().to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// 300 client sessions at once (lettre, a new connection each) through a
/// pool of 4 connections into smtp-sink: every message gets 250 and arrives
/// exactly once, and the backend never has more than 4 connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_300_sessions_through_4_connections() {
    let Some(sink) = Sink::start(&[]) else { return };
    let tap = Tap::start(&sink.addr).await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nmax_connections = 4\n",
        tap.addr
    ))
    .await;
    let port = proxy.addr.port();
    let t0 = Instant::now();
    let sends: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                let r = mailer(port).send(message(&format!("burst {i}"))).await;
                (i, r)
            })
        })
        .collect();
    let mut refused = Vec::new();
    for s in sends {
        let (i, r) = s.await.unwrap();
        match r {
            Ok(resp) if resp.code().to_string() == "250" => {}
            Ok(resp) => refused.push(format!("{i}: {resp:?}")),
            Err(e) => refused.push(format!("{i}: {e}")),
        }
    }
    let took = t0.elapsed();
    assert!(
        refused.is_empty(),
        "{} of 300 not accepted: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let got = subjects(&sink.wait_messages(300, Duration::from_secs(10)));
    for i in 0..300 {
        assert_eq!(
            got.get(&format!("burst {i}")),
            Some(&1),
            "message {i} must arrive exactly once"
        );
    }
    assert_eq!(got.len(), 300);
    assert!(
        tap.max_open() <= 4,
        "the backend saw {} connections at once",
        tap.max_open()
    );
    assert!(tap.total() >= 1);
    eprintln!(
        "300 sessions in {took:?} over {} backend connections (at most {} at once)",
        tap.total(),
        tap.max_open()
    );
    proxy.stop().await;
}

async fn ehlo(c: &mut Raw) {
    assert_eq!(c.cmd("EHLO waiter.client.test").await.code, 250);
}

/// Finishes the transaction whose MAIL was answered 250, then QUITs.
async fn finish(c: &mut Raw, tag: &str) {
    assert_eq!(c.cmd("RCPT TO:<b@backend.test>").await.code, 250, "{tag}");
    assert_eq!(c.cmd("DATA").await.code, 354, "{tag}");
    c.send(format!("Subject: {tag}\r\n\r\n{tag}\r\n.\r\n").as_bytes())
        .await;
    assert_eq!(c.reply().await.code, 250, "{tag}");
    assert_eq!(c.cmd("QUIT").await.code, 221, "{tag}");
}

/// One connection, one holder and five waiters arriving in order; the third
/// hangs up while waiting. When the holder finishes, the waiters are served
/// in arrival order over the same connection, the one that left is never
/// relayed, and no slot or waiter is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order_and_a_leaver_leaves_no_trace() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_pool_wait = 20\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nmax_connections = 1\n",
        rec.addr
    ))
    .await;
    let mut holder = Raw::greeted(proxy.addr).await;
    ehlo(&mut holder).await;
    assert_eq!(holder.cmd("MAIL FROM:<holder@client.test>").await.code, 250);

    let mut waiters = Vec::new();
    for w in 1..=5 {
        let mut c = Raw::greeted(proxy.addr).await;
        ehlo(&mut c).await;
        c.send(format!("MAIL FROM:<w{w}@client.test>\r\n").as_bytes())
            .await;
        waiters.push(c);
        // Arrival order is the order of the MAILs reaching the pool.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relay = proxy.backends.clone();
    assert_eq!(relay.idle_counts(), vec![0]);
    // The third waiter hangs up while in line.
    let leaver = waiters.remove(2);
    drop(leaver);
    tokio::time::sleep(Duration::from_millis(100)).await;

    finish(&mut holder, "holder").await;
    let mut tasks = Vec::new();
    for (c, w) in waiters.into_iter().zip([1, 2, 4, 5]) {
        tasks.push(tokio::spawn(async move {
            let mut c = c;
            let r = c.reply().await;
            assert_eq!(r.code, 250, "waiter {w}: {r:?}");
            finish(&mut c, &format!("waiter {w}")).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = rec.all_text();
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("MAIL FROM:<"))
        .map(|l| l.split('@').next().unwrap())
        .collect();
    assert_eq!(order, ["holder", "w1", "w2", "w4", "w5"], "{text}");
    assert_eq!(rec.connection_count(), 1, "one connection carried them all");
    assert_eq!(rec.messages().len(), 5);
    // Nothing stuck: the connection is idle again and a new session gets it
    // at once.
    assert_eq!(relay.idle_counts(), vec![1]);
    let mut late = Raw::greeted(proxy.addr).await;
    ehlo(&mut late).await;
    let t0 = Instant::now();
    assert_eq!(late.cmd("MAIL FROM:<late@client.test>").await.code, 250);
    assert!(t0.elapsed() < Duration::from_millis(500));
    finish(&mut late, "late").await;
    assert_eq!(rec.connection_count(), 1);
    proxy.stop().await;
}

async fn start_postfix() -> Option<Postfix> {
    match tokio::task::spawn_blocking(|| Postfix::start("")).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// identity = "xclient" with a cap of 4 and 50 sessions at once into a real
/// Postfix: each session needs a connection of its own, yet all 50 are
/// delivered and Postfix never has more than 4 of the proxy's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_50_sessions_through_a_cap_of_4() {
    let Some(pf) = start_postfix().await else {
        return;
    };
    let tap = Tap::start(&pf.addr).await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\nmax_connections = 4\n",
        tap.addr
    ))
    .await;
    let port = proxy.addr.port();
    let sends: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(
                async move { (i, mailer(port).send(message(&format!("xclient {i}"))).await) },
            )
        })
        .collect();
    for s in sends {
        let (i, r) = s.await.unwrap();
        let resp = r.unwrap_or_else(|e| panic!("session {i}: {e}\n{}", pf.log()));
        assert_eq!(resp.code().to_string(), "250", "session {i}: {resp:?}");
    }
    let end = Instant::now() + Duration::from_secs(30);
    while pf.delivered().len() < 50 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = pf.delivered();
    let texts: Vec<String> = delivered
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let got = subjects(&texts);
    for i in 0..50 {
        assert_eq!(
            got.get(&format!("xclient {i}")),
            Some(&1),
            "message {i} must be delivered exactly once\n{}",
            pf.log()
        );
    }
    assert!(
        tap.max_open() <= 4,
        "Postfix saw {} proxy connections at once",
        tap.max_open()
    );
    // One XCLIENT connection per session.
    assert_eq!(tap.total(), 50);
    let log = pf.log();
    assert!(!log.contains("insufficient authorization"), "{log}");
    proxy.stop().await;
}

/// Accepts connections into its backlog and never greets: a backend that
/// hangs, costing each attempt the whole connect timeout.
fn silent_listener(addr: &str) -> std::net::TcpListener {
    std::net::TcpListener::bind(addr).unwrap()
}

async fn one_message(proxy: &Proxy, tag: &str) -> Duration {
    let t0 = Instant::now();
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    let r = transaction(
        &mut c,
        format!("Subject: {tag}\r\n\r\n{tag}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.code, 250, "{tag}: {r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    t0.elapsed()
}

/// Two backends; the first hangs. After `down_after` failed connects it is
/// marked down and sessions go to the second without paying a connect
/// timeout; when the first comes back (a real smtp-sink on its address) a
/// background probe puts it back into rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_marked_down_skipped_and_probed_back() {
    let Some(good) = Sink::start(&[]) else { return };
    let dead_addr = format!("127.0.0.1:{}", free_port());
    let hang = silent_listener(&dead_addr);
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = 0.5\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{dead_addr}\"\ndown_after = 2\nprobe_interval = 0.3\nprobe_interval_max = 0.6\n[[backend]]\naddress = \"{}\"\n",
        good.addr
    ))
    .await;
    // Round robin sends every other session to the hanging backend first;
    // each such session pays one connect timeout, then fails over.
    for i in 0..4 {
        one_message(&proxy, &format!("before {i}")).await;
    }
    assert_eq!(proxy.backends.backends_up(), vec![false, true]);
    // Down: no session waits for it any more.
    for i in 0..10 {
        let took = one_message(&proxy, &format!("down {i}")).await;
        assert!(
            took < Duration::from_millis(400),
            "session {i} took {took:?} with the dead backend marked down"
        );
    }
    assert_eq!(good.wait_messages(14, Duration::from_secs(5)).len(), 14);

    // It comes back: the probe finds it and round robin uses it again.
    drop(hang);
    let back = Sink::start_on(&dead_addr, &[]).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while proxy.backends.backends_up() != vec![true, true] {
        assert!(Instant::now() < end, "the backend was not probed back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..6 {
        one_message(&proxy, &format!("after {i}")).await;
    }
    let returned = back.wait_messages(3, Duration::from_secs(5));
    assert!(
        returned.len() >= 3,
        "round robin did not use the returned backend: {} messages",
        returned.len()
    );
    proxy.stop().await;
}

/// Every backend down: the client hears 451 4.4.1 at once, not after a
/// connect timeout per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_answer_at_once() {
    let dead_addr = format!("127.0.0.1:{}", free_port());
    let _hang = silent_listener(&dead_addr);
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = 0.5\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{dead_addr}\"\ndown_after = 2\nprobe_interval = 30\n"
    ))
    .await;
    for _ in 0..2 {
        let mut c = Raw::greeted(proxy.addr).await;
        ehlo(&mut c).await;
        assert_eq!(c.cmd("MAIL FROM:<a@client.test>").await.code, 451);
    }
    assert_eq!(proxy.backends.backends_up(), vec![false]);
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    let t0 = Instant::now();
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    assert!(r.code == 451 && r.text.starts_with("4.4.1"), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    proxy.stop().await;
}

/// One whole transaction on an open session, 250 at every step.
async fn deliver(c: &mut Raw, tag: &str) {
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<{tag}@client.test>")).await.code,
        250,
        "{tag}"
    );
    finish_message(c, tag).await;
}

async fn finish_message(c: &mut Raw, tag: &str) {
    assert_eq!(c.cmd("RCPT TO:<b@backend.test>").await.code, 250, "{tag}");
    assert_eq!(c.cmd("DATA").await.code, 354, "{tag}");
    c.send(format!("Subject: {tag}\r\n\r\n{tag}\r\n.\r\n").as_bytes())
        .await;
    assert_eq!(c.reply().await.code, 250, "{tag}");
}

fn one_backend(addr: &str, keys: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{addr}\"\n{keys}\n"
    )
}

/// `max_lifetime = 1`: a pooled connection older than a second is QUIT
/// (here by the reaper while idle) and the next transaction opens a new
/// one; a transaction that ends past the lifetime QUITs its connection at
/// checkin instead of pooling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_past_max_lifetime_is_replaced() {
    let rec = SeqRecorder::start(vec![
        Script::default(),
        // The second connection's final reply comes after its lifetime.
        Script {
            dot: Some(Act::Delay(Duration::from_millis(1300))),
            ..Script::default()
        },
        Script::default(),
    ])
    .await;
    let proxy = Proxy::start(&one_backend(&rec.addr, "max_lifetime = 1")).await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    deliver(&mut c, "young").await;
    assert_eq!(proxy.backends.idle_counts(), vec![1], "not pooled");
    // Idle past its lifetime: the reaper (every second) QUITs it.
    assert!(rec.wait_ended(0, Duration::from_secs(3)).await);
    assert!(
        rec.conn_bytes(0).ends_with(b"QUIT\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rec.conn_bytes(0))
    );
    assert_eq!(proxy.backends.idle_counts(), vec![0]);
    // Past its lifetime at the end of the transaction: QUIT at checkin, not
    // pooled (the next transaction, at once, opens a new one; had it been
    // pooled, the checkout would have dropped it without QUIT).
    deliver(&mut c, "aging").await;
    deliver(&mut c, "fresh").await;
    assert_eq!(rec.connection_count(), 3);
    assert!(rec.wait_ended(1, Duration::from_secs(2)).await);
    assert!(
        rec.conn_bytes(1).ends_with(b"QUIT\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rec.conn_bytes(1))
    );
    assert_eq!(rec.messages().len(), 3);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    proxy.stop().await;
}

/// Pools are keyed by everything that shapes a connection: a reload that
/// changes only `identity` (xforward -> none), then only `tls`, on the
/// same address never hands out a connection made with the old settings;
/// the old idle one gets QUIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_of_identity_or_tls_gives_new_connections() {
    let rec = SeqRecorder::start(vec![Script {
        ehlo_extra: vec!["XFORWARD NAME ADDR PORT PROTO HELO SOURCE".into()],
        ..Script::default()
    }])
    .await;
    let proxy = Proxy::start(&one_backend(&rec.addr, "identity = \"xforward\"")).await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    deliver(&mut c, "before").await;
    assert_eq!(proxy.backends.idle_counts(), vec![1]);
    assert!(String::from_utf8_lossy(&rec.conn_bytes(0)).contains("XFORWARD "));

    proxy
        .reload(&one_backend(&rec.addr, "identity = \"none\""))
        .unwrap();
    // Same session: the next transaction is on a new connection, without
    // XFORWARD; the old connection got QUIT.
    deliver(&mut c, "after-identity").await;
    assert_eq!(rec.connection_count(), 2);
    let second = String::from_utf8_lossy(&rec.conn_bytes(1)).into_owned();
    assert!(!second.contains("XFORWARD"), "{second}");
    assert!(
        second.contains("MAIL FROM:<after-identity@client.test>"),
        "{second}"
    );
    assert!(rec.wait_ended(0, Duration::from_secs(3)).await);
    assert!(rec.conn_bytes(0).ends_with(b"QUIT\r\n"));
    assert!(!String::from_utf8_lossy(&rec.conn_bytes(0)).contains("after-identity"));

    // TLS only (opportunistic; this backend offers no STARTTLS, so the new
    // connection is plaintext, but it is new).
    proxy
        .reload(&one_backend(
            &rec.addr,
            "identity = \"none\"\ntls = \"opportunistic\"",
        ))
        .unwrap();
    deliver(&mut c, "after-tls").await;
    assert_eq!(rec.connection_count(), 3);
    assert!(
        String::from_utf8_lossy(&rec.conn_bytes(2)).contains("MAIL FROM:<after-tls@client.test>")
    );
    assert!(rec.wait_ended(1, Duration::from_secs(3)).await);
    assert!(rec.conn_bytes(1).ends_with(b"QUIT\r\n"));
    assert_eq!(rec.messages().len(), 3);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    proxy.stop().await;
}
