//! Fault injection: backends that are down, refuse, vanish, stall or restart;
//! clients that disconnect, stall, smuggle, inject or send garbage. Every test
//! checks both what the client was told (code and enhanced code) and what the
//! backend got (the Recorder's exact wire bytes, or smtp-sink's dumps).
mod common;
use common::*;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

// ---------------------------------------------------------------------------
// Helpers

/// Asserts the reply's code and enhanced code.
#[track_caller]
fn expect(r: &Seen, code: u16, enh: &str) {
    let ok = r.code == code && (r.text == enh || r.text.starts_with(&format!("{enh} ")));
    assert!(ok, "expected {code} {enh}, got {:?}", r.raw);
}

/// Asserts a 451 with a 4.4.x enhanced code (backend trouble, try later).
#[track_caller]
fn expect_backend_lost(r: &Seen) {
    assert!(
        r.code == 451 && r.text.starts_with("4.4."),
        "expected 451 4.4.x, got {:?}",
        r.raw
    );
}

/// DATA after every recipient was settled: the proxy answers 354 at once
/// and sends DATA to the backend meanwhile; what the backend says to DATA
/// is the reply after the final dot. Sends DATA and a short message and
/// returns that final reply.
async fn data_then_final(c: &mut Raw) -> Seen {
    let r = c.cmd("DATA").await;
    assert_eq!(r.code, 354, "{r:?}");
    c.send(b"Subject: early 354\r\n\r\nbody\r\n.\r\n").await;
    c.reply().await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Whether message data (starting at a line start) holds anything a
/// Postfix-like reader takes as the end of data: a "." line where lines end
/// at LF and trailing CRs are stripped.
fn postfix_end(data: &[u8]) -> bool {
    let mut probe = b"\n".to_vec();
    probe.extend_from_slice(data);
    let mut i = 0;
    while let Some(off) = find(&probe[i..], b"\n.") {
        let mut j = i + off + 2;
        while probe.get(j) == Some(&b'\r') {
            j += 1;
        }
        if probe.get(j) == Some(&b'\n') {
            return true;
        }
        i += off + 1;
    }
    false
}

/// The data bytes of the last DATA command on one backend connection.
fn after_last_data(bytes: &[u8]) -> &[u8] {
    match rfind(bytes, b"DATA\r\n") {
        Some(p) => &bytes[p + 6..],
        None => &[],
    }
}

async fn ehlo(c: &mut Raw) {
    let r = c.cmd("EHLO client.test").await;
    assert_eq!(r.code, 250, "EHLO: {r:?}");
}

/// A Recorder playing `script`, a proxy in front of it (`extra` added to
/// its config) and a client that has been greeted and said EHLO.
async fn scripted(extra: &str, script: Script) -> (Recorder, Proxy, Raw) {
    let rec = Recorder::start(script).await;
    let (proxy, c) = front(&rec.addr, extra).await;
    (rec, proxy, c)
}

/// `scripted` with a SeqRecorder: one script per backend connection.
async fn scripted_seq(extra: &str, scripts: Vec<Script>) -> (SeqRecorder, Proxy, Raw) {
    let rec = SeqRecorder::start(scripts).await;
    let (proxy, c) = front(&rec.addr, extra).await;
    (rec, proxy, c)
}

/// A proxy in front of `backend` and a client that said EHLO to it.
async fn front(backend: &str, extra: &str) -> (Proxy, Raw) {
    let proxy = Proxy::to_backend(backend, extra).await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    (proxy, c)
}

/// MAIL, RCPT, DATA, all positive; returns once the 354 arrived.
async fn begin(c: &mut Raw, tag: &str) {
    let r = c.cmd(&format!("MAIL FROM:<{tag}@client.test>")).await;
    expect(&r, 250, "2.1.0");
    let r = c.cmd("RCPT TO:<rcpt@backend.test>").await;
    expect(&r, 250, "2.1.5");
    let r = c.cmd("DATA").await;
    assert_eq!(r.code, 354, "DATA: {r:?}");
}

fn clean_body(tag: &str) -> Vec<u8> {
    format!("Subject: {tag}\r\n\r\nclean message {tag}\r\n").into_bytes()
}

/// One whole transaction; `body` is wire form ending with CRLF, without the
/// terminating dot line. Returns the final reply.
async fn send_message(c: &mut Raw, tag: &str, body: &[u8]) -> Seen {
    begin(c, tag).await;
    let mut data = body.to_vec();
    data.extend_from_slice(b".\r\n");
    c.send(&data).await;
    c.reply().await
}

/// A clean message that must get 250.
async fn deliver_clean(c: &mut Raw, tag: &str) {
    let r = send_message(c, tag, &clean_body(tag)).await;
    expect(&r, 250, "2.0.0");
}

/// What the Recorder keeps of a message sent as `body` (wire form ending
/// with CRLF): everything before the CRLF of the terminator.
fn recorded(body: &[u8]) -> &[u8] {
    body.strip_suffix(b"\r\n").expect("body ends with CRLF")
}

/// A message as the backend got it, without the proxy's Received header.
#[track_caller]
fn strip_received(msg: &[u8]) -> &[u8] {
    assert!(
        msg.starts_with(b"Received: "),
        "message does not start with the proxy's Received header: {:?}",
        String::from_utf8_lossy(msg)
    );
    let mut pos = 0;
    loop {
        let nl = find(&msg[pos..], b"\r\n").expect("Received header line end") + pos;
        pos = nl + 2;
        if !matches!(msg.get(pos), Some(b' ') | Some(b'\t')) {
            return &msg[pos..];
        }
    }
}

/// smtp-sink's dumps of transactions that got message data. (smtp-sink
/// creates a transaction's dump file at MAIL and removes it at RSET or
/// disconnect, so `Sink::messages` also lists transactions in progress.)
fn sink_delivered(sink: &Sink) -> Vec<String> {
    sink.messages()
        .into_iter()
        .filter(|m| m.contains("\nReceived: from client.test"))
        .collect()
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

/// Deterministic pseudo-random numbers (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A garbage command line (CRLF-terminated) that cannot start with a
    /// verb: first byte not a letter, no LF inside.
    fn garbage_line(&mut self) -> Vec<u8> {
        let len = 1 + (self.next() % 120) as usize;
        let mut line = Vec::with_capacity(len + 2);
        while line.len() < len {
            let b = (self.next() & 0xff) as u8;
            if b == b'\n' || (line.is_empty() && b.is_ascii_alphabetic()) {
                continue;
            }
            line.push(b);
        }
        line.extend_from_slice(b"\r\n");
        line
    }
}

/// One forwarded connection: its task and its stall switch.
type Piped = (tokio::task::JoinHandle<()>, Arc<Notify>);

/// A TCP middlebox between the proxy and a backend, forwarding both ways.
/// `cut` closes every current connection on both sides (a backend that
/// closed its idle connections); `stall` keeps them open but forwards
/// nothing more (a firewall that dropped their state). New connections are
/// always forwarded.
struct Middlebox {
    addr: String,
    conns: Arc<Mutex<Vec<Piped>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Middlebox {
    async fn start(target: String) -> Middlebox {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<Piped>>> = Arc::default();
        let c2 = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut b) = TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let stall = Arc::new(Notify::new());
                let s2 = stall.clone();
                let t = tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = s2.notified() => std::future::pending::<()>().await,
                    }
                });
                c2.lock().unwrap().push((t, stall));
            }
        });
        Middlebox { addr, conns, task }
    }

    fn cut(&self) {
        for (t, _) in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn stall(&self) {
        for (_, s) in self.conns.lock().unwrap().iter() {
            s.notify_one();
        }
    }
}

impl Drop for Middlebox {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// A TLS client accepting any certificate (the proxy's is self-signed):
/// the load generator's, with session resumption allowed.
fn tls_connector() -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(smtp_load::tls::client_config(true, false).unwrap())
}

/// Upgrades a plain client that just got its 220 to STARTTLS: asserts that
/// nothing else came in plaintext, then completes the handshake.
async fn start_tls(c: Raw) -> Raw<tokio_rustls::client::TlsStream<TcpStream>> {
    let (mut stream, leftover) = c.into_parts();
    assert!(
        leftover.is_empty(),
        "plaintext after the 220 to STARTTLS: {}",
        show(&leftover)
    );
    let mut tmp = [0u8; 512];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut tmp)).await {
        Err(_) => {}
        Ok(Ok(n)) => panic!("plaintext after the 220 to STARTTLS: {}", show(&tmp[..n])),
        Ok(Err(e)) => panic!("connection failed after STARTTLS: {e}"),
    }
    let name = ServerName::try_from("edge.test").unwrap();
    let tls = tls_connector()
        .connect(name, stream)
        .await
        .expect("TLS handshake");
    Raw::from_parts(tls, Vec::new())
}

fn starttls_config(backend: &str, require_tls: bool) -> String {
    format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\nrequire_tls = {require_tls}\n[[backend]]\naddress = \"{backend}\"\n"
    )
}

