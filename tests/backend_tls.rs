//! TLS to the backends (`[[backend]] tls`) against a real Postfix with a
//! certificate this test makes (its own CA): STARTTLS required and
//! verified, the session resumed on a new connection, implicit TLS
//! (`smtpd_tls_wrappermode`), a client certificate Postfix trusts, and the
//! refusals: an untrusted CA, a wrong name, a backend without STARTTLS.
//! Every refusal is a 451 4.7.10 to the client and nothing reaches the
//! backend in plaintext. Skips when Postfix is not installed (fails under
//! CI=true).
mod common;
mod postfix_instance;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use postfix_instance::Postfix;

const DELIVERY: Duration = Duration::from_secs(15);

/// A CA, a server certificate it signed (localhost and 127.0.0.1), a
/// client certificate it signed, and a second CA that signed nothing of
/// these, in a directory Postfix can read.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(
    names: &[&str],
    cn: &str,
    purpose: rcgen::ExtendedKeyUsagePurpose,
    issuer: &rcgen::Issuer<'_, &rcgen::KeyPair>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ca_params, ca_key, ca_pem) = ca("smtp-edge test CA");
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let (server_pem, server_key) = leaf(
        &["localhost", "127.0.0.1"],
        "localhost",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
    );
    let (client_pem, client_key) = leaf(
        &["edge.test"],
        "edge.test",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        &issuer,
    );
    let (_, _, other_pem) = ca("another CA");
    Pki {
        ca: write(d, "ca.pem", &ca_pem),
        other_ca: write(d, "other-ca.pem", &other_pem),
        server_cert: write(d, "server.pem", &server_pem),
        server_key: write(d, "server-key.pem", &server_key),
        client_cert: write(d, "client.pem", &client_pem),
        client_key: write(d, "client-key.pem", &client_key),
        _dir: dir,
    }
}

/// A private Postfix serving TLS with the PKI's server certificate;
/// `extra` is more main.cf.
async fn postfix(p: &Pki, extra: &str) -> Option<Postfix> {
    let cf = format!(
        "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_loglevel = 1\n{extra}",
        p.server_cert.display(),
        p.server_key.display()
    );
    match tokio::task::spawn_blocking(move || Postfix::start(&cf)).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The proxy with one backend at `addr` and `backend` more of its keys.
async fn edge(addr: &str, backend: &str) -> Proxy {
    Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\n[[backend]]\naddress = \"{addr}\"\ndown_after = 0\n{backend}\n"
    ))
    .await
}

/// One message; the reply to MAIL, or to the dot when MAIL was accepted.
async fn send(proxy: &Proxy, tag: &str) -> Seen {
    let mut c = Raw::greeted(proxy.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    let r = c.cmd("MAIL FROM:<alice@client.test>").await;
    if r.code != 250 {
        return r;
    }
    let r = c.cmd("RCPT TO:<bob@example.org>").await;
    assert_eq!(r.code, 250, "RCPT: {r:?}");
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(format!("Subject: {tag}\r\n\r\n{tag}\r\n.\r\n").as_bytes())
        .await;
    let r = c.reply().await;
    c.cmd("QUIT").await;
    r
}

fn counter(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&parse_metrics(&proxy.stats.encode()), name, labels)
}

/// Waits until `n` messages are in the Maildir; their contents.
async fn delivered(pf: &Postfix, n: usize) -> Vec<String> {
    let end = std::time::Instant::now() + DELIVERY;
    loop {
        let got = pf.delivered();
        if got.len() >= n || std::time::Instant::now() > end {
            return got
                .into_iter()
                .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// STARTTLS required, the CA given: delivered over TLS (Postfix logs the
/// TLS connection, and refuses MAIL without it: `encrypt`); the second
/// connection (max_transactions = 1) resumes the first one's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_verified_and_resumed() {
    let p = pki();
    let Some(pf) = postfix(&p, "smtpd_tls_security_level = encrypt").await else {
        return;
    };
    let proxy = edge(
        &pf.addr,
        &format!(
            "tls = \"starttls\"\ntls_ca = \"{}\"\nmax_transactions = 1",
            p.ca.display()
        ),
    )
    .await;
    for i in 0..2 {
        let r = send(&proxy, &format!("tls-{i}")).await;
        assert_eq!(r.code, 250, "{r:?}\n{}", pf.log());
    }
    let got = delivered(&pf, 2).await;
    assert_eq!(got.len(), 2, "{}", pf.log());
    assert!(got.iter().any(|m| m.contains("tls-0")) && got.iter().any(|m| m.contains("tls-1")));
    let log = pf.log();
    assert!(
        log.matches("TLS connection established from").count() >= 2,
        "{log}"
    );
    let b = [("backend", pf.addr.as_str())];
    assert_eq!(
        counter(&proxy, "smtp_edge_backend_tls_handshakes_total", &b),
        2.0
    );
    assert!(
        counter(&proxy, "smtp_edge_backend_tls_resumed_total", &b) >= 1.0,
        "the second connection did not resume:\n{}",
        proxy.stats.encode()
    );
}

/// Implicit TLS: Postfix in wrapper mode (TLS from the first byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls() {
    let p = pki();
    let Some(pf) = postfix(&p, "smtpd_tls_wrappermode = yes").await else {
        return;
    };
    let proxy = edge(
        &pf.addr,
        &format!("tls = \"implicit\"\ntls_ca = \"{}\"", p.ca.display()),
    )
    .await;
    let r = send(&proxy, "implicit").await;
    assert_eq!(r.code, 250, "{r:?}\n{}", pf.log());
    assert_eq!(delivered(&pf, 1).await.len(), 1);
    assert!(pf.log().contains("TLS connection established from"));
}

/// A client certificate signed by the CA Postfix trusts: Postfix logs the
/// connection as Trusted (Anonymous without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_trusted_by_postfix() {
    let p = pki();
    let cf = format!(
        "smtpd_tls_security_level = encrypt\nsmtpd_tls_ask_ccert = yes\nsmtpd_tls_CAfile = {}",
        p.ca.display()
    );
    let Some(pf) = postfix(&p, &cf).await else {
        return;
    };
    let proxy = edge(
        &pf.addr,
        &format!(
            "tls = \"starttls\"\ntls_ca = \"{}\"\ntls_certificate = \"{}\"\ntls_private_key = \"{}\"",
            p.ca.display(),
            p.client_cert.display(),
            p.client_key.display()
        ),
    )
    .await;
    let r = send(&proxy, "mtls").await;
    assert_eq!(r.code, 250, "{r:?}\n{}", pf.log());
    let log = pf.log();
    assert!(
        log.contains("Trusted TLS connection established from"),
        "{log}"
    );
}

