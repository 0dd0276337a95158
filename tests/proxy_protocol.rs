//! PROXY protocol inbound: behind a real HAProxy (deploy/haproxy/haproxy.cfg,
//! `send-proxy-v2` and `send-proxy`) the original client's address reaches a
//! real Postfix through XFORWARD and is the one the policy judges; HAProxy's
//! `option smtpchk` with `check-send-proxy` (v2 LOCAL) keeps two instances
//! of the binary UP, check after check, with nothing in their log; raw
//! connections for the bad cases (untrusted source, no header, garbage, too
//! long, too slow) are closed without a greeting and counted, while a v2
//! LOCAL or v1 UNKNOWN header is served as the balancer's own session
//! (policy, Received) and counted; TLS (implicit and STARTTLS) starts after
//! the header; a flood of connections that never send a header holds no
//! socket past the header timeout.
//! Skips when haproxy / Postfix are missing (fails under CI=true).
mod common;
mod postfix_instance;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use postfix_instance::Postfix;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A v2 PROXY header for a TCP connection from `client` to `dest`.
fn v2_header(client: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, dest),
    )
    // An unknown TLV, as some balancers send: ignored.
    .write_tlv(0xE7, b"opaque")
    .unwrap()
    .build()
    .unwrap()
}

fn v2_local() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

/// `smtp_edge_proxy_headers_total{result=...}` now.
fn headers(proxy: &Proxy, result: &str) -> u64 {
    let s = parse_metrics(&proxy.stats.encode());
    metric_value(&s, "smtp_edge_proxy_headers_total", &[("result", result)]) as u64
}

