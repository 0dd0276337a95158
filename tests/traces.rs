//! OpenTelemetry traces as an operator receives them: the real binary
//! exports over OTLP/gRPC and OTLP/HTTP to a real receiver in the test; the
//! span tree of a session (smtp.session > tls.handshake, smtp.transaction >
//! smtp.backend), its attributes, and the trace id in the delivered
//! message's Received header; a collector that answers slowly never slows
//! mail, and what cannot be queued is dropped and counted.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::otlp::{Got, Receiver};
use common::*;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

struct Edge {
    _proc: Running,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Edge {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn start_edge(backend: &str, telemetry: &str) -> Edge {
    start_edge_with(backend, telemetry, "", "info").await
}

async fn start_edge_with(backend: &str, telemetry: &str, extra: &str, level: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.path().join("smtp-edge.toml");
    std::fs::write(
        &file,
        format!(
            "hostname = \"edge.test\"\n{extra}\n[telemetry]\n{telemetry}\n[admin]\naddress = \"{admin}\"\n[[listener]]\naddress = \"{addr}\"\ntls = \"starttls\"\n[[backend]]\naddress = \"{backend}\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("smtp-edge.log");
    let proc = Running::edge(&file, level, &log, addr).await;
    Edge {
        _proc: proc,
        addr,
        admin,
        _dir: dir,
        log,
    }
}

async fn plain_message(addr: SocketAddr, subject: &str) {
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO traced.client.test").await.code, 250);
    let body = format!("Subject: {subject}\r\n\r\n{subject}\r\n");
    assert_eq!(transaction(&mut c, body.as_bytes()).await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);
}

async fn starttls_message(addr: SocketAddr, subject: &str) {
    let tls = TlsParameters::builder("edge.test".into())
        .dangerous_accept_invalid_certs(true)
        .build()
        .unwrap();
    let mailer: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(addr.port())
            .tls(Tls::Required(tls))
            .hello_name(ClientId::Domain("tls.client.test".into()))
            .build();
    let m = Message::builder()
        .from("a@client.example".parse().unwrap())
        .to("b@example.org".parse().unwrap())
        .subject(subject)
        .body("tls body\n".to_string())
        .unwrap();
    let r = mailer.send(m).await.expect("lettre STARTTLS send");
    assert_eq!(r.code().to_string(), "250");
}

fn by_id<'a>(spans: &'a [Got], id: &str) -> Option<&'a Got> {
    spans.iter().find(|s| s.span_id == id)
}

/// The `id` of the smtp-edge Received header in a recorded message.
fn received_id(msg: &[u8]) -> String {
    let text = String::from_utf8_lossy(msg);
    let head: String = text.split("\r\n").take(3).collect::<Vec<_>>().join(" ");
    let i = head
        .find(") with ")
        .unwrap_or_else(|| panic!("no Received: {head}"));
    head[i..]
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .map(|w| w.trim_end_matches(';').to_string())
        .unwrap_or_else(|| panic!("no id in {head}"))
}

async fn tree_over(rx: Receiver, protocol: &str) {
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge(
        &rec.addr,
        &format!(
            "otlp_endpoint = \"{}\"\notlp_protocol = \"{protocol}\"\nservice_name = \"edge-under-test\"",
            rx.endpoint
        ),
    )
    .await;
    plain_message(edge.addr, "plain").await;
    starttls_message(edge.addr, "tls").await;
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter()
                .filter(|x| x.name == "smtp.session" && x.attr("smtp.helo").is_some())
                .count()
                >= 2
                && s.iter().filter(|x| x.name == "smtp.backend").count() >= 2
        })
        .await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    // Sessions that said EHLO (the start-up probe of the port only connects).
    let sessions: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "smtp.session" && s.attr("smtp.helo").is_some())
        .collect();
    assert_eq!(sessions.len(), 2, "{names:?}\n{}", edge.log());
    for s in &sessions {
        assert_eq!(s.parent, "", "a session is a root span");
        assert_eq!(s.service, "edge-under-test");
        assert_eq!(s.attr("client.address"), Some("127.0.0.1"), "{s:?}");
        assert_eq!(s.attr("network.transport"), Some("tcp"));
        assert_eq!(
            s.attr("server.port"),
            Some(edge.addr.port().to_string().as_str())
        );
        // Numbers are integers, not their text.
        for k in ["client.port", "server.port"] {
            assert!(s.ints.iter().any(|i| i == k), "{k}: {s:?}");
        }
    }
    for t in spans.iter().filter(|s| s.name == "smtp.transaction") {
        let parent = by_id(&spans, &t.parent).expect("transaction's parent received");
        assert_eq!(parent.name, "smtp.session");
        assert_eq!(t.trace_id, parent.trace_id);
        assert_eq!(t.attr("smtp.reply.code"), Some("250"), "{t:?}");
        let domain = t.attr("smtp.mail_from.domain");
        assert!(
            matches!(domain, Some("example.org") | Some("client.example")),
            "{t:?}"
        );
        assert!(
            t.attr("smtp.mail_from").is_none(),
            "addresses are off by default"
        );
        assert_eq!(t.attr("server.address"), Some(rec.addr.as_str()));
        assert_eq!(t.attr("smtp.rcpt.count"), Some("1"), "{t:?}");
        assert!(
            t.attr("smtp.message.size")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n > 0),
            "{t:?}"
        );
        let enh = t.attr("smtp.reply.enhanced_code").unwrap_or_default();
        assert!(
            enh.split('.').count() == 3 && enh.split('.').all(|p| p.parse::<u16>().is_ok()),
            "{t:?}"
        );
        for k in ["smtp.reply.code", "smtp.rcpt.count", "smtp.message.size"] {
            assert!(t.ints.iter().any(|i| i == k), "{k}: {t:?}");
        }
        assert!(t.attr("error.type").is_none(), "{t:?}");
        assert!(t.attr("target").is_none(), "no target attribute: {t:?}");
    }
    let backends: Vec<&Got> = spans.iter().filter(|s| s.name == "smtp.backend").collect();
    assert_eq!(backends.len(), 2, "{names:?}");
    for b in &backends {
        let parent = by_id(&spans, &b.parent).expect("backend span's parent received");
        assert_eq!(parent.name, "smtp.transaction", "{b:?}");
        assert_eq!(b.attr("server.address"), Some(rec.addr.as_str()));
        assert_eq!(b.attr("smtp.backend.group"), Some("default"), "{b:?}");
        assert!(b.attr("smtp.backend.pool_wait_ms").is_some(), "{b:?}");
        assert!(
            b.ints.iter().any(|i| i == "smtp.backend.connection_id"),
            "{b:?}"
        );
    }
    // The second message reused the pooled connection of the first.
    assert!(
        backends
            .iter()
            .any(|b| b.attr("smtp.backend.reused") == Some("true")),
        "{backends:?}"
    );
    let hs: Vec<&Got> = spans.iter().filter(|s| s.name == "tls.handshake").collect();
    assert_eq!(hs.len(), 1, "{names:?}");
    // A first connection: a full handshake.
    assert_eq!(hs[0].attr("tls.resumed"), Some("false"), "{:?}", hs[0]);
    let tls_session = by_id(&spans, &hs[0].parent).expect("handshake's parent");
    assert_eq!(tls_session.name, "smtp.session");
    assert_eq!(tls_session.attr("tls.protocol.version"), Some("1.3"));
    // Each delivered message carries its session's trace id.
    let msgs = rec.messages();
    assert_eq!(msgs.len(), 2);
    let mut ids: Vec<String> = msgs.iter().map(|m| received_id(m)).collect();
    let mut want: Vec<String> = sessions.iter().map(|s| s.trace_id.clone()).collect();
    ids.sort();
    want.sort();
    assert_eq!(ids, want);
    // And every log line of a traced session names it.
    let log = edge.log();
    assert!(log.contains(&format!("trace_id=\"{}\"", want[0])), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_tree_over_otlp_grpc() {
    tree_over(Receiver::grpc().await, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_tree_over_otlp_http() {
    tree_over(Receiver::http(Duration::ZERO).await, "http").await;
}

/// A collector that takes 3 s per export: mail goes on at full speed (each
/// message well under a second), and the spans the queue cannot hold are
/// dropped and counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_collector_never_slows_mail() {
    let rx = Receiver::http(Duration::from_secs(3)).await;
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge(
        &rec.addr,
        &format!(
            "otlp_endpoint = \"{}\"\notlp_protocol = \"http\"\nexport_queue = 8",
            rx.endpoint
        ),
    )
    .await;
    let t0 = Instant::now();
    for i in 0..20 {
        let t = Instant::now();
        plain_message(edge.addr, &format!("m{i}")).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "message {i}: {:?}",
            t.elapsed()
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(rec.messages().len(), 20);
    let (status, metrics) = http_get(edge.admin, "/metrics").await;
    assert_eq!(status, 200);
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("smtp_edge_trace_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in {metrics}"));
    // 20 sessions of 3 spans against a queue of 8 and one slow export.
    assert!(dropped >= 20.0, "dropped {dropped}");
}

/// A collector that is not there (nothing listens on its port), over both
/// protocols: mail flows, the spans that left the queue are counted as
/// failed, and the failure is logged once, not once per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_collector_counts_failed_spans_and_logs_once() {
    for proto in ["grpc", "http"] {
        let rec = Recorder::start(Script::default()).await;
        let gone = format!("http://127.0.0.1:{}", free_port());
        let edge = start_edge(
            &rec.addr,
            &format!("otlp_endpoint = \"{gone}\"\notlp_protocol = \"{proto}\""),
        )
        .await;
        for i in 0..4 {
            plain_message(edge.addr, &format!("{proto}{i}")).await;
            // Apart by more than the batch delay (0.5 s): several batches.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        assert_eq!(rec.messages().len(), 4, "{proto}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let failed = loop {
            let (_, metrics) = http_get(edge.admin, "/metrics").await;
            let failed: f64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("smtp_edge_trace_spans_failed_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no failed counter in {metrics}"));
            // 4 sessions of 3 spans (and the start-up probe's session).
            if failed >= 12.0 || Instant::now() > deadline {
                break failed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!((12.0..=13.0).contains(&failed), "{proto}: {failed}");
        let log = std::fs::read_to_string(&edge.log).unwrap();
        assert_eq!(
            log.matches("OTLP trace export failing").count(),
            1,
            "{proto}: {log}"
        );
    }
}

/// A 4xx/5xx the proxy itself gives names the session's trace: here the
/// proxy's own 550 for a bare LF (SMTP smuggling defence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_refusals_carry_the_trace_id() {
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge(&rec.addr, &format!("otlp_endpoint = \"{}\"", rx.endpoint)).await;
    let mut c = Raw::greeted(edge.addr).await;
    assert_eq!(c.cmd("EHLO refused.client.test").await.code, 250);
    let r = transaction(&mut c, b"Subject: x\r\n\r\nbare\nLF\r\n").await;
    assert_eq!(r.code, 550, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let id = r
        .text
        .rsplit_once("(trace ")
        .map(|(_, t)| t.trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("no trace id in {r:?}"));
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter()
                .any(|x| x.name == "smtp.transaction" && x.trace_id == id)
        })
        .await;
    let t = spans
        .iter()
        .find(|x| x.name == "smtp.transaction" && x.trace_id == id)
        .unwrap_or_else(|| panic!("no transaction span in trace {id}: {spans:?}"));
    assert_eq!(t.attr("smtp.reply.code"), Some("550"));
    assert_eq!(t.attr("error.type"), Some("550"));
    assert!(rec.messages().is_empty());
}

