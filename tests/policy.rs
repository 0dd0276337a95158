//! Admission policy end to end: real TCP clients from several 127.0.0.x
//! source addresses against the proxy, a recording backend, and an
//! in-process authoritative DNS server (hickory-server) for rDNS, DNSBL and
//! HELO lookups. Asserts the replies clients see, the bytes the backend
//! got, and the queries the DNS server answered.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::{Proxy, Raw, Recorder, Script, Seen};
use smtp_edge::policy::Check;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn backend() -> Recorder {
    Recorder::start(Script {
        ehlo_extra: vec!["XFORWARD NAME ADDR PORT PROTO HELO SOURCE".into()],
        ..Script::default()
    })
    .await
}

async fn proxy(rec: &Recorder, policy: &str) -> Proxy {
    Proxy::to_backend(&rec.addr, policy).await
}

/// A policy with the resolver pointed at the test DNS server.
fn with_dns(dns: &TestDns, policy: &str) -> String {
    format!(
        "{policy}\n[policy.dns]\nnameservers = [\"{}\"]\ntimeout = 0.5\nattempts = 1\n",
        dns.addr
    )
}

async fn greeted_from(src: &str, addr: SocketAddr) -> Raw {
    let mut c = Raw::connect_from(ip(src), addr).await;
    let g = c.reply().await;
    assert_eq!(g.code, 220, "{g:?}");
    c
}

/// Connects and returns the first reply (the greeting or a refusal).
async fn first_reply(src: &str, addr: SocketAddr) -> (Raw, Seen) {
    let mut c = Raw::connect_from(ip(src), addr).await;
    let g = c.reply().await;
    (c, g)
}

fn count(p: &Proxy, check: Check) -> (u64, u64) {
    let c = p
        .policy
        .counts()
        .into_iter()
        .find(|c| c.check == check)
        .unwrap();
    (c.observed, c.enforced)
}

