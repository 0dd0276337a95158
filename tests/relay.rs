//! Relaying end to end, as a user checks it: real clients (lettre, swaks,
//! Python smtplib, raw pipelined SMTP) through the proxy into real and
//! recording backends (Postfix smtp-sink, the scripted Recorder, Maildir).
mod common;
use common::*;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// Unfolds header continuation lines (CRLF or LF followed by SP / HT).
fn unfold(s: &str) -> String {
    s.replace("\r\n\t", " ")
        .replace("\r\n ", " ")
        .replace("\n\t", " ")
        .replace("\n ", " ")
}

/// The (unfolded) `Received:` header the proxy added, if any.
fn edge_received(msg: &str) -> Option<String> {
    unfold(msg)
        .lines()
        .find(|l| l.starts_with("Received: ") && l.contains("(smtp-edge)"))
        .map(|l| l.trim_end_matches('\r').to_string())
}

/// Asserts the proxy's Received header: client's HELO name and IP, our
/// hostname, the protocol (and TLS version when given).
fn assert_edge_received(msg: &str, helo: &str, proto: &str, tls: Option<&str>) -> String {
    let h = edge_received(msg).unwrap_or_else(|| panic!("no smtp-edge Received header in:\n{msg}"));
    assert!(
        h.starts_with(&format!("Received: from {helo} ")),
        "Received header does not name the client's HELO {helo:?}: {h}"
    );
    assert!(
        h.contains("[127.0.0.1]"),
        "Received header does not name the client IP: {h}"
    );
    assert!(
        h.contains(&format!("by edge.test (smtp-edge) with {proto}")),
        "Received header lacks `by edge.test (smtp-edge) with {proto}`: {h}"
    );
    let after = &h[h.find("(smtp-edge) with ").unwrap() + "(smtp-edge) with ".len()..];
    let word: String = after
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    assert_eq!(word, proto, "protocol in {h}");
    if let Some(v) = tls {
        assert!(
            h.contains(&format!("using {v}")),
            "Received header lacks `using {v}`: {h}"
        );
    }
    h
}

/// The proxy's Received header must come before the message's own headers.
fn assert_prepended(msg: &str, first_own_header: &str) {
    let r = msg.find("(smtp-edge)").expect("edge header");
    let s = msg
        .find(first_own_header)
        .unwrap_or_else(|| panic!("{first_own_header} missing:\n{msg}"));
    assert!(
        r < s,
        "proxy Received header is not before {first_own_header}:\n{msg}"
    );
}

/// MAIL, RCPTs, DATA, body (which must end in CRLF), final dot: returns the
/// final reply. Asserts every intermediate reply is positive.
async fn transaction(c: &mut Raw, from: &str, rcpts: &[&str], body: &[u8]) -> Seen {
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    assert_eq!(r.code, 250, "MAIL: {r:?}");
    for to in rcpts {
        let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
        assert_eq!(r.code, 250, "RCPT {to}: {r:?}");
    }
    let r = c.cmd("DATA").await;
    assert_eq!(r.code, 354, "DATA: {r:?}");
    c.send(body).await;
    c.send(b".\r\n").await;
    c.reply().await
}

/// Transactions `range` in session `c`, one after another, message `i`
/// saying `{tag} body {i}`; each must get a 250.
async fn numbered_transactions(c: &mut Raw, tag: &str, range: std::ops::Range<usize>) {
    for i in range {
        let body = format!("Subject: {tag} {i}\r\n\r\n{tag} body {i}\r\n");
        let r = transaction(
            c,
            "sender@client.example",
            &["rcpt@dest.example"],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.code, 250, "message {i}: {r:?}");
    }
}

/// One whole session: greeting, EHLO, one message, QUIT. Returns the client's
/// local port (what XFORWARD/XCLIENT PORT should say).
async fn one_message(addr: SocketAddr, helo: &str, body: &str) -> u16 {
    let mut c = Raw::greeted(addr).await;
    let port = c.stream.local_addr().unwrap().port();
    let r = c.cmd(&format!("EHLO {helo}")).await;
    assert_eq!(r.code, 250, "{r:?}");
    let r = transaction(
        &mut c,
        "sender@client.example",
        &["rcpt@dest.example"],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.code, 250, "final reply: {r:?}");
    let r = c.cmd("QUIT").await;
    assert_eq!(r.code, 221, "{r:?}");
    port
}

/// The SMTP command lines in a recorded backend conversation (message data
/// excluded as long as no body line starts with one of these verbs).
fn command_lines(bytes: &[u8]) -> Vec<String> {
    const VERBS: [&str; 9] = [
        "EHLO", "HELO", "XFORWARD", "XCLIENT", "MAIL", "RCPT", "DATA", "RSET", "QUIT",
    ];
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .filter(|l| {
            let verb = l
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            VERBS.contains(&verb.as_str())
        })
        .map(str::to_string)
        .collect()
}

/// The `ATTR=value` pairs of an XFORWARD / XCLIENT line.
fn attrs(line: &str) -> Vec<(String, String)> {
    line.split_ascii_whitespace()
        .skip(1)
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn attr<'a>(a: &'a [(String, String)], k: &str) -> Option<&'a str> {
    a.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

