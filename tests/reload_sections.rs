//! Reload beyond the policy: a renewed certificate served to new handshakes
//! while an open TLS session goes on, a broken certificate file keeping the
//! running one, backends replaced (the removed one's transactions finish,
//! its connections get QUIT), and limits that apply to new sessions only.
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn tls_config(dir: &Path, backend: &str, extra: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n{extra}\n[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n[[backend]]\naddress = \"{backend}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    )
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

/// Greeting, EHLO, STARTTLS and the handshake; the client and the
/// certificate the proxy presented.
async fn starttls(addr: SocketAddr) -> (Raw<Tls>, Vec<u8>) {
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO tls.client.test").await.code, 250);
    assert_eq!(c.cmd("STARTTLS").await.code, 220);
    let (stream, _) = c.into_parts();
    let connector =
        tokio_rustls::TlsConnector::from(smtp_load::tls::client_config(false, false).unwrap());
    let tls = connector
        .connect(ServerName::try_from("edge.test").unwrap(), stream)
        .await
        .expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut c = Raw::from_parts(tls, Vec::new());
    assert_eq!(c.cmd("EHLO tls.client.test").await.code, 250);
    (c, cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_served_after_reload_open_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::start(Script::default()).await;
    write_cert(dir.path(), "edge.test");
    let old = der_of(&dir.path().join("cert.pem"));
    let cfg = tls_config(dir.path(), &rec.addr, "");
    let proxy = Proxy::start(&cfg).await;
    let (mut open, seen) = starttls(proxy.addr).await;
    assert_eq!(seen, old);

    // Renewal: new files in place, then SIGHUP (same config text).
    write_cert(dir.path(), "edge.test");
    let new = der_of(&dir.path().join("cert.pem"));
    assert_ne!(old, new);
    proxy.reload(&cfg).unwrap();
    let (mut fresh, seen) = starttls(proxy.addr).await;
    assert_eq!(
        seen, new,
        "a handshake after the reload sees the new certificate"
    );

    // Both sessions deliver: the open one on the TLS session it had.
    assert_eq!(
        transaction(&mut open, b"Subject: old\r\n\r\nold\r\n")
            .await
            .code,
        250
    );
    assert_eq!(
        transaction(&mut fresh, b"Subject: new\r\n\r\nnew\r\n")
            .await
            .code,
        250
    );
    assert_eq!(rec.messages().len(), 2);

    // A broken certificate file: the reload is refused, the running
    // certificate stays. The file's check (as SIGHUP's Config::load runs
    // it) names the key; one that breaks after the check is refused by
    // the reload itself.
    let parsed = smtp_edge::config::Config::parse(&cfg).unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    let errs = smtp_edge::config::Config::parse(&cfg).unwrap_err();
    assert_eq!(errs[0].key, "tls.certificate", "{errs:?}");
    let err = proxy.reloader.reload(&parsed).unwrap_err();
    assert!(err.contains("tls.certificate"), "{err}");
    let (_c, seen) = starttls(proxy.addr).await;
    assert_eq!(seen, new);
    proxy.stop().await;
}

fn two_step_config(backend: &str, extra: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n{extra}\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{backend}\"\n"
    )
}

/// Ends with the QUIT the proxy sends a connection it gives up.
fn quit_sent(bytes: &[u8]) -> bool {
    bytes.ends_with(b"QUIT\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_replaced_by_reload() {
    let a = Recorder::start(Script::default()).await;
    let b = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&two_step_config(&a.addr, "")).await;
    // One transaction in flight on A, one connection idle in A's pool.
    let mut inflight = Raw::greeted(proxy.addr).await;
    assert_eq!(inflight.cmd("EHLO a.client.test").await.code, 250);
    assert_eq!(inflight.cmd("MAIL FROM:<a@x.test>").await.code, 250);
    let mut done = Raw::greeted(proxy.addr).await;
    assert_eq!(done.cmd("EHLO a.client.test").await.code, 250);
    assert_eq!(
        transaction(&mut done, b"Subject: 1\r\n\r\n1\r\n")
            .await
            .code,
        250
    );
    assert_eq!(proxy.backends.idle_counts(), vec![1]);

    proxy.reload(&two_step_config(&b.addr, "")).unwrap();

    // New transactions go to B, also on sessions opened before.
    assert_eq!(
        transaction(&mut done, b"Subject: 2\r\n\r\n2\r\n")
            .await
            .code,
        250
    );
    let mut late = Raw::greeted(proxy.addr).await;
    assert_eq!(late.cmd("EHLO b.client.test").await.code, 250);
    assert_eq!(
        transaction(&mut late, b"Subject: 3\r\n\r\n3\r\n")
            .await
            .code,
        250
    );
    assert_eq!(b.messages().len(), 2);
    // The transaction in flight on A finishes there.
    assert_eq!(inflight.cmd("RCPT TO:<b@y.test>").await.code, 250);
    assert_eq!(inflight.cmd("DATA").await.code, 354);
    inflight
        .send(b"Subject: inflight\r\n\r\ninflight\r\n.\r\n")
        .await;
    assert_eq!(inflight.reply().await.code, 250);
    assert_eq!(a.messages().len(), 2);
    // A's idle connection and, after its transaction, the busy one got QUIT.
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let conns = a.all_conn_bytes();
        if conns.len() == 2 && conns.iter().all(|c| quit_sent(c)) {
            break;
        }
        assert!(
            Instant::now() < end,
            "A's connections were not given up: {:?}",
            conns
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B's two transactions shared one pooled connection.
    assert_eq!(b.connection_count(), 1);
    proxy.stop().await;
}

/// A reload that removes a backend marked down stops its prober, though an
/// open session still holds the old set of backends (its last
/// transaction's, kept for the next): nothing connects to the removed
/// backend afterwards, and the session's next message goes to the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_is_not_probed_while_a_session_holds_the_old_set() {
    let good = Recorder::start(Script::default()).await;
    let dead = format!("127.0.0.1:{}", free_port());
    // Accepts (the kernel's backlog) and never greets: each connect times out.
    let silent = std::net::TcpListener::bind(&dead).unwrap();
    let config = |first: &str| {
        format!(
            "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = 0.3\n[[listener]]\naddress = \"127.0.0.1:0\"\n{first}[[backend]]\naddress = \"{}\"\n",
            good.addr
        )
    };
    let proxy = Proxy::start(&config(&format!(
        "[[backend]]\naddress = \"{dead}\"\ndown_after = 1\nprobe_interval = 0.1\nprobe_interval_max = 0.1\n"
    )))
    .await;
    let mut s = Raw::greeted(proxy.addr).await;
    assert_eq!(s.cmd("EHLO a.client.test").await.code, 250);
    for i in 0..3 {
        let body = format!("Subject: {i}\r\n\r\n{i}\r\n");
        assert_eq!(transaction(&mut s, body.as_bytes()).await.code, 250);
    }
    assert_eq!(proxy.backends.backends_up(), vec![false, true]);

    proxy.reload(&config("")).unwrap();
    // The removed backend's address, watched: its prober (every 0.1 s
    // while the old set lives) would connect here.
    drop(silent);
    let watch = std::net::TcpListener::bind(&dead).unwrap();
    watch.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_millis(1200);
    let mut connects = 0;
    while Instant::now() < end {
        if watch.accept().is_ok() {
            connects += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(connects, 0, "the removed backend was still probed");
    // The session that held the old set sends on, to the new one.
    assert_eq!(
        transaction(&mut s, b"Subject: after\r\n\r\nafter\r\n")
            .await
            .code,
        250
    );
    assert_eq!(good.messages().len(), 4);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_new_sessions_only() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&two_step_config(&rec.addr, "")).await;
    let mut before = Raw::greeted(proxy.addr).await;
    assert_eq!(before.cmd("EHLO before.test").await.code, 250);
    proxy
        .reload(&two_step_config(&rec.addr, "[limits]\nmax_recipients = 1"))
        .unwrap();
    let mut after = Raw::greeted(proxy.addr).await;
    assert_eq!(after.cmd("EHLO after.test").await.code, 250);
    for (c, second) in [(&mut before, 250), (&mut after, 452)] {
        assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await.code, 250);
        assert_eq!(c.cmd("RCPT TO:<one@y.test>").await.code, 250);
        assert_eq!(c.cmd("RCPT TO:<two@y.test>").await.code, second);
        assert_eq!(c.cmd("RSET").await.code, 250);
    }
    proxy.stop().await;
}

/// `smtp-edge reload` asks the running binary through its admin listener:
/// exit 0 when the new file was taken, 1 with the errors (key and line)
/// when it was refused, and the running configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_command_reports_whether_the_file_was_taken() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.path().join("smtp-edge.toml");
    let base = format!(
        "hostname = \"edge.test\"\n[admin]\naddress = \"{admin}\"\n[[listener]]\naddress = \"{addr}\"\n[[backend]]\nmaildir = \"{}\"\n",
        dir.path().join("mail").display()
    );
    std::fs::write(&file, &base).unwrap();
    let log = dir.path().join("log");
    let _proc = Running::listening(
        std::process::Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
            .arg("--config")
            .arg(&file),
        &log,
        addr,
    )
    .await;
    let run = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
            .arg("--config")
            .arg(file)
            .arg("reload")
            .output()
            .unwrap()
    };
    // A limit changed: taken.
    std::fs::write(&file, format!("{base}[limits]\nmax_recipients = 1\n")).unwrap();
    let out = tokio::task::spawn_blocking({
        let file = file.clone();
        move || run(&file)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "reloaded\n");
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO a.test").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<one@y.test>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<two@y.test>").await.code, 452);

    // An invalid file (read from the --config path by the proxy; the
    // command finds the admin address in a valid copy): refused, with the
    // key and line, and the running limits stay.
    let copy = dir.path().join("copy.toml");
    std::fs::copy(&file, &copy).unwrap();
    std::fs::write(
        &file,
        format!("{base}[limits]\nmax_recipients = \"many\"\n"),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || run(&copy))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = base.lines().count() + 2;
    assert!(
        err.contains("limits.max_recipients") && err.contains(&format!("line {line}")),
        "{err}"
    );
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO a.test").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<one@y.test>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<two@y.test>").await.code, 452);
}