// ---------------------------------------------------------------------------
// Backend down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_451_and_session_continues() {
    let dead = free_port();
    let proxy = Proxy::to_backend(
        &format!("127.0.0.1:{dead}"),
        "[timeouts]\nbackend_connect = 1.0",
    )
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    expect(&r, 451, "4.4.1");
    // No transaction was opened: RCPT is out of sequence, not relayed.
    let r = c.cmd("RCPT TO:<b@backend.test>").await;
    expect(&r, 503, "5.5.1");
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    expect(&r, 451, "4.4.1");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(c.closed(Duration::from_secs(2)).await);
    assert_eq!(proxy.backends.idle_counts(), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_greeting_554_gives_451_at_mail() {
    let script = Script {
        greeting: Some(Act::Reply("554 5.3.2 Service not available".into())),
        ..Script::default()
    };
    let (rec, _proxy, mut c) = scripted("", script).await;
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    expect(&r, 451, "4.4.1");
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(
        rec.connection_count() >= 1,
        "the proxy never tried the backend"
    );
    let got = rec.all_bytes();
    assert!(
        !contains(&got, b"MAIL FROM"),
        "MAIL sent to a backend that greeted 554: {}",
        show(&got)
    );
    assert!(rec.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_backend_down_delivers_via_second() {
    let dead = free_port();
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = 1.0\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"127.0.0.1:{dead}\"\n[[backend]]\naddress = \"{}\"\n",
        rec.addr
    ))
    .await;
    // Several transactions so that round robin starts at each backend.
    for i in 0..3 {
        let mut c = Raw::greeted(proxy.addr).await;
        ehlo(&mut c).await;
        deliver_clean(&mut c, &format!("failover{i}")).await;
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
    }
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 3);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            show(strip_received(m)),
            show(recorded(&clean_body(&format!("failover{i}"))))
        );
    }
}