/// The lines smtp-sink's `-v` log shows it received (without the prefix).
fn sink_commands(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("smtp-sink: ").map(|(_, rest)| rest))
        .map(str::to_string)
        .collect()
}

async fn lettre_send(
    port: u16,
    tls: Tls,
    subject: &str,
    body: &str,
) -> Result<Response, lettre::transport::smtp::Error> {
    let mailer: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(tls)
            .hello_name(ClientId::Domain("lettre.client.test".into()))
            .timeout(Some(WAIT))
            .build();
    let email = Message::builder()
        .from("Alice <alice@client.example>".parse::<Mailbox>().unwrap())
        .to("Bob <bob@dest.example>".parse::<Mailbox>().unwrap())
        .subject(subject)
        .body(body.to_string())
        .unwrap();
    mailer.send(email).await
}

fn tls_params() -> TlsParameters {
    TlsParameters::builder("edge.test".into())
        .dangerous_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// Sends with lettre and checks what smtp-sink stored.
async fn lettre_case(
    proxy_port: u16,
    sink: &Sink,
    tls: Tls,
    tag: &str,
    proto: &str,
    tls_version: Option<&str>,
) {
    let subject = format!("Hello via smtp-edge ({tag})");
    let body = format!("This is the {tag} test body.\nSecond line.\n");
    let resp = lettre_send(proxy_port, tls, &subject, &body)
        .await
        .unwrap_or_else(|e| panic!("lettre {tag} send failed: {e}"));
    assert_eq!(u16::from(resp.code()), 250, "{tag}: {resp:?}");
    let msgs = sink.wait_messages(1, WAIT);
    assert_eq!(msgs.len(), 1, "{tag}: sink messages: {msgs:?}");
    let m = &msgs[0];
    assert!(
        m.contains(&format!("Subject: {subject}")),
        "{tag}: subject missing:\n{m}"
    );
    assert!(
        m.contains(&format!("This is the {tag} test body.")),
        "{tag}: body missing:\n{m}"
    );
    assert_edge_received(m, "lettre.client.test", proto, tls_version);
    assert_prepended(m, "Subject: ");
}

// ------------------------------------------------------- 1. lettre clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettre_plain_into_smtp_sink() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    lettre_case(proxy.addr.port(), &sink, Tls::None, "plain", "ESMTP", None).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettre_starttls_with_configured_certificate_into_smtp_sink() {
    let Some(sink) = Sink::start(&[]) else { return };
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(certs.path(), "edge.test");
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n[[backend]]\naddress = \"{}\"\n",
        cert.display(),
        key.display(),
        sink.addr
    ))
    .await;
    lettre_case(
        proxy.addr.port(),
        &sink,
        Tls::Required(tls_params()),
        "starttls",
        "ESMTPS",
        Some("TLSv1.3"),
    )
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettre_implicit_tls_with_self_signed_default_into_smtp_sink() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n[[backend]]\naddress = \"{}\"\n",
        sink.addr
    ))
    .await;
    lettre_case(
        proxy.addr.port(),
        &sink,
        Tls::Wrapper(tls_params()),
        "implicit",
        "ESMTPS",
        Some("TLSv1.3"),
    )
    .await;
    proxy.stop().await;
}

// ------------------------------------------------------------ 2. identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xforward_to_smtp_sink_carries_only_offered_attributes() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    one_message(
        proxy.addr,
        "xf-client.example",
        "Subject: xforward\r\n\r\nhello\r\n",
    )
    .await;
    sink.wait_messages(1, WAIT);
    let log = sink.log();
    let cmds = sink_commands(&log);
    let xf = cmds
        .iter()
        .position(|l| l.starts_with("XFORWARD "))
        .unwrap_or_else(|| panic!("no XFORWARD in smtp-sink log:\n{log}"));
    let mail = cmds
        .iter()
        .position(|l| l.starts_with("MAIL FROM:"))
        .unwrap_or_else(|| panic!("no MAIL in smtp-sink log:\n{log}"));
    assert!(xf < mail, "XFORWARD must precede MAIL:\n{log}");
    let a = attrs(&cmds[xf]);
    assert_eq!(attr(&a, "ADDR"), Some("127.0.0.1"), "{}", cmds[xf]);
    assert_eq!(attr(&a, "HELO"), Some("xf-client.example"), "{}", cmds[xf]);
    assert_eq!(attr(&a, "NAME"), Some("[UNAVAILABLE]"), "{}", cmds[xf]);
    assert_eq!(attr(&a, "PROTO"), Some("ESMTP"), "{}", cmds[xf]);
    // smtp-sink offers NAME ADDR PROTO HELO only.
    assert!(
        attr(&a, "PORT").is_none() && attr(&a, "SOURCE").is_none(),
        "unoffered attribute sent: {}",
        cmds[xf]
    );
    assert_eq!(a.len(), 4, "{}", cmds[xf]);
    proxy.stop().await;
}

