//! Routes by recipient domain (`[[route]]`, `[[backend]] group`), as an
//! operator checks them: which backend got which recipients (smtp-sink's
//! dumps, the scripted Recorder's bytes), the replies a client saw, and a
//! real Postfix as the sending client of one message to three routes.
//! Every refusal case asserts that nothing reached any backend.
mod common;
mod postfix_instance;

use common::*;
use postfix_instance::Postfix;

use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Three smtp-sink backends, one per group `ga`, `gb`, `gc`.
fn three_sinks() -> Option<[Sink; 3]> {
    Some([Sink::start(&[])?, Sink::start(&[])?, Sink::start(&[])?])
}

/// A config with one backend per group and `routes` (TOML) after them.
fn config(backends: &[(&str, &str)], routes: &str) -> String {
    let mut t = String::from("hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for (addr, group) in backends {
        t.push_str(&format!(
            "[[backend]]\naddress = \"{addr}\"\ngroup = \"{group}\"\n"
        ));
    }
    t.push_str(routes);
    t
}

const ROUTES: &str = "[[route]]\ndomains = [\"a.example\"]\ngroup = \"ga\"\n\
                      [[route]]\ndomains = [\"b.example\", \"Bücher.example\"]\ngroup = \"gb\"\n\
                      [[route]]\ndomains = [\"c.example\", \"*.c.example\"]\ngroup = \"gc\"\n";

async fn routed_proxy(sinks: &[Sink; 3]) -> Proxy {
    Proxy::start(&config(
        &[
            (&sinks[0].addr, "ga"),
            (&sinks[1].addr, "gb"),
            (&sinks[2].addr, "gc"),
        ],
        ROUTES,
    ))
    .await
}

fn refusals(p: &Proxy, reason: &str) -> f64 {
    metric_value(
        &parse_metrics(&p.stats.encode()),
        "smtp_edge_route_refusals_total",
        &[("reason", reason)],
    )
}

/// Nothing of any transaction reached the sink: no dump, no MAIL in its
/// conversation log.
fn untouched(s: &Sink) {
    assert!(s.messages().is_empty(), "a message reached {}", s.addr);
    assert!(
        !s.log().contains("MAIL FROM"),
        "{} saw a MAIL: {}",
        s.addr,
        s.log()
    );
}

async fn ehlo(p: &Proxy) -> Raw {
    let mut c = Raw::greeted(p.addr).await;
    assert_eq!(c.cmd("EHLO client.test").await.code, 250);
    c
}

async fn data(c: &mut Raw) -> Seen {
    let d = c.cmd("DATA").await;
    assert_eq!(d.code, 354, "{d:?}");
    c.send(b"Subject: routed\r\n\r\nhello\r\n.\r\n").await;
    c.reply().await
}

#[tokio::test]
async fn each_domain_goes_to_its_group() {
    let Some(sinks) = three_sinks() else { return };
    let p = routed_proxy(&sinks).await;
    let mut c = ehlo(&p).await;
    for (rcpt, sink) in [
        ("x@a.example", 0),
        ("y@B.Example", 1),
        ("z@deep.sub.c.example", 2),
        ("w@c.example", 2),
    ] {
        assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(r.code, 250, "{rcpt}: {r:?}");
        let d = data(&mut c).await;
        assert_eq!(d.code, 250, "{d:?}");
        let got = sinks[sink].wait_messages(1, WAIT);
        assert!(
            got.iter().any(|m| Sink::rcpts(m) == vec![rcpt.to_string()]),
            "{rcpt} not at sink {sink}: {got:?}"
        );
    }
    let counts: Vec<usize> = sinks.iter().map(|s| s.messages().len()).collect();
    assert_eq!(counts, vec![1, 1, 2]);
    // Each group's backend series carry its name.
    let m = parse_metrics(&p.stats.encode());
    for (g, addr) in [("ga", &sinks[0].addr), ("gc", &sinks[2].addr)] {
        let l = [("group", g), ("backend", addr.as_str())];
        assert_eq!(
            metric_value(&m, "smtp_edge_backend_connections_created_total", &l),
            1.0
        );
        assert_eq!(metric_value(&m, "smtp_edge_backend_up", &l), 1.0);
    }
}

