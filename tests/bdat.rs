//! CHUNKING / BDAT inbound (RFC 3030) end to end: raw-socket and Python
//! smtplib clients sending pipelined chunks, `BDAT 0 LAST`, too-big chunks,
//! BDAT after a failure, DATA mixed with BDAT, smuggling payloads inside
//! chunks and chunk boundaries inside CR LF pairs; relayed to smtp-sink
//! (no CHUNKING: converted to dot-stuffed DATA), to a real Postfix smtpd
//! with CHUNKING (relayed as BDAT) and without it, and into a Maildir.
//! Asserts the reply codes the client saw and the bytes the backend stored.
mod common;
mod postfix_instance;

use std::path::Path;
use std::time::Duration;

use common::*;
use postfix_instance::Postfix;

const WAIT: Duration = Duration::from_secs(10);
const NORMALIZE: &str = "[smtp]\nbare_line_endings = \"normalize\"\n";

/// `BDAT <len>[ LAST]` and the chunk's octets.
fn chunk(content: &[u8], last: bool) -> Vec<u8> {
    let mut v = format!(
        "BDAT {}{}\r\n",
        content.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    v.extend_from_slice(content);
    v
}

/// The chunks of `parts`, the last one marked LAST.
fn chunks(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        v.extend(chunk(p, i + 1 == parts.len()));
    }
    v
}

/// A greeted, EHLO'd client; the proxy must offer CHUNKING.
async fn client(addr: std::net::SocketAddr) -> Raw {
    let mut c = Raw::greeted(addr).await;
    let r = c.cmd("EHLO bdat.client.test").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.text.lines().any(|l| l == "CHUNKING"), "{r:?}");
    c
}

/// MAIL, RCPT and `parts` as chunks, all in one write; the reply codes in
/// order (MAIL, RCPT, one per chunk) and the last reply.
async fn bdat_txn(c: &mut Raw, parts: &[&[u8]]) -> (Vec<u16>, Seen) {
    let mut w = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n".to_vec();
    w.extend(chunks(parts));
    c.send(&w).await;
    let mut codes = Vec::new();
    let mut last = None;
    for _ in 0..parts.len() + 2 {
        let r = c.reply().await;
        codes.push(r.code);
        last = Some(r);
    }
    (codes, last.unwrap())
}

fn ok_codes(parts: usize) -> Vec<u16> {
    vec![250; parts + 2]
}

/// The stored message from `marker` on (smtp-sink and Postfix store LF
/// line endings).
fn from_marker(stored: &str, marker: &str) -> String {
    let start = stored
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not in\n{stored}"));
    stored[start..].to_string()
}

/// The transactions smtp-sink stored with content (it leaves an empty
/// dump for a transaction that ended with RSET).
fn stored(sink: &Sink, n: usize) -> Vec<String> {
    let mut msgs = sink.wait_messages(n, WAIT);
    msgs.retain(|m| !m.is_empty());
    msgs
}

