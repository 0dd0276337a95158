//! TLS certificates and session resumption with real parts: certificates
//! made by rcgen (RSA-2048 and ECDSA P-256) in a scratch directory, the
//! proxy in process, and a tokio-rustls client whose offered signature
//! schemes, protocol versions and SNI are set per test. The client records
//! nothing itself: the certificate it got is `peer_certificates()[0]`, the
//! handshake kind `handshake_kind()`. Also: `/metrics` counts resumed
//! handshakes, a reload serves the new certificate and keeps the session
//! state, `check-config` names a mismatched key and both forms with key and
//! line, and `openssl s_client -starttls smtp -sess_out/-sess_in` resumes
//! (the tool is required when CI=true).
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind, SignatureScheme};
use smtp_load::tls::AcceptAnyCert;
use tokio::net::TcpStream;

use common::{http_get, metric_value, parse_metrics, require_tool, Proxy, Raw};

const ECDSA: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];
const RSA: &[SignatureScheme] = &[
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// A certificate written to disk: its files and its DER (what a client
/// should get).
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

/// A self-signed certificate for `names` with a new RSA-2048 or ECDSA
/// P-256 key, written as `<stem>.crt` / `<stem>.key` in `dir`.
fn cert(dir: &Path, stem: &str, rsa: bool, names: &[&str]) -> Cert {
    let key = if rsa {
        rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
    } else {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
    }
    .unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let c = params.self_signed(&key).unwrap();
    let out = Cert {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
        der: c.der().to_vec(),
    };
    std::fs::write(&out.cert, c.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

/// `[[tls.certificates]]` for `c`, with `names` when given.
fn entry(c: &Cert, names: Option<&str>) -> String {
    format!(
        "[[tls.certificates]]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n{}",
        c.cert.display(),
        c.key.display(),
        names.map(|n| format!("names = {n}\n")).unwrap_or_default()
    )
}

/// One implicit-TLS and one STARTTLS listener, an admin listener, a Maildir
/// backend, and `tls` (the `[tls]` table and its entries).
fn config(tls: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [admin]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\nmaildir = \"{{DIR}}/mail\"\n{tls}\n"
    )
}

/// A client offering `schemes` (all the provider's when empty) over
/// `versions`; it keeps sessions for resumption (rustls' default cache).
fn client(schemes: &[SignatureScheme], tls12_only: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::offering(provider, schemes)))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// What one connection saw.
#[derive(Debug)]
struct Seen {
    leaf: Vec<u8>,
    kind: HandshakeKind,
    version: rustls::ProtocolVersion,
}

/// Connects to the implicit-TLS listener (`sni` None: an IP address, so no
/// SNI is sent), reads the greeting (which also takes in the session
/// tickets sent after the handshake), says QUIT.
async fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>, sni: Option<&str>) -> Seen {
    let tcp = TcpStream::connect(addr).await.unwrap();
    handshake(tcp, cfg, sni, true).await
}

/// Connects to the STARTTLS listener, says EHLO and STARTTLS, then as
/// `connect`.
async fn connect_starttls(addr: SocketAddr, cfg: &Arc<ClientConfig>, sni: Option<&str>) -> Seen {
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    assert_eq!(c.cmd("STARTTLS").await.code, 220);
    let (tcp, rest) = c.into_parts();
    assert!(rest.is_empty());
    handshake(tcp, cfg, sni, false).await
}

async fn handshake(
    tcp: TcpStream,
    cfg: &Arc<ClientConfig>,
    sni: Option<&str>,
    greeting: bool,
) -> Seen {
    let name: ServerName<'static> = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (_, conn) = tls.get_ref();
    let seen = Seen {
        leaf: conn.peer_certificates().unwrap()[0].to_vec(),
        kind: conn.handshake_kind().unwrap(),
        version: conn.protocol_version().unwrap(),
    };
    let mut c = Raw::from_parts(tls, Vec::new());
    if greeting {
        assert_eq!(c.reply().await.code, 220);
    } else {
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    }
    assert_eq!(c.cmd("QUIT").await.code, 221);
    seen
}