/// Three client sessions, one message each: one pooled backend connection,
/// and XFORWARD (with the right client's identity) before every MAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xforward_before_every_mail_on_a_pooled_connection() {
    let rec = Recorder::start(Script {
        ehlo_extra: vec!["XFORWARD NAME ADDR PORT PROTO HELO SOURCE".into()],
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let mut ports = Vec::new();
    for i in 0..3 {
        let body = format!("Subject: pooled {i}\r\n\r\nmessage {i}\r\n");
        ports.push(one_message(proxy.addr, &format!("client-{i}.example"), &body).await);
    }
    assert_eq!(rec.messages().len(), 3);
    assert_eq!(
        rec.connection_count(),
        1,
        "the backend connection was not reused"
    );
    let cmds = command_lines(&rec.all_bytes());
    let xm: Vec<&String> = cmds
        .iter()
        .filter(|l| l.starts_with("XFORWARD ") || l.starts_with("MAIL "))
        .collect();
    assert_eq!(xm.len(), 6, "{cmds:#?}");
    for (i, pair) in xm.chunks(2).enumerate() {
        assert!(
            pair[0].starts_with("XFORWARD "),
            "XFORWARD must precede MAIL #{i}: {cmds:#?}"
        );
        assert!(pair[1].starts_with("MAIL "), "{cmds:#?}");
        let a = attrs(pair[0]);
        let helo = format!("client-{i}.example");
        let port = ports[i].to_string();
        assert_eq!(attr(&a, "NAME"), Some("[UNAVAILABLE]"), "{}", pair[0]);
        assert_eq!(attr(&a, "ADDR"), Some("127.0.0.1"), "{}", pair[0]);
        assert_eq!(attr(&a, "PORT"), Some(port.as_str()), "{}", pair[0]);
        assert_eq!(attr(&a, "PROTO"), Some("ESMTP"), "{}", pair[0]);
        assert_eq!(attr(&a, "HELO"), Some(helo.as_str()), "{}", pair[0]);
        assert_eq!(attr(&a, "SOURCE"), Some("REMOTE"), "{}", pair[0]);
    }
    assert!(!cmds.iter().any(|l| l.starts_with("XCLIENT")), "{cmds:#?}");
    proxy.stop().await;
}

/// identity = "xclient": one dedicated backend connection per client
/// session; XCLIENT once, then EHLO again, then MAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_once_per_client_session() {
    let rec = Recorder::start(Script {
        ehlo_extra: vec!["XCLIENT NAME ADDR PORT PROTO HELO".into()],
        ..Script::default()
    })
    .await;
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\n",
        rec.addr
    ))
    .await;
    let mut ports = Vec::new();
    for s in 0..2 {
        let mut c = Raw::greeted(proxy.addr).await;
        ports.push(c.stream.local_addr().unwrap().port());
        assert_eq!(c.cmd(&format!("EHLO xc-{s}.example")).await.code, 250);
        for m in 0..2 {
            let body = format!("Subject: xclient {s}.{m}\r\n\r\nbody {s}.{m}\r\n");
            let r = transaction(
                &mut c,
                "sender@client.example",
                &["rcpt@dest.example"],
                body.as_bytes(),
            )
            .await;
            assert_eq!(r.code, 250, "session {s} message {m}: {r:?}");
        }
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    assert_eq!(rec.messages().len(), 4);
    assert_eq!(
        rec.connection_count(),
        2,
        "XCLIENT needs one backend connection per client session"
    );
    let conns = rec.all_conn_bytes();
    for (s, bytes) in conns.iter().enumerate() {
        let cmds = command_lines(bytes);
        let xc: Vec<usize> = (0..cmds.len())
            .filter(|&i| cmds[i].starts_with("XCLIENT "))
            .collect();
        assert_eq!(
            xc.len(),
            1,
            "connection {s}: XCLIENT must be sent exactly once: {cmds:#?}"
        );
        let i = xc[0];
        assert!(
            cmds[..i].iter().all(|l| !l.starts_with("MAIL")),
            "XCLIENT after MAIL: {cmds:#?}"
        );
        assert!(
            cmds.get(i + 1).is_some_and(|l| l.starts_with("EHLO ")),
            "EHLO must follow XCLIENT: {cmds:#?}"
        );
        assert!(
            cmds.get(i + 2).is_some_and(|l| l.starts_with("MAIL ")),
            "MAIL must follow the new EHLO: {cmds:#?}"
        );
        assert_eq!(
            cmds.iter().filter(|l| l.starts_with("MAIL ")).count(),
            2,
            "{cmds:#?}"
        );
        assert!(!cmds.iter().any(|l| l.starts_with("XFORWARD")), "{cmds:#?}");
        let a = attrs(&cmds[i]);
        assert_eq!(attr(&a, "ADDR"), Some("127.0.0.1"), "{}", cmds[i]);
        assert_eq!(attr(&a, "NAME"), Some("[UNAVAILABLE]"), "{}", cmds[i]);
        assert_eq!(attr(&a, "PROTO"), Some("ESMTP"), "{}", cmds[i]);
        let helo = attr(&a, "HELO").unwrap_or_default().to_string();
        let port = attr(&a, "PORT").unwrap_or_default().to_string();
        // Connections are recorded in accept order = session order.
        assert_eq!(helo, format!("xc-{s}.example"), "{}", cmds[i]);
        assert_eq!(port, ports[s].to_string(), "{}", cmds[i]);
        assert!(attr(&a, "SOURCE").is_none(), "{}", cmds[i]);
    }
    proxy.stop().await;
}