/// A policy verdict enforced inside a session (here HELO naming the proxy
/// itself, `not_ours = "reject"`) is on the session span as attributes:
/// the check, the action and an error status, which the collector's tail
/// sampling keeps; a session refused at accept (deny list) the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_verdicts_are_session_attributes() {
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge_with(
        &rec.addr,
        &format!("otlp_endpoint = \"{}\"", rx.endpoint),
        "[policy]\ndelay_reject = false\ndeny = [\"127.0.0.9/32\"]\n[policy.helo]\nnot_ours = \"reject\"",
        "info",
    )
    .await;
    let mut c = Raw::greeted(edge.addr).await;
    let r = c.cmd("EHLO edge.test").await;
    assert_eq!(r.code, 550, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let mut d = Raw::connect_from("127.0.0.9".parse().unwrap(), edge.addr).await;
    assert_eq!(d.reply().await.code, 554);
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter()
                .filter(|x| x.name == "smtp.session" && x.attr("smtp.policy.check").is_some())
                .count()
                >= 2
        })
        .await;
    let by_check = |check: &str| {
        spans
            .iter()
            .find(|x| x.name == "smtp.session" && x.attr("smtp.policy.check") == Some(check))
            .unwrap_or_else(|| panic!("no session span with {check}: {spans:?}"))
    };
    let helo = by_check("helo_not_ours");
    assert_eq!(helo.attr("smtp.policy.action"), Some("reject"), "{helo:?}");
    assert_eq!(helo.attr("error.type"), Some("refused"), "{helo:?}");
    assert_eq!(helo.attr("smtp.helo"), Some("edge.test"), "{helo:?}");
    let deny = by_check("deny_list");
    assert_eq!(deny.attr("smtp.policy.action"), Some("reject"), "{deny:?}");
    assert_eq!(deny.attr("client.address"), Some("127.0.0.9"), "{deny:?}");
}