/// The resumed and successful handshakes /metrics reports.
async fn handshakes(p: &Proxy) -> (f64, f64) {
    let (status, body) = http_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let s = parse_metrics(&body);
    (
        metric_value(&s, "smtp_edge_tls_resumed_total", &[]),
        metric_value(&s, "smtp_edge_tls_handshakes_total", &[("outcome", "ok")]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_schemes_pick_rsa_or_ecdsa() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = cert(dir.path(), "rsa", true, &["mx.test"]);
    let ec = cert(dir.path(), "ec", false, &["mx.test"]);
    let p = Proxy::start(&config(&format!(
        "{}{}",
        entry(&rsa, None),
        entry(&ec, None)
    )))
    .await;
    let implicit = p.addrs[0];
    for tls12 in [false, true] {
        for sni in [Some("mx.test"), None] {
            let s = connect(implicit, &client(ECDSA, tls12), sni).await;
            assert!(
                s.leaf == ec.der,
                "ECDSA-only client, tls12 {tls12}, {sni:?}: not the ECDSA certificate"
            );
            let s = connect(implicit, &client(RSA, tls12), sni).await;
            assert!(
                s.leaf == rsa.der,
                "RSA-only client, tls12 {tls12}, {sni:?}: not the RSA certificate"
            );
            // Both offered: the first in the file.
            let s = connect(implicit, &client(&[], tls12), sni).await;
            assert!(s.leaf == rsa.der, "both offered, tls12 {tls12}, {sni:?}");
            let want = if tls12 {
                rustls::ProtocolVersion::TLSv1_2
            } else {
                rustls::ProtocolVersion::TLSv1_3
            };
            assert_eq!(s.version, want);
        }
    }
    // After STARTTLS too.
    let s = connect_starttls(p.addrs[1], &client(ECDSA, false), Some("mx.test")).await;
    assert!(s.leaf == ec.der);
    let s = connect_starttls(p.addrs[1], &client(RSA, true), Some("mx.test")).await;
    assert!(s.leaf == rsa.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_by_name_with_a_default() {
    let dir = tempfile::tempdir().unwrap();
    // Names from the subjectAltName, and from `names` (a wildcard).
    let a = cert(dir.path(), "a", false, &["a.test"]);
    let b = cert(dir.path(), "b", false, &["b.test", "mx.b.test"]);
    let c = cert(dir.path(), "c", true, &["unrelated.test"]);
    let c_ec = cert(dir.path(), "c-ec", false, &["unrelated.test"]);
    let tls = format!(
        "{}{}{}{}",
        entry(&a, None),
        entry(&b, None),
        entry(&c, Some("[\"*.c.test\"]")),
        entry(&c_ec, Some("[\"*.c.test\"]"))
    );
    let p = Proxy::start(&config(&tls)).await;
    let addr = p.addrs[0];
    let any = client(&[], false);
    for (sni, want, what) in [
        (Some("a.test"), &a, "a"),
        (Some("b.test"), &b, "b"),
        (Some("MX.B.test"), &b, "b by its second name"),
        (Some("x.c.test"), &c, "c by wildcard"),
        (Some("unknown.test"), &a, "default for an unknown name"),
        (Some("c.test"), &a, "a wildcard covers one label, not none"),
        (None, &a, "default without SNI"),
    ] {
        let s = connect(addr, &any, sni).await;
        assert!(s.leaf == want.der, "{sni:?}: want {what}");
    }
    // By name first, then by key type among that name's pairs.
    let s = connect(addr, &client(ECDSA, false), Some("y.c.test")).await;
    assert!(s.leaf == c_ec.der, "y.c.test, ECDSA only");
    // A name whose only pair does not fit the client: the default that does.
    let only_rsa = cert(dir.path(), "r", true, &["rsa.test"]);
    let p2 = Proxy::start(&config(&format!(
        "{}{}",
        entry(&only_rsa, None),
        entry(&a, None)
    )))
    .await;
    let s = connect(p2.addrs[0], &client(ECDSA, false), Some("rsa.test")).await;
    assert!(
        s.leaf == a.der,
        "rsa.test, ECDSA only: the first pair that fits"
    );
}

/// Two connections with the same client config: the second resumes.
async fn resumes(addr: SocketAddr, tls12: bool, starttls: bool) -> (Seen, Seen) {
    let cfg = client(&[], tls12);
    let go = |cfg| async move {
        if starttls {
            connect_starttls(addr, &cfg, Some("mx.test")).await
        } else {
            connect(addr, &cfg, Some("mx.test")).await
        }
    };
    let first = go(cfg.clone()).await;
    let second = go(cfg).await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ec = cert(dir.path(), "ec", false, &["mx.test"]);
    let short = format!(
        "certificate = \"{}\"\nprivate_key = \"{}\"\n",
        ec.cert.display(),
        ec.key.display()
    );
    for (settings, resumed) in [
        // Defaults: tickets and a cache.
        ("", true),
        // Tickets only.
        ("session_cache_size = 0\n", true),
        // The cache only (TLS 1.3: stateful tickets; 1.2: session ids).
        ("session_tickets = false\n", true),
        ("session_tickets = false\nsession_cache_size = 0\n", false),
    ] {
        let p = Proxy::start(&config(&format!("[tls]\n{short}{settings}"))).await;
        let mut want = 0.0;
        for (tls12, starttls) in [(false, false), (true, false), (false, true), (true, true)] {
            let addr = p.addrs[usize::from(starttls)];
            let (a, b) = resumes(addr, tls12, starttls).await;
            let what = format!("{settings:?} tls12 {tls12} starttls {starttls}");
            assert_eq!(a.kind, HandshakeKind::Full, "{what}");
            let kind = if resumed {
                HandshakeKind::Resumed
            } else {
                HandshakeKind::Full
            };
            assert_eq!(b.kind, kind, "{what}");
            assert!(b.leaf == ec.der, "{what}");
            if resumed {
                want += 1.0;
            }
            assert_eq!(handshakes(&p).await.0, want, "{what}");
        }
        assert_eq!(handshakes(&p).await.1, 8.0, "{settings:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_the_new_certificates_and_keeps_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let old = cert(dir.path(), "old", false, &["mx.test"]);
    let new_ec = cert(dir.path(), "new-ec", false, &["mx.test"]);
    let new_rsa = cert(dir.path(), "new-rsa", true, &["mx.test"]);
    let short = |c: &Cert, extra: &str| {
        config(&format!(
            "[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n{extra}",
            c.cert.display(),
            c.key.display()
        ))
    };
    let p = Proxy::start(&short(&old, "")).await;
    let addr = p.addrs[0];
    let cfg = client(&[], false);
    assert!(connect(addr, &cfg, Some("mx.test")).await.leaf == old.der);
    // The same files, renewed in place: read again at reload.
    let renewed = cert(dir.path(), "old", false, &["mx.test"]);
    p.reload(&short(&renewed, "")).expect("reload");
    let fresh = client(&[], false);
    assert!(connect(addr, &fresh, Some("mx.test")).await.leaf == renewed.der);
    // To the list form, RSA and ECDSA.
    p.reload(&config(&format!(
        "{}{}",
        entry(&new_rsa, None),
        entry(&new_ec, None)
    )))
    .expect("reload");
    assert!(connect(addr, &client(ECDSA, false), None).await.leaf == new_ec.der);
    assert!(connect(addr, &client(RSA, false), None).await.leaf == new_rsa.der);
    // Session settings unchanged through both reloads: the session of the
    // first connection still resumes.
    let s = connect(addr, &cfg, Some("mx.test")).await;
    assert_eq!(s.kind, HandshakeKind::Resumed);
    // Changed settings: new ticket keys and a new cache, so a session from
    // before is not resumed (a full handshake), and is resumed after.
    p.reload(&config(&format!(
        "[tls]\nsession_cache_size = 100\n{}",
        entry(&new_ec, None)
    )))
    .expect("reload");
    let s = connect(addr, &cfg, Some("mx.test")).await;
    assert_eq!(s.kind, HandshakeKind::Full);
    assert!(s.leaf == new_ec.der);
    let s = connect(addr, &cfg, Some("mx.test")).await;
    assert_eq!(s.kind, HandshakeKind::Resumed);
    // A key that breaks between validation and the reload (as SIGHUP runs
    // them) refuses the reload, naming the key, and changes nothing.
    let text = config(&entry(&new_rsa, None)).replace("{DIR}", &p.dir.path().display().to_string());
    let valid = smtp_edge::config::Config::parse(&text).unwrap();
    std::fs::write(&new_rsa.key, "garbage\n").unwrap();
    let e = p.reloader.reload(&valid).unwrap_err();
    assert!(e.contains("tls.certificates[0].private_key"), "{e}");
    assert!(connect(addr, &fresh, None).await.leaf == new_ec.der);
}

const BIN: &str = env!("CARGO_BIN_EXE_smtp-edge");

#[test]
fn check_config_names_a_mismatched_key_and_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let a = cert(dir.path(), "a", false, &["a.test"]);
    let b = cert(dir.path(), "b", true, &["b.test"]);
    let run = |text: &str| {
        let path = dir.path().join("smtp-edge.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let head = "[[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"starttls\"\n[[backend]]\naddress = \"a:25\"\n[tls]\n";
    // Line 12: the second entry's private_key, a's key for b's certificate.
    let mismatch = format!(
        "{head}{}[[tls.certificates]]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
        entry(&a, None),
        b.cert.display(),
        a.key.display()
    );
    let err = run(&mismatch);
    assert!(
        err.contains("line 12: key `tls.certificates[1].private_key`")
            && err.contains("does not match the certificate"),
        "{err}"
    );
    let both = format!(
        "{head}certificate = \"{}\"\nprivate_key = \"{}\"\n{}",
        a.cert.display(),
        a.key.display(),
        entry(&b, None)
    );
    let err = run(&both);
    assert!(
        err.contains("line 9: key `tls.certificates`") && err.contains("not both"),
        "{err}"
    );
    let unreadable = format!(
        "{head}certificate = \"{}\"\nprivate_key = \"{}/nothing.key\"\n",
        a.cert.display(),
        dir.path().display()
    );
    let err = run(&unreadable);
    assert!(
        err.contains("line 8: key `tls.private_key`") && err.contains("nothing.key"),
        "{err}"
    );
}

/// `openssl s_client -starttls smtp` through the STARTTLS listener; stdin
/// says QUIT. Returns its stdout.
fn s_client(openssl: &Path, addr: SocketAddr, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new(openssl)
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-starttls",
            "smtp",
        ])
        .args(["-servername", "mx.test", "-crlf", "-ign_eof"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // After a moment, so the greeting and tickets are read first.
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    stdin.write_all(b"QUIT\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_picks_by_sigalgs_and_resumes() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rsa = cert(dir.path(), "rsa", true, &["mx.test"]);
    let ec = cert(dir.path(), "ec", false, &["mx.test"]);
    let p = Proxy::start(&config(&format!(
        "{}{}",
        entry(&rsa, None),
        entry(&ec, None)
    )))
    .await;
    let addr = p.addrs[1];
    let run = move |args: Vec<String>| {
        let openssl = openssl.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            s_client(&openssl, addr, &a)
        })
    };
    let out = run(vec!["-sigalgs".into(), "ecdsa_secp256r1_sha256".into()])
        .await
        .unwrap();
    assert!(out.contains("Server public key is 256 bit"), "{out}");
    let out = run(vec!["-sigalgs".into(), "rsa_pss_rsae_sha256".into()])
        .await
        .unwrap();
    assert!(out.contains("Server public key is 2048 bit"), "{out}");
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = dir.path().join(format!("sess{version}"));
        let sess = sess.display().to_string();
        let out = run(vec![version.into(), "-sess_out".into(), sess.clone()])
            .await
            .unwrap();
        assert!(out.contains("221 "), "{version}: {out}");
        assert!(out.contains("\nNew, TLSv1."), "{version}: {out}");
        let out = run(vec![version.into(), "-sess_in".into(), sess])
            .await
            .unwrap();
        assert!(out.contains("\nReused, TLSv1."), "{version}: {out}");
    }
    let (resumed, ok) = handshakes(&p).await;
    assert_eq!((resumed, ok), (2.0, 6.0));
}

// ------------------------------------------- the end of a TLS session, SMTPUTF8

type TlsRaw = Raw<tokio_rustls::client::TlsStream<TcpStream>>;

/// An implicit-TLS (`addrs[0]`) and a STARTTLS (`addrs[1]`) listener with
/// the default self-signed certificate, relaying to the Recorder `rec`;
/// `extra` goes before the tables (e.g. `[limits]`).
async fn relay_proxy(rec: &common::Recorder, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "hostname = \"edge.test\"\n{extra}\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[backend]]\naddress = \"{}\"\n",
        rec.addr
    ))
    .await
}

/// A TLS session with `p`, greeted: implicit TLS, or STARTTLS after an EHLO
/// (the client must EHLO again).
async fn tls_session(p: &Proxy, implicit: bool) -> TlsRaw {
    let tcp = if implicit {
        TcpStream::connect(p.addrs[0]).await.unwrap()
    } else {
        let mut c = Raw::greeted(p.addrs[1]).await;
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
        assert_eq!(c.cmd("STARTTLS").await.code, 220);
        let (tcp, rest) = c.into_parts();
        assert!(rest.is_empty());
        tcp
    };
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(client(&[], false))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let mut c = Raw::from_parts(tls, Vec::new());
    if implicit {
        assert_eq!(c.reply().await.code, 220);
    }
    c
}

/// Reads the session to its end, which must be clean: rustls reads `Ok(0)`
/// only after the peer's close_notify; a TCP close without one is an
/// `UnexpectedEof` error (what Exim logs as "TLS connection was
/// non-properly terminated", OpenSSL and Python as "unexpected eof").
async fn assert_clean_end(c: &mut TlsRaw, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let t = std::time::Duration::from_secs(5);
    match tokio::time::timeout(t, c.stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => assert!(
            rest.is_empty(),
            "{what}: more after the last reply: {rest:?}"
        ),
        Ok(Err(e)) => panic!("{what}: the TLS session ended without close_notify: {e}"),
        Err(_) => panic!("{what}: the session was not closed within {t:?}"),
    }
}

/// Every way the proxy ends an inbound TLS session ends it with a
/// close_notify, implicit TLS and STARTTLS alike: the 221 to QUIT (after a
/// message), its 421 for too many errors, its 421 at the command timeout,
/// and its 421 at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_ends_every_tls_session() {
    let rec = common::Recorder::start(common::Script::default()).await;
    let p = relay_proxy(
        &rec,
        "[limits]\nmax_bad_commands = 2\n[timeouts]\ncommand = 1.0\n",
    )
    .await;
    for implicit in [true, false] {
        let mode = if implicit { "implicit TLS" } else { "STARTTLS" };
        let mut c = tls_session(&p, implicit).await;
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
        let r = common::transaction(&mut c, b"Subject: t\r\n\r\nhi\r\n").await;
        assert_eq!(r.raw, "250 2.0.0 Ok: queued\r\n", "{mode}");
        assert_eq!(c.cmd("QUIT").await.raw, "221 2.0.0 Bye\r\n", "{mode}");
        assert_clean_end(&mut c, &format!("{mode}, QUIT")).await;

        let mut c = tls_session(&p, implicit).await;
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
        for _ in 0..3 {
            assert_eq!(c.cmd("BOGUS").await.code, 502);
        }
        let r = c.reply().await;
        assert!(r.raw.starts_with("421 4.7.0 "), "{mode}: {r:?}");
        assert_clean_end(&mut c, &format!("{mode}, too many errors")).await;

        let mut c = tls_session(&p, implicit).await;
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
        let r = c.reply().await;
        assert!(r.raw.starts_with("421 4.4.2 "), "{mode}: {r:?}");
        assert_clean_end(&mut c, &format!("{mode}, command timeout")).await;
    }
    // Shutdown: an idle session of each kind gets 421 and a clean end.
    let mut idle = Vec::new();
    for implicit in [true, false] {
        let mut c = tls_session(&p, implicit).await;
        assert_eq!(c.cmd("EHLO client.test").await.code, 250);
        idle.push(c);
    }
    let stop = tokio::spawn(p.stop());
    for c in &mut idle {
        let r = c.reply().await;
        assert!(r.raw.starts_with("421 4.3.2 "), "{r:?}");
        assert_clean_end(c, "shutdown").await;
    }
    stop.await.unwrap();
    assert_eq!(rec.messages().len(), 2);
}

/// Python's `ssl` with `suppress_ragged_eofs=False` (it raises
/// `SSLEOFError` "EOF occurred in violation of protocol" on a TCP close
/// without close_notify) reads a clean end after the 221, over implicit
/// TLS and STARTTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_reads_a_clean_end_after_quit() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    const SCRIPT: &str = r#"
import socket, ssl, sys
port, mode = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
buf = b""
def reply(s):
    global buf
    while True:
        lines = buf.split(b"\r\n")
        for i, l in enumerate(lines[:-1]):
            if l[3:4] != b"-":
                buf = b"\r\n".join(lines[i + 1:])
                return l
        d = s.recv(4096)
        if not d:
            raise SystemExit("eof before a reply")
        buf += d
s = socket.create_connection(("127.0.0.1", port), timeout=10)
if mode == "starttls":
    assert reply(s).startswith(b"220")
    s.sendall(b"EHLO py.test\r\n"); assert reply(s).startswith(b"250")
    s.sendall(b"STARTTLS\r\n"); assert reply(s).startswith(b"220")
t = ctx.wrap_socket(s, suppress_ragged_eofs=False)
if mode == "implicit":
    assert reply(t).startswith(b"220")
t.sendall(b"EHLO py.test\r\n"); assert reply(t).startswith(b"250")
t.sendall(b"QUIT\r\n"); print(reply(t).decode())
try:
    while t.recv(4096):
        pass
    print("clean end")
except ssl.SSLError as e:
    print("no close_notify:", e)
"#;
    let rec = common::Recorder::start(common::Script::default()).await;
    let p = relay_proxy(&rec, "").await;
    for (mode, addr) in [("implicit", p.addrs[0]), ("starttls", p.addrs[1])] {
        let python = python.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(python)
                .args(["-c", SCRIPT, &addr.port().to_string(), mode])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("221 2.0.0 Bye\nclean end"),
            "{mode}: {text}{err}"
        );
    }
}

/// The `with` protocol of the proxy's Received header is `UTF8SMTP` /
/// `UTF8SMTPS` (RFC 6531 section 3.7.3) for a transaction whose MAIL had
/// SMTPUTF8, `ESMTP` / `ESMTPS` for the others of the same session; the
/// rest of the header is the same. The bytes the backend got, DATA and BDAT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_transactions_are_received_with_utf8smtp() {
    let rec = common::Recorder::start(common::Script::default()).await;
    let p = relay_proxy(&rec, "").await;

    async fn send<S>(c: &mut Raw<S>, utf8: bool, bdat: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (from, to) = if utf8 {
            (
                "MAIL FROM:<jörg@bücher.example> SMTPUTF8",
                "RCPT TO:<ünï@example.net>",
            )
        } else {
            ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>")
        };
        assert_eq!(c.cmd(from).await.code, 250);
        assert_eq!(c.cmd(to).await.code, 250);
        let body = "Subject: ü\r\n\r\nhi\r\n";
        if bdat {
            c.send(format!("BDAT {} LAST\r\n{body}", body.len()).as_bytes())
                .await;
        } else {
            assert_eq!(c.cmd("DATA").await.code, 354);
            c.send(format!("{body}.\r\n").as_bytes()).await;
        }
        assert_eq!(c.reply().await.code, 250);
    }

    let mut c = Raw::greeted(p.addrs[1]).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    send(&mut c, true, false).await;
    send(&mut c, false, false).await;
    send(&mut c, true, true).await;
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let mut t = tls_session(&p, false).await;
    assert_eq!(t.cmd("EHLO client.test").await.code, 250);
    send(&mut t, true, false).await;
    send(&mut t, false, true).await;
    send(&mut t, true, true).await;
    assert_eq!(t.cmd("QUIT").await.code, 221);

    // The header up to the date.
    let head = |m: &Vec<u8>| {
        let m = String::from_utf8_lossy(m).into_owned();
        m[..m.find(";\r\n\t").expect("Received header")].to_string()
    };
    let msgs: Vec<String> = rec.messages().iter().map(head).collect();
    assert_eq!(msgs.len(), 6, "{msgs:#?}");
    let words = [
        "UTF8SMTP",
        "ESMTP",
        "UTF8SMTP",
        "UTF8SMTPS",
        "ESMTPS",
        "UTF8SMTPS",
    ];
    for (m, w) in msgs.iter().zip(words) {
        assert!(
            m.contains(&format!("\r\n\tby edge.test (smtp-edge) with {w}")),
            "not `with {w}`: {m:?}"
        );
    }
    assert_eq!(msgs[0].replace("UTF8SMTP", "ESMTP"), msgs[1]);
    assert_eq!(msgs[2], msgs[0]);
    assert_eq!(msgs[3].replace("UTF8SMTPS", "ESMTPS"), msgs[4]);
    assert_eq!(msgs[5], msgs[3]);
    assert!(
        msgs[3].contains("UTF8SMTPS\r\n\t(using TLSv1.3 with cipher "),
        "{msgs:#?}"
    );
}