async fn send_message(c: &mut Raw, helo: &str) -> Seen {
    assert_eq!(c.cmd(&format!("EHLO {helo}")).await.code, 250);
    common::transaction(c, b"Subject: t\r\n\r\nhello\r\n").await
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_list_refuses_at_connect_and_allow_list_skips_checks() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy]\ndelay_reject = false\ndeny = [\"127.0.0.64/26\", \"::1/128\"]\nallow = [\"127.0.0.70/32\"]\n[policy.helo]\nfqdn = \"reject\"",
    )
    .await;
    let (mut c, g) = first_reply("127.0.0.66", p.addr).await;
    assert_eq!(
        (g.code, g.text.as_str()),
        (554, "5.7.1 Access denied for [127.0.0.66]")
    );
    assert!(c.closed(Duration::from_secs(2)).await);
    // 127.0.0.70 is on both lists: allow wins, and HELO checks are skipped.
    let mut ok = greeted_from("127.0.0.70", p.addr).await;
    assert_eq!(send_message(&mut ok, "localhost").await.code, 250);
    // Anyone else gets the HELO check.
    let mut other = greeted_from("127.0.0.2", p.addr).await;
    let r = other.cmd("EHLO localhost").await;
    assert_eq!(r.code, 504, "{r:?}");
    assert!(
        r.text
            .starts_with("5.5.2 <localhost>: Helo command rejected"),
        "{r:?}"
    );
    assert_eq!(count(&p, Check::Deny), (0, 1));
    assert_eq!(rec.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn global_cap_refuses_with_421_and_releases() {
    let rec = backend().await;
    let p = proxy(&rec, "[policy.limits]\nmax_connections = 2").await;
    let a = greeted_from("127.0.0.2", p.addr).await;
    let _b = greeted_from("127.0.0.3", p.addr).await;
    let (mut c, g) = first_reply("127.0.0.4", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.starts_with("4.3.2 "), "{g:?}");
    assert!(c.closed(Duration::from_secs(2)).await);
    drop(a);
    // The slot comes back when the session ends (client gone).
    let mut got = None;
    for _ in 0..100 {
        let (_c, g) = first_reply("127.0.0.4", p.addr).await;
        if g.code == 220 {
            got = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got.is_some(), "slot never released");
    assert!(count(&p, Check::GlobalCap).1 >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_per_ip_and_per_prefix_released_on_every_exit() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.limits]\nipv4_prefix = 24\n[policy.limits.concurrency]\naction = \"reject\"\nper_ip = 2\nper_prefix = 3\n[timeouts]\ncommand = 1",
    )
    .await;
    let mut a1 = greeted_from("127.0.0.10", p.addr).await;
    let a2 = greeted_from("127.0.0.10", p.addr).await;
    let (_a3, g) = first_reply("127.0.0.10", p.addr).await;
    assert_eq!(g.code, 421);
    assert!(
        g.text
            .contains("4.7.0 Too many concurrent connections from [127.0.0.10]"),
        "{g:?}"
    );
    let b1 = greeted_from("127.0.0.11", p.addr).await;
    let (_b2, g) = first_reply("127.0.0.11", p.addr).await;
    assert_eq!(g.code, 421);
    assert!(g.text.contains("from your network"), "{g:?}");
    // One client quits properly: its slot is free again.
    assert_eq!(a1.cmd("QUIT").await.code, 221);
    let mut b2 = None;
    for _ in 0..100 {
        let (c, g) = first_reply("127.0.0.11", p.addr).await;
        if g.code == 220 {
            b2 = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b2 = b2.expect("slot released after QUIT");
    // Exits of every kind: drop mid-DATA, plain drop, command timeout.
    assert_eq!(b2.cmd("EHLO client.example.org").await.code, 250);
    assert_eq!(b2.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    assert_eq!(b2.cmd("RCPT TO:<b@example.net>").await.code, 250);
    assert_eq!(b2.cmd("DATA").await.code, 354);
    b2.send(b"Subject: half\r\n").await;
    drop(b2);
    drop(a2);
    let mut b1 = b1; // left idle: the 1 s command timeout ends it
    let t = b1.reply().await;
    assert_eq!(t.code, 421);
    let limits = p.policy.limits().clone();
    wait_until("every concurrency slot released", || {
        limits.tracked_keys() == 0
    })
    .await;
    assert!(count(&p, Check::Concurrency).1 >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_message_and_recipient_rates() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.limits.connection_rate]\naction = \"reject\"\nper_ip = { count = 3, period = 60 }\n\
         [policy.limits.message_rate]\naction = \"reject\"\nper_ip = { count = 2, period = 60 }\n\
         [policy.limits.recipient_rate]\naction = \"reject\"\nper_ip = { count = 3, period = 60 }",
    )
    .await;
    let mut c = greeted_from("127.0.0.20", p.addr).await;
    assert_eq!(c.cmd("EHLO client.example.org").await.code, 250);
    for _ in 0..2 {
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
        assert_eq!(c.cmd("RSET").await.code, 250);
    }
    let m = c.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(m.code, 450, "{m:?}");
    assert!(
        m.text.starts_with("4.7.28 Message rate limit exceeded"),
        "{m:?}"
    );
    // Recipients, on another address (the message rate is per IP).
    let mut d = greeted_from("127.0.0.21", p.addr).await;
    assert_eq!(d.cmd("EHLO client.example.org").await.code, 250);
    assert_eq!(d.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    for i in 0..3 {
        assert_eq!(
            d.cmd(&format!("RCPT TO:<r{i}@example.net>")).await.code,
            250
        );
    }
    let r = d.cmd("RCPT TO:<r9@example.net>").await;
    assert_eq!(r.code, 452, "{r:?}");
    assert!(
        r.text.starts_with("4.7.28 Recipient rate limit exceeded"),
        "{r:?}"
    );
    // The accepted recipients still get their message.
    assert_eq!(d.cmd("DATA").await.code, 354);
    d.send(b"Subject: t\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(d.reply().await.code, 250);
    // Connections: 127.0.0.20 has used 1 of 3.
    let _k1 = greeted_from("127.0.0.20", p.addr).await;
    let _k2 = greeted_from("127.0.0.20", p.addr).await;
    let (_k3, g) = first_reply("127.0.0.20", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(
        g.text.starts_with("4.7.0 Connection rate limit exceeded"),
        "{g:?}"
    );
    // Another source is not affected.
    greeted_from("127.0.0.22", p.addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_mode_counts_without_enforcing() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.limits.message_rate]\naction = \"observe\"\nper_ip = { count = 1, period = 60 }\n[policy.helo]\nfqdn = \"observe\"",
    )
    .await;
    let mut c = greeted_from("127.0.0.30", p.addr).await;
    for _ in 0..3 {
        assert_eq!(send_message(&mut c, "localhost").await.code, 250);
    }
    assert_eq!(rec.messages().len(), 3);
    assert_eq!(count(&p, Check::MessageRate), (2, 0));
    assert_eq!(count(&p, Check::HeloFqdn), (3, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn helo_checks_at_helo_and_delayed_to_mail() {
    let rec = backend().await;
    let strict = "[policy]\ndelay_reject = false\n[policy.helo]\nsyntax = \"reject\"\nfqdn = \"reject\"\nnot_ours = \"reject\"\nbare_ip = \"reject\"\nliteral_mismatch = \"reject\"";
    let p = proxy(&rec, strict).await;
    let mut c = greeted_from("127.0.0.40", p.addr).await;
    for (helo, code, start) in [
        (
            "-bad-.example",
            501,
            "5.5.2 <-bad-.example>: Helo command rejected: Invalid name",
        ),
        (
            "192.0.2.1",
            501,
            "5.5.2 <192.0.2.1>: Helo command rejected: an address must be",
        ),
        (
            "[10.0.0.1]",
            550,
            "5.7.1 <[10.0.0.1]>: Helo command rejected: address literal",
        ),
        (
            "localhost",
            504,
            "5.5.2 <localhost>: Helo command rejected: need fully-qualified",
        ),
        (
            "EDGE.test",
            550,
            "5.7.1 <EDGE.test>: Helo command rejected: that is my name",
        ),
    ] {
        let r = c.cmd(&format!("EHLO {helo}")).await;
        assert_eq!(r.code, code, "{helo}: {r:?}");
        assert!(r.text.starts_with(start), "{helo}: {r:?}");
        // A rejected HELO leaves the session without one.
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 503);
    }
    // The client's own literal and a proper name pass.
    assert_eq!(c.cmd("EHLO [127.0.0.40]").await.code, 250);
    assert_eq!(send_message(&mut c, "client.example.org").await.code, 250);

    // delay_reject (the default): EHLO is accepted, MAIL gets the verdict.
    let delayed = strict.replace("delay_reject = false", "delay_reject = true");
    let p2 = proxy(&rec, &delayed).await;
    let mut d = greeted_from("127.0.0.41", p2.addr).await;
    assert_eq!(d.cmd("EHLO localhost").await.code, 250);
    let m = d.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(m.code, 504, "{m:?}");
    // A new, good EHLO clears it.
    assert_eq!(send_message(&mut d, "client.example.org").await.code, 250);
    // Defer turns it into a 4xx.
    let p3 = proxy(
        &rec,
        &strict.replace("fqdn = \"reject\"", "fqdn = \"defer\""),
    )
    .await;
    let mut e = greeted_from("127.0.0.42", p3.addr).await;
    let r = e.cmd("EHLO localhost").await;
    assert_eq!(r.code, 450, "{r:?}");
    assert!(r.text.starts_with("4.5.2 "), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_pass_names_the_client_in_received_and_xforward() {
    let dns = TestDns::standard().await;
    let rec = backend().await;
    let p = proxy(&rec, &with_dns(&dns, "[policy.rdns]\nlookup = true")).await;
    let mut c = greeted_from("127.0.0.2", p.addr).await;
    assert_eq!(send_message(&mut c, "client.example.org").await.code, 250);
    let msgs = rec.messages();
    let m = String::from_utf8_lossy(&msgs[0]);
    assert!(
        m.starts_with("Received: from client.example.org (good.example.test [127.0.0.2])"),
        "{m}"
    );
    let wire = rec.all_text();
    assert!(wire.contains("XFORWARD NAME=good.example.test"), "{wire}");
    // Unknown names stay [UNAVAILABLE] / unknown.
    let mut n = greeted_from("127.0.0.3", p.addr).await;
    assert_eq!(send_message(&mut n, "client.example.org").await.code, 250);
    let msgs = rec.messages();
    let m = String::from_utf8_lossy(&msgs[1]);
    assert!(
        m.starts_with("Received: from client.example.org (unknown [127.0.0.3])"),
        "{m}"
    );
    assert!(rec.all_text().contains("XFORWARD NAME=[UNAVAILABLE]"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rdns_verdicts_and_temporary_failures_never_5xx() {
    let dns = TestDns::standard().await;
    let rec = backend().await;
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy.rdns]\nlookup = true\nno_ptr = \"reject\"\nmismatch = \"reject\"\ntemp_error = \"reject\"",
        ),
    )
    .await;
    for (src, code, start) in [
        (
            "127.0.0.3",
            550,
            "5.7.25 Reverse DNS validation failed: no PTR record for [127.0.0.3]",
        ),
        (
            "127.0.0.4",
            550,
            "5.7.25 Reverse DNS validation failed: mismatch.example.test does not resolve",
        ),
        (
            "127.0.0.5",
            450,
            "4.7.25 Temporary failure looking up the reverse DNS",
        ),
        (
            "127.0.0.6",
            450,
            "4.7.25 Temporary failure looking up the reverse DNS",
        ),
    ] {
        let mut c = greeted_from(src, p.addr).await;
        let r = send_message(&mut c, "client.example.org").await;
        assert_eq!(r.code, code, "{src}: {r:?}");
        assert!(r.text.starts_with(start), "{src}: {r:?}");
    }
    let mut ok = greeted_from("127.0.0.2", p.addr).await;
    assert_eq!(send_message(&mut ok, "client.example.org").await.code, 250);
    assert_eq!(rec.messages().len(), 1);
    assert_eq!(count(&p, Check::Rdns).1, 4);

    // Without delay_reject the verdict is the greeting.
    let p2 = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy]\ndelay_reject = false\n[policy.rdns]\nlookup = true\nno_ptr = \"reject\"\ntemp_error = \"reject\"",
        ),
    )
    .await;
    let (mut c, g) = first_reply("127.0.0.3", p2.addr).await;
    assert_eq!(g.code, 554, "{g:?}");
    assert!(g.text.starts_with("5.7.25 "), "{g:?}");
    assert!(c.closed(Duration::from_secs(2)).await);
    let (_c, g) = first_reply("127.0.0.5", p2.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.starts_with("4.7.25 "), "{g:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dnsbl_weights_threshold_and_filters() {
    let dns = TestDns::standard().await;
    let rec = backend().await;
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy.dnsbl]\naction = \"reject\"\nthreshold = 2\n\
             [[policy.dnsbl.zone]]\nname = \"bl.test\"\nweight = 2\ncodes = [\"127.0.0.2..127.0.0.11\"]\n\
             [[policy.dnsbl.zone]]\nname = \"bl2.test\"\nweight = 1\n\
             [[policy.dnsbl.zone]]\nname = \"wl.test\"\nweight = -5",
        ),
    )
    .await;
    let mut c = greeted_from("127.0.0.7", p.addr).await;
    let r = send_message(&mut c, "client.example.org").await;
    assert_eq!(r.code, 554, "{r:?}");
    assert!(
        r.text
            .starts_with("5.7.1 Service unavailable; client [127.0.0.7] blocked using bl.test"),
        "{r:?}"
    );
    // Allow-listed (negative weight), answer outside the filter, unlisted.
    for src in ["127.0.0.8", "127.0.0.9", "127.0.0.2"] {
        let mut c = greeted_from(src, p.addr).await;
        assert_eq!(
            send_message(&mut c, "client.example.org").await.code,
            250,
            "{src}"
        );
    }
    assert_eq!(rec.messages().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn helo_must_resolve_and_match_rdns() {
    let dns = TestDns::standard().await;
    let rec = backend().await;
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy]\ndelay_reject = false\n[policy.rdns]\nlookup = true\n[policy.helo]\nresolves = \"reject\"",
        ),
    )
    .await;
    let mut c = greeted_from("127.0.0.2", p.addr).await;
    assert_eq!(c.cmd("EHLO mail.example.test").await.code, 250);
    assert_eq!(c.cmd("EHLO mx-only.example.test").await.code, 250);
    let r = c.cmd("EHLO nohost.example.test").await;
    assert_eq!(r.code, 550, "{r:?}");
    assert!(r.text.contains("Host not found"), "{r:?}");
    let r = c.cmd("EHLO servfail.example.test").await;
    assert_eq!(r.code, 450, "{r:?}");

    let p2 = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy]\ndelay_reject = false\n[policy.rdns]\nlookup = true\n[policy.helo]\nmatch_rdns = \"reject\"",
        ),
    )
    .await;
    let mut c = greeted_from("127.0.0.2", p2.addr).await;
    // rDNS is good.example.test: same name and same domain pass.
    assert_eq!(c.cmd("EHLO good.example.test").await.code, 250);
    assert_eq!(c.cmd("EHLO mail.example.test").await.code, 250);
    let r = c.cmd("EHLO mail.other.test").await;
    assert_eq!(r.code, 550, "{r:?}");
    // No rDNS name at all: mismatch; a temporary failure: 4xx.
    let mut n = greeted_from("127.0.0.3", p2.addr).await;
    assert_eq!(n.cmd("EHLO mail.example.test").await.code, 550);
    let mut t = greeted_from("127.0.0.5", p2.addr).await;
    assert_eq!(t.cmd("EHLO mail.example.test").await.code, 450);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_connections_from_one_new_address_make_one_ptr_query() {
    let dns = TestDns::standard().await;
    let rec = backend().await;
    // delay_reject off: every greeting waits for the verdict.
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy]\ndelay_reject = false\n[policy.rdns]\nlookup = true\nno_ptr = \"reject\"",
        ),
    )
    .await;
    // 250 at a time (the listen backlog drops SYNs of a bigger burst and
    // their retransmits would outlast the reply timeout on a busy machine).
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(250));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let addr = p.addr;
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await.unwrap();
            let mut c = greeted_from("127.0.0.2", addr).await;
            c.cmd("EHLO client.example.org").await.code
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 250);
    }
    assert_eq!(dns.queries("2.0.0.127.in-addr.arpa.", "PTR"), 1);
    assert_eq!(dns.queries("good.example.test.", "A"), 1);
    let stats = p.policy.dns().unwrap().stats();
    assert_eq!(stats.rdns_misses, 1);
    assert_eq!(stats.rdns_hits, 999);
}