/// The admission's DNS work belongs to the session's trace: the PTR lookup
/// and its forward confirmation start at accept as `dns.lookup` children
/// of `smtp.session`, with `cache.hit` false the first time and true when
/// the same client comes back; a DNSBL zone gets its own span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_lookups_are_spans_of_the_session() {
    let dns = dns::TestDns::standard().await;
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script::default()).await;
    let policy = format!(
        "[policy.rdns]\nlookup = true\n[policy.dnsbl]\naction = \"observe\"\nthreshold = 1\n[[policy.dnsbl.zone]]\nname = \"bl.test\"\nweight = 1\n[policy.dns]\nnameservers = [\"{}\"]\ntimeout = 0.5\nattempts = 1",
        dns.addr
    );
    let edge = start_edge_with(
        &rec.addr,
        &format!("otlp_endpoint = \"{}\"", rx.endpoint),
        &policy,
        "info",
    )
    .await;
    for _ in 0..2 {
        let src: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let mut c = Raw::connect_from(src, edge.addr).await;
        assert_eq!(c.reply().await.code, 220);
        assert_eq!(c.cmd("EHLO dns.client.test").await.code, 250);
        assert_eq!(
            transaction(&mut c, b"Subject: d\r\n\r\nd\r\n").await.code,
            250
        );
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter()
                .filter(|x| {
                    x.name == "smtp.session" && x.attr("client.address") == Some("127.0.0.2")
                })
                .count()
                >= 2
        })
        .await;
    let sessions: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "smtp.session" && s.attr("client.address") == Some("127.0.0.2"))
        .collect();
    assert_eq!(sessions.len(), 2, "{spans:#?}\n{}", edge.log());
    // (The start-up probe of the port, from 127.0.0.1, has its own.)
    let ours = |x: &&Got| sessions.iter().any(|s| s.trace_id == x.trace_id);
    let mut rdns: Vec<&Got> = spans
        .iter()
        .filter(|x| x.name == "dns.lookup" && x.attr("dns.lookup.kind") == Some("rdns"))
        .filter(ours)
        .collect();
    assert_eq!(rdns.len(), 2, "{spans:#?}");
    for r in &rdns {
        let parent = by_id(&spans, &r.parent).expect("rdns span's parent");
        assert_eq!(parent.name, "smtp.session", "{r:?}");
        assert_eq!(r.attr("dns.question.type"), Some("PTR"));
        assert_eq!(r.attr("dns.verdict"), Some("pass"), "{r:?}");
    }
    // First lookup asked DNS (with a forward confirmation under it), the
    // second came from the cache.
    rdns.sort_by_key(|r| r.attr("cache.hit") == Some("true"));
    assert_eq!(rdns[0].attr("cache.hit"), Some("false"), "{rdns:?}");
    assert_eq!(rdns[1].attr("cache.hit"), Some("true"), "{rdns:?}");
    let fwd: Vec<&Got> = spans
        .iter()
        .filter(|x| x.attr("dns.lookup.kind") == Some("fcrdns_forward"))
        .filter(ours)
        .collect();
    assert_eq!(fwd.len(), 1, "{spans:#?}");
    assert_eq!(fwd[0].parent, rdns[0].span_id);
    assert_eq!(fwd[0].attr("dns.question.name"), Some("good.example.test"));
    let bl: Vec<&Got> = spans
        .iter()
        .filter(|x| x.attr("dns.lookup.kind") == Some("dnsbl"))
        .filter(ours)
        .collect();
    assert!(!bl.is_empty(), "{spans:#?}");
    assert_eq!(bl[0].attr("dns.zone"), Some("bl.test"));
    assert_eq!(bl[0].attr("dns.verdict"), Some("not_listed"));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn timed_messages(addr: SocketAddr, n: usize) -> Duration {
    let t0 = Instant::now();
    let mut c = Raw::greeted(addr).await;
    assert_eq!(c.cmd("EHLO rate.client.test").await.code, 250);
    for i in 0..n {
        let body = format!("Subject: r{i}\r\n\r\nr{i}\r\n");
        assert_eq!(transaction(&mut c, body.as_bytes()).await.code, 250);
    }
    assert_eq!(c.cmd("QUIT").await.code, 221);
    t0.elapsed()
}

