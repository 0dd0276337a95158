//! The proxy in front of a real Postfix (a private instance per test, see
//! tests/postfix_instance): client identity via XFORWARD and XCLIENT as
//! Postfix logs it, byte-exact delivery into a Maildir, pooled connections
//! reused across client sessions, and bare-LF smuggling stopped at the edge.
//! Skips when Postfix is not installed (fails under CI=true).
mod common;
mod postfix_instance;

use std::time::Duration;

use common::*;
use postfix_instance::Postfix;

const DELIVERY: Duration = Duration::from_secs(15);

async fn start_postfix() -> Option<Postfix> {
    match tokio::task::spawn_blocking(|| Postfix::start("")).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The queue id from Postfix's "250 2.0.0 Ok: queued as 3F2A1B0C9D".
fn queue_id(r: &Seen) -> String {
    assert_eq!(r.code, 250, "final reply: {r:?}");
    let id = r
        .text
        .rsplit_once("queued as ")
        .map(|(_, id)| id.trim().to_string())
        .unwrap_or_else(|| panic!("no queue id in {r:?}"));
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{r:?}"
    );
    id
}

/// One whole session through the proxy: EHLO `helo`, one message from
/// alice to bob@example.org, QUIT. Returns the client's own port (what the
/// proxy should forward) and Postfix's queue id.
async fn send_one(proxy: &Proxy, helo: &str, wire: &[u8]) -> (u16, String) {
    let mut c = Raw::greeted(proxy.addr).await;
    let port = c.stream.local_addr().unwrap().port();
    let r = c.cmd(&format!("EHLO {helo}")).await;
    assert_eq!(r.code, 250, "{r:?}");
    let r = c
        .cmd("MAIL FROM:<alice@client.example> BODY=8BITMIME")
        .await;
    assert_eq!(r.code, 250, "MAIL: {r:?}");
    let r = c.cmd("RCPT TO:<bob@example.org>").await;
    assert_eq!(r.code, 250, "RCPT: {r:?}");
    let r = c.cmd("DATA").await;
    assert_eq!(r.code, 354, "DATA: {r:?}");
    c.send(wire).await;
    let r = c.reply().await;
    let id = queue_id(&r);
    let r = c.cmd("QUIT").await;
    assert_eq!(r.code, 221, "{r:?}");
    (port, id)
}

fn simple_message(subject: &str) -> Vec<u8> {
    format!(
        "From: <alice@client.example>\r\nTo: <bob@example.org>\r\nSubject: {subject}\r\nMessage-ID: <{}@client.example>\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n\r\nbody of {subject}\r\n.\r\n",
        subject.replace(' ', "-")
    )
    .into_bytes()
}

