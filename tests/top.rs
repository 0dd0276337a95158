//! A live view of who is sending: `GET /top` after real sessions (messages
//! and recipients through smtp-sink, refused recipients, a banned address
//! refused at accept, bad commands), sorted each way, per prefix, the ban
//! shown; `smtp-edge top --once` printing the same as a table; the
//! interactive `smtp-edge top` in a real pseudo-terminal (`script`),
//! sorted by a key and quit with `q`.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn top(admin: SocketAddr, q: &str) -> serde_json::Value {
    let (s, b) = http_get(admin, &format!("/top?{q}")).await;
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

/// A session from `from`: `msgs` messages of `rcpts` recipients each
/// (smtp-sink refuses none), and `bad` unknown commands.
async fn traffic(addr: SocketAddr, from: &str, msgs: usize, rcpts: usize, bad: usize) {
    let mut c = Raw::connect_from(ip(from), addr).await;
    assert_eq!(c.reply().await.code, 220);
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    for _ in 0..bad {
        assert_eq!(c.cmd("FOO").await.code, 502);
    }
    for _ in 0..msgs {
        assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
        for i in 0..rcpts {
            assert_eq!(
                c.cmd(&format!("RCPT TO:<r{i}@example.net>")).await.code,
                250
            );
        }
        assert_eq!(c.cmd("DATA").await.code, 354);
        c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n").await;
        assert_eq!(c.reply().await.code, 250);
    }
    c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn top_ranks_who_is_sending_and_shows_bans() {
    let Some(sink) = Sink::start(&[]) else {
        return;
    };
    let admin_port = free_port();
    let p = Proxy::to_backend(
        &sink.addr,
        &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\"\n"),
    )
    .await;
    let admin = p.admin.unwrap();
    traffic(p.addr, "127.0.0.20", 3, 1, 0).await;
    traffic(p.addr, "127.0.0.21", 1, 5, 0).await;
    traffic(p.addr, "127.0.0.21", 0, 0, 0).await;
    traffic(p.addr, "127.0.0.22", 0, 0, 3).await;
    // One still open.
    let mut open = Raw::connect_from(ip("127.0.0.23"), p.addr).await;
    assert_eq!(open.reply().await.code, 220);
    // A banned one, refused at accept twice.
    let (s, _) = http(
        admin,
        "POST",
        "/bans",
        Some(r#"{"address": "127.0.0.24"}"#),
        None,
    )
    .await;
    assert_eq!(s, 201);
    for _ in 0..2 {
        let mut c = Raw::connect_from(ip("127.0.0.24"), p.addr).await;
        assert_eq!(c.reply().await.code, 421);
    }

    let t = top(admin, "by=messages&n=2").await;
    assert_eq!(t["window"], 60);
    assert_eq!(t["by"], "messages");
    let a = t["addresses"].as_array().unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["address"], "127.0.0.20");
    assert_eq!(a[0]["messages"], 3);
    assert_eq!(a[0]["recipients"], 3);
    assert_eq!(a[1]["address"], "127.0.0.21");

    let t = top(admin, "by=recipients").await;
    assert_eq!(t["addresses"][0]["address"], "127.0.0.21");
    assert_eq!(t["addresses"][0]["recipients"], 5);
    assert_eq!(t["addresses"][0]["sessions"], 2);

    let t = top(admin, "by=refusals").await;
    let a = t["addresses"].as_array().unwrap();
    assert_eq!(a[0]["address"], "127.0.0.22");
    assert_eq!(a[0]["refusals"]["bad_command"], 3);
    assert_eq!(a[1]["address"], "127.0.0.24");
    assert_eq!(a[1]["refusals"]["ban"], 2);
    assert_eq!(a[1]["sessions"], 2);
    assert_eq!(a[1]["open"], 0);
    assert_eq!(a[1]["ban"]["source"], "admin");
    assert!(a[0]["ban"].is_null());

    let t = top(admin, "by=sessions").await;
    let open_row = t["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "127.0.0.23")
        .cloned()
        .unwrap();
    assert_eq!(open_row["open"], 1);
    // Every client is in 127.0.0.0/24: one prefix with everything.
    let pf = &t["prefixes"][0];
    assert_eq!(pf["prefix"], "127.0.0.0/24");
    assert_eq!(pf["sessions"], 7);
    assert_eq!(pf["messages"], 4);
    assert_eq!(pf["open"], 1);
    assert_eq!(t["tracked"]["addresses"], 5);

    for q in ["by=size", "n=0", "n=x"] {
        let (s, b) = http_get(admin, &format!("/top?{q}")).await;
        assert_eq!(s, 400, "{q}: {b}");
    }

    // The CLI: one table.
    let a = admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smtp-edge"))
            .args(["top", "--once", "--by", "refusals", "--admin", &a])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("smtp-edge top: last 60 s, by refusals"),
        "{text}"
    );
    assert!(lines[2].starts_with("ADDRESS"), "{text}");
    assert!(
        lines[3].starts_with("127.0.0.22") && lines[3].contains("bad_command (3)"),
        "{text}"
    );
    assert!(
        lines[4].starts_with("127.0.0.24") && lines[4].contains("admin 3"),
        "{text}"
    );
    drop(open);
}

/// The interactive table in a real pseudo-terminal (util-linux `script`):
/// drawn, re-sorted by `r`, left with `q`, exit status 0.
#[tokio::test(flavor = "multi_thread")]
async fn interactive_top_draws_sorts_and_quits() {
    let Some(script) = require_tool("script") else {
        return;
    };
    let admin_port = free_port();
    let p = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[admin]\naddress = \"127.0.0.1:{admin_port}\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\nmaildir = \"{{DIR}}/mail\"\n"
    ))
    .await;
    let mut c = Raw::connect_from(ip("127.0.0.30"), p.addr).await;
    assert_eq!(c.reply().await.code, 220);
    let cmd = format!(
        "{} top --admin 127.0.0.1:{admin_port} --interval 0.3",
        env!("CARGO_BIN_EXE_smtp-edge")
    );
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(script)
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        stdin.write_all(b"r").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        stdin.write_all(b"q").unwrap();
        stdin.flush().unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("by sessions"), "{screen}");
    assert!(screen.contains("by recipients"), "re-sorted by r: {screen}");
    assert!(screen.contains("127.0.0.30"), "{screen}");
    assert!(screen.contains("[q]uit"), "{screen}");
}
