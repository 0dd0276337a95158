//! Policy reload (SIGHUP) while sessions run: open sessions keep working
//! under the policy they were admitted with, new connections meet the new
//! one, and the counters and limiters carry over so nothing is miscounted.
//! In process through the server's reload handle, and once through the real
//! binary with `kill -HUP` (an invalid file keeps the running policy).
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{free_port, Proxy, Raw, Running, Seen};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A whole config: one plain listener, the Maildir backend, and `policy`
/// (TOML tables, `[policy...]`).
fn config(policy: &str) -> String {
    format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\nmaildir = \"{{DIR}}/mail\"\n{policy}\n"
    )
}

async fn start(policy: &str) -> Proxy {
    Proxy::start(&config(policy)).await
}

/// Connects and returns the first reply (the greeting or a refusal).
async fn first_reply(src: &str, addr: SocketAddr) -> (Raw, Seen) {
    let mut c = Raw::connect_from(ip(src), addr).await;
    let g = c.reply().await;
    (c, g)
}

async fn greeted_from(src: &str, addr: SocketAddr) -> Raw {
    let (c, g) = first_reply(src, addr).await;
    assert_eq!(g.code, 220, "{src}: {g:?}");
    c
}

/// One message on a session past EHLO.
async fn message(c: &mut Raw) -> Seen {
    common::transaction(c, b"Subject: reload\r\n\r\nstill here\r\n").await
}

