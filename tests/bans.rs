//! Bans as an operator meets them: added through the admin API and the
//! `smtp-edge ban` CLI (listed, expired, lifted, cleared by source), writes
//! refused outside `[admin] write_from` (`/reload` included), a banned
//! address or network refused at connect with 421 4.7.1, the
//! `bad_commands` budget banning across sessions, and the fleet's list on
//! a real redis-server: a ban on one instance refused by the other within
//! 2 s, Redis down and back.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn edge(extra: &str) -> (Proxy, SocketAddr) {
    // A fixed admin port: a reload names the same address.
    let p = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[admin]\naddress = \"127.0.0.1:{}\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[backend]]\nmaildir = \"{{DIR}}/mail\"\n{extra}\n",
        free_port()
    ))
    .await;
    let admin = p.admin.expect("admin listener");
    (p, admin)
}

/// The first reply a client from `from` gets.
async fn greeting(from: &str, addr: SocketAddr) -> Seen {
    let mut c = Raw::connect_from(ip(from), addr).await;
    c.reply().await
}

async fn post_ban(admin: SocketAddr, body: &str) -> (u16, serde_json::Value) {
    let (s, b) = http(admin, "POST", "/bans", Some(body), None).await;
    (
        s,
        serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
    )
}

async fn list(admin: SocketAddr) -> serde_json::Value {
    let (s, b) = http_get(admin, "/bans").await;
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

fn metric(p: &Proxy, name: &str, source: &str) -> f64 {
    metric_value(
        &parse_metrics(&p.stats.encode()),
        name,
        &[("source", source)],
    )
}

/// Polls `f` until true, for at most `t`; the time it took.
async fn within(t: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < t {
        if f().await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_bans_refuse_at_connect_until_lifted_or_expired() {
    let (p, admin) = edge("").await;
    let (s, b) = post_ban(
        admin,
        r#"{"address": "127.0.0.66", "ttl": 1.5, "reason": "seen in a dictionary attack"}"#,
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["address"], "127.0.0.66");
    assert_eq!(b["source"], "admin");
    let g = greeting("127.0.0.66", p.addr).await;
    assert_eq!(g.code, 421, "{g:?}");
    assert!(
        g.text
            .starts_with("4.7.1 Client host [127.0.0.66] blocked until ")
            && g.text.ends_with("(admin)"),
        "{g:?}"
    );
    assert!(
        !g.text.contains("dictionary"),
        "the reason stays the operator's"
    );
    assert_eq!(greeting("127.0.0.67", p.addr).await.code, 220);
    let l = list(admin).await;
    assert_eq!(l["count"], 1);
    assert_eq!(l["bans"][0]["reason"], "seen in a dictionary attack");
    assert_eq!(metric(&p, "smtp_edge_bans_active", "admin"), 1.0);
    assert_eq!(metric(&p, "smtp_edge_ban_refusals_total", "admin"), 1.0);
    // Expired: admitted again, and swept and counted.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(greeting("127.0.0.66", p.addr).await.code, 220);
    assert_eq!(list(admin).await["count"], 0);

    // A network, lifted by the API.
    let (s, _) = post_ban(admin, r#"{"address": "127.0.1.0/24", "ttl": 600}"#).await;
    assert_eq!(s, 201);
    assert_eq!(greeting("127.0.1.9", p.addr).await.code, 421);
    let (s, b) = http(admin, "DELETE", "/bans?address=127.0.1.0%2F24", None, None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(greeting("127.0.1.9", p.addr).await.code, 220);
    let (s, _) = http(admin, "DELETE", "/bans?address=127.0.1.0/24", None, None).await;
    assert_eq!(s, 404);

    // Bulk clear by source.
    for a in ["127.0.2.1", "127.0.2.2", "127.0.3.0/24"] {
        let (s, _) = post_ban(admin, &format!(r#"{{"address": "{a}"}}"#)).await;
        assert_eq!(s, 201);
    }
    let (s, b) = http(admin, "DELETE", "/bans?source=pregreet", None, None).await;
    assert_eq!((s, b.trim()), (200, r#"{"removed":0}"#));
    let (s, b) = http(admin, "DELETE", "/bans?source=admin", None, None).await;
    assert_eq!((s, b.trim()), (200, r#"{"removed":3}"#));
    assert_eq!(greeting("127.0.2.1", p.addr).await.code, 220);

    // Mistakes get 400 and say what is wrong.
    for (method, path, body) in [
        ("POST", "/bans", r#"{"address": "not-an-ip"}"#),
        ("POST", "/bans", r#"{"address": "127.0.0.9", "ttl": 0}"#),
        ("POST", "/bans", "{"),
        ("DELETE", "/bans?source=nobody", ""),
        ("DELETE", "/bans", ""),
    ] {
        let (s, b) = http(admin, method, path, Some(body), None).await;
        assert_eq!(s, 400, "{method} {path} {body}: {b}");
        assert!(b.contains("\"error\""), "{b}");
    }
    let m = parse_metrics(&p.stats.encode());
    assert_eq!(
        metric_value(&m, "smtp_edge_bans_added_total", &[("source", "admin")]),
        5.0
    );
    assert_eq!(
        metric_value(&m, "smtp_edge_bans_expired_total", &[("source", "admin")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_only_from_write_from_reload_included() {
    let (p, admin) = edge("").await;
    // Reload with write_from narrowed to 127.0.0.1 (the address stays).
    p.reload(&format!(
        "hostname = \"edge.test\"\n[admin]\naddress = \"{admin}\"\nwrite_from = [\"127.0.0.1/32\"]\n\
         [[listener]]\naddress = \"{}\"\n[[backend]]\nmaildir = \"{{DIR}}/mail\"\n",
        p.addr
    ))
    .unwrap();
    let outsider = Some(ip("127.0.0.2"));
    for (method, path, body) in [
        ("POST", "/bans", r#"{"address": "127.0.0.70"}"#),
        ("DELETE", "/bans?source=all", ""),
        ("POST", "/reload", ""),
    ] {
        let (s, b) = http(admin, method, path, Some(body), outsider).await;
        assert_eq!(s, 403, "{method} {path}: {b}");
        assert!(b.contains("write_from"), "{b}");
    }
    assert_eq!(list(admin).await["count"], 0, "nothing was added");
    // Reading stays open.
    for path in ["/bans", "/metrics", "/livez"] {
        assert_eq!(
            http(admin, "GET", path, None, outsider).await.0,
            200,
            "{path}"
        );
    }
    // From inside write_from: taken.
    let (s, _) = http(
        admin,
        "POST",
        "/bans",
        Some(r#"{"address": "127.0.0.70"}"#),
        Some(ip("127.0.0.1")),
    )
    .await;
    assert_eq!(s, 201);
    // No configuration file behind this proxy: /reload is not possible,
    // but it was asked (not refused).
    let (s, _) = http(admin, "POST", "/reload", None, Some(ip("127.0.0.1"))).await;
    assert_eq!(s, 501);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_adds_lists_removes_and_clears() {
    let (p, admin) = edge("").await;
    let a = admin.to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let args = |v: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        out.extend(["--admin".to_string(), a.clone()]);
        out
    };
    let o = run(args(&[
        "ban",
        "add",
        "127.0.0.90",
        "--ttl",
        "600",
        "--reason",
        "by hand",
    ]))
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("banned 127.0.0.90 for 600 s"));
    assert_eq!(greeting("127.0.0.90", p.addr).await.code, 421);
    run(args(&["ban", "add", "127.0.5.0/24"])).await.unwrap();
    let o = run(args(&["ban", "list"])).await.unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("127.0.0.90") && out.contains("by hand"),
        "{out}"
    );
    assert!(
        out.contains("127.0.5.0/24") && out.trim_end().ends_with("2 bans"),
        "{out}"
    );
    let o = run(args(&["ban", "list", "--json", "--source", "admin"]))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"], 2);
    let o = run(args(&["ban", "remove", "127.0.0.90"])).await.unwrap();
    assert!(o.status.success());
    assert_eq!(greeting("127.0.0.90", p.addr).await.code, 220);
    let o = run(args(&["ban", "remove", "127.0.0.90"])).await.unwrap();
    assert_eq!(o.status.code(), Some(1), "not banned: refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));
    let o = run(args(&["ban", "clear", "--source", "all"]))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "lifted 1 bans");
    let o = run(args(&["ban", "add", "bogus"])).await.unwrap();
    assert_eq!(o.status.code(), Some(1));
    // Nobody listening: exit 2.
    let o = run(vec![
        "ban".into(),
        "list".into(),
        "--admin".into(),
        format!("127.0.0.1:{}", free_port()),
    ])
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_commands_over_budget_ban_the_address_across_sessions() {
    let (p, admin) = edge(
        "[policy.bans.bad_commands]\naction = \"reject\"\nper_ip = { count = 5, period = 600 }\nban_for = 60\n",
    )
    .await;
    let from = ip("127.0.0.80");
    // Three bad commands, then a clean QUIT.
    let mut c = Raw::connect_from(from, p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    for _ in 0..3 {
        assert_eq!(c.cmd("FOO").await.code, 502);
    }
    assert_eq!(c.cmd("QUIT").await.code, 221);
    // Two more pass; the sixth goes over: 421 and the session ends.
    let mut c = Raw::connect_from(from, p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("RCPT TO:<a@b.example>").await.code, 503);
    assert_eq!(c.cmd("BAR").await.code, 502);
    c.send(b"MAIL FROM\r\n").await;
    let r1 = c.reply().await;
    let r2 = c.reply().await;
    assert_eq!(r1.code, 501, "{r1:?}");
    assert_eq!(r2.code, 421, "{r2:?}");
    assert!(
        r2.text
            .starts_with("4.7.1 Too many bad commands from [127.0.0.80]"),
        "{r2:?}"
    );
    assert!(c.closed(Duration::from_secs(5)).await);
    // Banned at connect now; others are not.
    let g = greeting("127.0.0.80", p.addr).await;
    assert_eq!(g.code, 421);
    assert!(g.text.ends_with("(bad_commands)"), "{g:?}");
    assert_eq!(greeting("127.0.0.81", p.addr).await.code, 220);
    let l = list(admin).await;
    assert_eq!(l["bans"][0]["source"], "bad_commands");
    assert!(l["bans"][0]["expires_in"].as_u64().unwrap() <= 60);
    assert_eq!(bad_commands_verdicts(&p, "enforced"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_commands_observed_only_ban_nobody() {
    let (p, admin) = edge(
        "[policy.bans.bad_commands]\naction = \"observe\"\nper_ip = { count = 2, period = 600 }\nban_for = 60\n",
    )
    .await;
    let mut c = Raw::connect_from(ip("127.0.0.82"), p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    for _ in 0..4 {
        assert_eq!(c.cmd("FOO").await.code, 502);
    }
    assert_eq!(c.cmd("NOOP").await.code, 250);
    assert_eq!(list(admin).await["count"], 0);
    assert_eq!(bad_commands_verdicts(&p, "observed"), 1.0);
}

fn bad_commands_verdicts(p: &Proxy, action: &str) -> f64 {
    metric_value(
        &parse_metrics(&p.stats.encode()),
        "smtp_edge_policy_verdicts_total",
        &[("check", "bad_commands"), ("action", action)],
    )
}

fn shared_config(redis: &Redis) -> String {
    format!(
        "[policy.bans]\nstore = \"redis\"\n\
         [policy.bans.bad_commands]\naction = \"reject\"\nper_ip = {{ count = 1, period = 600 }}\nban_for = 300\n\
         [policy.limits.redis]\nurl = \"{}\"\n",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_on_redis_shares_its_bans_within_two_seconds() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let (a, admin_a) = edge(&shared_config(&redis)).await;
    let (b, admin_b) = edge(&shared_config(&redis)).await;
    // Banned through A's API: B refuses it within 2 s.
    let (s, _) = post_ban(
        admin_a,
        r#"{"address": "127.0.0.100", "ttl": 600, "reason": "fleet"}"#,
    )
    .await;
    assert_eq!(s, 201);
    let took = within(Duration::from_secs(2), async || {
        greeting("127.0.0.100", b.addr).await.code == 421
    })
    .await
    .expect("B refuses A's ban within 2 s");
    eprintln!("admin ban seen by B after {took:?}");
    assert_eq!(list(admin_b).await["bans"][0]["reason"], "fleet");
    assert!(
        redis
            .cli(&["PTTL", "smtp-edge:ban:127.0.0.100/32"])
            .trim()
            .parse::<i64>()
            .unwrap()
            > 590_000
    );
    // An automatic ban on B (over the bad_commands budget): A refuses it.
    let mut c = Raw::connect_from(ip("127.0.0.101"), b.addr).await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("FOO").await.code, 502);
    c.send(b"FOO\r\n").await;
    assert_eq!(c.reply().await.code, 502);
    assert_eq!(c.reply().await.code, 421);
    within(Duration::from_secs(2), async || {
        greeting("127.0.0.101", a.addr).await.code == 421
    })
    .await
    .expect("A refuses B's automatic ban within 2 s");
    // Lifted on B: A admits it again within 2 s.
    let (s, _) = http(admin_b, "DELETE", "/bans?address=127.0.0.100", None, None).await;
    assert_eq!(s, 200);
    within(Duration::from_secs(2), async || {
        greeting("127.0.0.100", a.addr).await.code == 220
    })
    .await
    .expect("A lifts the ban within 2 s");

    // Redis down: A's bans keep working; a ban added meanwhile is A's
    // alone, then the fleet's when Redis is back (restarted empty: A
    // writes back what it holds).
    redis.stop();
    assert_eq!(
        greeting("127.0.0.101", a.addr).await.code,
        421,
        "local copy enforced"
    );
    let (s, _) = post_ban(admin_a, r#"{"address": "127.0.0.102", "ttl": 600}"#).await;
    assert_eq!(s, 201, "adding never waits for Redis");
    assert_eq!(greeting("127.0.0.102", a.addr).await.code, 421);
    assert_eq!(
        greeting("127.0.0.103", a.addr).await.code,
        220,
        "mail goes on"
    );
    within(Duration::from_secs(3), async || {
        metric_value(
            &parse_metrics(&a.stats.encode()),
            "smtp_edge_bans_store_up",
            &[],
        ) == 0.0
    })
    .await
    .expect("the store shows down");
    redis.resume();
    within(Duration::from_secs(4), async || {
        greeting("127.0.0.102", b.addr).await.code == 421
    })
    .await
    .expect("B sees the ban A added while Redis was down");
    assert_eq!(
        greeting("127.0.0.101", b.addr).await.code,
        421,
        "still banned on B"
    );
    within(Duration::from_secs(2), async || {
        redis
            .cli(&["EXISTS", "smtp-edge:ban:127.0.0.101/32"])
            .trim()
            == "1"
    })
    .await
    .expect("what the instances held is on Redis again");
}