fn lf(content: &[u8]) -> String {
    String::from_utf8(content.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
}

/// Content with smuggling payloads made of CRLF pairs only (legal BDAT
/// content), cut so that CR LF pairs and a `.` line straddle chunks.
const TRICKY: &[&[u8]] = &[
    b"Subject: bdat tricky\r\n\r\nfirst\r\n.dot line\r",
    b"\n.\r\nMAIL FROM:<evil@smuggler.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\r\n.",
    b"\r\n..two dots\r\n",
    b"last line without CRLF",
];

fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// --------------------------------------------------- a DATA backend (smtp-sink)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_chunks_reach_a_data_backend_stuffed() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    let mut c = client(proxy.addr).await;
    let (codes, last) = bdat_txn(&mut c, TRICKY).await;
    assert_eq!(codes, ok_codes(TRICKY.len()), "{last:?}");
    // BDAT 0 LAST on its own: the message is the Received header alone.
    let (codes, _) = bdat_txn(&mut c, &[b""]).await;
    assert_eq!(codes, ok_codes(1));
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let mut msgs = stored(&sink, 2);
    msgs.sort_by_key(|m| !m.contains("Subject:"));
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    // smtp-sink un-stuffs and writes LF endings; the proxy ended the last
    // line; the `.` lines were content, nothing was smuggled.
    let mut want = lf(&joined(TRICKY));
    want.push('\n');
    assert_eq!(from_marker(&msgs[0], "Subject: bdat tricky"), want + "\n");
    assert!(msgs[0].contains("\tby edge.test (smtp-edge) with ESMTP"));
    assert!(!msgs[1].contains("Subject:"), "{}", msgs[1]);
    // The message of BDAT 0 LAST: our Received header (three lines), the
    // empty line smtp-sink appends.
    let received = from_marker(&msgs[1], "Received: from bdat.client.test");
    assert_eq!(received.lines().count(), 4, "{received:?}");
    assert!(received.ends_with("\n\n"), "{received:?}");
    assert!(!sink.log().contains("evil@smuggler"), "{}", sink.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_line_ending_payloads_in_chunks() {
    let Some(sink) = Sink::start(&[]) else { return };
    let reject = Proxy::to_backend(&sink.addr, "").await;
    let normalize = Proxy::to_backend(&sink.addr, NORMALIZE).await;
    let payloads: [&[u8]; 4] = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r"];
    for p in payloads {
        let mut content = b"Subject: smuggle\r\n\r\nbefore".to_vec();
        content.extend_from_slice(p);
        content.extend_from_slice(b"MAIL FROM:<evil@smuggler.example>\r\nafter\r\n");
        // Cut inside the payload, after its first octet.
        let (a, b) = content.split_at(b"Subject: smuggle\r\n\r\nbefore".len() + 1);
        let mut c = client(reject.addr).await;
        let (codes, last) = bdat_txn(&mut c, &[a, b]).await;
        // A CR that ends the first chunk is judged with the next octet.
        let first = if a.ends_with(b"\r") { 250 } else { 550 };
        assert_eq!(codes, vec![250, 250, first, 550], "{p:?} {last:?}");
        assert!(last.text.starts_with("5.5.2 "), "{last:?}");
        // The session is in sync and goes on.
        assert_eq!(c.cmd("RSET").await.code, 250);
        assert_eq!(c.cmd("QUIT").await.code, 221);

        let mut c = client(normalize.addr).await;
        let (codes, last) = bdat_txn(&mut c, &[a, b]).await;
        assert_eq!(codes, ok_codes(2), "{p:?} {last:?}");
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    let msgs = stored(&sink, payloads.len());
    assert_eq!(msgs.len(), payloads.len(), "one message each: {msgs:#?}");
    // Normalized: each bare ending a line break, the `.` line content.
    let want = "Subject: smuggle\n\nbefore\n.\nMAIL FROM:<evil@smuggler.example>\nafter\n\n";
    for (i, m) in msgs.iter().enumerate() {
        let got = from_marker(m, "Subject: smuggle");
        // "\r\n.\r" leaves CRLF "." CRLF: the same; "\n.\r\n" too.
        assert_eq!(got, want, "payload {:?}", payloads[i]);
    }
    assert!(!sink.log().contains("evil@smuggler"), "{}", sink.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_pairs_split_across_chunks() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    let mut c = client(proxy.addr).await;
    // Every CR at the end of a chunk, its LF starting the next: in Reject
    // mode this is clean content.
    let parts: [&[u8]; 5] = [b"Subject: split\r", b"\n\r", b"\nbody\r", b"\n.\r", b"\n"];
    let (codes, last) = bdat_txn(&mut c, &parts).await;
    assert_eq!(codes, ok_codes(parts.len()), "{last:?}");
    // A CR that ends the LAST chunk has no LF: bare.
    let (codes, last) = bdat_txn(&mut c, &[b"Subject: bare\r\n\r\nx\r"]).await;
    assert_eq!(codes, vec![250, 250, 550], "{last:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let msgs = stored(&sink, 1);
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(
        from_marker(&msgs[0], "Subject: split"),
        "Subject: split\n\nbody\n.\n\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_big_chunk_and_long_line_are_refused_and_later_chunks_too() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "[limits]\nmax_message_size = 4000\n").await;
    let mut c = client(proxy.addr).await;
    // The too-big chunk is full of commands: were its octets not consumed,
    // QUIT would end the session.
    let big = b"QUIT\r\n".repeat(1000);
    let (codes, last) = bdat_txn(&mut c, &[b"Subject: big\r\n\r\n", &big, b"tail"]).await;
    assert_eq!(codes, vec![250, 250, 250, 552, 552], "{last:?}");
    assert!(last.text.starts_with("5.3.4 "), "{last:?}");
    assert_eq!(c.cmd("NOOP").await.code, 250);
    // The LAST ended the transaction: a new one is fine.
    let (codes, _) = bdat_txn(&mut c, &[b"Subject: small\r\n\r\nok\r\n"]).await;
    assert_eq!(codes, ok_codes(1));
    // A line over max_text_line (1000), half in each chunk: refused at the
    // chunk that makes it too long.
    let half = [b'x'; 600];
    let (codes, last) = bdat_txn(&mut c, &[b"Subject: long\r\n\r\n", &half, &half]).await;
    assert_eq!(codes, vec![250, 250, 250, 250, 550], "{last:?}");
    assert!(last.text.starts_with("5.6.0 "), "{last:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let msgs = stored(&sink, 1);
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert!(msgs[0].contains("Subject: small\n"), "{}", msgs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_out_of_sequence_is_refused_and_its_octets_consumed() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    let mut c = client(proxy.addr).await;
    // No MAIL: 503, and "QUIT\r\n" inside the chunk is not a command.
    c.send(&chunk(b"QUIT\r\n", true)).await;
    let r = c.reply().await;
    assert_eq!((r.code, &r.text[..6]), (503, "5.5.1 "), "{r:?}");
    assert_eq!(c.cmd("NOOP").await.code, 250);
    // MAIL but no RCPT.
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    c.send(&chunk(b"QUIT\r\n", false)).await;
    let r = c.reply().await;
    assert_eq!((r.code, &r.text[..6]), (503, "5.5.1 "), "{r:?}");
    // DATA after BDAT in one transaction: 503, the transaction goes on.
    assert_eq!(c.cmd("RCPT TO:<b@example.org>").await.code, 250);
    c.send(&chunk(b"Subject: mixed\r\n\r\n", false)).await;
    assert_eq!(c.reply().await.code, 250);
    let r = c.cmd("DATA").await;
    assert_eq!((r.code, &r.text[..6]), (503, "5.5.1 "), "{r:?}");
    c.send(&chunk(b"body\r\n", true)).await;
    assert_eq!(c.reply().await.code, 250);
    // A BDAT after the LAST: 503, its octets consumed.
    c.send(&chunk(b"QUIT\r\n", false)).await;
    assert_eq!(c.reply().await.code, 503);
    assert_eq!(c.cmd("NOOP").await.code, 250);
    // BDAT after DATA (refused for want of RCPT) in one transaction: 503.
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 503);
    assert_eq!(c.cmd("RCPT TO:<b@example.org>").await.code, 250);
    c.send(&chunk(b"QUIT\r\n", true)).await;
    let r = c.reply().await;
    assert_eq!((r.code, &r.text[..6]), (503, "5.5.1 "), "{r:?}");
    assert_eq!(c.cmd("RSET").await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let msgs = stored(&sink, 1);
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert!(
        msgs[0].ends_with("Subject: mixed\n\nbody\n\n"),
        "{}",
        msgs[0]
    );
}

// ------------------------------------------------------------------ Maildir

fn maildir_new(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("new"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

const PYTHON_BDAT: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='py.bdat.test', timeout=10)
s.ehlo()
assert s.has_extn('chunking'), s.esmtp_features
assert s.mail('py@example.org')[0] == 250
assert s.rcpt('box@example.org')[0] == 250
# smtplib has no BDAT: raw chunks through its socket, pipelined.
parts = [b'Subject: python bdat\r\n\r\n.starts with a dot\r', b'\n.\r\n', b'no final CRLF']
wire = b''.join(b'BDAT %d%s\r\n%s' % (len(p), b' LAST' if i == len(parts) - 1 else b'', p)
                for i, p in enumerate(parts))
s.sock.sendall(wire)
codes = [s.getreply() for _ in parts]
assert [c for c, _ in codes] == [250, 250, 250], codes
print(codes[-1][1].decode())
s.quit()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_bdat_into_maildir_unstuffed() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let proxy = Proxy::start(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\nmaildir = \"{DIR}/mail\"\n",
    )
    .await;
    let port = proxy.addr.port().to_string();
    let out = tokio::process::Command::new(python)
        .args(["-c", PYTHON_BDAT, &port])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2.0.0 Ok: queued as"));
    let files = maildir_new(&proxy.dir.path().join("mail"));
    assert_eq!(files.len(), 1);
    let text = String::from_utf8(files[0].clone()).unwrap();
    assert!(text.starts_with("Received: from py.bdat.test"), "{text}");
    // Stored as sent (CRLF, no stuffing), the last line ended.
    assert!(
        text.ends_with(
            "\r\nSubject: python bdat\r\n\r\n.starts with a dot\r\n.\r\nno final CRLF\r\n"
        ),
        "{text:?}"
    );
}

// ------------------------------------------------------------- real Postfix

async fn start_postfix(extra: &'static str) -> Option<Postfix> {
    match tokio::task::spawn_blocking(move || Postfix::start(extra)).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The queue id from Postfix's "2.0.0 Ok: queued as 3F2A1B0C9D".
fn queue_id(r: &Seen) -> String {
    assert_eq!(r.code, 250, "final reply: {r:?}");
    r.text
        .rsplit_once("queued as ")
        .map(|(_, id)| id.trim().to_string())
        .unwrap_or_else(|| panic!("no queue id in {r:?}"))
}

/// Postfix logging each command of the proxy's sessions.
const VERBOSE: &str = "debug_peer_list = 127.0.0.1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_with_chunking_gets_bdat_streamed() {
    let Some(pf) = start_postfix(VERBOSE).await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, "").await;
    let mut c = client(proxy.addr).await;
    // Pipelined chunks with `.` lines and a CR LF cut, then a big message
    // in many chunks: relayed as it arrives (more backend chunks than the
    // replies a backend may owe at once).
    let (codes, last) = bdat_txn(&mut c, TRICKY).await;
    assert_eq!(codes, ok_codes(TRICKY.len()), "{last:?}");
    let tricky_id = queue_id(&last);
    let line = b"0123456789 a line of a big message, to be sent in many chunks\r\n";
    let body = line.repeat(8000);
    let mut parts: Vec<&[u8]> = vec![b"Subject: big bdat\r\n\r\n"];
    parts.extend(body.chunks(9999));
    let (codes, last) = bdat_txn(&mut c, &parts).await;
    assert_eq!(codes, ok_codes(parts.len()), "{last:?}");
    let big_id = queue_id(&last);
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let (_, file) = pf.wait_delivered(&tricky_id, WAIT).await;
    let file = String::from_utf8(file).unwrap();
    let mut want = lf(&joined(TRICKY));
    want.push('\n');
    assert_eq!(from_marker(&file, "Subject: bdat tricky"), want);
    let (_, file) = pf.wait_delivered(&big_id, WAIT).await;
    let file = String::from_utf8(file).unwrap();
    assert_eq!(
        from_marker(&file, "Subject: big bdat"),
        lf(&[&b"Subject: big bdat\r\n\r\n"[..], &body].concat())
    );
    // BDAT reached Postfix, never DATA.
    let log = pf.log();
    assert!(log.contains(": BDAT ") && log.contains(" LAST"), "{log}");
    assert!(!log.contains(": DATA"), "{log}");
    assert_eq!(pf.delivered().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_without_chunking_gets_stuffed_data_no_smuggling() {
    // Postfix reading a bare LF as a line end (smtpd_forbid_bare_newline =
    // no): "\n.\n" would end its DATA early, were it to reach it.
    let Some(pf) = start_postfix("smtpd_discard_ehlo_keywords = chunking\n").await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, NORMALIZE).await;
    let mut c = client(proxy.addr).await;
    let parts: [&[u8]; 3] = [
        b"Subject: smuggle pf\r\n\r\nbefore\n.\nMAIL FROM:<evil@smuggler.example>\r",
        b".\r\n.\r\nRCPT TO:<victim@example.org>\r\n\r\n.",
        b"\r\n.after",
    ];
    let (codes, last) = bdat_txn(&mut c, &parts).await;
    assert_eq!(codes, ok_codes(parts.len()), "{last:?}");
    let id = queue_id(&last);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let (_, file) = pf.wait_delivered(&id, WAIT).await;
    assert_eq!(
        from_marker(&String::from_utf8(file).unwrap(), "Subject: smuggle pf"),
        "Subject: smuggle pf\n\nbefore\n.\nMAIL FROM:<evil@smuggler.example>\n.\n.\nRCPT TO:<victim@example.org>\n\n.\n.after\n"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pf.delivered().len(), 1, "{}", pf.log());
    assert!(!pf.log().contains("evil@smuggler"), "{}", pf.log());
}

/// RSET after some chunks, and a client gone inside a chunk: neither
/// message is delivered, and the session's next transaction is.
async fn abandoned_transactions(addr: std::net::SocketAddr) -> Seen {
    let mut c = client(addr).await;
    let mut w = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n".to_vec();
    w.extend(chunk(
        b"Subject: reset\r\n\r\nnot to be delivered\r\n",
        false,
    ));
    c.send(&w).await;
    for _ in 0..3 {
        assert_eq!(c.reply().await.code, 250);
    }
    assert_eq!(c.cmd("RSET").await.code, 250);
    let (codes, last) = bdat_txn(&mut c, &[b"Subject: kept\r\n\r\nafter RSET\r\n"]).await;
    assert_eq!(codes, ok_codes(1), "{last:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let mut c = client(addr).await;
    let mut w = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n".to_vec();
    w.extend(chunk(b"Subject: gone\r\n\r\nfirst chunk\r\n", false));
    w.extend_from_slice(b"BDAT 1000 LAST\r\nSubject: half of it\r\n");
    c.send(&w).await;
    for _ in 0..3 {
        assert_eq!(c.reply().await.code, 250);
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_bdat_transactions_deliver_nothing() {
    let Some(sink) = Sink::start(&[]) else { return };
    let proxy = Proxy::to_backend(&sink.addr, "").await;
    abandoned_transactions(proxy.addr).await;
    let msgs = stored(&sink, 1);
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert!(msgs[0].contains("Subject: kept\n"), "{}", msgs[0]);

    let Some(pf) = start_postfix("").await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, "").await;
    let kept = abandoned_transactions(proxy.addr).await;
    pf.wait_delivered(&queue_id(&kept), WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = pf.delivered();
    assert_eq!(files.len(), 1, "{}", pf.log());
    assert!(String::from_utf8_lossy(&files[0].1).contains("Subject: kept\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_refusing_a_chunk_gives_the_final_reply() {
    // Postfix takes 50 000 octets, the proxy more: Postfix's refusal of a
    // chunk is what the client hears after its LAST, and nothing is
    // delivered.
    let Some(pf) = start_postfix("message_size_limit = 50000\n").await else {
        return;
    };
    let proxy = Proxy::to_backend(&pf.addr, "").await;
    let mut c = client(proxy.addr).await;
    let body = b"a line of a message that is too big for the backend\r\n".repeat(2000);
    let mut parts: Vec<&[u8]> = vec![b"Subject: too big for postfix\r\n\r\n"];
    parts.extend(body.chunks(10_000));
    let (codes, last) = bdat_txn(&mut c, &parts).await;
    // 250s, then (once the proxy has read the refusal: at the latest after
    // the LAST) the backend's 552 for every chunk left.
    let first_552 = codes.iter().position(|&c| c == 552).expect("a 552");
    assert!(first_552 >= 2, "{codes:?}");
    assert!(codes[..first_552].iter().all(|&c| c == 250), "{codes:?}");
    assert!(codes[first_552..].iter().all(|&c| c == 552), "{codes:?}");
    assert!(last.text.starts_with("5.3.4 "), "{last:?}");
    // The session goes on: a message that fits is delivered.
    let (codes, last) = bdat_txn(&mut c, &[b"Subject: fits\r\n\r\nsmall\r\n"]).await;
    assert_eq!(codes, ok_codes(1), "{last:?}");
    pf.wait_delivered(&queue_id(&last), WAIT).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);
    assert_eq!(pf.delivered().len(), 1, "{}", pf.log());
}