/// True once nothing accepts on `addr` (within 2 s): the admin task stops
/// accepting when it sees the reload's stop signal.
async fn closed_soon(addr: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// `[admin]` moved by a reload: the new address answers, the old one is
/// closed; removed: closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_moved_and_closed_by_reload() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&two_step_config(
        &rec.addr,
        "[admin]\naddress = \"127.0.0.1:0\"",
    ))
    .await;
    let old = proxy.admin.unwrap();
    assert_eq!(http_get(old, "/livez").await.0, 200);
    let new: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    proxy
        .reload(&two_step_config(
            &rec.addr,
            &format!("[admin]\naddress = \"{new}\""),
        ))
        .unwrap();
    assert_eq!(http_get(new, "/livez").await.0, 200);
    assert!(closed_soon(old).await, "old admin still open");
    proxy.reload(&two_step_config(&rec.addr, "")).unwrap();
    assert!(closed_soon(new).await, "admin still open");
    proxy.stop().await;
}

/// A reload that changes only a session timeout keeps the backends and
/// their pooled connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_timeout_reload_keeps_the_pool() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&two_step_config(&rec.addr, "")).await;
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO a.test").await.code, 250);
    assert_eq!(
        transaction(&mut c, b"Subject: 1\r\n\r\n1\r\n").await.code,
        250
    );
    proxy
        .reload(&two_step_config(&rec.addr, "[timeouts]\ncommand = 60"))
        .unwrap();
    assert_eq!(
        transaction(&mut c, b"Subject: 2\r\n\r\n2\r\n").await.code,
        250
    );
    assert_eq!(rec.connection_count(), 1);
    assert!(!quit_sent(&rec.all_conn_bytes()[0]));
    proxy.stop().await;
}