/// Refusals: the proxy's CA is not the one that signed Postfix's
/// certificate; the name asked for is not the certificate's. Each: 451
/// 4.7.10 at MAIL, counted by reason, and Postfix never saw a MAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_or_misnamed_certificate_is_refused() {
    let p = pki();
    let Some(pf) = postfix(&p, "smtpd_tls_security_level = may").await else {
        return;
    };
    for extra in [
        format!("tls_ca = \"{}\"", p.other_ca.display()),
        format!(
            "tls_ca = \"{}\"\ntls_server_name = \"mx.other.test\"",
            p.ca.display()
        ),
    ] {
        let proxy = edge(&pf.addr, &format!("tls = \"starttls\"\n{extra}")).await;
        let r = send(&proxy, "refused").await;
        assert_eq!(
            (r.code, r.text.as_str().get(..6)),
            (451, Some("4.7.10")),
            "{r:?}"
        );
        let b = [("backend", pf.addr.as_str()), ("reason", "certificate")];
        assert!(
            counter(&proxy, "smtp_edge_backend_tls_failures_total", &b) >= 1.0,
            "{}",
            proxy.stats.encode()
        );
    }
    // Postfix offered STARTTLS each time; no mail command ever came.
    let log = pf.log();
    assert!(!log.contains("from=<"), "{log}");
    assert!(pf.delivered().is_empty());
}

/// A backend that does not offer STARTTLS: `starttls` refuses to send
/// anything (451 4.7.10; the backend's recording has no MAIL), while
/// `opportunistic` delivers in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_starttls_offered_required_or_opportunistic() {
    let rec = Recorder::start(Script::default()).await;
    let proxy = edge(&rec.addr, "tls = \"starttls\"\ntls_verify = false").await;
    let r = send(&proxy, "required").await;
    assert_eq!(
        (r.code, r.text.as_str().get(..6)),
        (451, Some("4.7.10")),
        "{r:?}"
    );
    let seen = String::from_utf8_lossy(&rec.all_bytes()).into_owned();
    assert!(!seen.contains("MAIL FROM"), "{seen}");
    let b = [("backend", rec.addr.as_str()), ("reason", "not_offered")];
    assert_eq!(
        counter(&proxy, "smtp_edge_backend_tls_failures_total", &b),
        1.0
    );
    let proxy = edge(&rec.addr, "tls = \"opportunistic\"").await;
    let r = send(&proxy, "opportunistic").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(rec.messages().len(), 1);
}

/// A pooled TLS connection is reused: the session tickets Postfix sends
/// after the handshake are taken in by the idle check, not read as the
/// backend talking (which would drop the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_tls_connection_is_reused() {
    let p = pki();
    let Some(pf) = postfix(&p, "smtpd_tls_security_level = encrypt").await else {
        return;
    };
    let proxy = edge(
        &pf.addr,
        &format!("tls = \"starttls\"\ntls_ca = \"{}\"", p.ca.display()),
    )
    .await;
    for i in 0..3 {
        let r = send(&proxy, &format!("pooled-{i}")).await;
        assert_eq!(r.code, 250, "{r:?}\n{}", pf.log());
        // Time for the tickets to arrive while the connection is idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(delivered(&pf, 3).await.len(), 3);
    let b = [("backend", pf.addr.as_str())];
    let m = proxy.stats.encode();
    assert_eq!(
        counter(&proxy, "smtp_edge_backend_connections_created_total", &b),
        1.0,
        "{m}"
    );
    assert_eq!(
        counter(&proxy, "smtp_edge_backend_connections_reused_total", &b),
        2.0,
        "{m}"
    );
    assert_eq!(
        counter(&proxy, "smtp_edge_backend_tls_handshakes_total", &b),
        1.0
    );
}