/// Splits a delivered file (LF line endings) into its first header fields
/// (each with its continuation lines) and the offset where the next one
/// starts.
fn leading_fields(file: &[u8], n: usize) -> (Vec<String>, usize) {
    let mut fields: Vec<String> = Vec::new();
    let mut pos = 0;
    while pos < file.len() {
        let end = file[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(file.len());
        let line = String::from_utf8_lossy(&file[pos..end]).into_owned();
        if line.starts_with(' ') || line.starts_with('\t') {
            fields
                .last_mut()
                .expect("continuation first")
                .push_str(&line);
        } else if fields.len() == n {
            break;
        } else {
            fields.push(line);
        }
        pos = end;
    }
    (fields, pos)
}

/// A header field unfolded, with runs of white space as one space.
fn unfold(field: &str) -> String {
    field.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Postfix's log lines that name `queue_id` with `client=` (smtpd's first
/// line of a message).
fn client_line(pf: &Postfix, queue_id: &str) -> String {
    pf.log_of(queue_id)
        .into_iter()
        .find(|l| l.contains("/smtpd[") && l.contains(" client="))
        .unwrap_or_else(|| panic!("no smtpd client= line for {queue_id}:\n{}", pf.log()))
}

/// smtpd logged no warning and rejected nothing (an identity command
/// refused, a command out of order, ...).
fn assert_no_smtpd_complaints(pf: &Postfix) {
    let bad: Vec<String> = pf
        .log()
        .lines()
        .filter(|l| l.contains("/smtpd[") && (l.contains("warning:") || l.contains("reject:")))
        .map(str::to_string)
        .collect();
    assert!(
        bad.is_empty(),
        "smtpd complained:\n{}\n\nlog:\n{}",
        bad.join("\n"),
        pf.log()
    );
}

/// The value of `key=` in a log line, up to the next ", " or end.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    Some(rest.split(", ").next().unwrap_or(rest).trim_end())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xforward_identity_and_byte_exact_delivery() {
    let Some(pf) = start_postfix().await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, "").await;

    // What the client sends (wire form: dot-stuffed, CRLF) and what the
    // message is (unstuffed), line by line.
    let lines: [(&str, &str); 17] = [
        ("From: Alice <alice@client.example>", ""),
        ("To: Bob <bob@example.org>", ""),
        ("Subject: byte-exact through smtp-edge", ""),
        ("Message-ID: <exact-1@client.example>", ""),
        ("Date: Tue, 24 Nov 2026 12:00:00 +0000", ""),
        ("MIME-Version: 1.0", ""),
        ("Content-Type: text/plain; charset=utf-8", ""),
        ("Content-Transfer-Encoding: 8bit", ""),
        ("", ""),
        ("Grüße aus Köln — ünïcödé, 8-bit, not encoded ✓", ""),
        (
            "..dot line, stuffed on the wire",
            ".dot line, stuffed on the wire",
        ),
        ("..", "."),
        ("...two dots", "..two dots"),
        ("  leading spaces, trailing space ", ""),
        ("\ttab\tinside", ""),
        ("", ""),
        ("last line", ""),
    ];
    let mut wire = Vec::new();
    let mut content = Vec::new();
    for (on_wire, unstuffed) in lines {
        wire.extend_from_slice(on_wire.as_bytes());
        wire.extend_from_slice(b"\r\n");
        let line = if unstuffed.is_empty() {
            on_wire
        } else {
            unstuffed
        };
        content.extend_from_slice(line.as_bytes());
        content.push(b'\n');
    }
    wire.extend_from_slice(b".\r\n");

    let (client_port, qid) = send_one(&proxy, "client.example", &wire).await;
    let (path, file) = pf.wait_delivered(&qid, DELIVERY).await;

    // Postfix learned the client's identity through XFORWARD.
    let line = client_line(&pf, &qid);
    assert_eq!(
        field(&line, "orig_client"),
        Some(format!("unknown[127.0.0.1]:{client_port}").as_str()),
        "XFORWARD not applied: {line}\n{}",
        pf.log()
    );
    assert_no_smtpd_complaints(&pf);

    // The file: Postfix's own headers, the proxy's Received, the message.
    let file = lf(&file);
    let (fields, _) = leading_fields(&file, 4);
    let names: Vec<&str> = fields
        .iter()
        .map(|f| f.split(':').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Return-Path", "X-Original-To", "Delivered-To", "Received"],
        "unexpected leading headers in {}:\n{}",
        path.display(),
        String::from_utf8_lossy(&file)
    );
    assert!(fields[3].contains("(Postfix)"), "{}", fields[3]);
    let (fields, body_at) = leading_fields(&file, 5);
    let ours = unfold(&fields[4]);
    assert!(
        ours.starts_with(
            "Received: from client.example (unknown [127.0.0.1]) by edge.test (smtp-edge) with ESMTP;"
        ),
        "proxy's Received header missing or wrong: {ours:?}\nfile:\n{}",
        String::from_utf8_lossy(&file)
    );
    let delivered = &file[body_at..];
    assert!(
        delivered == &content[..],
        "delivered message differs from what the client sent\n--- expected\n{}\n--- delivered\n{}",
        String::from_utf8_lossy(&content),
        String::from_utf8_lossy(delivered)
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_carries_xforward_per_transaction() {
    let Some(pf) = start_postfix().await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, "").await;

    let mut sent = Vec::new();
    for i in 0..5 {
        let subject = format!("pooled {i}");
        let helo = format!("client{i}.example");
        let (port, qid) = send_one(&proxy, &helo, &simple_message(&subject)).await;
        sent.push((port, qid, subject));
    }
    let mut backend_clients = Vec::new();
    for (port, qid, subject) in &sent {
        let (_, file) = pf.wait_delivered(qid, DELIVERY).await;
        let text = String::from_utf8_lossy(&file);
        assert!(
            text.contains(&format!("\nSubject: {subject}\n")),
            "{qid}: {text}"
        );
        let line = client_line(&pf, qid);
        assert_eq!(
            field(&line, "orig_client"),
            Some(format!("unknown[127.0.0.1]:{port}").as_str()),
            "message {subject}: XFORWARD missing on the pooled connection: {line}\n{}",
            pf.log()
        );
        backend_clients.push(field(&line, "client").unwrap().to_string());
    }
    assert_eq!(pf.delivered().len(), 5, "{}", pf.log());
    assert_eq!(
        pf.connects(),
        1,
        "expected one pooled backend connection for 5 sessions:\n{}",
        pf.log()
    );
    // All five arrived over that one connection (same proxy source port).
    backend_clients.dedup();
    assert_eq!(backend_clients.len(), 1, "{backend_clients:?}");
    assert_no_smtpd_complaints(&pf);
    drop(proxy);
}

async fn xclient_proxy(pf: &Postfix) -> Proxy {
    Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\n",
        pf.addr
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_gives_each_session_its_own_connection() {
    let Some(pf) = start_postfix().await else {
        return;
    };
    let proxy = xclient_proxy(&pf).await;

    let mut sent = Vec::new();
    for i in 0..2 {
        let subject = format!("xclient {i}");
        let (port, qid) = send_one(&proxy, "client.example", &simple_message(&subject)).await;
        sent.push((port, qid));
    }
    for (port, qid) in &sent {
        pf.wait_delivered(qid, DELIVERY).await;
        // With XCLIENT, smtpd takes the forwarded client as the client
        // (the port is the client's own, not the proxy's).
        let line = client_line(&pf, qid);
        assert_eq!(
            field(&line, "client"),
            Some(format!("unknown[127.0.0.1]:{port}").as_str()),
            "XCLIENT not applied: {line}\n{}",
            pf.log()
        );
        assert!(field(&line, "orig_client").is_none(), "{line}");
    }
    let log = pf.log();
    assert_eq!(
        pf.connects(),
        2,
        "one backend connection per session:\n{log}"
    );
    assert!(!log.contains("insufficient authorization"), "{log}");
    assert_no_smtpd_complaints(&pf);
    drop(proxy);
}

/// After XCLIENT Postfix greets again and the proxy must EHLO again; that
/// EHLO sets the HELO name Postfix records, so it has to be the client's
/// (as in Postfix's XCLIENT_README example), not the proxy's own hostname.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_keeps_the_clients_helo() {
    let Some(pf) = start_postfix().await else {
        return;
    };
    let proxy = xclient_proxy(&pf).await;
    let (port, qid) = send_one(&proxy, "client.example", &simple_message("xclient helo")).await;
    let (_, file) = pf.wait_delivered(&qid, DELIVERY).await;
    let file = lf(&file);
    let (fields, _) = leading_fields(&file, 4);
    let postfix_received = unfold(&fields[3]);
    assert!(
        postfix_received.starts_with("Received: from client.example (unknown [127.0.0.1])"),
        "Postfix recorded the wrong HELO for the XCLIENT session (client port {port}): {postfix_received:?}"
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_smuggling_is_stopped_before_postfix() {
    let Some(pf) = start_postfix().await else {
        return;
    };

    let smuggle = |tag: &str| -> Vec<u8> {
        format!(
            "From: <alice@client.example>\r\nTo: <bob@example.org>\r\nSubject: {tag} outer\r\n\r\nouter body\n.\nMAIL FROM:<{tag}@attacker.example>\nRCPT TO:<bob@example.org>\nDATA\nFrom: <{tag}@attacker.example>\nSubject: {tag} smuggled\n\nsmuggled body\r\n.\r\n"
        )
        .into_bytes()
    };

    // Control: straight to Postfix (configured like Postfix < 3.9, bare
    // newlines allowed), the payload does smuggle a second message. This
    // proves the check below can fail.
    {
        let addr = pf.addr.parse().unwrap();
        let mut c = Raw::greeted(addr).await;
        assert_eq!(c.cmd("EHLO client.example").await.code, 250);
        // Not pipelined: each command gets its own reply.
        assert_eq!(c.cmd("MAIL FROM:<alice@client.example>").await.code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.org>").await.code, 250);
        assert_eq!(c.cmd("DATA").await.code, 354);
        c.send(&smuggle("ctl")).await;
        // outer 250, then the smuggled MAIL, RCPT, DATA, final dot.
        let mut codes = Vec::new();
        for _ in 0..5 {
            codes.push(c.reply().await.code);
        }
        assert_eq!(codes, [250, 250, 250, 354, 250], "control run");
        let _ = c.cmd("QUIT").await;
        pf.wait_log("the control's smuggled message", DELIVERY, |log| {
            log.lines().filter(|l| l.contains("status=sent")).count() >= 2
        })
        .await;
        assert!(pf.log().contains("from=<ctl@attacker.example>"));
    }
    let before = pf.delivered().len();
    assert_eq!(before, 2);

    // Through the proxy (default: bare line endings rejected).
    let proxy = Proxy::to_backend(&pf.addr, "").await;
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<alice@client.example>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.org>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(&smuggle("evil")).await;
    let r = c.reply().await;
    assert_eq!(r.code, 550, "{r:?}");
    assert!(r.text.starts_with("5.5.2"), "{r:?}");
    // The session stays in step: nothing of the payload runs as commands,
    // and a clean message afterwards goes through (on a fresh backend
    // connection; the aborted one was dropped without its dot).
    let r = c.cmd("MAIL FROM:<alice@client.example>").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<bob@example.org>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(&simple_message("after smuggling")).await;
    let qid = queue_id(&c.reply().await);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let (_, file) = pf.wait_delivered(&qid, DELIVERY).await;
    assert!(String::from_utf8_lossy(&file).contains("Subject: after smuggling"));

    // The aborted transaction left no trace but a lost connection.
    pf.wait_log("the aborted backend session", DELIVERY, |log| {
        log.contains("lost connection after DATA")
    })
    .await;
    let log = pf.log();
    assert!(
        !log.contains("evil@"),
        "smuggled command reached Postfix:\n{log}"
    );
    let delivered = pf.delivered();
    assert_eq!(delivered.len(), before + 1, "{log}");
    for (p, bytes) in &delivered {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains("evil"), "{}: {text}", p.display());
    }
    drop(proxy);
}