/// A backend set to get the client's identity that does not offer the
/// command in its EHLO (no XFORWARD, no XCLIENT): mail goes on without it,
/// and the binary's log says so once per backend at warn, not per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_not_offered_is_logged_once_per_backend() {
    let xf = Recorder::start(Script::default()).await;
    let xc = Recorder::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.path().join("smtp-edge.toml");
    std::fs::write(
        &file,
        format!(
            "hostname = \"edge.test\"\n[[listener]]\naddress = \"{addr}\"\n\
             [[backend]]\naddress = \"{}\"\nidentity = \"xforward\"\n\
             [[backend]]\naddress = \"{}\"\nidentity = \"xclient\"\n",
            xf.addr, xc.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("smtp-edge.log");
    let _edge = Running::edge(&file, "info", &log, addr).await;
    // Round robin: sessions alternate between the two backends; each
    // XCLIENT session opens a connection of its own.
    for s in 0..6 {
        let mut c = Raw::greeted(addr).await;
        assert_eq!(c.cmd(&format!("EHLO s{s}.example")).await.code, 250);
        for m in 0..2 {
            let body = format!("Subject: {s}.{m}\r\n\r\nhi\r\n");
            let r = transaction(&mut c, "a@example.org", &["b@example.net"], body.as_bytes()).await;
            assert_eq!(r.code, 250, "{r:?}");
        }
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    assert_eq!(xf.messages().len() + xc.messages().len(), 12);
    assert!(xf.messages().len() >= 4 && xc.connection_count() >= 2);
    let sent = format!("{}{}", xf.all_text(), xc.all_text());
    assert!(
        !sent.contains("XFORWARD") && !sent.contains("XCLIENT"),
        "{sent}"
    );
    // The non-blocking log writer: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    for cmd in ["XFORWARD", "XCLIENT"] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("does not offer {cmd}")))
            .collect();
        assert_eq!(lines.len(), 1, "{cmd}:\n{text}");
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
    }
}

// --------------------------------------------------------- 3. byte-exact

/// A message that exercises transparency: dot-stuffed lines, a line that is
/// just "..", 8-bit UTF-8, a 998-octet line, empty lines (wire form, CRLF).
fn tricky_body() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(
        b"From: <sender@client.example>\r\nTo: <rcpt@dest.example>\r\nSubject: byte exact\r\n",
    );
    b.extend_from_slice(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    b.extend_from_slice(b"..leading dot\r\n");
    b.extend_from_slice(b"..\r\n");
    b.extend_from_slice(b"...three dots\r\n");
    b.extend_from_slice(
        " line: caf\u{e9}, na\u{ef}ve, \u{65e5}\u{672c}\u{8a9e}, \u{1F600}\r\n".as_bytes(),
    );
    b.extend_from_slice(b"\r\n\r\n");
    let mut long = b"long:".to_vec();
    while long.len() < 998 {
        long.push(b'a' + (long.len() % 26) as u8);
    }
    b.extend_from_slice(&long);
    b.extend_from_slice(b"\r\n");
    b.extend_from_slice(b" .space then dot\r\n");
    b.extend_from_slice(b"\ttab line\r\n");
    b.extend_from_slice(b"last line\r\n");
    b.extend_from_slice(b"\r\n");
    b
}

/// The message as its recipient reads it: dot-stuffing removed.
fn unstuffed(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in wire.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// Splits a message into its first header (with continuation lines) and
/// the rest.
fn split_first_header(msg: &[u8]) -> (&[u8], &[u8]) {
    let mut pos = 0;
    let mut first = true;
    while pos < msg.len() {
        let end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(msg.len());
        if !first && !matches!(msg[pos], b' ' | b'\t') {
            break;
        }
        first = false;
        pos = end;
    }
    msg.split_at(pos)
}

async fn send_tricky(addr: SocketAddr) {
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO exact.client.example").await.code, 250);
    let r = c
        .cmd("MAIL FROM:<sender@client.example> BODY=8BITMIME")
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<rcpt@dest.example>").await.code, 250);
    let r = c.cmd("DATA").await;
    assert_eq!(r.code, 354, "{r:?}");
    c.send(&tricky_body()).await;
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_relayed_byte_exact_with_dot_stuffing_preserved() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    send_tricky(proxy.addr).await;
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1);
    let got = &msgs[0];
    let (header, rest) = split_first_header(got);
    let header = String::from_utf8_lossy(header).into_owned();
    assert!(header.ends_with("\r\n"), "{header:?}");
    assert!(
        !header.contains("\n\r") && header.matches('\n').count() == header.matches("\r\n").count(),
        "header line endings must be CRLF: {header:?}"
    );
    assert_edge_received(&header, "exact.client.example", "ESMTP", None);
    // What the Recorder keeps excludes the CRLF before the final dot.
    let sent = tricky_body();
    let expected = &sent[..sent.len() - 2];
    assert!(
        rest == expected,
        "message data changed in transit\n--- sent ---\n{}\n--- backend got (after Received) ---\n{}",
        String::from_utf8_lossy(expected).escape_debug(),
        String::from_utf8_lossy(rest).escape_debug()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_arrives_intact_in_smtp_sink() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    send_tricky(proxy.addr).await;
    let msgs = sink.wait_messages(1, WAIT);
    assert_eq!(msgs.len(), 1);
    let dump = &msgs[0];
    assert_edge_received(dump, "exact.client.example", "ESMTP", None);
    assert_prepended(dump, "From: <sender@client.example>");
    // smtp-sink un-stuffs, writes LF line endings and appends an empty line.
    let expected = String::from_utf8(unstuffed(&tricky_body()))
        .unwrap()
        .replace("\r\n", "\n")
        + "\n";
    let start = dump.find("From: <sender@client.example>").unwrap();
    assert!(
        dump[start..] == expected,
        "smtp-sink stored something else\n--- expected ---\n{}\n--- got ---\n{}",
        expected.escape_debug(),
        dump[start..].escape_debug()
    );
    proxy.stop().await;
}

// ---------------------------------------------------------- 4. pipelining

const PIPELINED: &[u8] =
    b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n";

async fn pipelined_replies(addr: SocketAddr) -> (Raw, Vec<Seen>) {
    let mut c = Raw::greeted(addr).await;
    let r = c.cmd("EHLO pipe.client.example").await;
    assert_eq!(r.code, 250);
    assert!(r.text.lines().any(|l| l == "PIPELINING"), "{r:?}");
    c.send(PIPELINED).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(c.reply().await);
    }
    (c, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_get_replies_in_order() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let (mut c, seen) = pipelined_replies(proxy.addr).await;
    let codes: Vec<u16> = seen.iter().map(|s| s.code).collect();
    assert_eq!(codes, [250, 250, 250, 354], "{seen:#?}");
    c.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let cmds = command_lines(&rec.all_bytes());
    let rcpts: Vec<&String> = cmds.iter().filter(|l| l.starts_with("RCPT")).collect();
    assert_eq!(
        rcpts,
        ["RCPT TO:<b@y.example>", "RCPT TO:<c@y.example>"],
        "{cmds:#?}"
    );
    assert_eq!(rec.messages().len(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_rcpt_refusal_reaches_client_verbatim_in_position() {
    let rec = Recorder::start(Script {
        rcpt_for: vec![(
            "c@y.example".into(),
            Act::Reply("550 5.1.1 <c@y.example>: no such user".into()),
        )],
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let (mut c, seen) = pipelined_replies(proxy.addr).await;
    let codes: Vec<u16> = seen.iter().map(|s| s.code).collect();
    assert_eq!(codes, [250, 250, 550, 354], "{seen:#?}");
    assert_eq!(
        seen[2].raw, "550 5.1.1 <c@y.example>: no such user\r\n",
        "{seen:#?}"
    );
    c.send(b"Subject: one refused\r\n\r\nhi b\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    assert_eq!(rec.messages().len(), 1);
    proxy.stop().await;
}

/// A backend whose replies carry no enhanced status code (Exim's `250 OK`,
/// `250 Accepted`): the client, told ENHANCEDSTATUSCODES, gets one on
/// every 2xx/4xx/5xx reply (RFC 2034): 2.1.0 after MAIL, 2.1.5 after RCPT,
/// 2.0.0 after the data (DATA and BDAT), the class's X.0.0 on a refusal;
/// the text is the backend's, and a 354 is left alone. The proxy's own
/// replies carry theirs. A backend's codes pass unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_replies_without_enhanced_codes_get_one() {
    let rec = Recorder::start(Script {
        mail: Some(Act::Reply("250 OK".into())),
        rcpt: Some(Act::Reply("250 Accepted".into())),
        rcpt_for: vec![
            ("nouser@".into(), Act::Reply("550 no such user".into())),
            ("later@".into(), Act::Reply("451 later".into())),
        ],
        dot: Some(Act::Reply("250-OK\r\n250 id=1uXyZ".into())),
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
          RCPT TO:<nouser@example.net>\r\nRCPT TO:<later@example.net>\r\nDATA\r\n",
    )
    .await;
    let mut raw = Vec::new();
    for _ in 0..5 {
        raw.push(c.reply().await.raw);
    }
    assert_eq!(
        raw,
        [
            "250 2.1.0 OK\r\n",
            "250 2.1.5 Accepted\r\n",
            "550 5.0.0 no such user\r\n",
            "451 4.0.0 later\r\n",
            "354 End data with <CR><LF>.<CR><LF>\r\n",
        ]
    );
    c.send(b"Subject: one\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(
        c.reply().await.raw,
        "250-2.0.0 OK\r\n250 2.0.0 id=1uXyZ\r\n"
    );
    // BDAT, converted to DATA for this backend: the final reply too.
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.org>").await.raw,
        "250 2.1.0 OK\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<b@example.net>").await.raw,
        "250 2.1.5 Accepted\r\n"
    );
    let r = c.cmd("BDAT 20 LAST\r\nSubject: two\r\n\r\nhi").await;
    assert_eq!(r.raw, "250-2.0.0 OK\r\n250 2.0.0 id=1uXyZ\r\n");
    // The proxy's own replies.
    for (cmd, want) in [
        ("RSET", "250 2.0.0 Ok\r\n"),
        ("NOOP", "250 2.0.0 Ok\r\n"),
        ("VRFY b", "252 2.0.0 "),
        ("HELP", "214 2.0.0 "),
        ("RCPT TO:<b@example.net>", "503 5.5.1 "),
        ("QUIT", "221 2.0.0 Bye\r\n"),
    ] {
        let r = c.cmd(cmd).await;
        assert!(r.raw.starts_with(want), "{cmd}: {r:?}");
    }
    assert_eq!(rec.messages().len(), 2);
    proxy.stop().await;

    // A refusal of DATA without a code; a backend's own codes unchanged.
    let rec = Recorder::start(Script {
        data: Some(Act::Reply("554 no data for you".into())),
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    let mut raw = Vec::new();
    for _ in 0..3 {
        raw.push(c.reply().await.raw);
    }
    assert_eq!(
        raw,
        [
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "554 5.0.0 no data for you\r\n"
        ]
    );
    // The same refusal after the proxy's early 354: the reply after the dot.
    c.cmd("RSET").await;
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.net>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"Subject: three\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.raw, "554 5.0.0 no data for you\r\n");
    assert_eq!(c.cmd("QUIT").await.raw, "221 2.0.0 Bye\r\n");
    assert!(rec.messages().is_empty());
    proxy.stop().await;
}

/// The client may pipeline even when the backend does not offer PIPELINING:
/// the proxy then feeds the backend one command at a time, and the client
/// still gets every reply, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_client_to_backend_without_pipelining() {
    let rec = Recorder::start(Script {
        no_pipelining: true,
        rcpt_for: vec![(
            "c@y.example".into(),
            Act::Reply("550 5.1.1 <c@y.example>: no such user".into()),
        )],
        ..Script::default()
    })
    .await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let (mut c, seen) = pipelined_replies(proxy.addr).await;
    let codes: Vec<u16> = seen.iter().map(|s| s.code).collect();
    assert_eq!(codes, [250, 250, 550, 354], "{seen:#?}");
    assert_eq!(
        seen[2].raw, "550 5.1.1 <c@y.example>: no such user\r\n",
        "{seen:#?}"
    );
    c.send(b"Subject: no pipelining\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    assert_eq!(rec.messages().len(), 1);
    proxy.stop().await;
}

// ------------------------------------------------------ 5. Maildir backend

fn maildir_files(dir: &Path, sub: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir.join(sub))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let p = e.path();
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default())
                            .into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn find_delivered(mail: &Path, needle: &str) -> String {
    let new = maildir_files(mail, "new");
    let hits: Vec<&(String, String)> = new.iter().filter(|(_, c)| c.contains(needle)).collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one message containing {needle:?} in new/: {new:#?}"
    );
    hits[0].1.clone()
}

async fn maildir_proxy() -> Proxy {
    Proxy::start(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n[[backend]]\nmaildir = \"{DIR}/mail\"\n",
    )
    .await
}

async fn swaks(port: u16, extra: &[&str], subject: &str, body: &str) {
    let Some(bin) = require_tool("swaks") else {
        return;
    };
    let server = format!("127.0.0.1:{port}");
    let header = format!("Subject: {subject}");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(bin)
            .args([
                "--server",
                &server,
                "--to",
                "x@example.org",
                "--from",
                "y@example.org",
            ])
            .args(["--ehlo", "swaks.client.test", "--timeout", "10"])
            .args(["--header", &header, "--body", body])
            .args(extra)
            .output(),
    )
    .await
    .expect("swaks timed out")
    .expect("run swaks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks {extra:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("<-  250 "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_plain_and_starttls_into_maildir() {
    if require_tool("swaks").is_none() {
        return;
    }
    let proxy = maildir_proxy().await;
    let mail = proxy.dir.path().join("mail");
    let port = proxy.addr.port();

    swaks(port, &[], "swaks plain", "swaks plain body to the maildir").await;
    let m = find_delivered(&mail, "swaks plain body to the maildir");
    assert!(m.contains("Subject: swaks plain"), "{m}");
    assert_edge_received(&m, "swaks.client.test", "ESMTP", None);
    assert_prepended(&m, "Subject: swaks plain");

    swaks(
        port,
        &["--tls"],
        "swaks tls",
        "swaks starttls body to the maildir",
    )
    .await;
    let m = find_delivered(&mail, "swaks starttls body to the maildir");
    assert!(m.contains("Subject: swaks tls"), "{m}");
    assert_edge_received(&m, "swaks.client.test", "ESMTPS", Some("TLSv1."));
    assert_prepended(&m, "Subject: swaks tls");

    assert_eq!(maildir_files(&mail, "new").len(), 2);
    assert!(
        maildir_files(&mail, "tmp").is_empty(),
        "left in tmp/: {:?}",
        maildir_files(&mail, "tmp")
    );
    proxy.stop().await;
}

const PYTHON_CLIENT: &str = r#"
import smtplib, socket, sys
port = int(sys.argv[1])
s = smtplib.SMTP('127.0.0.1', port, local_hostname='py.client.test', timeout=10)
refused = s.sendmail('py@example.org', ['a@example.org', 'b@example.org'],
                     'Subject: python smtplib\r\n\r\npython smtplib body\r\n.dotted\r\n')
assert refused == {}, refused
s.quit()

# smtplib waits for each reply; pipeline by hand as well.
c = socket.create_connection(('127.0.0.1', port), timeout=10)
f = c.makefile('rb')
def reply():
    lines = []
    while True:
        l = f.readline()
        if not l:
            raise SystemExit('connection closed; got %r' % lines)
        lines.append(l)
        if l[3:4] != b'-':
            return b''.join(lines)
assert reply()[:3] == b'220'
c.sendall(b'EHLO pypipe.client.test\r\n')
r = reply()
assert b'PIPELINING' in r, r
c.sendall(b'MAIL FROM:<p@example.org>\r\nRCPT TO:<q@example.org>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n')
codes = [reply()[:3] for _ in range(4)]
assert codes == [b'250', b'250', b'250', b'354'], codes
c.sendall(b'Subject: python pipelined\r\n\r\npython pipelined body\r\n.\r\nQUIT\r\n')
r = reply(); assert r[:3] == b'250', r
r = reply(); assert r[:3] == b'221', r
print('ok')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_and_pipelined_into_maildir() {
    let Some(py) = require_tool("python3") else {
        return;
    };
    let proxy = maildir_proxy().await;
    let mail = proxy.dir.path().join("mail");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(py)
            .args(["-c", PYTHON_CLIENT, &proxy.addr.port().to_string()])
            .output(),
    )
    .await
    .expect("python timed out")
    .expect("run python3");
    assert!(
        out.status.success(),
        "python client failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let m = find_delivered(&mail, "python smtplib body");
    assert!(m.contains("Subject: python smtplib"), "{m}");
    assert!(
        m.contains("\n.dotted"),
        "dot-stuffing must be removed in the Maildir copy: {m}"
    );
    assert!(
        !m.contains("..dotted"),
        "dot-stuffing must be removed in the Maildir copy: {m}"
    );
    assert_edge_received(&m, "py.client.test", "ESMTP", None);
    let m = find_delivered(&mail, "python pipelined body");
    assert_edge_received(&m, "pypipe.client.test", "ESMTP", None);
    assert_prepended(&m, "Subject: python pipelined");
    assert_eq!(maildir_files(&mail, "new").len(), 2);
    assert!(
        maildir_files(&mail, "tmp").is_empty(),
        "left in tmp/: {:?}",
        maildir_files(&mail, "tmp")
    );
    proxy.stop().await;
}

// ---------------------------------------------------- 6. several backends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_first_backend_is_skipped() {
    let Some(sink) = Sink::start(&[]) else { return };
    let dead = free_port();
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"127.0.0.1:{dead}\"\n[[backend]]\naddress = \"{}\"\n",
        sink.addr
    ))
    .await;
    // Separate sessions (round robin starts at either backend) ...
    for i in 0..4 {
        one_message(
            proxy.addr,
            "multi.client.example",
            &format!("Subject: multi {i}\r\n\r\nmulti body {i}\r\n"),
        )
        .await;
    }
    // ... and several transactions in one session.
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO multi.client.example").await.code, 250);
    numbered_transactions(&mut c, "multi", 4..7).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let msgs = sink.wait_messages(7, WAIT);
    assert_eq!(msgs.len(), 7, "{msgs:#?}");
    for i in 0..7 {
        assert!(
            msgs.iter()
                .any(|m| m.contains(&format!("multi body {i}\n"))),
            "message {i} not delivered"
        );
    }
    proxy.stop().await;
}

/// Round robin alternates between two live backends, transaction after
/// transaction in one session, also once each backend's pool holds an idle
/// connection that begins a transaction at once (`Backends::begin_now`
/// takes the turn only when it succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_with_idle_connections() {
    let Some(a) = Sink::start(&[]) else { return };
    let Some(b) = Sink::start(&[]) else { return };
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\n[[backend]]\naddress = \"{}\"\n",
        a.addr, b.addr
    ))
    .await;
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO rr.client.example").await.code, 250);
    numbered_transactions(&mut c, "rr", 0..8).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let (ma, mb) = (a.wait_messages(4, WAIT), b.wait_messages(4, WAIT));
    assert_eq!((ma.len(), mb.len()), (4, 4), "{ma:#?}\n{mb:#?}");
    proxy.stop().await;
}

// --------------------------------------------------- 7. graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_message_in_data_finish_then_says_421() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "").await;
    let addr = proxy.addr;
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO stopping.client.example").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<sender@client.example>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<rcpt@dest.example>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stop = tokio::spawn(proxy.stop());
    // New connections are refused once the stop took effect.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(s) => {
                drop(s);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still accepting connections after stop"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        !stop.is_finished(),
        "stop returned while a message was still in DATA"
    );

    c.send(b"second half\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "the message in flight must complete: {r:?}");
    let r = c.reply().await;
    assert_eq!(r.code, 421, "{r:?}");
    assert!(r.text.starts_with("4.3.2"), "{r:?}");
    assert!(c.closed(WAIT).await, "connection not closed after 421");
    tokio::time::timeout(WAIT, stop)
        .await
        .expect("stop did not return after the last session ended")
        .unwrap();

    let msgs = rec.messages();
    assert_eq!(msgs.len(), 1);
    let m = String::from_utf8_lossy(&msgs[0]);
    assert!(m.contains("first half\r\nsecond half"), "{m}");
    // The pooled backend connection was closed politely.
    let cmds = command_lines(&rec.all_bytes());
    assert_eq!(
        cmds.last().map(String::as_str),
        Some("QUIT"),
        "pooled backend connection not QUIT at shutdown: {cmds:#?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new connection accepted after stop"
    );
}