/// A collector that accepts connections and never answers (a hung one):
/// mail flows at the rate of a proxy without export, memory stays flat,
/// and the spans that do not fit the queue are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_collector_keeps_mail_rate_and_memory() {
    let hung_addr = format!("127.0.0.1:{}", free_port());
    let _hung = std::net::TcpListener::bind(&hung_addr).unwrap();
    let rec = Recorder::start(Script::default()).await;
    let plain = start_edge(&rec.addr, "").await;
    let traced = start_edge(
        &rec.addr,
        &format!("otlp_endpoint = \"http://{hung_addr}\"\nexport_queue = 64"),
    )
    .await;
    // Warm both, then time the same work on each.
    timed_messages(plain.addr, 20).await;
    timed_messages(traced.addr, 20).await;
    let pid = traced._proc.0.id();
    let rss0 = rss_kib(pid);
    let base = timed_messages(plain.addr, 200).await;
    let hung = timed_messages(traced.addr, 200).await;
    let rss1 = rss_kib(pid);
    assert!(
        hung.as_secs_f64() < base.as_secs_f64() * 1.5 + 0.5,
        "with a hung collector {hung:?}, without export {base:?}"
    );
    assert!(
        rss1 < rss0 + 8 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB over 200 messages"
    );
    let (_, metrics) = http_get(traced.admin, "/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("smtp_edge_trace_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(dropped > 0.0, "{metrics}");
    eprintln!("200 messages: {base:?} without export, {hung:?} with a hung collector; RSS {rss0} -> {rss1} KiB; {dropped} spans dropped");
}

