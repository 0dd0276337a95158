//! Recipients a backend refused as unknown, answered by the edge itself
//! for a while (`[policy.recipients] cache_unknown`): against a real
//! Postfix that knows its users (how many RCPTs its log shows) and the
//! scripted Recorder (exact bytes: what the backend was asked).
mod common;
mod postfix_instance;

use common::redis::Redis;
use common::*;
use postfix_instance::Postfix;

use std::time::Duration;

fn hits(p: &Proxy) -> f64 {
    metric_value(
        &parse_metrics(&p.stats.encode()),
        "smtp_edge_recipients_unknown_cached_total",
        &[],
    )
}

async fn session(p: &Proxy) -> Raw {
    let mut c = Raw::greeted(p.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    c
}

/// How many times the backend was asked for `rcpt`.
fn asked(rec: &Recorder, rcpt: &str) -> usize {
    rec.all_text().matches(&format!("RCPT TO:<{rcpt}>")).count()
}

fn unknown_user() -> Script {
    Script {
        rcpt_for: vec![
            (
                "nobody@example.org".into(),
                Act::Reply("550 5.1.1 <nobody@example.org>: User unknown".into()),
            ),
            (
                "busy@example.org".into(),
                Act::Reply("450 4.2.1 <busy@example.org>: Mailbox busy".into()),
            ),
            (
                "policy@example.org".into(),
                Act::Reply("554 5.7.1 <policy@example.org>: Access denied".into()),
            ),
        ],
        ..Script::default()
    }
}

#[tokio::test]
async fn a_real_postfix_is_asked_once_per_unknown_user() {
    let Some(pf) = Postfix::start("virtual_mailbox_maps = inline:{ known@example.org=box/ }\n")
    else {
        return;
    };
    let p = Proxy::to_backend(&pf.addr, "").await;
    for (i, rcpt) in [
        "ghost@example.org",
        "Ghost@EXAMPLE.org",
        "ghost@example.org",
    ]
    .iter()
    .enumerate()
    {
        let mut c = session(&p).await;
        assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(r.code, 550, "{i}: {r:?}");
        assert!(r.text.starts_with("5.1.1"), "{r:?}");
        assert!(
            r.text.contains("User unknown in virtual mailbox table"),
            "the backend's own text: {r:?}"
        );
        // A known user in the same transaction goes on.
        assert_eq!(c.cmd("RCPT TO:<known@example.org>").await.code, 250);
        let d = c.cmd("DATA").await;
        assert_eq!(d.code, 354);
        c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n").await;
        assert_eq!(c.reply().await.code, 250);
        c.cmd("QUIT").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = pf.log();
    assert_eq!(
        log.lines().filter(|l| l.contains("User unknown") && l.to_lowercase().contains("ghost@example.org")).count(),
        1,
        "Postfix was asked once:\n{log}"
    );
    assert_eq!(hits(&p), 2.0);
}

#[tokio::test]
async fn only_permanent_unknown_user_replies_are_remembered() {
    let rec = Recorder::start(unknown_user()).await;
    let p = Proxy::to_backend(&rec.addr, "").await;
    for _ in 0..3 {
        let mut c = session(&p).await;
        assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
        // Pipelined, the edge's answer in its place among the backend's.
        c.send(
            b"RCPT TO:<busy@example.org>\r\nRCPT TO:<nobody@example.org>\r\n\
              RCPT TO:<policy@example.org>\r\nRCPT TO:<ok@example.org>\r\nDATA\r\n",
        )
        .await;
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = c.reply().await;
            got.push(format!("{} {}", r.code, &r.text[..5]));
        }
        assert_eq!(
            got,
            vec!["450 4.2.1", "550 5.1.1", "554 5.7.1", "250 2.1.5",]
        );
        assert_eq!(c.reply().await.code, 354);
        c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n").await;
        assert_eq!(c.reply().await.code, 250);
    }
    assert_eq!(asked(&rec, "nobody@example.org"), 1, "unknown: asked once");
    assert_eq!(
        asked(&rec, "busy@example.org"),
        3,
        "temporary: never remembered"
    );
    assert_eq!(
        asked(&rec, "policy@example.org"),
        3,
        "not 'no such user': never remembered"
    );
    assert_eq!(hits(&p), 2.0);
}

#[tokio::test]
async fn remembered_for_cache_unknown_seconds_and_forgotten_on_reload() {
    let rec = Recorder::start(unknown_user()).await;
    let cfg = |max: usize| {
        format!(
            "hostname = \"edge.test\"\n[policy.recipients]\ncache_unknown = 1\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\nmax_connections = {max}\n",
            rec.addr
        )
    };
    let p = Proxy::start(&cfg(8)).await;
    let ask = |p: &Proxy| {
        let addr = p.addr;
        async move {
            let mut c = Raw::greeted(addr).await;
            c.cmd("EHLO client.test").await;
            c.cmd("MAIL FROM:<s@example.net>").await;
            let r = c.cmd("RCPT TO:<nobody@example.org>").await;
            assert_eq!(r.code, 550);
            // Only refused recipients: no message.
            assert_eq!(c.cmd("DATA").await.code, 554);
        }
    };
    ask(&p).await;
    ask(&p).await;
    assert_eq!(asked(&rec, "nobody@example.org"), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ask(&p).await;
    assert_eq!(asked(&rec, "nobody@example.org"), 2, "expired after 1 s");
    ask(&p).await;
    assert_eq!(asked(&rec, "nobody@example.org"), 2);
    // A reload that changes the backends starts an empty cache.
    p.reload(&cfg(9)).unwrap();
    ask(&p).await;
    assert_eq!(asked(&rec, "nobody@example.org"), 3);
    // Off: every RCPT goes to the backend.
    p.reload(&cfg(9).replace("cache_unknown = 1", "cache_unknown = 0"))
        .unwrap();
    ask(&p).await;
    ask(&p).await;
    assert_eq!(asked(&rec, "nobody@example.org"), 5);
}

/// With routes the remembered answer comes before any backend connection:
/// a route whose backend is down still answers a remembered unknown user
/// with the backend's own 550.
#[tokio::test]
async fn with_routes_no_backend_connection_is_needed() {
    let rec = Recorder::start(unknown_user()).await;
    let p = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\naddress = \"{}\"\n[[route]]\ndomains = [\"example.org\"]\ngroup = \"default\"\n",
        rec.addr
    ))
    .await;
    let mut c = session(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<nobody@example.org>").await.code, 550);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    let conns = rec.connection_count();
    let mut c = session(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
    let r = c.cmd("RCPT TO:<NOBODY@example.org>").await;
    assert_eq!((r.code, &r.text[..5]), (550, "5.1.1"), "{r:?}");
    assert_eq!(c.cmd("DATA").await.code, 554);
    assert_eq!(rec.connection_count(), conns, "no new backend connection");
    assert_eq!(asked(&rec, "nobody@example.org"), 1);
    assert_eq!(hits(&p), 1.0);
}

/// A dictionary attack run with Python's smtplib, one RCPT at a time, from
/// 127.0.0.150: sessions of up to 100 random recipients, reconnecting
/// until refused at connect or 2 000 recipients are tried. Prints
/// `rcpts=N refused_at_connect=M over_budget=K`.
const DICTIONARY: &str = r#"
import random, smtplib, string, sys
port = int(sys.argv[1]); tried = 0; at_connect = 0; over = 0
while tried < 2000 and at_connect < 2:
    try:
        s = smtplib.SMTP(); s.source_address = ("127.0.0.150", 0)
        code, _ = s.connect("127.0.0.1", port)
    except smtplib.SMTPConnectError as e:
        at_connect += 1; continue
    except smtplib.SMTPServerDisconnected:
        at_connect += 1; continue
    if code != 220:
        at_connect += 1; continue
    try:
        s.ehlo("dict.example"); s.mail("x@dict.example")
        for _ in range(100):
            u = "".join(random.choice(string.ascii_lowercase) for _ in range(10))
            code, _ = s.rcpt(u + "@example.org"); tried += 1
            if code == 421:
                over += 1; break
        s.close()
    except smtplib.SMTPServerDisconnected:
        over += 1
print(f"rcpts={tried} refused_at_connect={at_connect} over_budget={over}")
"#;

/// The issue's scene: a real Postfix that knows its users, a dictionary
/// attack of random recipients from one address. Postfix sees at most the
/// budget's unknown RCPTs (plus the one that goes over), the address is
/// banned (refused at connect), another client keeps delivering, and a
/// second instance sharing the bans on Redis refuses the attacker within
/// 2 s of the ban.
#[tokio::test(flavor = "multi_thread")]
async fn a_dictionary_attack_reaches_postfix_with_at_most_the_budget() {
    let Some(py) = require_tool("python3") else {
        return;
    };
    // Postfix's error limits count per connection, and a pooled connection
    // carries the errors of every client the edge relays: set behind an
    // edge as the README says (the defaults, 10 and 20, would sleep 1 s per
    // error after the tenth and drop the connection at the twentieth).
    let Some(pf) = Postfix::start(
        "virtual_mailbox_maps = inline:{ known@example.org=box/ }\n\
         smtpd_soft_error_limit = 1000\nsmtpd_hard_error_limit = 1000\nsmtpd_error_sleep_time = 0\n",
    ) else {
        return;
    };
    // Two instances sharing their bans on one Redis.
    let Some(redis) = Redis::start() else {
        return;
    };
    let shield = format!(
        "[policy.bans]\nstore = \"redis\"\n\
         [policy.bans.unknown_recipients]\naction = \"reject\"\nper_ip = {{ count = 20, period = 600 }}\nban_for = 3600\n\
         [policy.limits.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let p = Proxy::to_backend(&pf.addr, &shield).await;
    let other = Proxy::to_backend(&pf.addr, &shield).await;
    let port = p.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .args(["-c", DICTIONARY, &port])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The 421 follows the 21st refusal at once; smtplib reads it as the
    // answer to its 22nd RCPT, which never reaches the backend.
    assert_eq!(
        said.trim(),
        "rcpts=22 refused_at_connect=2 over_budget=1",
        "{said}"
    );
    // Another client delivers meanwhile.
    let mut c = Raw::connect_from("127.0.0.151".parse().unwrap(), p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("EHLO good.example").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<known@example.org>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = pf.log();
    let unknown = log.lines().filter(|l| l.contains("User unknown")).count();
    assert_eq!(unknown, 21, "the budget (20) and the one over it:\n{log}");
    let bans = p.policy.bans().list();
    assert!(!bans.is_empty());
    assert_eq!(bans[0].address(), "127.0.0.150");
    // A client that pipelines 30 unknown recipients in one batch: the edge
    // stops pipelining at its budget's edge, so Postfix again sees 21.
    let mut c = Raw::connect_from("127.0.0.152".parse().unwrap(), p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("EHLO batch.example").await.code, 250);
    let mut batch = b"MAIL FROM:<x@batch.example>\r\n".to_vec();
    for i in 0..30 {
        batch.extend_from_slice(format!("RCPT TO:<batch{i}@example.org>\r\n").as_bytes());
    }
    batch.extend_from_slice(b"DATA\r\n");
    c.send(&batch).await;
    assert_eq!(c.reply().await.code, 250);
    for i in 0..21 {
        assert_eq!(c.reply().await.code, 550, "RCPT {i}");
    }
    let r = c.reply().await;
    assert_eq!(r.code, 421, "{r:?}");
    assert!(c.closed(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = pf.log();
    let batch_unknown = log
        .lines()
        .filter(|l| l.contains("User unknown") && l.contains("<batch"))
        .count();
    assert_eq!(
        batch_unknown, 21,
        "pipelined: the budget and the one over it:\n{log}"
    );
    // The second instance refuses the attacker at connect within 2 s of
    // the ban.
    let banned_at = bans[0].created;
    loop {
        let mut c = Raw::connect_from("127.0.0.150".parse().unwrap(), other.addr).await;
        let g = c.reply().await;
        let lag = smtp_edge::policy::bans::now_ms() - banned_at;
        if g.code == 421 {
            assert!(g.text.ends_with("(unknown_recipients)"), "{g:?}");
            assert!(lag <= 2000, "refused {lag} ms after the ban");
            break;
        }
        assert!(lag < 2000, "not refused by the other instance: {g:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