/// Sessions idle between commands when the stop comes (one fresh after
/// EHLO, one after a whole message, each having waited for input several
/// times) hear 421 4.3.2 at once, not at their command timeout: the wait
/// for shutdown they keep registered wakes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_421_to_idle_sessions_at_once() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::to_backend(&rec.addr, "[timeouts]\ncommand = 60").await;
    let mut fresh = Raw::greeted(proxy.addr).await;
    assert_eq!(fresh.cmd("EHLO idle.client.example").await.code, 250);
    assert_eq!(fresh.cmd("NOOP").await.code, 250);
    let mut done = Raw::greeted(proxy.addr).await;
    assert_eq!(done.cmd("EHLO busy.client.example").await.code, 250);
    let r = transaction(
        &mut done,
        "busy@client.example",
        &["rcpt@dest.example"],
        b"Subject: before the stop\r\n\r\nbody\r\n",
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let stop = tokio::spawn(proxy.stop());
    for c in [&mut fresh, &mut done] {
        let r = tokio::time::timeout(Duration::from_secs(5), c.reply())
            .await
            .expect("no 421 within 5 s of the stop");
        assert_eq!(r.code, 421, "{r:?}");
        assert!(r.text.starts_with("4.3.2"), "{r:?}");
        assert!(c.closed(WAIT).await, "connection not closed after 421");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    tokio::time::timeout(WAIT, stop)
        .await
        .expect("stop did not return after the sessions ended")
        .unwrap();
    assert_eq!(rec.messages().len(), 1);
}

/// A client that pipelines a whole transaction and QUIT, then shuts its
/// side down before reading (as Exim does), while the MAIL waits for a new
/// backend connection: every reply arrives and the message is delivered.
/// An end of input with commands still to answer is not a hang-up.
#[tokio::test]
async fn a_client_half_closing_after_pipelining_gets_every_reply() {
    let rec = Recorder::start(Script {
        greeting: Some(Act::Delay(Duration::from_millis(200))),
        ..Script::default()
    })
    .await;
    let p = Proxy::to_backend(&rec.addr, "").await;
    let mut c = Raw::greeted(p.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    let body = b"Subject: half\r\n\r\nhello\r\n";
    let mut batch = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n".to_vec();
    batch.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
    batch.extend_from_slice(body);
    batch.extend_from_slice(b"QUIT\r\n");
    c.send(&batch).await;
    use tokio::io::AsyncWriteExt;
    c.stream.shutdown().await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(c.reply().await.code);
    }
    assert_eq!(codes, vec![250, 250, 250, 221]);
    assert_eq!(rec.messages.lock().unwrap().len(), 1);
}

/// The threads of process `pid` (Linux: /proc/PID/task).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One worker and nothing to log: the proxy relays as a single thread (no
/// log thread until the first line: a single-threaded process pays less
/// per system call, `telemetry/logwriter.rs`). The first line starts the
/// log thread and is written; so is every line after it.
#[tokio::test]
async fn one_worker_stays_one_thread_until_it_has_a_line_to_log() {
    let rec = Recorder::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.path().join("smtp-edge.toml");
    let good = format!(
        "hostname = \"edge.test\"\n[runtime]\nworker_threads = 1\n\
         [[listener]]\naddress = \"{addr}\"\n[[backend]]\naddress = \"{}\"\n\
         identity = \"none\"\n",
        rec.addr
    );
    std::fs::write(&file, &good).unwrap();
    let log = dir.path().join("smtp-edge.log");
    let edge = Running::edge(&file, "warn", &log, addr).await;
    let pid = edge.0.id();
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO one.example").await.code, 250);
    numbered_transactions(&mut c, "single", 0..3).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);
    assert_eq!(rec.messages().len(), 3);
    assert_eq!(
        threads(pid),
        1,
        "log: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");

    // An invalid file on SIGHUP: refused, and said at `error`.
    std::fs::write(&file, "hostname = 7\n").unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let end = std::time::Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("reload refused") || std::time::Instant::now() > end {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(text.contains("reload refused"), "log: {text}");
    assert!(text.contains("hostname"), "the key named: {text}");
    assert_eq!(threads(pid), 2, "the log thread, started by the line");
    // Mail still flows, on the configuration it had.
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO two.example").await.code, 250);
    numbered_transactions(&mut c, "after", 0..1).await;
    assert_eq!(rec.messages().len(), 4);
}