#[tokio::test(flavor = "multi_thread")]
async fn pregreet_talker_is_rejected_and_remembered() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.pregreet]\naction = \"reject\"\ndelay = 0.4\nremember = 60",
    )
    .await;
    // A polite client waits for the whole greeting.
    let t0 = Instant::now();
    let mut good = Raw::connect_from(ip("127.0.0.50"), p.addr).await;
    let g = good.reply().await;
    assert_eq!(g.code, 220);
    assert!(
        g.raw
            .starts_with("220-edge.test ESMTP\r\n220 edge.test ESMTP\r\n"),
        "{g:?}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(380));
    assert_eq!(
        send_message(&mut good, "client.example.org").await.code,
        250
    );
    // A talker sends EHLO right away: its MAIL is refused (delay_reject).
    let mut bad = Raw::connect_from(ip("127.0.0.51"), p.addr).await;
    bad.send(b"EHLO bot.example.org\r\n").await;
    assert_eq!(bad.reply().await.code, 220);
    assert_eq!(bad.reply().await.code, 250);
    let m = bad.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(m.code, 554, "{m:?}");
    assert!(m.text.starts_with("5.5.1 Protocol error"), "{m:?}");
    drop(bad);
    // ... and remembered: banned (source pregreet), refused at connect
    // next time with a temporary 421.
    let (_c, g) = first_reply("127.0.0.51", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(
        g.text
            .starts_with("4.7.1 Client host [127.0.0.51] blocked until"),
        "{g:?}"
    );
    assert!(g.text.ends_with("(pregreet)"), "{g:?}");
    assert_eq!(count(&p, Check::Pregreet).1, 1);
    assert_eq!(count(&p, Check::Ban).1, 1);
    let bans = p.policy.bans().list();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source, smtp_edge::policy::bans::Source::Pregreet);
    assert!(bans[0].expires - bans[0].created == 60_000);
    assert_eq!(rec.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tarpit_delays_policy_rejections_only() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy]\ndelay_reject = false\ntarpit = 0.3\n[policy.helo]\nfqdn = \"reject\"",
    )
    .await;
    let mut c = greeted_from("127.0.0.60", p.addr).await;
    let t0 = Instant::now();
    assert_eq!(c.cmd("EHLO client.example.org").await.code, 250);
    assert!(t0.elapsed() < Duration::from_millis(250));
    let t1 = Instant::now();
    assert_eq!(c.cmd("EHLO localhost").await.code, 504);
    assert!(t1.elapsed() >= Duration::from_millis(290));
}