fn delivered(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("mail/new")).map_or(0, |d| d.count())
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn open_session_keeps_working_and_keeps_its_policy() {
    let p = start("[policy.helo]\nfqdn = \"observe\"").await;
    let mut a = greeted_from("127.0.0.2", p.addr).await;
    assert_eq!(a.cmd("EHLO client.example.org").await.code, 250);
    p.reload(&config(
        "[policy]\ndeny = [\"127.0.0.99/32\"]\n[policy.helo]\nfqdn = \"reject\"",
    ))
    .expect("reload");
    // Not dropped, and still judged by the policy it was admitted under
    // (fqdn observed): a whole message after the reload.
    assert_eq!(a.cmd("EHLO localhost").await.code, 250);
    let r = message(&mut a).await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(a.cmd("QUIT").await.code, 221);
    // A new connection meets the new one (delivered at MAIL: delay_reject).
    let mut b = greeted_from("127.0.0.3", p.addr).await;
    assert_eq!(b.cmd("EHLO localhost").await.code, 250);
    let r = b.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(r.code, 504, "{r:?}");
    assert_eq!(delivered(p.dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_list_added_by_reload_refuses_new_connections_only() {
    let p = start("").await;
    let mut a = greeted_from("127.0.0.5", p.addr).await;
    assert_eq!(a.cmd("EHLO client.example.org").await.code, 250);
    p.reload(&config("[policy]\ndeny = [\"127.0.0.5/32\"]"))
        .expect("reload");
    let (mut refused, g) = first_reply("127.0.0.5", p.addr).await;
    assert_eq!(
        (g.code, g.text.as_str()),
        (554, "5.7.1 Access denied for [127.0.0.5]")
    );
    assert!(refused.closed(Duration::from_secs(2)).await);
    // Others are still welcome, and the open session goes on.
    let _other = greeted_from("127.0.0.6", p.addr).await;
    let r = message(&mut a).await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(delivered(p.dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_counts_carry_over_with_new_thresholds() {
    let conc = |n: u32| {
        config(&format!(
            "[policy.limits.concurrency]\naction = \"reject\"\nper_ip = {n}"
        ))
    };
    let p = Proxy::start(&conc(2)).await;
    let mut open = vec![
        greeted_from("127.0.0.7", p.addr).await,
        greeted_from("127.0.0.7", p.addr).await,
    ];
    let (_c, g) = first_reply("127.0.0.7", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    p.reload(&conc(3)).expect("reload");
    // The two sessions from before still count: one more fits, not two.
    open.push(greeted_from("127.0.0.7", p.addr).await);
    let (_d, g) = first_reply("127.0.0.7", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.starts_with("4.7.0 "), "{g:?}");
    for mut c in open {
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    // Old and new sessions released into the same counters.
    let limits = p.policy.limits();
    wait_until("every slot released", || {
        limits.tracked_keys() == 0 && limits.global_in_use() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn global_cap_set_by_reload_counts_running_sessions() {
    // No cap at start: sessions are counted all the same.
    let p = start("[policy.limits]\nmax_connections = 0").await;
    let _a = greeted_from("127.0.0.8", p.addr).await;
    let _b = greeted_from("127.0.0.9", p.addr).await;
    p.reload(&config("[policy.limits]\nmax_connections = 3"))
        .expect("reload");
    let _c = greeted_from("127.0.0.10", p.addr).await;
    let (_d, g) = first_reply("127.0.0.11", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(g.text.starts_with("4.3.2 "), "{g:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn message_rate_state_carries_over_when_unchanged() {
    let rate = |count: u32, fqdn: &str| {
        config(&format!(
            "[policy.helo]\nfqdn = \"{fqdn}\"\n\
             [policy.limits.message_rate]\naction = \"defer\"\n\
             per_ip = {{ count = {count}, period = 3600 }}"
        ))
    };
    let p = Proxy::start(&rate(1, "observe")).await;
    let mut a = greeted_from("127.0.0.12", p.addr).await;
    assert_eq!(a.cmd("EHLO client.example.org").await.code, 250);
    assert_eq!(message(&mut a).await.code, 250);
    let r = a.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(r.code, 450, "{r:?}");
    assert!(r.text.starts_with("4.7.28 "), "{r:?}");
    // Only the HELO settings change: the client stays at its limit.
    p.reload(&rate(1, "reject")).expect("reload");
    let mut b = greeted_from("127.0.0.12", p.addr).await;
    assert_eq!(b.cmd("EHLO client.example.org").await.code, 250);
    let r = b.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(r.code, 450, "limit forgotten by the reload: {r:?}");
    // A changed rate starts fresh for new connections.
    p.reload(&rate(2, "reject")).expect("reload");
    let mut c = greeted_from("127.0.0.12", p.addr).await;
    assert_eq!(c.cmd("EHLO client.example.org").await.code, 250);
    assert_eq!(message(&mut c).await.code, 250);
    assert_eq!(delivered(p.dir.path()), 2);
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().to_string();
    let st = Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// The real binary: SIGHUP with an invalid file logs every error and keeps
/// the running policy; SIGHUP with a valid one applies it; the open session
/// and the process survive both; SIGTERM still stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_keeps_it_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.path().join("smtp-edge.toml");
    let base = format!(
        "hostname = \"edge.test\"\n[[listener]]\naddress = \"{addr}\"\n\
         [[backend]]\nmaildir = \"{}\"\n",
        dir.path().join("mail").display()
    );
    std::fs::write(&file, &base).unwrap();
    let log_path = dir.path().join("smtp-edge.log");
    let mut proc = Running::edge(&file, "info", &log_path, addr).await;
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut a = greeted_from("127.0.0.20", addr).await;
    assert_eq!(a.cmd("EHLO client.example.org").await.code, 250);

    let wait_log = |what: &'static str, n: usize| {
        let log_text = &log_text;
        async move {
            let end = Instant::now() + Duration::from_secs(5);
            while log_text().matches(what).count() < n {
                assert!(
                    Instant::now() < end,
                    "log never said {what:?}:\n{}",
                    log_text()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // An invalid file (a deny list and two errors): nothing changes.
    std::fs::write(
        &file,
        format!(
            "{base}[policy]\ndeny = [\"127.0.0.21/32\"]\n\
             [policy.limits]\nmax_connections = \"many\"\n\
             [policy.dns]\nattempts = 0\n"
        ),
    )
    .unwrap();
    let lines = base.lines().count();
    signal(&proc.0, "-HUP");
    wait_log("reload refused", 1).await;
    let text = log_text();
    for (key, line) in [
        ("policy.limits.max_connections", lines + 4),
        ("policy.dns.attempts", lines + 6),
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(key) && l.contains(&format!("line {line}:"))),
            "the log does not name `{key}` at line {line}:\n{text}"
        );
    }
    assert!(!text.contains("configuration reloaded"), "{text}");
    assert!(proc.0.try_wait().unwrap().is_none(), "SIGHUP stopped it");
    let _still = greeted_from("127.0.0.21", addr).await;

    // The same deny list in a valid file is applied.
    std::fs::write(
        &file,
        format!("{base}[policy]\ndeny = [\"127.0.0.21/32\"]\n"),
    )
    .unwrap();
    signal(&proc.0, "-HUP");
    wait_log("configuration reloaded", 1).await;
    let (_c, g) = first_reply("127.0.0.21", addr).await;
    assert_eq!(g.code, 554, "{g:?}");
    // The session open through both reloads delivers.
    let r = message(&mut a).await;
    assert_eq!(r.code, 250, "{r:?}\n{}", log_text());
    assert_eq!(a.cmd("QUIT").await.code, 221);
    assert_eq!(delivered(dir.path()), 1);

    let status = proc.terminated(Duration::from_secs(10), &log_path).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", log_text());
}