// ---------------------------------------------------------------------------
// Backend refuses at each stage: the client sees the backend's code and text.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_mail() {
    for line in [
        "451 4.3.0 Mail temporarily refused here",
        "550 5.7.1 Sender <a@client.test> rejected",
    ] {
        let script = Script {
            mail: Some(Act::Reply(line.into())),
            ..Script::default()
        };
        let (rec, _proxy, mut c) = scripted("", script).await;
        let r = c.cmd("MAIL FROM:<a@client.test>").await;
        assert_eq!(
            r.raw,
            format!("{line}\r\n"),
            "backend reply not passed through"
        );
        // The transaction did not start: RCPT is out of sequence and is not relayed.
        let r = c.cmd("RCPT TO:<b@backend.test>").await;
        expect(&r, 503, "5.5.1");
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let got = rec.all_bytes();
        assert_eq!(
            count(&got, b"MAIL FROM:<a@client.test>"),
            1,
            "{}",
            show(&got)
        );
        assert!(
            !contains(&got, b"RCPT TO"),
            "RCPT relayed after MAIL refusal: {}",
            show(&got)
        );
        assert!(rec.messages().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_rcpt() {
    for line in [
        "450 4.2.0 <b@backend.test>: Recipient address rejected: Mailbox busy",
        "550 5.1.1 <b@backend.test>: Recipient address rejected: User unknown in local recipient table",
    ] {
        let script = Script {
            rcpt: Some(Act::Reply(line.into())),
            ..Script::default()
        };
        let (rec, _proxy, mut c) = scripted("", script).await;
        expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
        let r = c.cmd("RCPT TO:<b@backend.test>").await;
        assert_eq!(r.raw, format!("{line}\r\n"), "backend reply not passed through");
        // No valid recipient: DATA is refused here, never relayed.
        let r = c.cmd("DATA").await;
        assert!(r.code >= 500 && r.code != 354, "DATA without a valid recipient: {r:?}");
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        // Pipelined: MAIL and RCPT in one write, then DATA.
        c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@backend.test>\r\n").await;
        expect(&c.reply().await, 250, "2.1.0");
        assert_eq!(c.reply().await.raw, format!("{line}\r\n"));
        let r = c.cmd("DATA").await;
        assert!(r.code >= 500, "DATA without a valid recipient: {r:?}");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let got = rec.all_bytes();
        assert!(!contains(&got, b"DATA\r\n"), "DATA relayed without a valid recipient: {}", show(&got));
        assert!(rec.messages().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_data_command() {
    for line in [
        "451 4.3.0 Try again later",
        "554 5.5.1 Error: no valid recipients",
    ] {
        let script = Script {
            data: Some(Act::Reply(line.into())),
            ..Script::default()
        };
        let (rec, _proxy, mut c) = scripted("", script).await;
        expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<b@backend.test>").await, 250, "2.1.5");
        let r = data_then_final(&mut c).await;
        assert_eq!(
            r.raw,
            format!("{line}\r\n"),
            "backend reply not passed through"
        );
        // Back in sync: the next line is a command.
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let got = rec.all_bytes();
        assert_eq!(count(&got, b"DATA\r\n"), 1, "{}", show(&got));
        assert!(
            !contains(&got, b"early 354"),
            "message sent to a backend that refused DATA: {}",
            show(&got)
        );
        assert!(
            !contains(&got, b"NOOP"),
            "client NOOP leaked to the backend: {}",
            show(&got)
        );
        assert!(rec.messages().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refuses_final_dot() {
    for line in [
        "451 4.3.0 Error: queue file write error",
        "554 5.7.1 Message rejected as spam",
        "550-5.7.1 Message rejected: first line of the reason\r\n550 5.7.1 second line",
    ] {
        let script = Script {
            dot: Some(Act::Reply(line.into())),
            ..Script::default()
        };
        let (rec, _proxy, mut c) = scripted("", script).await;
        let body = clean_body("refused-at-dot");
        let r = send_message(&mut c, "dot", &body).await;
        assert_eq!(
            r.raw,
            format!("{line}\r\n"),
            "backend's final reply not passed through"
        );
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        // The backend got the whole message, once, and refused it.
        let got = rec.all_bytes();
        let mut whole = body.clone();
        whole.extend_from_slice(b".\r\n");
        assert_eq!(count(&got, &whole), 1, "{}", show(&got));
        // (Recorder::messages() also lists transactions refused at the dot.)
        assert_eq!(rec.messages().len(), 1);
    }
}

/// smtp-sink's -r (4xx) / -f (5xx) at each stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_refuses_each_stage() {
    for (opt, stage) in [
        ("-r", "MAIL"),
        ("-f", "MAIL"),
        ("-r", "RCPT"),
        ("-f", "RCPT"),
        ("-r", "DATA"),
        ("-f", "DATA"),
        ("-r", "."),
        ("-f", "."),
    ] {
        let Some(sink) = Sink::start(&[opt, stage]) else {
            return;
        };
        let (_proxy, mut c) = front(&sink.addr, "").await;
        let (class, enh) = if opt == "-r" {
            (4, "4.3.0")
        } else {
            (5, "5.3.0")
        };
        let check = |r: &Seen| {
            assert!(
                r.code / 100 == class && r.text == format!("{enh} Error: command failed"),
                "{opt} {stage}: client got {:?}",
                r.raw
            );
        };
        let r = c.cmd("MAIL FROM:<a@client.test>").await;
        if stage == "MAIL" {
            check(&r);
        } else {
            expect(&r, 250, "2.1.0");
            let r = c.cmd("RCPT TO:<b@backend.test>").await;
            if stage == "RCPT" {
                check(&r);
            } else {
                expect(&r, 250, "2.1.5");
                // DATA refused or the dot refused: either way the client
                // hears the backend's reply after its final dot.
                check(&data_then_final(&mut c).await);
            }
        }
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        if stage != "." {
            assert!(
                sink_delivered(&sink).is_empty(),
                "{opt} {stage}: sink got a message"
            );
        }
        let log = sink.log();
        assert!(
            log.contains("MAIL FROM:<a@client.test>"),
            "{opt} {stage}: {log}"
        );
        if stage == "MAIL" {
            assert!(
                !log.contains("RCPT TO"),
                "{opt} {stage}: RCPT relayed: {log}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Backend drops the connection; the next transaction uses a new connection.

async fn drop_case(stage: &str, first: Script) {
    let (rec, _proxy, mut c) = scripted_seq("", vec![first, Script::default()]).await;
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    if stage == "MAIL" {
        expect_backend_lost(&r);
    } else {
        expect(&r, 250, "2.1.0");
        let r = c.cmd("RCPT TO:<b@backend.test>").await;
        if stage == "RCPT" {
            expect_backend_lost(&r);
            // Another recipient of the same transaction: still a temporary
            // failure, never a permanent one.
            let r = c.cmd("RCPT TO:<c@backend.test>").await;
            assert!(
                r.code / 100 == 4,
                "second RCPT after the backend was lost: {r:?}"
            );
        } else {
            expect(&r, 250, "2.1.5");
            if stage == "DATA" {
                // 354 comes from the proxy; the lost backend shows after
                // the final dot.
                expect_backend_lost(&data_then_final(&mut c).await);
            } else {
                let r = c.cmd("DATA").await;
                assert_eq!(r.code, 354);
                let mut body = b"Subject: dropped\r\n\r\n".to_vec();
                for i in 0..400 {
                    body.extend_from_slice(
                        format!("line {i:04} of a message the backend drops\r\n").as_bytes(),
                    );
                }
                body.extend_from_slice(b".\r\n");
                // The first part, then a pause (the backend may drop now),
                // then the rest with the end of data.
                c.send(&body[..6000]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.send(&body[6000..]).await;
                expect_backend_lost(&c.reply().await);
            }
        }
    }
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    // The next transaction goes over a new backend connection and works.
    deliver_clean(&mut c, "after-drop").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(
        rec.connection_count() >= 2,
        "{stage}: no new backend connection"
    );
    let first = rec.conn_bytes(0);
    if stage != "dot" {
        assert!(
            !postfix_end(after_last_data(&first)),
            "{stage}: end of data on the dropped connection: {}",
            show(&first)
        );
    }
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1, "{stage}: {msgs:?}");
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(recorded(&clean_body("after-drop")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_after_mail() {
    drop_case(
        "MAIL",
        Script {
            mail: Some(Act::Drop),
            ..Script::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_after_rcpt() {
    drop_case(
        "RCPT",
        Script {
            rcpt: Some(Act::Drop),
            ..Script::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_after_data_command() {
    drop_case(
        "DATA",
        Script {
            data: Some(Act::Drop),
            ..Script::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_mid_data() {
    drop_case(
        "mid-DATA",
        Script {
            drop_mid_data_after: Some(3000),
            ..Script::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_at_final_dot() {
    drop_case(
        "dot",
        Script {
            dot: Some(Act::Drop),
            ..Script::default()
        },
    )
    .await;
}

/// smtp-sink -q: disconnect silently after a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_drops_after_each_command() {
    for stage in ["MAIL", "RCPT", "DATA"] {
        let Some(sink) = Sink::start(&["-q", stage]) else {
            return;
        };
        let (proxy, mut c) = front(&sink.addr, "").await;
        let r = c.cmd("MAIL FROM:<a@client.test>").await;
        if stage == "MAIL" {
            expect_backend_lost(&r);
        } else {
            expect(&r, 250, "2.1.0");
            let r = c.cmd("RCPT TO:<b@backend.test>").await;
            if stage == "RCPT" {
                expect_backend_lost(&r);
            } else {
                expect(&r, 250, "2.1.5");
                expect_backend_lost(&data_then_final(&mut c).await);
            }
        }
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        assert!(
            sink_delivered(&sink).is_empty(),
            "-q {stage}: sink got a message"
        );
        assert_eq!(
            proxy.backends.idle_counts(),
            vec![0],
            "-q {stage}: dead connection pooled"
        );
    }
}

/// smtp-sink -Q: 421 and disconnect after a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_421_after_rcpt() {
    let Some(sink) = Sink::start(&["-Q", "RCPT"]) else {
        return;
    };
    let (proxy, mut c) = front(&sink.addr, "").await;
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    let r = c.cmd("RCPT TO:<b@backend.test>").await;
    assert!(
        r.code / 100 == 4,
        "backend 421 must reach the client as a 4xx: {r:?}"
    );
    let r = c.cmd("DATA").await;
    assert!(r.code != 354 && r.code != 250, "{r:?}");
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(sink_delivered(&sink).is_empty());
    assert_eq!(
        proxy.backends.idle_counts(),
        vec![0],
        "a connection that said 421 was pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_slow_final_reply_gives_451() {
    let script = Script {
        dot: Some(Act::Delay(Duration::from_secs(4))),
        ..Script::default()
    };
    let (rec, proxy, mut c) = scripted("[timeouts]\nbackend_data_end = 1.0", script).await;
    begin(&mut c, "slow").await;
    c.send(b"Subject: slow\r\n\r\nslow backend\r\n.\r\n").await;
    let t0 = Instant::now();
    let r = c.reply().await;
    expect_backend_lost(&r);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "final reply took {took:?}"
    );
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    // The backend did get the whole message (it was slow, not broken).
    assert!(contains(&rec.all_bytes(), b"slow backend\r\n.\r\n"));
    assert_eq!(
        proxy.backends.idle_counts(),
        vec![0],
        "timed-out connection pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_slow_mail_reply_gives_451() {
    let script = Script {
        mail: Some(Act::Delay(Duration::from_secs(4))),
        ..Script::default()
    };
    let (rec, _proxy, mut c) = scripted("[timeouts]\nbackend_command = 1.0", script).await;
    let t0 = Instant::now();
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    expect_backend_lost(&r);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "MAIL reply took {:?}",
        t0.elapsed()
    );
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    assert!(rec.messages().is_empty());
}

/// smtp-sink -w: the DATA reply comes later than backend_command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_slow_data_reply_gives_451() {
    let Some(sink) = Sink::start(&["-w", "4"]) else {
        return;
    };
    let (_proxy, mut c) = front(&sink.addr, "[timeouts]\nbackend_command = 1.0").await;
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<b@backend.test>").await, 250, "2.1.5");
    let t0 = Instant::now();
    expect_backend_lost(&data_then_final(&mut c).await);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "final reply took {:?}",
        t0.elapsed()
    );
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    assert!(sink_delivered(&sink).is_empty());
}

// ---------------------------------------------------------------------------
// No loss, no truncation: a client that disconnects mid-DATA.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_data_never_delivers() {
    // Tails that end the half message at awkward places, including a
    // partial terminator the proxy must not complete, and (normalize mode)
    // bare line endings whose output is held back.
    let tails: [&[u8]; 8] = [
        b"half a line",
        b"a whole line\r\n",
        b"line\r\n.",
        b"line\r\n.\r",
        b"line\r\n\r\n",
        b"line\n.",
        b"line\r.\r",
        b"line\n.\r",
    ];
    for mode in ["reject", "normalize"] {
        let rec = SeqRecorder::start(vec![Script::default()]).await;
        let extra = format!("[smtp]\nbare_line_endings = \"{mode}\"");
        let proxy = Proxy::to_backend(&rec.addr, &extra).await;
        for (i, tail) in tails.iter().enumerate() {
            let ctx = format!("{mode} tail {}", show(tail));
            let mut c = Raw::greeted(proxy.addr).await;
            ehlo(&mut c).await;
            begin(&mut c, &format!("partial{i}")).await;
            let mut half = format!("Subject: partial {i}\r\n\r\n").into_bytes();
            for n in 0..50 {
                half.extend_from_slice(
                    format!("body line {n} of a message never finished\r\n").as_bytes(),
                );
            }
            half.extend_from_slice(tail);
            c.send(&half).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(c);
            assert!(
                rec.wait_ended(i, Duration::from_secs(3)).await,
                "{ctx}: the proxy kept the backend connection open after the client left mid-DATA"
            );
            let got = rec.conn_bytes(i);
            assert!(contains(&got, b"DATA\r\n"), "{ctx}: {}", show(&got));
            assert!(
                !contains(&got, b"\r\n.\r\n"),
                "{ctx}: terminator sent: {}",
                show(&got)
            );
            assert!(
                !postfix_end(after_last_data(&got)),
                "{ctx}: end of data sent: {}",
                show(&got)
            );
            assert!(
                rec.messages().is_empty(),
                "{ctx}: truncated message delivered"
            );
        }
        assert_eq!(rec.connection_count(), tails.len(), "{mode}");
        assert_eq!(proxy.backends.idle_counts(), vec![0], "{mode}");
    }
}

// ---------------------------------------------------------------------------
// Pooled connection found dead.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_closed_by_backend_is_replaced() {
    let rec = Recorder::start(Script::default()).await;
    let mb = Middlebox::start(rec.addr.clone()).await;
    let (proxy, mut c) = front(&mb.addr, "").await;
    deliver_clean(&mut c, "pool-one").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(c.closed(Duration::from_secs(2)).await);
    assert_eq!(
        proxy.backends.idle_counts(),
        vec![1],
        "connection not pooled"
    );
    // The backend closes its idle connection.
    mb.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    deliver_clean(&mut c, "pool-two").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        show(strip_received(&msgs[1])),
        show(recorded(&clean_body("pool-two")))
    );
    assert_eq!(rec.connection_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_silently_dead_is_replaced() {
    for no_pipelining in [false, true] {
        let ctx = format!("no_pipelining={no_pipelining}");
        let rec = SeqRecorder::start(vec![Script {
            no_pipelining,
            ..Script::default()
        }])
        .await;
        let mb = Middlebox::start(rec.addr.clone()).await;
        let (proxy, mut c) = front(&mb.addr, "[timeouts]\nbackend_command = 1.0").await;
        deliver_clean(&mut c, "stall-one").await;
        assert_eq!(
            proxy.backends.idle_counts(),
            vec![1],
            "{ctx}: connection not pooled"
        );
        // A firewall forgets the pooled connection: it looks alive, but
        // nothing will ever come back.
        mb.stall();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Same client session: the next message must still succeed.
        deliver_clean(&mut c, "stall-two").await;
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let msgs = rec.messages();
        assert_eq!(msgs.len(), 2, "{ctx}: {msgs:?}");
        assert_eq!(
            show(strip_received(&msgs[1])),
            show(recorded(&clean_body("stall-two"))),
            "{ctx}"
        );
        assert_eq!(rec.connection_count(), 2, "{ctx}");
        // The stalled connection delivered only the first message.
        assert_eq!(count(&rec.conn_bytes(0), b"MAIL FROM"), 1, "{ctx}");
    }
}

/// identity = "xclient": each client session has its own backend
/// connection; when it dies between two messages, the next message still
/// goes through (on a new connection, with XCLIENT again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_xclient_connection_closed_is_replaced() {
    let rec = Recorder::start(Script {
        ehlo_extra: vec!["XCLIENT NAME ADDR PORT PROTO HELO".into()],
        ..Script::default()
    })
    .await;
    let mb = Middlebox::start(rec.addr.clone()).await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\n",
        mb.addr
    ))
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    deliver_clean(&mut c, "xclient-one").await;
    // The backend closes the session's connection.
    mb.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.cmd("MAIL FROM:<xclient-two@client.test>").await;
    assert_eq!(
        r.code, 250,
        "MAIL after the dedicated connection died: {r:?}"
    );
    expect(&c.cmd("RCPT TO:<b@backend.test>").await, 250, "2.1.5");
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(&clean_body("xclient-two")).await;
    c.send(b".\r\n").await;
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        show(strip_received(&msgs[1])),
        show(recorded(&clean_body("xclient-two")))
    );
    assert_eq!(rec.connection_count(), 2);
    let conns = rec.conns.lock().unwrap().clone();
    let second = String::from_utf8_lossy(&conns[1].lock().unwrap()).into_owned();
    assert!(second.starts_with("EHLO edge.test\r\nXCLIENT "), "{second}");
}

/// A transaction the client abandoned (RSET after RCPT) leaves its pooled
/// connection owing an RSET, sent before the next MAIL. A backend that
/// refuses it (5xx or 4xx) is in a state nobody knows: the connection is
/// dropped, and the next transaction is replayed on a fresh one, delivered
/// once, the client hearing nothing but 2xx/3xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_refusing_rset_is_replaced() {
    for (refusal, no_pipelining) in [
        ("503 5.5.1 Error: bad sequence", false),
        ("454 4.3.0 Try again", false),
        ("500 5.5.2 Error: what", true),
    ] {
        let ctx = format!("{refusal}, no_pipelining={no_pipelining}");
        // Every connection refuses RSET; only a reused one is sent one.
        let scripts = vec![Script {
            rset: Some(Act::Reply(refusal.into())),
            no_pipelining,
            ..Script::default()
        }];
        let (rec, proxy, mut c) = scripted_seq("", scripts).await;
        expect(
            &c.cmd("MAIL FROM:<abandoned@client.test>").await,
            250,
            "2.1.0",
        );
        expect(&c.cmd("RCPT TO:<rcpt@backend.test>").await, 250, "2.1.5");
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        assert_eq!(proxy.backends.idle_counts(), vec![1], "{ctx}: not pooled");
        // Same session, next transaction: delivered on a new connection.
        deliver_clean(&mut c, "after-rset").await;
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let msgs = rec.messages();
        assert_eq!(msgs.len(), 1, "{ctx}: {msgs:?}");
        assert_eq!(
            show(strip_received(&msgs[0])),
            show(recorded(&clean_body("after-rset"))),
            "{ctx}"
        );
        assert_eq!(rec.connection_count(), 2, "{ctx}");
        let old = rec.conn_bytes(0);
        assert_eq!(count(&old, b"RSET\r\n"), 1, "{ctx}: {}", show(&old));
        assert!(!contains(&old, b"DATA\r\n"), "{ctx}: {}", show(&old));
        let fresh = rec.conn_bytes(1);
        assert!(!contains(&fresh, b"RSET"), "{ctx}: {}", show(&fresh));
        assert_eq!(
            count(&fresh, b"MAIL FROM:<after-rset@client.test>"),
            1,
            "{ctx}: {}",
            show(&fresh)
        );
        // The connection that refused RSET is closed, not pooled again.
        assert!(rec.wait_ended(0, Duration::from_secs(2)).await, "{ctx}");
        assert_eq!(proxy.backends.idle_counts(), vec![1], "{ctx}");
    }
}

/// identity = "xclient": the session's own connection is not reused from
/// a pool, so a refused RSET cannot be replayed: the MAIL gets 451 4.4.2
/// (never the backend's 5xx), and the session's next MAIL opens a new
/// connection (XCLIENT again) and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_xclient_connection_refusing_rset_gives_451() {
    let rec = SeqRecorder::start(vec![Script {
        ehlo_extra: vec!["XCLIENT NAME ADDR PORT PROTO HELO".into()],
        rset: Some(Act::Reply("503 5.5.1 Error: bad sequence".into())),
        ..Script::default()
    }])
    .await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\n",
        rec.addr
    ))
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    expect(
        &c.cmd("MAIL FROM:<abandoned@client.test>").await,
        250,
        "2.1.0",
    );
    expect(&c.cmd("RCPT TO:<rcpt@backend.test>").await, 250, "2.1.5");
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(
        &c.cmd("MAIL FROM:<refused@client.test>").await,
        451,
        "4.4.2",
    );
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    deliver_clean(&mut c, "xclient-after-rset").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert_eq!(rec.messages().len(), 1);
    assert_eq!(rec.connection_count(), 2);
    assert!(rec.wait_ended(0, Duration::from_secs(2)).await);
    let fresh = String::from_utf8_lossy(&rec.conn_bytes(1)).into_owned();
    assert!(fresh.starts_with("EHLO edge.test\r\nXCLIENT "), "{fresh}");
    assert!(!fresh.contains("RSET"), "{fresh}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_to_restarted_sink_is_replaced() {
    let Some(sink) = Sink::start(&[]) else { return };
    let addr = sink.addr.clone();
    let (proxy, mut c) = front(&addr, "").await;
    deliver_clean(&mut c, "before-restart").await;
    let first = sink.wait_messages(1, Duration::from_secs(5));
    assert_eq!(first.len(), 1);
    assert_eq!(
        proxy.backends.idle_counts(),
        vec![1],
        "connection not pooled"
    );
    drop(sink);
    let Some(sink) = Sink::start_on(&addr, &[]) else {
        return;
    };
    // Same client session, no client-visible error.
    deliver_clean(&mut c, "after-restart").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = sink.wait_messages(1, Duration::from_secs(5));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains("clean message after-restart"),
        "{}",
        msgs[0]
    );
}

// ---------------------------------------------------------------------------
// SMTP smuggling.

const VECTORS: [(&str, &[u8]); 6] = [
    ("LF.LF", b"\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("CRLF.LF", b"\r\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n"),
];

const SMUGGLE_HEAD: &[u8] = b"Subject: smuggling test\r\n\r\nHello";
const SMUGGLED: &[u8] =
    b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil body";

/// The whole DATA sent by the client, including the real end of data.
fn smuggle_data(v: &[u8]) -> Vec<u8> {
    let mut d = SMUGGLE_HEAD.to_vec();
    d.extend_from_slice(v);
    d.extend_from_slice(SMUGGLED);
    d.extend_from_slice(b"\r\n.\r\n");
    d
}

/// What a normalizing proxy forwards (wire form, without the terminator's
/// CRLF, as the Recorder keeps it): each bare CR / LF became CRLF, and the
/// lone-dot line so made is stuffed.
fn smuggle_normalized(name: &str) -> Vec<u8> {
    let mid: &[u8] = match name {
        "CRLF.CRCRLF" => b"\r\n..\r\n\r\n",
        _ => b"\r\n..\r\n",
    };
    let mut d = SMUGGLE_HEAD.to_vec();
    d.extend_from_slice(mid);
    d.extend_from_slice(SMUGGLED);
    d
}

/// Sends `data`; when `split`, the bytes around the vector go one per write
/// (so every chunk boundary inside it is exercised).
async fn send_smuggle(c: &mut Raw, v: &[u8], split: bool) {
    let data = smuggle_data(v);
    if !split {
        c.send(&data).await;
        return;
    }
    let from = SMUGGLE_HEAD.len() - 2;
    let to = SMUGGLE_HEAD.len() + v.len() + 2;
    c.send(&data[..from]).await;
    for b in &data[from..to] {
        c.send(std::slice::from_ref(b)).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    c.send(&data[to..]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_rejected_by_default() {
    for (name, v) in VECTORS {
        for split in [false, true] {
            let ctx = format!("{name} split={split}");
            let (rec, _proxy, mut c) = scripted("", Script::default()).await;
            begin(&mut c, "smuggler").await;
            send_smuggle(&mut c, v, split).await;
            let r = c.reply().await;
            expect(&r, 550, "5.5.2");
            // In sync: the smuggled commands were data, not commands.
            let r = c.cmd("NOOP").await;
            expect(&r, 250, "2.0.0");
            deliver_clean(&mut c, "after-smuggle").await;
            expect(&c.cmd("QUIT").await, 221, "2.0.0");
            // The backend got exactly the clean message.
            let msgs = rec.messages();
            assert_eq!(
                msgs.len(),
                1,
                "{ctx}: {:?}",
                msgs.iter().map(|m| show(m)).collect::<Vec<_>>()
            );
            assert_eq!(
                show(strip_received(&msgs[0])),
                show(recorded(&clean_body("after-smuggle"))),
                "{ctx}"
            );
            // The smuggled MAIL was never a command at the backend: wherever
            // it appears, the data before it holds no end of data.
            let conns = rec.conns.lock().unwrap().clone();
            for (i, conn) in conns.iter().enumerate() {
                let bytes = conn.lock().unwrap().clone();
                if let Some(p) = find(&bytes, b"MAIL FROM:<evil@x>") {
                    let before = &bytes[..p];
                    let data = rfind(before, b"DATA\r\n")
                        .map(|d| &before[d + 6..])
                        .unwrap_or_else(|| {
                            panic!(
                                "{ctx}: evil MAIL sent as a command on conn {i}: {}",
                                show(&bytes)
                            )
                        });
                    assert!(
                        !contains(data, b"\r\n.\r\n"),
                        "{ctx}: conn {i}: {}",
                        show(&bytes)
                    );
                    assert!(!postfix_end(data), "{ctx}: conn {i}: {}", show(&bytes));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_normalized_stays_one_message() {
    for (name, v) in VECTORS {
        for split in [false, true] {
            let ctx = format!("{name} split={split}");
            let rec = Recorder::start(Script::default()).await;
            let proxy =
                Proxy::to_backend(&rec.addr, "[smtp]\nbare_line_endings = \"normalize\"").await;
            let mut c = Raw::greeted(proxy.addr).await;
            ehlo(&mut c).await;
            begin(&mut c, "smuggler").await;
            send_smuggle(&mut c, v, split).await;
            let r = c.reply().await;
            expect(&r, 250, "2.0.0");
            expect(&c.cmd("NOOP").await, 250, "2.0.0");
            expect(&c.cmd("QUIT").await, 221, "2.0.0");
            let msgs = rec.messages();
            assert_eq!(
                msgs.len(),
                1,
                "{ctx}: {:?}",
                msgs.iter().map(|m| show(m)).collect::<Vec<_>>()
            );
            assert_eq!(
                show(strip_received(&msgs[0])),
                show(&smuggle_normalized(name)),
                "{ctx}"
            );
            // The evil MAIL only ever appears inside that message.
            assert_eq!(count(&rec.all_bytes(), b"MAIL FROM:<evil@x>"), 1, "{ctx}");
        }
    }
}

/// The message as smtp-sink dumps it: LF line ends, dots un-stuffed.
fn sink_view(wire: &[u8]) -> String {
    let text = String::from_utf8_lossy(wire).into_owned();
    text.split("\r\n")
        .map(|l| l.strip_prefix('.').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_through_sink() {
    // Reject mode: the sink gets only the clean messages.
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    for (name, v) in VECTORS {
        let mut c = Raw::greeted(proxy.addr).await;
        ehlo(&mut c).await;
        begin(&mut c, "smuggler").await;
        send_smuggle(&mut c, v, false).await;
        let r = c.reply().await;
        assert!(
            r.code == 550 && r.text.starts_with("5.5.2"),
            "{name}: {r:?}"
        );
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        deliver_clean(&mut c, &format!("clean-{name}")).await;
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
    }
    sink.wait_messages(VECTORS.len(), Duration::from_secs(5));
    // Let smtp-sink remove the files of the aborted transactions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs = sink.messages();
    assert_eq!(msgs.len(), VECTORS.len(), "{msgs:?}");
    for m in &msgs {
        assert!(
            !m.contains("evil") && !m.contains("smuggling test"),
            "sink got smuggled content: {m}"
        );
        assert!(m.contains("clean message clean-"), "{m}");
    }
    drop(proxy);
    drop(sink);

    // Normalize mode: one message each, the evil MAIL is body text.
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "[smtp]\nbare_line_endings = \"normalize\"").await;
    for (name, v) in VECTORS {
        let mut c = Raw::greeted(proxy.addr).await;
        ehlo(&mut c).await;
        begin(&mut c, "smuggler").await;
        send_smuggle(&mut c, v, false).await;
        let r = c.reply().await;
        expect(&r, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let msgs = sink.wait_messages(1, Duration::from_secs(5));
        assert_eq!(msgs.len(), 1, "{name}: {msgs:?}");
        let want = sink_view(&smuggle_normalized(name));
        assert!(
            msgs[0].contains(&want),
            "{name}: sink dump\n{}\ndoes not contain\n{want}",
            msgs[0]
        );
        assert!(
            msgs[0].contains("X-Mail-Args: <smuggler@client.test>"),
            "{name}: {}",
            msgs[0]
        );
        assert!(
            !msgs[0].contains("X-Mail-Args: <evil@x>"),
            "{name}: {}",
            msgs[0]
        );
        // Empty the dump directory for the next vector.
        for e in std::fs::read_dir(sink.dir.path().join("dump")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// STARTTLS command injection (CVE-2011-0411 class).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_injected_commands_are_discarded() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&starttls_config(&rec.addr, false)).await;

    // 1: after the handshake nothing answers the injected commands; EHLO
    // gets the first reply.
    let mut c = Raw::greeted(proxy.addr).await;
    let r = c.cmd("EHLO client.test").await;
    assert!(r.code == 250 && r.text.contains("STARTTLS"), "{r:?}");
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<inject@x>\r\n")
        .await;
    expect(&c.reply().await, 220, "2.0.0");
    let mut t = start_tls(c).await;
    let early = t.try_reply(Duration::from_millis(300)).await;
    assert!(
        early.is_none(),
        "reply to an injected command after TLS: {early:?}"
    );
    let r = t.cmd("EHLO client.test").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(
        r.text.starts_with("edge.test"),
        "first reply after TLS is not the EHLO reply: {r:?}"
    );
    assert!(
        r.text.contains("PIPELINING") && !r.text.contains("STARTTLS"),
        "{r:?}"
    );
    // STARTTLS inside TLS.
    expect(&t.cmd("STARTTLS").await, 503, "5.5.1");
    // A normal transaction works over TLS, without the injected sender.
    expect(&t.cmd("MAIL FROM:<real@client.test>").await, 250, "2.1.0");
    expect(&t.cmd("RCPT TO:<b@backend.test>").await, 250, "2.1.5");
    assert_eq!(t.cmd("DATA").await.code, 354);
    t.send(b"Subject: tls\r\n\r\nover tls\r\n.\r\n").await;
    expect(&t.reply().await, 250, "2.0.0");
    expect(&t.cmd("QUIT").await, 221, "2.0.0");

    // 2: MAIL right after the handshake, before EHLO: 503.
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    c.send(b"STARTTLS\r\nEHLO injected.test\r\nMAIL FROM:<inject@x>\r\n")
        .await;
    expect(&c.reply().await, 220, "2.0.0");
    let mut t = start_tls(c).await;
    let r = t.cmd("MAIL FROM:<a@client.test>").await;
    expect(&r, 503, "5.5.1");
    let r = t.cmd("EHLO client.test").await;
    assert!(r.code == 250 && r.text.starts_with("edge.test"), "{r:?}");
    expect(&t.cmd("QUIT").await, 221, "2.0.0");

    let got = rec.all_text();
    assert!(
        !got.contains("inject"),
        "injected command reached the backend: {got}"
    );
    assert!(!got.contains("injected.test"), "{got}");
    assert_eq!(got.matches("MAIL FROM").count(), 1, "{got}");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1);
    let m = String::from_utf8_lossy(&msgs[0]);
    assert!(
        m.contains("with ESMTPS"),
        "Received header does not say TLS: {m}"
    );
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(b"Subject: tls\r\n\r\nover tls")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_refuses_mail_before_starttls() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&starttls_config(&rec.addr, true)).await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    expect(&r, 530, "5.7.0");
    let r = c.cmd("RCPT TO:<b@backend.test>").await;
    assert_eq!(r.code / 100, 5, "{r:?}");
    assert_eq!(rec.connection_count(), 0, "backend contacted before TLS");
    expect(&c.cmd("STARTTLS").await, 220, "2.0.0");
    let mut t = start_tls(c).await;
    assert_eq!(t.cmd("EHLO client.test").await.code, 250);
    expect(&t.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    expect(&t.cmd("RSET").await, 250, "2.0.0");
    expect(&t.cmd("QUIT").await, 221, "2.0.0");
    assert!(rec.messages().is_empty());
}

// ---------------------------------------------------------------------------
// Command lines: too long, garbage, too many errors.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_command_line_refused_session_continues() {
    let (rec, _proxy, mut c) = scripted("", Script::default()).await;
    // 600 octets with CRLF.
    let mut line = b"MAIL FROM:<".to_vec();
    line.resize(600 - 3, b'a');
    line.extend_from_slice(b">\r\n");
    assert_eq!(line.len(), 600);
    c.send(&line).await;
    expect(&c.reply().await, 500, "5.5.6");
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    // The long MAIL did not start a transaction.
    deliver_clean(&mut c, "after-long-line").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let got = rec.all_bytes();
    assert!(
        !contains(&got, b"aaaaaaaaaaaaaaaa"),
        "long line reached the backend"
    );
    assert_eq!(count(&got, b"MAIL FROM"), 1);
    assert_eq!(rec.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_line_refused_once() {
    let (rec, _proxy, mut c) = scripted("", Script::default()).await;
    let blob = vec![b'A'; 100 * 1024];
    for chunk in blob.chunks(8192) {
        c.send(chunk).await;
    }
    expect(&c.reply().await, 500, "5.5.6");
    c.send(b"\r\nNOOP\r\n").await;
    // Exactly one 500 for the whole line: the next reply is the NOOP's.
    expect(&c.reply().await, 250, "2.0.0");
    deliver_clean(&mut c, "after-endless-line").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(!contains(&rec.all_bytes(), b"AAAAAAAA"));
    assert_eq!(rec.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_commands_then_too_many_errors() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "[limits]\nmax_bad_commands = 5").await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for conn in 0..8 {
        let mut c = Raw::greeted(proxy.addr).await;
        let lines: Vec<Vec<u8>> = if conn == 0 {
            [
                &b"\0\r\n"[..],
                b"\0\0\0\0\r\n",
                b"\0NOOP\r\n",
                b"\0\r\0\r\n",
                b"\x7f\0\xff\r\n",
                b"\0\0\r\n",
            ]
            .iter()
            .map(|l| l.to_vec())
            .collect()
        } else {
            (0..6).map(|_| rng.garbage_line()).collect()
        };
        // Five bad commands are allowed: each gets a 5xx.
        for line in &lines[..5] {
            c.send(line).await;
            let r = c.reply().await;
            assert!(r.code / 100 == 5, "conn {conn}: {} got {r:?}", show(line));
        }
        // The sixth is one too many.
        c.send(&lines[5]).await;
        let mut r = c.reply().await;
        if r.code != 421 {
            assert!(r.code / 100 == 5, "conn {conn}: {r:?}");
            r = c.reply().await;
        }
        expect(&r, 421, "4.7.0");
        assert!(
            c.closed(Duration::from_secs(2)).await,
            "conn {conn}: not closed after 421"
        );
    }
    // Still serving.
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    deliver_clean(&mut c, "after-garbage").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert_eq!(rec.messages().len(), 1);
    assert_eq!(count(&rec.all_bytes(), b"MAIL FROM"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_fuzz_never_crashes() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "[limits]\nmax_bad_commands = 1000").await;
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    for i in 0..300 {
        let line = rng.garbage_line();
        c.send(&line).await;
        let r = c.reply().await;
        assert!(r.code / 100 == 5, "line {i} {}: {r:?}", show(&line));
    }
    // Verbs followed by binary junk: any reply, as long as the session survives.
    for verb in [
        "EHLO ",
        "HELO ",
        "MAIL FROM:<",
        "RCPT TO:<",
        "VRFY ",
        "NOOP ",
        "RSET ",
    ] {
        for _ in 0..5 {
            let mut line = verb.as_bytes().to_vec();
            let junk = rng.garbage_line();
            line.extend_from_slice(&junk);
            c.send(&line).await;
            let r = c.reply().await;
            assert!(
                r.code >= 200 && r.code < 600 && r.code != 421,
                "{}: {r:?}",
                show(&line)
            );
        }
        expect(&c.cmd("RSET").await, 250, "2.0.0");
    }
    ehlo(&mut c).await;
    deliver_clean(&mut c, "after-fuzz").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(recorded(&clean_body("after-fuzz")))
    );
}

// ---------------------------------------------------------------------------
// Limits and protocol order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_parameter_over_limit_refused_at_mail() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "[limits]\nmax_message_size = 10000").await;
    let mut c = Raw::greeted(proxy.addr).await;
    let r = c.cmd("EHLO client.test").await;
    assert!(r.text.contains("SIZE 10000"), "{r:?}");
    expect(
        &c.cmd("MAIL FROM:<a@client.test> SIZE=20000").await,
        552,
        "5.3.4",
    );
    assert!(
        !contains(&rec.all_bytes(), b"MAIL FROM"),
        "refused MAIL relayed"
    );
    // Within the limit it works.
    expect(
        &c.cmd("MAIL FROM:<a@client.test> SIZE=500").await,
        250,
        "2.1.0",
    );
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert_eq!(count(&rec.all_bytes(), b"MAIL FROM"), 1);
    assert!(rec.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_refused_after_dot() {
    let (rec, _proxy, mut c) =
        scripted("[limits]\nmax_message_size = 10000", Script::default()).await;
    begin(&mut c, "big").await;
    let mut body = Vec::with_capacity(20_003);
    for i in 0..200 {
        let mut line = format!("big{i:03} ").into_bytes();
        line.resize(98, b'x');
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    assert_eq!(body.len(), 20_000);
    body.extend_from_slice(b".\r\n");
    c.send(&body).await;
    expect(&c.reply().await, 552, "5.3.4");
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    deliver_clean(&mut c, "small").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1, "oversized message delivered");
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(recorded(&clean_body("small")))
    );
    let got = rec.all_bytes();
    assert!(
        !contains(&got, b"big199"),
        "the end of the oversized message reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients() {
    let (rec, _proxy, mut c) = scripted("[limits]\nmax_recipients = 3", Script::default()).await;
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    for i in 0..3 {
        expect(
            &c.cmd(&format!("RCPT TO:<r{i}@backend.test>")).await,
            250,
            "2.1.5",
        );
    }
    expect(&c.cmd("RCPT TO:<r3@backend.test>").await, 452, "4.5.3");
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"Subject: three\r\n\r\nthree recipients\r\n.\r\n")
        .await;
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let got = rec.all_bytes();
    assert_eq!(count(&got, b"RCPT TO"), 3, "{}", show(&got));
    assert!(!contains(&got, b"r3@backend.test"));
    assert_eq!(rec.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_data_line_refused() {
    let (rec, _proxy, mut c) = scripted("", Script::default()).await;
    // 1000 octets with CRLF: allowed.
    let mut ok = b"Subject: limit\r\n\r\n".to_vec();
    ok.extend_from_slice(&[b'k'; 998]);
    ok.extend_from_slice(b"\r\n");
    let r = send_message(&mut c, "limit-ok", &ok).await;
    expect(&r, 250, "2.0.0");
    // 1001 octets with CRLF: refused.
    let mut long = b"Subject: too long\r\n\r\n".to_vec();
    long.extend_from_slice(&[b'L'; 999]);
    long.extend_from_slice(b"\r\nafter the long line\r\n");
    let r = send_message(&mut c, "limit-long", &long).await;
    expect(&r, 550, "5.6.0");
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    deliver_clean(&mut c, "after-long").await;
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(
        msgs.len(),
        2,
        "{:?}",
        msgs.iter().map(|m| show(m)).collect::<Vec<_>>()
    );
    assert_eq!(show(strip_received(&msgs[0])), show(recorded(&ok)));
    assert_eq!(
        show(strip_received(&msgs[1])),
        show(recorded(&clean_body("after-long")))
    );
    assert!(!contains(&rec.all_bytes(), b"after the long line"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_and_bad_commands() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let mut c = Raw::greeted(proxy.addr).await;
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 503, "5.5.1");
    ehlo(&mut c).await;
    expect(&c.cmd("RCPT TO:<b@backend.test>").await, 503, "5.5.1");
    expect(&c.cmd("DATA").await, 503, "5.5.1");
    expect(&c.cmd("FOOBAR baz").await, 502, "5.5.1");
    expect(&c.cmd("MAIL FROM:<a@client.test").await, 501, "5.5.2");
    expect(
        &c.cmd("MAIL FROM:<a@client.test> FOO=BAR").await,
        555,
        "5.5.4",
    );
    assert!(
        !contains(&rec.all_bytes(), b"MAIL FROM"),
        "bad MAIL relayed: {}",
        rec.all_text()
    );
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 503, "5.5.1");
    expect(&c.cmd("DATA").await, 503, "5.5.1");
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let got = rec.all_bytes();
    assert_eq!(count(&got, b"MAIL FROM"), 1, "{}", show(&got));
    assert!(
        !contains(&got, b"RCPT") && !contains(&got, b"DATA") && !contains(&got, b"FOOBAR"),
        "{}",
        show(&got)
    );
    assert!(rec.messages().is_empty());
}

// ---------------------------------------------------------------------------
// Client timeouts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_times_out() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "[timeouts]\ncommand = 1.0").await;
    let mut c = Raw::greeted(proxy.addr).await;
    let t0 = Instant::now();
    let r = c
        .try_reply(Duration::from_secs(4))
        .await
        .expect("421 before close");
    expect(&r, 421, "4.4.2");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "timeout after {took:?}"
    );
    assert!(
        c.closed(Duration::from_secs(1)).await,
        "not disconnected after 421"
    );

    // Idle inside a transaction: same, and nothing is delivered.
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<b@backend.test>").await, 250, "2.1.5");
    let t0 = Instant::now();
    let r = c
        .try_reply(Duration::from_secs(4))
        .await
        .expect("421 before close");
    expect(&r, 421, "4.4.2");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "timeout after {:?}",
        t0.elapsed()
    );
    assert!(c.closed(Duration::from_secs(1)).await);
    assert!(!contains(&rec.all_bytes(), b"DATA"));
    assert!(rec.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stalling_mid_data_times_out() {
    let (rec, proxy, mut c) =
        scripted_seq("[timeouts]\ndata_block = 1.0", vec![Script::default()]).await;
    begin(&mut c, "staller").await;
    c.send(b"Subject: stalled\r\n\r\nfirst part of the body\r\n")
        .await;
    let t0 = Instant::now();
    let r = c
        .try_reply(Duration::from_secs(4))
        .await
        .expect("421 before close");
    expect(&r, 421, "4.4.2");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "timeout after {took:?}"
    );
    assert!(
        c.closed(Duration::from_secs(1)).await,
        "not disconnected after 421"
    );
    assert!(
        rec.wait_ended(0, Duration::from_secs(2)).await,
        "backend connection left open"
    );
    let got = rec.conn_bytes(0);
    assert!(
        !postfix_end(after_last_data(&got)),
        "end of data sent: {}",
        show(&got)
    );
    assert!(rec.messages().is_empty());
    assert_eq!(proxy.backends.idle_counts(), vec![0]);
}

/// Sends `n` bytes of body one at a time, `gap` apart, while the session
/// stays open; returns the reply that ended it early, if any.
async fn dribble(c: &mut Raw, n: usize, gap: Duration) -> Option<Seen> {
    for _ in 0..n {
        c.send(b"x").await;
        if let Some(r) = c.try_reply(gap).await {
            return Some(r);
        }
    }
    None
}

/// A proxy with `data_block` and `min_data_rate` in front of a recorder
/// of `conns` backend connections, and a client past EHLO.
async fn paced(block: f64, rate: u64, conns: usize) -> (SeqRecorder, Proxy, Raw) {
    let rec = SeqRecorder::start(vec![Script::default(); conns]).await;
    let proxy = Proxy::to_backend(
        &rec.addr,
        &format!("[timeouts]\ndata_block = {block}\n[limits]\nmin_data_rate = {rate}"),
    )
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    (rec, proxy, c)
}

/// A client that dribbles its message, each byte well inside `data_block`,
/// is cut off once the minimum data rate's allowance (`data_block` of
/// grace, plus a second per `min_data_rate` bytes) is used up: 421 4.4.2,
/// the backend gets no end of data. Without the minimum, the same client
/// is still connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dribbling_data_is_cut_at_the_minimum_rate() {
    let (rec, _proxy, mut c) = paced(1.0, 1000, 1).await;
    begin(&mut c, "dribbler").await;
    let t0 = Instant::now();
    let r = dribble(&mut c, 40, Duration::from_millis(300))
        .await
        .expect("cut off while dribbling");
    expect(&r, 421, "4.4.2");
    assert!(r.text.contains("too slow"), "{r:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    assert!(c.closed(Duration::from_secs(1)).await);
    let got = rec.conn_bytes(0);
    assert!(!postfix_end(after_last_data(&got)), "end of data sent");
    assert!(rec.messages().is_empty());

    // min_data_rate = 0: only data_block per read, and each byte is
    // inside it.
    let (_rec, _proxy, mut c) = paced(1.0, 0, 1).await;
    begin(&mut c, "dribbler").await;
    assert!(dribble(&mut c, 10, Duration::from_millis(300))
        .await
        .is_none());
    c.send(b"\r\n.\r\n").await;
    let r = c.reply().await;
    expect(&r, 250, "2.0.0");
}

/// A client that sends faster than the minimum rate on average is never
/// cut off by it, however long its message takes; the same limit covers a
/// BDAT transaction's chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimum_data_rate_spares_steady_senders_and_covers_bdat() {
    let (rec, _proxy, mut c) = paced(0.5, 1000, 2).await;
    begin(&mut c, "steady").await;
    // 2 000 bytes every 400 ms (5 000 B/s) for 2.4 s: far past the grace.
    let line = [b"y".repeat(998), b"\r\n".to_vec()].concat();
    for _ in 0..6 {
        c.send(&line).await;
        c.send(&line).await;
        assert!(c.try_reply(Duration::from_millis(400)).await.is_none());
    }
    c.send(b".\r\n").await;
    let r = c.reply().await;
    expect(&r, 250, "2.0.0");
    assert_eq!(rec.messages().len(), 1);

    // BDAT: a chunk's octets dribbled are cut the same way.
    let r = c.cmd("MAIL FROM:<bdat@client.test>").await;
    expect(&r, 250, "2.1.0");
    let r = c.cmd("RCPT TO:<rcpt@backend.test>").await;
    expect(&r, 250, "2.1.5");
    c.send(b"BDAT 100 LAST\r\n").await;
    let t0 = Instant::now();
    let r = dribble(&mut c, 40, Duration::from_millis(200))
        .await
        .expect("cut off while dribbling a chunk");
    expect(&r, 421, "4.4.2");
    assert!(r.text.contains("too slow"), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(rec.messages().len(), 1, "nothing more delivered");
}

/// BDAT chunks of one octet, each sent promptly after its command but the
/// commands far apart (inside the command timeout): the time between
/// chunks counts toward the minimum data rate, so the transaction is cut
/// off (421 4.4.2) and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_far_apart_are_cut_at_the_minimum_rate() {
    let (rec, _proxy, mut c) = paced(0.5, 1000, 1).await;
    let r = c.cmd("MAIL FROM:<gaps@client.test>").await;
    expect(&r, 250, "2.1.0");
    let r = c.cmd("RCPT TO:<rcpt@backend.test>").await;
    expect(&r, 250, "2.1.5");
    let t0 = Instant::now();
    let mut cut = None;
    for _ in 0..20 {
        c.send(b"BDAT 1\r\nx").await;
        let r = c.reply().await;
        if r.code != 250 {
            cut = Some(r);
            break;
        }
        // Well inside the command timeout (300 s), but slow.
        if let Some(r) = c.try_reply(Duration::from_millis(300)).await {
            cut = Some(r);
            break;
        }
    }
    let r = cut.expect("cut off between chunks");
    expect(&r, 421, "4.4.2");
    assert!(r.text.contains("too slow"), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(c.closed(Duration::from_secs(1)).await);
    assert!(rec.messages().is_empty());
}

// ---------------------------------------------------------------------------
// More backend and client faults.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drops_after_rcpt_without_pipelining() {
    drop_case(
        "RCPT",
        Script {
            rcpt: Some(Act::Drop),
            no_pipelining: true,
            ..Script::default()
        },
    )
    .await;
}

/// A backend answering with something that is not an SMTP reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_garbage_reply_gives_451() {
    for stage in ["MAIL", "dot"] {
        let bad = Some(Act::Reply("HTTP/1.1 400 Bad Request".into()));
        let script = if stage == "MAIL" {
            Script {
                mail: bad,
                ..Script::default()
            }
        } else {
            Script {
                dot: bad,
                ..Script::default()
            }
        };
        let (_rec, proxy, mut c) = scripted("", script).await;
        if stage == "MAIL" {
            let r = c.cmd("MAIL FROM:<a@client.test>").await;
            expect_backend_lost(&r);
        } else {
            let r = send_message(&mut c, "garbage", &clean_body("garbage")).await;
            expect_backend_lost(&r);
        }
        expect(&c.cmd("RSET").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        assert_eq!(
            proxy.backends.idle_counts(),
            vec![0],
            "{stage}: connection with a garbled reply pooled"
        );
    }
}

/// Commands pipelined right behind the end of data, while the backend is
/// still deciding: answered in order after the final reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_after_end_of_data() {
    let script = Script {
        dot: Some(Act::Delay(Duration::from_millis(300))),
        ..Script::default()
    };
    let (rec, _proxy, mut c) = scripted("", script).await;
    begin(&mut c, "pipelined").await;
    let mut data = clean_body("pipelined");
    data.extend_from_slice(
        b".\r\nNOOP\r\nMAIL FROM:<second@client.test>\r\nRCPT TO:<b@backend.test>\r\nDATA\r\n",
    );
    c.send(&data).await;
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.reply().await, 250, "2.1.0");
    expect(&c.reply().await, 250, "2.1.5");
    assert_eq!(c.reply().await.code, 354);
    c.send(&clean_body("second")).await;
    c.send(b".\r\nQUIT\r\n").await;
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.reply().await, 221, "2.0.0");
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(recorded(&clean_body("pipelined")))
    );
    assert_eq!(
        show(strip_received(&msgs[1])),
        show(recorded(&clean_body("second")))
    );
    assert!(!rec.all_text().contains("NOOP"), "client NOOP relayed");
}

/// All backend connections busy: a temporary failure, then it works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_exhausted_gives_451() {
    let rec = Recorder::start(Script::default()).await;
    let addr = rec.addr.clone();
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = 1.0\nbackend_pool_wait = 1.0\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{addr}\"\nmax_connections = 1\n"
    ))
    .await;
    let mut a = Raw::greeted(proxy.addr).await;
    ehlo(&mut a).await;
    expect(&a.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    let mut b = Raw::greeted(proxy.addr).await;
    ehlo(&mut b).await;
    let t0 = Instant::now();
    let r = b.cmd("MAIL FROM:<b@client.test>").await;
    assert!(r.code == 451 && r.text.starts_with("4.4."), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    // A finishes; B gets the connection.
    expect(&a.cmd("RCPT TO:<x@backend.test>").await, 250, "2.1.5");
    assert_eq!(a.cmd("DATA").await.code, 354);
    a.send(&clean_body("holder")).await;
    a.send(b".\r\n").await;
    expect(&a.reply().await, 250, "2.0.0");
    expect(&a.cmd("QUIT").await, 221, "2.0.0");
    deliver_clean(&mut b, "waiter").await;
    expect(&b.cmd("QUIT").await, 221, "2.0.0");
    assert_eq!(rec.connection_count(), 1);
    let got = rec.all_bytes();
    assert!(
        !contains(&got, b"MAIL FROM:<b@client.test>"),
        "{}",
        show(&got)
    );
    assert_eq!(rec.messages().len(), 2);
}

/// Bare line endings right at the start of the data, and lines that start
/// with a dot only because of normalization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_at_data_start_and_dot_lines() {
    // (client data without the real end, normalized wire form or None when
    // reject mode must refuse it)
    let cases: [(&[u8], &[u8]); 5] = [
        (
            b".\nMAIL FROM:<evil@x>\r\nbody",
            b"..\r\nMAIL FROM:<evil@x>\r\nbody",
        ),
        (
            b".\r\r\nMAIL FROM:<evil@x>\r\nbody",
            b"..\r\n\r\nMAIL FROM:<evil@x>\r\nbody",
        ),
        (
            b".\rMAIL FROM:<evil@x>\r\nbody",
            b"..\r\nMAIL FROM:<evil@x>\r\nbody",
        ),
        (b"Hello\n.foo\r\nbody", b"Hello\r\n..foo\r\nbody"),
        (b"Hello\r\n..\nbody", b"Hello\r\n..\r\nbody"),
    ];
    for (data, normalized) in cases {
        let mut wire = data.to_vec();
        wire.extend_from_slice(b"\r\n.\r\n");
        // Reject mode.
        let (rec, proxy, mut c) = scripted("", Script::default()).await;
        begin(&mut c, "start").await;
        c.send(&wire).await;
        expect(&c.reply().await, 550, "5.5.2");
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        assert!(
            rec.messages().is_empty(),
            "reject {}: {:?}",
            show(data),
            rec.messages()
        );
        let got = rec.all_bytes();
        assert!(
            !postfix_end(after_last_data(&got)),
            "reject {}: {}",
            show(data),
            show(&got)
        );
        drop(proxy);
        // Normalize mode.
        let (rec, _proxy, mut c) = scripted(
            "[smtp]\nbare_line_endings = \"normalize\"",
            Script::default(),
        )
        .await;
        begin(&mut c, "start").await;
        c.send(&wire).await;
        expect(&c.reply().await, 250, "2.0.0");
        expect(&c.cmd("NOOP").await, 250, "2.0.0");
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let msgs = rec.messages();
        assert_eq!(
            msgs.len(),
            1,
            "normalize {}: {:?}",
            show(data),
            msgs.iter().map(|m| show(m)).collect::<Vec<_>>()
        );
        assert_eq!(
            show(strip_received(&msgs[0])),
            show(normalized),
            "normalize {}",
            show(data)
        );
    }
}

/// Replies stay in order when local errors, backend refusals and relayed
/// commands are pipelined together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_errors_keep_reply_order() {
    let script = Script {
        rcpt_for: vec![(
            "bad@backend.test".into(),
            Act::Reply(
                "550 5.1.1 <bad@backend.test>: Recipient address rejected: User unknown".into(),
            ),
        )],
        ..Script::default()
    };
    let (rec, _proxy, mut c) = scripted("", script).await;
    let mut batch = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<good@backend.test>\r\nFOOBAR\r\nRCPT TO:<bad@backend.test>\r\n".to_vec();
    let mut long = b"RCPT TO:<".to_vec();
    long.resize(597, b'l');
    long.extend_from_slice(b">\r\n");
    batch.extend_from_slice(&long);
    batch.extend_from_slice(b"RCPT TO:<good2@backend.test>\r\nDATA\r\n");
    c.send(&batch).await;
    expect(&c.reply().await, 250, "2.1.0");
    expect(&c.reply().await, 250, "2.1.5");
    expect(&c.reply().await, 502, "5.5.1");
    assert_eq!(
        c.reply().await.raw,
        "550 5.1.1 <bad@backend.test>: Recipient address rejected: User unknown\r\n"
    );
    expect(&c.reply().await, 500, "5.5.6");
    expect(&c.reply().await, 250, "2.1.5");
    assert_eq!(c.reply().await.code, 354);
    c.send(&clean_body("ordered")).await;
    c.send(b".\r\n").await;
    expect(&c.reply().await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let got = rec.all_text();
    assert_eq!(got.matches("RCPT TO").count(), 3, "{got}");
    assert!(
        !got.contains("FOOBAR") && !got.contains("llllllll"),
        "{got}"
    );
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        show(strip_received(&msgs[0])),
        show(recorded(&clean_body("ordered")))
    );
}

/// Bare CR (or NUL) inside a command line must not reach the backend, where
/// a CR-as-line-end reader would see a second, injected command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_in_commands_never_relayed() {
    let (rec, _proxy, mut c) = scripted("", Script::default()).await;
    let lines: [&[u8]; 4] = [
        b"MAIL FROM:<a@client.test>\rRCPT TO:<victim@y>\r\n",
        b"MAIL FROM:<a\rRCPT TO:<victim@y>@client.test>\r\n",
        b"MAIL FROM:<a@client.test> BODY=8BITMIME\rRCPT TO:<victim@y>\r\n",
        b"MAIL FROM:<a@client.test>\0RCPT TO:<victim@y>\r\n",
    ];
    for line in lines {
        c.send(line).await;
        let r = c.reply().await;
        if r.code == 250 {
            expect(&c.cmd("RSET").await, 250, "2.0.0");
        } else {
            assert!(r.code / 100 == 5, "{}: {r:?}", show(line));
        }
    }
    expect(&c.cmd("MAIL FROM:<a@client.test>").await, 250, "2.1.0");
    for line in [
        &b"RCPT TO:<b@backend.test>\rDATA\r\n"[..],
        b"RCPT TO:<b\rRCPT TO:<victim@y>@backend.test>\r\n",
    ] {
        c.send(line).await;
        let r = c.reply().await;
        assert!(r.code == 250 || r.code / 100 == 5, "{}: {r:?}", show(line));
    }
    expect(&c.cmd("RSET").await, 250, "2.0.0");
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    let got = rec.all_bytes();
    let bare_cr = got
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\r' && got.get(i + 1) != Some(&b'\n'));
    assert!(!bare_cr, "bare CR relayed in a command: {}", show(&got));
    assert!(!contains(&got, b"\0"), "NUL relayed: {}", show(&got));
    assert!(
        !contains(&got, b"victim"),
        "injected command relayed: {}",
        show(&got)
    );
}

/// A backend that accepts the TCP connection but never greets in time:
/// `backend_connect` covers "connecting to a backend and reading its
/// greeting" (config/smtp-edge.toml), so MAIL fails fast with 451 4.4.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_silent_greeting_bounded_by_backend_connect() {
    let rec = Recorder::start(Script {
        greeting: Some(Act::Delay(Duration::from_secs(5))),
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(
        &rec.addr,
        "[timeouts]\nbackend_connect = 1.0\nbackend_command = 30.0",
    )
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    let t0 = Instant::now();
    let r = c.cmd("MAIL FROM:<a@client.test>").await;
    let took = t0.elapsed();
    expect(&r, 451, "4.4.1");
    assert!(
        took < Duration::from_millis(2500),
        "MAIL reply took {took:?}"
    );
    expect(&c.cmd("QUIT").await, 221, "2.0.0");
    assert!(!contains(&rec.all_bytes(), b"MAIL FROM"));
}

/// STARTTLS, then no handshake (silence, or plaintext garbage): the
/// connection is closed, within `tls_handshake` for the silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_without_handshake_is_closed() {
    let rec = Recorder::start(Script::default()).await;
    let cfg = starttls_config(&rec.addr, false).replace(
        "[[listener]]",
        "[timeouts]\ntls_handshake = 1.0\n[[listener]]",
    );
    let proxy = Proxy::start(&cfg).await;
    // Silence.
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    expect(&c.cmd("STARTTLS").await, 220, "2.0.0");
    let t0 = Instant::now();
    assert!(c.closed(Duration::from_secs(4)).await, "not closed");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "closed after {:?}",
        t0.elapsed()
    );
    // Plaintext instead of a ClientHello.
    let mut c = Raw::greeted(proxy.addr).await;
    ehlo(&mut c).await;
    expect(&c.cmd("STARTTLS").await, 220, "2.0.0");
    c.send(b"MAIL FROM:<plain@x>\r\nRCPT TO:<v@y>\r\n").await;
    let mut tmp = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(4), c.stream.read(&mut tmp))
        .await
        .expect("not closed")
        .unwrap_or(0);
    let got = &tmp[..n];
    assert!(
        !got.starts_with(b"250") && !got.starts_with(b"5"),
        "plaintext command answered after STARTTLS: {}",
        show(got)
    );
    assert_eq!(rec.connection_count(), 0, "backend contacted");
}

/// A message torn into small random pieces by the network arrives byte
/// for byte (dot-stuffing and all), in both bare-line-ending modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_arrives_intact() {
    // Wire form: dot-stuffed lines, empty lines, near-terminators.
    let lines: [&[u8]; 7] = [
        b"..",
        b"...leading dots",
        b"",
        b".. a stuffed dot",
        b"plain text line with some words in it",
        b"\t.tab then dot",
        b"x.",
    ];
    let mut body = b"Subject: fragments\r\n\r\n".to_vec();
    for i in 0..40 {
        body.extend_from_slice(lines[i % lines.len()]);
        body.extend_from_slice(b"\r\n");
    }
    for mode in ["reject", "normalize"] {
        let rec = Recorder::start(Script::default()).await;
        let extra = format!("[smtp]\nbare_line_endings = \"{mode}\"");
        let (_proxy, mut c) = front(&rec.addr, &extra).await;
        let mut rng = Rng(0x5151_7777_0000_0001 ^ mode.len() as u64);
        for round in 0..3 {
            begin(&mut c, &format!("frag{round}")).await;
            let mut data = body.clone();
            data.extend_from_slice(b".\r\n");
            let mut pos = 0;
            while pos < data.len() {
                let n = (1 + rng.next() % 17) as usize;
                let end = (pos + n).min(data.len());
                c.send(&data[pos..end]).await;
                if rng.next().is_multiple_of(4) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                pos = end;
            }
            let r = c.reply().await;
            expect(&r, 250, "2.0.0");
        }
        expect(&c.cmd("QUIT").await, 221, "2.0.0");
        let msgs = rec.messages();
        assert_eq!(msgs.len(), 3, "{mode}");
        for m in &msgs {
            assert_eq!(show(strip_received(m)), show(recorded(&body)), "{mode}");
        }
    }
}

/// A backend that answers DATA with 354 although it refused every
/// recipient (real MTAs say 554): the client gets 554 5.5.1, the backend
/// connection (now inside DATA) is dropped and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_354_with_no_recipient_is_refused() {
    let script = Script {
        rcpt: Some(Act::Reply("550 5.1.1 no such user".into())),
        ..Script::default()
    };
    let (rec, proxy, mut c) = scripted("", script).await;
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@backend.test>\r\nDATA\r\n")
        .await;
    expect(&c.reply().await, 250, "2.1.0");
    expect(&c.reply().await, 550, "5.1.1");
    expect(&c.reply().await, 554, "5.5.1");
    // The session goes on; the client's message text is taken as commands
    // only if it sends any, and NOOP works.
    expect(&c.cmd("NOOP").await, 250, "2.0.0");
    assert!(rec.messages().is_empty());
    assert_eq!(proxy.backends.idle_counts(), vec![0]);
}