/// Runs swaks from `src` and returns (success, stdout).
async fn swaks_from(src: &str, addr: SocketAddr, helo: &str) -> Option<(bool, String)> {
    let bin = common::require_tool("swaks")?;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(bin)
            .args(["--server", &addr.to_string(), "--local-interface", src])
            .args(["--from", "y@example.org", "--to", "x@example.net"])
            .args(["--ehlo", helo, "--timeout", "10"])
            .args(["--header", "Subject: policy", "--body", "policy body"])
            .output(),
    )
    .await
    .expect("swaks timed out")
    .expect("run swaks");
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks_through_the_policy_into_smtp_sink() {
    let Some(sink) = common::Sink::start(&[]) else {
        return;
    };
    let dns = TestDns::standard().await;
    let p = Proxy::to_backend(
        &sink.addr,
        &with_dns(&dns, "[policy.rdns]\nlookup = true\nno_ptr = \"reject\""),
    )
    .await;
    // A client with forward-confirmed rDNS: delivered, named in XFORWARD.
    let Some((ok, out)) = swaks_from("127.0.0.2", p.addr, "client.example.org").await else {
        return;
    };
    assert!(ok, "{out}");
    sink.wait_messages(1, Duration::from_secs(10));
    let log = sink.log();
    assert!(log.contains("XFORWARD NAME=good.example.test"), "{log}");
    // No PTR: swaks sees the 550 5.7.25 at MAIL and nothing is delivered.
    let (ok, out) = swaks_from("127.0.0.3", p.addr, "client.example.org")
        .await
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("<** 550 5.7.25 Reverse DNS validation failed"),
        "{out}"
    );
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelining_sender_over_its_rate_is_not_cut_off_for_the_503s() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.limits.message_rate]\naction = \"reject\"\nper_ip = { count = 1, period = 600 }",
    )
    .await;
    let mut c = greeted_from("127.0.0.80", p.addr).await;
    assert_eq!(send_message(&mut c, "client.example.org").await.code, 250);
    // 15 refused pipelined transactions: 15 policy errors, the 30 503s to
    // the RCPT and DATA that rode along are not counted (limit: 20).
    for _ in 0..15 {
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            .await;
        assert_eq!(c.reply().await.code, 450);
        assert_eq!(c.reply().await.code, 503);
        assert_eq!(c.reply().await.code, 503);
    }
    assert_eq!(c.cmd("NOOP").await.code, 250);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_free_as_soon_as_the_221_arrives() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy.limits.concurrency]\naction = \"reject\"\nper_ip = 4",
    )
    .await;
    // Four clients from one address, each reconnecting the moment it has
    // read its 221: none may find its old slot still taken.
    let mut loops = Vec::new();
    for _ in 0..4 {
        let addr = p.addr;
        loops.push(tokio::spawn(async move {
            for i in 0..300 {
                let (mut c, g) = first_reply("127.0.0.90", addr).await;
                assert_eq!(g.code, 220, "connection {i}: {g:?}");
                assert_eq!(c.cmd("QUIT").await.code, 221);
            }
        }));
    }
    for l in loops {
        l.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_clients_are_limited_and_listed_like_ipv4() {
    let rec = backend().await;
    let listen = |policy: &str| {
        format!(
            "hostname = \"edge.test\"\n{policy}\n[[listener]]\naddress = \"[::1]:0\"\n[[backend]]\naddress = \"{}\"\n",
            rec.addr
        )
    };
    let p = Proxy::start(&listen(
        "[policy.limits]\nipv6_prefix = 64\n[policy.limits.concurrency]\naction = \"reject\"\nper_prefix = 1",
    ))
    .await;
    let mut a = greeted_from("::1", p.addr).await;
    let (_b, g) = first_reply("::1", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.contains("from your network"), "{g:?}");
    assert_eq!(send_message(&mut a, "client.example.org").await.code, 250);
    assert!(
        rec.all_text()
            .contains("XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:::1"),
        "{}",
        rec.all_text()
    );
    let d = Proxy::start(&listen("[policy]\ndeny = [\"::1/128\"]")).await;
    let (_c, g) = first_reply("::1", d.addr).await;
    assert_eq!(
        (g.code, g.text.as_str()),
        (554, "5.7.1 Access denied for [::1]")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pregreet_without_delay_reject_answers_the_first_command_and_closes() {
    let rec = backend().await;
    let p = proxy(
        &rec,
        "[policy]\ndelay_reject = false\n[policy.pregreet]\naction = \"reject\"\ndelay = 0.3\nremember = 0",
    )
    .await;
    let mut bad = Raw::connect_from(ip("127.0.0.52"), p.addr).await;
    bad.send(b"EHLO bot.example.org\r\n").await;
    assert_eq!(bad.reply().await.code, 220);
    let r = bad.reply().await;
    assert_eq!(r.code, 554, "{r:?}");
    assert!(r.text.starts_with("5.5.1 Protocol error"), "{r:?}");
    assert!(bad.closed(Duration::from_secs(2)).await);
    // remember = 0: nothing is held against the address afterwards.
    let mut again = greeted_from("127.0.0.52", p.addr).await;
    assert_eq!(
        send_message(&mut again, "client.example.org").await.code,
        250
    );
}

fn zone_metric(p: &Proxy, name: &str, zone: &str) -> f64 {
    common::metric_value(
        &common::parse_metrics(&p.stats.encode()),
        name,
        &[("zone", zone)],
    )
}

/// A list's error codes (127.255.255.0/24: query refused, public resolver,
/// rate limited) never list a client, whatever `codes` says; they are
/// counted per zone.
#[tokio::test]
async fn dnsbl_error_answers_never_list() {
    let dns = TestDns::start(
        &[
            ("7.0.0.127.err.test", "A", "127.255.255.254", 60),
            ("7.0.0.127.err2.test", "A", "127.255.255.252", 60),
            ("2.0.0.127.err.test", "A", "127.0.0.2", 60),
        ],
        &[],
        &[],
    )
    .await;
    let rec = backend().await;
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy.dnsbl]\naction = \"reject\"\n\
             [[policy.dnsbl.zone]]\nname = \"err.test\"\n\
             [[policy.dnsbl.zone]]\nname = \"err2.test\"\ncodes = [\"127.0.0.0..127.255.255.255\"]\n",
        ),
    )
    .await;
    let mut c = greeted_from("127.0.0.7", p.addr).await;
    let r = send_message(&mut c, "client.example.org").await;
    assert_eq!(r.code, 250, "an error answer is not a listing: {r:?}");
    assert_eq!(
        zone_metric(&p, "smtp_edge_dnsbl_error_answers_total", "err.test"),
        1.0
    );
    assert_eq!(
        zone_metric(&p, "smtp_edge_dnsbl_error_answers_total", "err2.test"),
        1.0
    );
    assert_eq!(
        zone_metric(&p, "smtp_edge_dnsbl_zone_in_scoring", "err.test"),
        1.0
    );
}