/// RUST_LOG filters the log output only: with `warn` the spans are still
/// exported (and the per-message log line is not written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_does_not_depend_on_the_log_level() {
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge_with(
        &rec.addr,
        &format!("otlp_endpoint = \"{}\"", rx.endpoint),
        "",
        "warn",
    )
    .await;
    plain_message(edge.addr, "quiet").await;
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter().any(|x| x.name == "smtp.backend")
        })
        .await;
    assert!(
        spans.iter().any(|x| x.name == "smtp.transaction"),
        "{spans:?}"
    );
    assert!(!edge.log().contains("message 250"), "{}", edge.log());
}

/// Head sampling at accept: at 0.5 some sessions are traced, each one
/// whole (no transaction or backend span without its session), and the
/// others leave nothing in the collector; at 0.0 nothing is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_sessions_are_whole_traces() {
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script::default()).await;
    let edge = start_edge(
        &rec.addr,
        &format!("otlp_endpoint = \"{}\"\nsample_ratio = 0.5", rx.endpoint),
    )
    .await;
    for i in 0..40 {
        plain_message(edge.addr, &format!("s{i}")).await;
    }
    let spans = rx
        .wait(Duration::from_secs(3), |s| {
            s.iter().filter(|x| x.name == "smtp.backend").count() >= 40
        })
        .await;
    let sessions: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "smtp.session" && s.attr("smtp.helo").is_some())
        .collect();
    assert!(
        (4..=36).contains(&sessions.len()),
        "{} of 40 sessions traced at 0.5",
        sessions.len()
    );
    for t in spans.iter().filter(|s| s.name != "smtp.session") {
        assert!(by_id(&spans, &t.parent).is_some(), "orphan span {t:?}");
    }
    let txns = spans
        .iter()
        .filter(|s| s.name == "smtp.transaction")
        .count();
    assert_eq!(txns, sessions.len());
    drop(edge);

    let rx = Receiver::grpc().await;
    let edge = start_edge(
        &rec.addr,
        &format!("otlp_endpoint = \"{}\"\nsample_ratio = 0.0", rx.endpoint),
    )
    .await;
    for i in 0..5 {
        plain_message(edge.addr, &format!("z{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.spans().is_empty(), "{:?}", rx.spans());
}

/// A backend's own refusal is passed through as it said it: the trace id
/// goes only into replies the proxy itself gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusals_pass_through_without_the_trace_id() {
    let rx = Receiver::grpc().await;
    let rec = Recorder::start(Script {
        data: Some(Act::Reply("554 5.7.1 Not from you".into())),
        ..Script::default()
    })
    .await;
    let edge = start_edge(&rec.addr, &format!("otlp_endpoint = \"{}\"", rx.endpoint)).await;
    let mut c = Raw::greeted(edge.addr).await;
    assert_eq!(c.cmd("EHLO refused.client.test").await.code, 250);
    let r = transaction(&mut c, b"Subject: x\r\n\r\nx\r\n").await;
    assert_eq!(
        (r.code, r.text.as_str()),
        (554, "5.7.1 Not from you"),
        "{r:?}"
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);
}

/// TLS to the backend: the new backend connection of a traced transaction
/// has its `tls.handshake` span under `smtp.backend` (a full handshake,
/// TLS 1.3, the backend's name), and `/metrics` counts the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_handshake_is_a_span_under_the_backend_span() {
    let rx = Receiver::grpc().await;
    let mut sink = smtp_load::SinkConfig::new("127.0.0.1:0".parse().unwrap());
    sink.tls = Some(smtp_load::tls::self_signed_server_config().unwrap());
    let sink = smtp_load::SinkServer::start(sink).await.unwrap();
    let backend = format!(
        "{}\"\ntls = \"starttls\"\ntls_verify = false\ntls_server_name = \"localhost",
        sink.local_addr()
    );
    let edge = start_edge(&backend, &format!("otlp_endpoint = \"{}\"", rx.endpoint)).await;
    plain_message(edge.addr, "over tls").await;
    let spans = rx
        .wait(Duration::from_secs(15), |s| {
            s.iter().any(|x| x.name == "tls.handshake")
                && s.iter().any(|x| x.name == "smtp.backend")
        })
        .await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let hs: Vec<&Got> = spans.iter().filter(|s| s.name == "tls.handshake").collect();
    assert_eq!(hs.len(), 1, "{names:?}\n{}", edge.log());
    let parent = by_id(&spans, &hs[0].parent).expect("handshake's parent received");
    assert_eq!(parent.name, "smtp.backend", "{:?}", hs[0]);
    assert_eq!(
        hs[0].attr("server.address"),
        Some("localhost"),
        "{:?}",
        hs[0]
    );
    assert_eq!(hs[0].attr("tls.resumed"), Some("false"), "{:?}", hs[0]);
    assert_eq!(
        hs[0].attr("tls.protocol.version"),
        Some("1.3"),
        "{:?}",
        hs[0]
    );
    assert!(hs[0].attr("error.type").is_none(), "{:?}", hs[0]);
    let (_, metrics) = http_get(edge.admin, "/metrics").await;
    let line = format!(
        "smtp_edge_backend_tls_handshakes_total{{backend=\"{}\",group=\"default\"}} 1",
        sink.local_addr()
    );
    assert!(metrics.contains(&line), "{line}\n{metrics}");
}