/// Waits until the counter reaches `n` (the header task counts after the
/// client sees the close).
async fn wait_headers(proxy: &Proxy, result: &str, n: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while headers(proxy, result) < n {
        assert!(
            Instant::now() < end,
            "{result}: {} < {n}\n{}",
            headers(proxy, result),
            proxy.stats.encode()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything the server sends until it closes (within `t`): closed with
/// nothing said is `Some(empty)`; still open after `t` is None.
async fn said_before_close(s: &mut TcpStream, t: Duration) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let end = tokio::time::Instant::now() + t;
    loop {
        let mut buf = [0u8; 512];
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn edge_toml(backend: &str, trusted: &str, extra: &str, listener_extra: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n{extra}\n[[listener]]\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [{trusted}]\n{listener_extra}\n[[backend]]\naddress = \"{backend}\"\n"
    )
}

/// HAProxy run in the foreground on deploy/haproxy/haproxy.cfg (with
/// `send-proxy-v2` replaced by `version`), with an admin stats socket.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// Both servers pointing at `edge`.
    fn start(edge: SocketAddr, version: &str) -> Option<Haproxy> {
        Haproxy::start_two([edge, edge], version)
    }

    /// Servers edge1 and edge2 pointing at `edges`.
    fn start_two(edges: [SocketAddr; 2], version: &str) -> Option<Haproxy> {
        let bin = require_tool("haproxy")?;
        let dir = tempfile::tempdir().unwrap();
        let cfg = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg"),
        )
        .unwrap();
        assert!(cfg.contains("send-proxy-v2"), "the deploy file sends v2");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg.replace("send-proxy-v2", version)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .env("HAPROXY_BIND", addr.to_string())
            .env("EDGE1", edges[0].to_string())
            .env("EDGE2", edges[1].to_string())
            .env("HAPROXY_STATS", dir.path().join("stats.sock"))
            .env_remove("EDGE1_ADMIN_PORT")
            .env_remove("EDGE2_ADMIN_PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn haproxy");
        wait_port(&addr.to_string());
        Some(Haproxy { child, addr, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// `show stat` on the stats socket: server `name` of backend smtp_edge
    /// as column -> value (status, check_status, check_code, chkfail, ...).
    fn server(&self, name: &str) -> Option<HashMap<String, String>> {
        use std::io::{Read, Write};
        let sock = self.dir.path().join("stats.sock");
        let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let header: Vec<&str> = out
            .lines()
            .next()?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.first() == Some(&"smtp_edge") && f.get(1) == Some(&name)).then(|| {
                header
                    .iter()
                    .zip(f.iter())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_postfix() -> Option<Postfix> {
    match tokio::task::spawn_blocking(|| Postfix::start("")).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// One message from `src` through `addr`; the client's port and the final
/// reply's queue id.
async fn send_from(src: IpAddr, addr: SocketAddr) -> (u16, String) {
    let mut c = Raw::connect_from(src, addr).await;
    let port = c.stream.local_addr().unwrap().port();
    let g = c.reply().await;
    assert_eq!(g.code, 220, "{g:?}");
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    let r = transaction(&mut c, b"Subject: via haproxy\r\n\r\nhi\r\n").await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = r
        .text
        .rsplit_once("queued as ")
        .unwrap()
        .1
        .trim()
        .to_string();
    assert_eq!(c.cmd("QUIT").await.code, 221);
    (port, id)
}

/// Postfix's smtpd line for `qid` shows `orig_client=unknown[ip]:port`.
/// (Postfix writes its log through postlogd: waits up to 5 s for the line.)
async fn assert_orig_client(pf: &Postfix, qid: &str, ip: &str, port: u16) {
    let end = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let found = pf
            .log_of(qid)
            .into_iter()
            .find(|l| l.contains("/smtpd[") && l.contains(" client="));
        match found {
            Some(l) => break l,
            None if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            None => panic!("no client= line for {qid}:\n{}", pf.log()),
        }
    };
    assert!(
        line.contains(&format!(" orig_client=unknown[{ip}]:{port}")),
        "{line}"
    );
}

async fn through_haproxy(version: &str) {
    let Some(pf) = start_postfix().await else {
        return;
    };
    // HAProxy connects from 127.0.0.1, which is trusted and not denied; the
    // clients come from 127.0.0.5 (allowed) and 127.0.0.6 (deny-listed).
    let proxy = Proxy::start(&edge_toml(
        &pf.addr,
        "\"127.0.0.1/32\"",
        "[policy]\ndeny = [\"127.0.0.6/32\"]",
        "",
    ))
    .await;
    let Some(hap) = Haproxy::start(proxy.addr, version) else {
        return;
    };
    let good: IpAddr = "127.0.0.5".parse().unwrap();
    let (port, qid) = send_from(good, hap.addr).await;
    assert_orig_client(&pf, &qid, "127.0.0.5", port).await;

    let mut c = Raw::connect_from("127.0.0.6".parse().unwrap(), hap.addr).await;
    let r = c.reply().await;
    assert_eq!(r.code, 554, "the original address is deny-listed: {r:?}");
    assert!(r.text.starts_with("5.7.1"), "{r:?}");
    let refused = proxy.stats.encode();
    assert!(
        refused.contains("smtp_edge_connections_refused_total{reason=\"deny_list\"} 1"),
        "{refused}"
    );
    // Both clients' headers, and maybe health checks' (HAProxy sends v2
    // health checks as LOCAL, v1 ones as UNKNOWN or with its own address).
    assert!(headers(&proxy, "accepted") >= 2, "{refused}");
    if version == "send-proxy-v2" {
        wait_headers(&proxy, "local", 1).await;
    }
    assert_eq!(headers(&proxy, "malformed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_passes_the_client_to_postfix_and_policy() {
    through_haproxy("send-proxy-v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v1_passes_the_client_to_postfix_and_policy() {
    through_haproxy("send-proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_are_closed_without_a_greeting_and_counted() {
    let backend = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&edge_toml(
        &backend.addr,
        "\"127.0.0.1/32\"",
        "",
        "proxy_header_timeout = 0.5",
    ))
    .await;
    let quiet = Duration::from_secs(3);
    let dest: SocketAddr = "198.51.100.1:25".parse().unwrap();

    // A client speaking SMTP straight away (no header).
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"EHLO client.example\r\n").await.unwrap();
    assert_eq!(said_before_close(&mut s, quiet).await, Some(vec![]));
    // A v2 header claiming 64 KiB of TLVs.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    h.extend_from_slice(&[0; 64]);
    s.write_all(&h).await.unwrap();
    assert_eq!(said_before_close(&mut s, quiet).await, Some(vec![]));
    // A v1 line that never ends.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("PROXY TCP4 {}", "9".repeat(120)).as_bytes())
        .await
        .unwrap();
    assert_eq!(said_before_close(&mut s, quiet).await, Some(vec![]));
    // Half a header, then silence: closed at proxy_header_timeout.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let full = v2_header("192.0.2.7:40000".parse().unwrap(), dest);
    s.write_all(&full[..10]).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(said_before_close(&mut s, quiet).await, Some(vec![]));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // Gone before the header was whole.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
    drop(s);

    wait_headers(&proxy, "closed", 1).await;
    assert_eq!(headers(&proxy, "malformed"), 1);
    assert_eq!(headers(&proxy, "too_long"), 2);
    assert_eq!(headers(&proxy, "timeout"), 1);
    assert_eq!(headers(&proxy, "local"), 0);
    assert_eq!(headers(&proxy, "accepted"), 0);
    assert_eq!(
        backend.connection_count(),
        0,
        "no session reached a backend"
    );

    // A header arriving in pieces, with the client's first command in the
    // same write as its end: both taken, nothing of the command lost.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n";
    s.write_all(&h[..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&h[9..]).await.unwrap();
    let mut c = Raw::from_parts(s, Vec::new());
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    assert_eq!(
        transaction(&mut c, b"Subject: t\r\n\r\nx\r\n").await.code,
        250
    );
    let msg = String::from_utf8_lossy(&backend.messages()[0]).to_string();
    assert!(
        msg.starts_with("Received: from client.example (unknown [192.0.2.7])"),
        "the header's address is the client's: {msg}"
    );
    assert_eq!(headers(&proxy, "accepted"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_sources_are_closed_at_once() {
    let backend = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&edge_toml(
        &backend.addr,
        "\"10.0.0.0/8\", \"127.0.0.9/32\"",
        "",
        "",
    ))
    .await;
    // A perfectly good header, from a source that may not send one.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s
        .write_all(&v2_header(
            "192.0.2.7:40000".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
        ))
        .await;
    assert_eq!(
        said_before_close(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    wait_headers(&proxy, "untrusted", 1).await;
    // A LOCAL header (a health check) from it is no better: closed unread.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(&v2_local()).await;
    let _ = s.write_all(b"EHLO x\r\n").await;
    assert_eq!(
        said_before_close(&mut s, Duration::from_secs(3)).await,
        Some(vec![])
    );
    wait_headers(&proxy, "untrusted", 2).await;
    assert_eq!(headers(&proxy, "local"), 0);
    // From the trusted 127.0.0.9 it works.
    let mut c = Raw::connect_from("127.0.0.9".parse().unwrap(), proxy.addr).await;
    c.send(&v2_header(
        "192.0.2.8:40000".parse().unwrap(),
        "198.51.100.1:25".parse().unwrap(),
    ))
    .await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(headers(&proxy, "accepted"), 1);
}

/// The PROXY protocol spec: a v2 LOCAL or v1 UNKNOWN header makes the
/// receiver "use the real connection endpoints". HAProxy's `option
/// smtpchk` speaks SMTP after it (220, EHLO 250, QUIT 221); the session's
/// client is the balancer itself, judged by the policy like any client
/// (a deny-listed balancer's own session is refused, while the clients it
/// passes on in PROXY headers are not), and named in `Received:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_unknown_headers_are_served_as_the_balancers_own_sessions() {
    let backend = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&edge_toml(
        &backend.addr,
        "\"127.0.0.0/8\"",
        "[policy]\ndeny = [\"127.0.0.7/32\"]",
        "",
    ))
    .await;

    // What HAProxy's smtpchk does after a v2 LOCAL header.
    let mut c = Raw::connect_from("127.0.0.8".parse().unwrap(), proxy.addr).await;
    c.send(&v2_local()).await;
    let g = c.reply().await;
    assert_eq!(g.code, 220, "{g:?}");
    assert_eq!(c.cmd("EHLO x").await.code, 250);
    let q = c.cmd("QUIT").await;
    assert_eq!(q.code, 221, "{q:?}");
    assert!(c.closed(Duration::from_secs(3)).await);
    assert_eq!(headers(&proxy, "local"), 1);

    // v1 UNKNOWN, with the addresses the spec says to ignore, and HELO in
    // the same write: a message goes through, from the socket's peer.
    let mut c = Raw::connect_from("127.0.0.9".parse().unwrap(), proxy.addr).await;
    c.send(b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 40000 25\r\nHELO check.example\r\n")
        .await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.reply().await.code, 250);
    let r = transaction(&mut c, b"Subject: t\r\n\r\nx\r\n").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let msg = String::from_utf8_lossy(&backend.messages()[0]).to_string();
    assert!(
        msg.starts_with("Received: from check.example (unknown [127.0.0.9])"),
        "the socket's peer is the client, not the ignored address: {msg}"
    );
    assert!(!msg.contains("192.0.2.7"), "{msg}");
    assert_eq!(headers(&proxy, "local"), 2);

    // A deny-listed balancer: its own session is refused at connect...
    let denied: IpAddr = "127.0.0.7".parse().unwrap();
    let mut c = Raw::connect_from(denied, proxy.addr).await;
    c.send(&v2_local()).await;
    let r = c.reply().await;
    assert_eq!(r.code, 554, "the balancer's address is judged: {r:?}");
    assert!(r.text.starts_with("5.7.1"), "{r:?}");
    assert!(c.closed(Duration::from_secs(3)).await);
    // ...while a client it passes on is judged by its own address.
    let mut c = Raw::connect_from(denied, proxy.addr).await;
    c.send(&v2_header(
        "192.0.2.7:40000".parse().unwrap(),
        "198.51.100.1:25".parse().unwrap(),
    ))
    .await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let m = proxy.stats.encode();
    assert_eq!(headers(&proxy, "local"), 3, "{m}");
    assert_eq!(headers(&proxy, "accepted"), 1, "{m}");
    assert!(
        m.contains("smtp_edge_connections_refused_total{reason=\"deny_list\"} 1"),
        "{m}"
    );
    for bad in ["malformed", "unsupported", "closed", "timeout"] {
        assert_eq!(headers(&proxy, bad), 0, "{bad}: {m}");
    }
    assert_eq!(backend.messages().len(), 1);
}

/// An instance of the real binary: a PROXY protocol listener trusting
/// 127.0.0.1 (HAProxy), a Maildir backend, `[admin]` for /metrics, its log
/// at the default level (RUST_LOG unset) in a file.
struct Edge {
    _proc: Running,
    smtp: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Edge {
    async fn start() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cfg = dir.path().join("smtp-edge.toml");
        std::fs::write(
            &cfg,
            format!(
                "hostname = \"edge.test\"\n[[listener]]\naddress = \"{smtp}\"\n\
                 proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
                 [[backend]]\nmaildir = \"{}\"\n[admin]\naddress = \"{admin}\"\n",
                dir.path().join("mail").display()
            ),
        )
        .unwrap();
        let proc = Running::listening(
            Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
                .arg("--config")
                .arg(&cfg)
                .env_remove("RUST_LOG"),
            &dir.path().join("log"),
            smtp,
        )
        .await;
        wait_port(&admin.to_string());
        Edge {
            _proc: proc,
            smtp,
            admin,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    async fn headers(&self, result: &str) -> u64 {
        let (code, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(code, 200);
        let s = parse_metrics(&body);
        metric_value(&s, "smtp_edge_proxy_headers_total", &[("result", result)]) as u64
    }
}

/// HAProxy's standard SMTP check as deploy/haproxy/haproxy.cfg ships it
/// without admin ports (`option smtpchk`, `check-send-proxy`,
/// `send-proxy-v2`: a v2 LOCAL header, then 220 / EHLO 250 / QUIT 221),
/// against two instances of the binary: both stay UP with every check
/// passed (L7OK, code 221, no failed check) for five check intervals; each
/// instance counts its checks as `local`; their log, at the default level,
/// gains no line from them (a check every 2 s must not fill the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_smtpchk_over_local_headers_keeps_both_instances_up() {
    if require_tool("haproxy").is_none() {
        return;
    }
    let edges = [Edge::start().await, Edge::start().await];
    let Some(hap) = Haproxy::start_two([edges[0].smtp, edges[1].smtp], "send-proxy-v2") else {
        return;
    };
    let names = ["edge1", "edge2"];
    let stat = |name: &str| {
        hap.server(name)
            .unwrap_or_else(|| panic!("no `show stat` line for {name}:\n{}", hap.log()))
    };
    // The stats socket comes with the listeners; give it a moment.
    let end = Instant::now() + Duration::from_secs(5);
    while hap.server("edge1").is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // inter 2 s, fall 2: a failing check would show within 2 s (chkfail)
    // and take the server DOWN within 4 s. HAProxy starts a server as
    // "UP 1/2" (up, not yet confirmed by a check); the first passed check
    // makes it "UP". Watch five intervals.
    let end = Instant::now() + Duration::from_secs(11);
    while Instant::now() < end {
        for name in names {
            let st = stat(name);
            assert!(
                st["status"].starts_with("UP"),
                "{name}: {st:?}\n{}",
                hap.log()
            );
            assert_eq!(st["chkfail"], "0", "{name}: {st:?}\n{}", hap.log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (name, edge) in names.iter().zip(&edges) {
        let st = stat(name);
        assert_eq!(st["status"], "UP", "{name}: {st:?}\n{}", hap.log());
        assert_eq!(st["check_status"], "L7OK", "{name}: {st:?}");
        assert_eq!(st["check_code"], "221", "{name}: {st:?}");
        let local = edge.headers("local").await;
        assert!(local >= 4, "{name}: {local} checks in five intervals");
        assert_eq!(edge.headers("malformed").await, 0);
        eprintln!(
            "{name}: UP, {st:?}, {local} LOCAL sessions",
            st = st["check_status"]
        );
    }
    for edge in &edges {
        let log = edge.log();
        assert!(
            !log.contains(" WARN ") && !log.contains(" ERROR "),
            "the checks logged a warning:\n{log}"
        );
        // Only the start's lines ("runtime", "listening").
        let other: Vec<_> = log
            .lines()
            .filter(|l| !l.contains(" listening ") && !l.contains(" runtime "))
            .collect();
        assert!(
            other.is_empty(),
            "the checks logged at the default level: {other:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_starts_after_the_header() {
    let backend = Recorder::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(dir.path(), "edge.test");
    let tls = format!(
        "[tls]\ncertificate = \"{}\"\nprivate_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let header = v2_header(
        "192.0.2.7:40000".parse().unwrap(),
        "198.51.100.1:465".parse().unwrap(),
    );
    for mode in ["implicit", "starttls"] {
        let proxy = Proxy::start(&edge_toml(
            &backend.addr,
            "\"127.0.0.1/32\"",
            &tls,
            &format!("tls = \"{mode}\""),
        ))
        .await;
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&header).await.unwrap();
        let s = if mode == "starttls" {
            let mut c = Raw::from_parts(s, Vec::new());
            assert_eq!(c.reply().await.code, 220);
            assert_eq!(c.cmd("EHLO client.example").await.code, 250);
            assert_eq!(c.cmd("STARTTLS").await.code, 220);
            let (s, rest) = c.into_parts();
            assert!(rest.is_empty());
            s
        } else {
            s
        };
        let tls = tls_client(s, &cert).await;
        let mut c = Raw::from_parts(tls, Vec::new());
        if mode == "implicit" {
            assert_eq!(c.reply().await.code, 220);
        }
        assert_eq!(c.cmd("EHLO client.example").await.code, 250, "{mode}");
        assert_eq!(
            transaction(&mut c, b"Subject: t\r\n\r\nx\r\n").await.code,
            250,
            "{mode}"
        );
        assert_eq!(headers(&proxy, "accepted"), 1);
    }
    for m in backend.messages() {
        let m = String::from_utf8_lossy(&m).to_string();
        assert!(m.contains("[192.0.2.7]"), "{m}");
        assert!(m.contains("with ESMTPS"), "{m}");
    }
}

/// A TLS client trusting `cert` for edge.test.
async fn tls_client(s: TcpStream, cert: &Path) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    conn.connect("edge.test".try_into().unwrap(), s)
        .await
        .expect("TLS handshake after the PROXY header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_without_headers_holds_no_socket() {
    let backend = Recorder::start(Script::default()).await;
    let proxy = Proxy::start(&edge_toml(
        &backend.addr,
        "\"127.0.0.1/32\"",
        "",
        "proxy_header_timeout = 2\nbacklog = 64",
    ))
    .await;
    // 300 connections that never speak: at most 64 wait for a header (the
    // backlog), the others are closed at once; all are closed by the
    // timeout. The timeout is long enough that all 300 are in before the
    // first 64 time out and give their places to later ones (a loaded
    // 2-core machine once took over 0.5 s to connect them: 128 timeouts).
    let mut socks = Vec::new();
    let connecting = Instant::now();
    for _ in 0..300 {
        socks.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let connecting = connecting.elapsed();
    let t0 = Instant::now();
    for s in &mut socks {
        assert_eq!(
            said_before_close(s, Duration::from_secs(5)).await,
            Some(vec![])
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    wait_headers(&proxy, "timeout", 1).await;
    let timeouts = headers(&proxy, "timeout");
    let busy = headers(&proxy, "busy");
    assert_eq!(timeouts + busy, 300, "timeouts {timeouts} busy {busy}");
    if connecting < Duration::from_millis(1500) {
        assert!(
            timeouts <= 64,
            "{timeouts} (connecting took {connecting:?})"
        );
    }
    // And a real session is served right after.
    let mut c = Raw::connect(proxy.addr).await;
    c.send(&v2_header(
        "192.0.2.7:40000".parse().unwrap(),
        "198.51.100.1:25".parse().unwrap(),
    ))
    .await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
}