/// A zone that lists its "never listed" test entry 127.0.0.1 lists
/// everyone: a health check takes it out of scoring (clients it lists are
/// served), and puts it back once it stops (they are refused again).
#[tokio::test]
async fn dnsbl_zone_listing_everything_is_taken_out_until_healthy() {
    let dns = TestDns::start(
        &[
            ("1.0.0.127.all.test", "A", "127.0.0.2", 1),
            ("2.0.0.127.all.test", "A", "127.0.0.2", 1),
            ("7.0.0.127.all.test", "A", "127.0.0.2", 1),
        ],
        &[],
        &[],
    )
    .await;
    let rec = backend().await;
    let p = proxy(
        &rec,
        &with_dns(
            &dns,
            "[policy.dnsbl]\naction = \"reject\"\nhealth_interval = 0.2\n\
             [[policy.dnsbl.zone]]\nname = \"all.test\"\n",
        ),
    )
    .await;
    let scoring = |p: &Proxy| zone_metric(p, "smtp_edge_dnsbl_zone_in_scoring", "all.test");
    wait_until("the zone taken out of scoring", || scoring(&p) == 0.0).await;
    let mut c = greeted_from("127.0.0.7", p.addr).await;
    let r = send_message(&mut c, "client.example.org").await;
    assert_eq!(r.code, 250, "a zone out of scoring lists nobody: {r:?}");
    assert_eq!(
        dns.queries("7.0.0.127.all.test", "A"),
        0,
        "and is not asked"
    );
    // Healthy again: back in scoring.
    dns.remove("1.0.0.127.all.test");
    wait_until("the zone back in scoring", || scoring(&p) == 1.0).await;
    let mut c = greeted_from("127.0.0.7", p.addr).await;
    let r = send_message(&mut c, "client.example.org").await;
    assert_eq!(r.code, 554, "{r:?}");
}