#[tokio::test]
async fn unrouted_domain_is_refused_and_reaches_no_backend() {
    let Some(sinks) = three_sinks() else { return };
    let p = routed_proxy(&sinks).await;
    let mut c = ehlo(&p).await;
    // The edge answers MAIL itself: the route is the recipients'.
    let m = c.cmd("MAIL FROM:<s@example.org>").await;
    assert_eq!((m.code, m.text.starts_with("2.1.0")), (250, true), "{m:?}");
    for rcpt in [
        "x@elsewhere.example",
        "x@a.example.evil",
        "x@[192.0.2.1]",
        "postmaster",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(r.code, 550, "{rcpt}: {r:?}");
        assert!(r.text.starts_with("5.7.1 Relay access denied"), "{r:?}");
    }
    let d = c.cmd("DATA").await;
    assert_eq!(d.code, 554, "{d:?}");
    assert!(d.text.starts_with("5.5.1"), "{d:?}");
    // Pipelined the same way.
    c.send(b"RSET\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<q@nowhere.example>\r\nDATA\r\nQUIT\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(c.reply().await.code);
    }
    assert_eq!(got, vec![250, 250, 550, 554, 221]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in &sinks {
        untouched(s);
    }
    assert_eq!(refusals(&p, "no_route"), 5.0);
}

#[tokio::test]
async fn trailing_dot_and_case_are_one_domain() {
    let Some(sinks) = three_sinks() else { return };
    let p = routed_proxy(&sinks).await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    // Postfix strips a trailing dot too; the route compares the normal form.
    let r = c.cmd("RCPT TO:<x@A.EXAMPLE>").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(sinks[0].wait_messages(1, WAIT).len(), 1);
}

#[tokio::test]
async fn a_mixed_transaction_keeps_the_first_accepted_route() {
    let Some(sinks) = three_sinks() else { return };
    let p = routed_proxy(&sinks).await;
    let mut c = ehlo(&p).await;
    // Pipelined as a real client sends it.
    c.send(
        b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a1@a.example>\r\nRCPT TO:<b1@b.example>\r\n\
          RCPT TO:<a2@a.example>\r\nRCPT TO:<c1@x.c.example>\r\nDATA\r\n",
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..6 {
        let r = c.reply().await;
        got.push((r.code, r.text.get(..5).unwrap_or("").to_string()));
    }
    let codes: Vec<u16> = got.iter().map(|g| g.0).collect();
    assert_eq!(codes, vec![250, 250, 452, 250, 452, 354], "{got:?}");
    assert_eq!(got[2].1, "4.5.3");
    c.send(b"Subject: mixed\r\n\r\nhello\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    let a = sinks[0].wait_messages(1, WAIT);
    assert_eq!(a.len(), 1);
    assert_eq!(Sink::rcpts(&a[0]), vec!["a1@a.example", "a2@a.example"]);
    // The client sends the others again, in their own transactions.
    for (rcpt, s) in [("b1@b.example", 1), ("c1@x.c.example", 2)] {
        assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).await.code, 250);
        assert_eq!(data(&mut c).await.code, 250);
        let m = sinks[s].wait_messages(1, WAIT);
        assert_eq!(Sink::rcpts(&m[0]), vec![rcpt]);
    }
    assert_eq!(refusals(&p, "other_route"), 2.0);
    assert_eq!(sinks.iter().map(|s| s.messages().len()).sum::<usize>(), 3);
}

#[tokio::test]
async fn a_u_label_and_its_a_label_are_one_domain() {
    // Recorders: smtp-sink writes non-ASCII as `?` in its dumps.
    let ra = Recorder::start(Script::default()).await;
    let rb = Recorder::start(Script::default()).await;
    let p = Proxy::start(&config(
        &[(&ra.addr, "ga"), (&rb.addr, "gb")],
        &ROUTES.replace("gc", "gb"),
    ))
    .await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org> SMTPUTF8").await.code, 250);
    let u = c.cmd("RCPT TO:<jörg@BÜCHER.example>").await;
    assert_eq!(u.code, 250, "{u:?}");
    let a = c.cmd("RCPT TO:<joerg@xn--bcher-kva.example>").await;
    assert_eq!(a.code, 250, "{a:?}: the A-label must be on the same route");
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(rb.messages.lock().unwrap().len(), 1);
    let text = rb.all_text();
    // The recipients go to the backend as the client wrote them.
    assert!(
        text.contains("RCPT TO:<jörg@BÜCHER.example>\r\nRCPT TO:<joerg@xn--bcher-kva.example>\r\n"),
        "{text}"
    );
    assert_eq!(ra.connection_count(), 0);
}

/// A route is fixed by the first recipient the backend *accepts*: one it
/// refused leaves the transaction free to take another route (the first
/// backend gets RSET, never DATA).
#[tokio::test]
async fn a_refused_first_recipient_does_not_fix_the_route() {
    let ra = Recorder::start(Script {
        rcpt_for: vec![(
            "gone@a.example".into(),
            Act::Reply("550 5.1.1 User unknown".into()),
        )],
        ..Script::default()
    })
    .await;
    let rb = Recorder::start(Script::default()).await;
    let p = Proxy::start(&config(
        &[(&ra.addr, "ga"), (&rb.addr, "gb")],
        &ROUTES.replace("gc", "gb"),
    ))
    .await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<gone@a.example>").await.code, 550);
    assert_eq!(c.cmd("RCPT TO:<b@b.example>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<a@a.example>").await.code, 452);
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(rb.messages.lock().unwrap().len(), 1);
    assert!(ra.messages.lock().unwrap().is_empty());
    let a_text = ra.all_text();
    assert!(a_text.contains("RCPT TO:<gone@a.example>"), "{a_text}");
    assert!(!a_text.contains("a@a.example>"), "{a_text}");
    assert!(!a_text.contains("DATA"), "{a_text}");
}

/// The backend refuses the MAIL the edge already said 250 to: the RCPT
/// hears that refusal, nothing is delivered, and the client's MAIL stands.
#[tokio::test]
async fn a_backend_refusing_the_deferred_mail_answers_the_rcpt() {
    let ra = Recorder::start(Script {
        mail: Some(Act::Reply("553 5.1.8 Sender domain not found".into())),
        ..Script::default()
    })
    .await;
    let rb = Recorder::start(Script::default()).await;
    let p = Proxy::start(&config(
        &[(&ra.addr, "ga"), (&rb.addr, "gb")],
        &ROUTES.replace("gc", "gb"),
    ))
    .await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@bad.example>").await.code, 250);
    let r = c.cmd("RCPT TO:<x@a.example>").await;
    assert_eq!(r.code, 553, "{r:?}");
    assert!(r.text.contains("5.1.8 Sender domain not found"), "{r:?}");
    // Pipelined: both RCPTs carry it.
    c.send(b"RCPT TO:<y@a.example>\r\nRCPT TO:<z@a.example>\r\n")
        .await;
    assert_eq!(c.reply().await.code, 553);
    assert_eq!(c.reply().await.code, 553);
    // The MAIL stands: another route may still take the message.
    assert_eq!(c.cmd("RCPT TO:<b@b.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    assert!(ra.messages.lock().unwrap().is_empty());
    assert_eq!(rb.messages.lock().unwrap().len(), 1);
}

/// SIZE= above what the route's backends announced: 552 5.3.4 at RCPT,
/// before anything is sent; without routes, at MAIL. EHLO keeps the edge's
/// own limit.
#[tokio::test]
async fn size_above_the_routes_backends_is_refused_at_rcpt() {
    let small = Recorder::start(Script {
        ehlo_extra: vec!["SIZE 10000".into()],
        ..Script::default()
    })
    .await;
    let big = Recorder::start(Script {
        ehlo_extra: vec!["SIZE 1000000".into()],
        ..Script::default()
    })
    .await;
    let p = Proxy::start(&config(
        &[(&small.addr, "ga"), (&big.addr, "gb")],
        &ROUTES.replace("gc", "gb"),
    ))
    .await;
    // The pools learn the limits from their first connection.
    for rcpt in ["x@a.example", "y@b.example"] {
        let mut c = ehlo(&p).await;
        assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<{rcpt}>")).await.code, 250);
        assert_eq!(data(&mut c).await.code, 250);
    }
    let before: Vec<usize> = [&small, &big].iter().map(|r| r.all_bytes().len()).collect();
    let mut c = Raw::greeted(p.addr).await;
    let e = c.cmd("EHLO client.test").await;
    assert!(
        e.raw.contains("SIZE 52428800\r\n"),
        "the edge's own limit: {}",
        e.raw
    );
    assert_eq!(
        c.cmd("MAIL FROM:<s@example.org> SIZE=50000").await.code,
        250
    );
    let r = c.cmd("RCPT TO:<x@a.example>").await;
    assert_eq!((r.code, &r.text[..5]), (552, "5.3.4"), "{r:?}");
    // Another route whose backends take it.
    assert_eq!(c.cmd("RCPT TO:<y@b.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(
        small.all_bytes().len(),
        before[0],
        "the small backend heard nothing"
    );
    assert_eq!(big.messages.lock().unwrap().len(), 2);
    assert_eq!(refusals(&p, "size"), 1.0);

    // Without routes: every backend may get it, so the smallest limit
    // counts, at MAIL.
    let p2 = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\n",
        small.addr
    ))
    .await;
    let mut c = ehlo(&p2).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@a.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    let m = c.cmd("MAIL FROM:<s@example.org> SIZE=50000").await;
    assert_eq!((m.code, &m.text[..5]), (552, "5.3.4"), "{m:?}");
    assert_eq!(c.cmd("MAIL FROM:<s@example.org> SIZE=5000").await.code, 250);
}

/// A route whose group is all down: 451 4.4.1 at RCPT; the other routes
/// work on.
#[tokio::test]
async fn a_route_whose_group_is_down_answers_451_at_rcpt() {
    let Some(sink) = Sink::start(&[]) else { return };
    let dead = format!("127.0.0.1:{}", free_port());
    let p = Proxy::start(&config(
        &[(&dead, "ga"), (&sink.addr, "gb")],
        "[[route]]\ndomains = [\"a.example\"]\ngroup = \"ga\"\n[[route]]\ndomains = [\"*\"]\ngroup = \"gb\"\n",
    ))
    .await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    let r = c.cmd("RCPT TO:<x@a.example>").await;
    assert_eq!((r.code, &r.text[..5]), (451, "4.4.1"), "{r:?}");
    assert_eq!(c.cmd("RCPT TO:<y@anything.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    let m = sink.wait_messages(1, WAIT);
    assert_eq!(Sink::rcpts(&m[0]), vec!["y@anything.example"]);
}

/// `[[route]]` reloads like `[[backend]]`: the next transaction follows the
/// new table.
#[tokio::test]
async fn routes_reload() {
    let Some(sinks) = three_sinks() else { return };
    let backends = [
        (sinks[0].addr.as_str(), "ga"),
        (sinks[1].addr.as_str(), "gb"),
        (sinks[2].addr.as_str(), "gc"),
    ];
    let p = Proxy::start(&config(&backends, ROUTES)).await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@new.example>").await.code, 550);
    assert_eq!(c.cmd("RSET").await.code, 250);
    p.reload(&config(
        &backends,
        &format!("{ROUTES}[[route]]\ndomains = [\"new.example\"]\ngroup = \"gc\"\n"),
    ))
    .unwrap();
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@new.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(
        Sink::rcpts(&sinks[2].wait_messages(1, WAIT)[0]),
        vec!["x@new.example"]
    );
    // Routes gone: every domain to every backend, as without them.
    p.reload(&format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\naddress = \"{}\"\n",
        sinks[0].addr
    ))
    .unwrap();
    assert_eq!(c.cmd("MAIL FROM:<s@example.org>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<x@anything.example>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    assert_eq!(sinks[0].wait_messages(1, WAIT).len(), 1);
}

/// The acceptance test of the issue: a real Postfix sends one message to
/// three domains on three routes through the edge; each group's backend
/// gets it exactly once, with its own recipients only (Postfix sends the
/// recipients the edge answered 452 again in another transaction).
#[tokio::test]
async fn postfix_sends_one_message_to_three_routes() {
    let Some(sinks) = three_sinks() else { return };
    let p = routed_proxy(&sinks).await;
    let Some(pf) = Postfix::start(&format!("relayhost = [127.0.0.1]:{}\n", p.addr.port())) else {
        return;
    };
    let mut c = Raw::greeted(pf.addr.parse().unwrap()).await;
    assert_eq!(c.cmd("EHLO submitter.test").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<sender@example.org>").await.code, 250);
    for rcpt in [
        "a1@a.example",
        "b1@b.example",
        "a2@a.example",
        "c1@sub.c.example",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert_eq!(r.code, 250, "{rcpt}: {r:?}");
    }
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"Subject: three routes\r\nMessage-ID: <three@example.org>\r\n\r\nhello\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.code, 250);
    c.cmd("QUIT").await;
    // Postfix may defer the 452'd recipients to a later queue run: wait.
    let end = Instant::now() + Duration::from_secs(60);
    while sinks.iter().any(|s| s.messages().is_empty()) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(pf.wait_queue_empty(Duration::from_secs(30)), "{}", pf.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let want: [&[&str]; 3] = [
        &["a1@a.example", "a2@a.example"],
        &["b1@b.example"],
        &["c1@sub.c.example"],
    ];
    for (s, want) in sinks.iter().zip(want) {
        let m = s.messages();
        assert_eq!(
            m.len(),
            1,
            "{} got {} copies:\n{m:?}\n{}",
            s.addr,
            m.len(),
            pf.log()
        );
        assert_eq!(Sink::rcpts(&m[0]), want.to_vec());
        assert!(m[0].contains("Message-ID: <three@example.org>"), "{}", m[0]);
    }
    let log = pf.log();
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    assert!(log.contains("4.5.3"), "the 452 in Postfix's log:\n{log}");
    assert!(!log.contains("status=bounced"), "{log}");
}

/// SIZE learned from a real Postfix (`message_size_limit`): above it, 552
/// 5.3.4 at the RCPT of its route and Postfix hears nothing of it; a
/// message that grows past it unannounced still ends with Postfix's own
/// reply after the final dot.
#[tokio::test]
async fn size_learned_from_a_real_postfix() {
    let Some(sink) = Sink::start(&[]) else { return };
    let Some(pf) = Postfix::start("message_size_limit = 20000\n") else {
        return;
    };
    let p = Proxy::start(&config(
        &[(&pf.addr, "pf"), (&sink.addr, "rest")],
        "[[route]]\ndomains = [\"example.org\"]\ngroup = \"pf\"\n[[route]]\ndomains = [\"*\"]\ngroup = \"rest\"\n",
    ))
    .await;
    let mut c = ehlo(&p).await;
    assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<box@example.org>").await.code, 250);
    assert_eq!(data(&mut c).await.code, 250);
    let end = Instant::now() + WAIT;
    while pf.delivered().is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = pf.delivered().len();
    assert_eq!(delivered, 1, "{}", pf.log());
    let mails = pf.log().matches("from=<s@example.net>").count();

    assert_eq!(
        c.cmd("MAIL FROM:<s@example.net> SIZE=50000").await.code,
        250
    );
    let r = c.cmd("RCPT TO:<box@example.org>").await;
    assert_eq!((r.code, &r.text[..5]), (552, "5.3.4"), "{r:?}");
    let other = c.cmd("RCPT TO:<x@example.com>").await;
    assert_eq!(other.code, 250, "{other:?}: the other route takes it");
    assert_eq!(c.cmd("RSET").await.code, 250);
    assert_eq!(refusals(&p, "size"), 1.0);

    // Unannounced and too big: Postfix's own reply after the dot.
    assert_eq!(c.cmd("MAIL FROM:<s@example.net>").await.code, 250);
    assert_eq!(c.cmd("RCPT TO:<box@example.org>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    let line = "x".repeat(70) + "\r\n";
    c.send(format!("Subject: big\r\n\r\n{}.\r\n", line.repeat(500)).as_bytes())
        .await;
    let end = c.reply().await;
    assert_eq!(end.code, 552, "{end:?}");
    assert!(end.text.starts_with("5.3.4"), "{end:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pf.delivered().len(), delivered, "nothing more delivered");
    assert_eq!(
        pf.log().matches("from=<s@example.net>").count(),
        mails,
        "Postfix queued nothing more:\n{}",
        pf.log()
    );
}
