//! deploy/fail2ban/ checked by fail2ban's own tools against real log lines.
//!
//! The built binary runs once per `[telemetry] log_format` (text and JSON)
//! with a policy that refuses at connect (deny list, concurrency cap) and
//! at EHLO (`reject` and `defer`), and observes one HELO check; clients on
//! 127.0.0.x, `::1` and an IPv4-mapped listener (logged as
//! `::ffff:127.0.0.5`) trigger each once or twice. Then, on the log it
//! wrote to stderr:
//!
//! - every enforced refusal line has the shape deploy/fail2ban/README.md
//!   documents (the fields the filter relies on, in their order);
//! - `fail2ban-regex` with filter.d/smtp-edge.conf matches exactly the
//!   enforced refusals, in order, each with its client as the host to ban
//!   (the IPv4-mapped one as plain IPv4) and its check, finds the date on
//!   every line, and matches neither the observe-mode line nor any other;
//! - with the jail's own `filter = smtp-edge[checks="..."]` it matches the
//!   same minus the checks the jail leaves out (the concurrency cap), and
//!   `actions="reject"` leaves out the `defer` one;
//! - the same lines as the systemd backend hands them over (`host
//!   ident[pid]: ` before the message) match the same way;
//! - a refusal text forging the fields of another address (what a client
//!   could put in it) still names the real client, and a forged observe
//!   line matches nothing.
//!
//! The jail: `fail2ban-client -t` on a copy of /etc/fail2ban with only this
//! jail enabled, the unit name and ports it names against deploy/systemd/,
//! and every check the proxy has (`Check::ALL`) either in its `checks` or
//! left out on purpose (`LEFT_OUT`): a new check fails until someone
//! decides. A missing fail2ban skips, except under CI=true.
mod common;
use common::*;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_smtp-edge");
const FILTER: &str = "deploy/fail2ban/filter.d/smtp-edge.conf";
const JAIL: &str = "deploy/fail2ban/jail.d/smtp-edge.conf";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// One refusal the scenario causes: the client as logged, the host
/// fail2ban should ban, the check, the action and the code.
#[derive(Debug, Clone, PartialEq)]
struct Refusal {
    client: &'static str,
    host: &'static str,
    check: &'static str,
    action: &'static str,
    code: u16,
}

const fn refusal(
    client: &'static str,
    host: &'static str,
    check: &'static str,
    action: &'static str,
    code: u16,
) -> Refusal {
    Refusal {
        client,
        host,
        check,
        action,
        code,
    }
}

/// The enforced refusals of [`run_scenario`], in the order they happen.
const ENFORCED: [Refusal; 8] = [
    refusal("127.0.0.2", "127.0.0.2", "deny_list", "reject", 554),
    refusal("127.0.0.2", "127.0.0.2", "deny_list", "reject", 554),
    refusal("127.0.0.3", "127.0.0.3", "helo_syntax", "reject", 501),
    refusal("127.0.0.3", "127.0.0.3", "helo_syntax", "reject", 501),
    refusal("127.0.0.3", "127.0.0.3", "helo_bare_ip", "defer", 450),
    refusal("127.0.0.4", "127.0.0.4", "concurrency", "reject", 421),
    refusal("::1", "::1", "helo_syntax", "reject", 501),
    refusal(
        "::ffff:127.0.0.5",
        "127.0.0.5",
        "helo_syntax",
        "reject",
        501,
    ),
];

/// The one observe-mode refusal: (client, check, would).
const OBSERVED: (&str, &str, u16) = ("127.0.0.3", "helo_fqdn", 504);

/// Starts the binary with `format` logs, runs the clients, stops it with
/// SIGTERM (so every line is written) and returns its log.
async fn run_scenario(format: &str, dir: &Path) -> String {
    let (p4, p6, pm) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"hostname = "mx.example.net"
[[listener]]
address = "127.0.0.1:{p4}"
[[listener]]
address = "[::1]:{p6}"
# An IPv6 socket taking IPv4 clients: they are logged IPv4-mapped.
[[listener]]
address = "[::ffff:127.0.0.1]:{pm}"
[[backend]]
maildir = "{mail}"
[timeouts]
shutdown_grace = 1
[policy]
delay_reject = false
deny = ["127.0.0.2/32"]
[policy.rdns]
lookup = false
[policy.helo]
syntax = "reject"
bare_ip = "defer"
fqdn = "observe"
not_ours = "off"
[policy.limits.concurrency]
action = "reject"
per_ip = 1
per_prefix = 0
[telemetry]
log_format = "{format}"
"#,
        mail = dir.join("mail").display()
    );
    let path = dir.join("smtp-edge.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("{format}.log"));
    let v4: SocketAddr = format!("127.0.0.1:{p4}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{p6}").parse().unwrap();
    let mapped: SocketAddr = format!("127.0.0.1:{pm}").parse().unwrap();
    let mut proc = Running::listening(Command::new(BIN).arg("--config").arg(&path), &log, v4).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // The other listeners, each probed by a whole session: its slot is
    // free once the 221 arrives (::1 comes back below, per_ip = 1).
    for addr in [v6, mapped] {
        let end = Instant::now() + Duration::from_secs(10);
        let mut probe = loop {
            // The IPv4 probe comes from 127.0.0.9: `Running::listening`'s
            // own connection from 127.0.0.1 may be accepted only now
            // (per_ip = 1 would then refuse one of the two, a refusal
            // line the filter must not see).
            let s = if addr.is_ipv4() {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
                sock.connect(addr).await
            } else {
                tokio::net::TcpStream::connect(addr).await
            };
            if let Ok(s) = s {
                break Raw::from_parts(s, Vec::new());
            }
            assert!(
                Instant::now() < end,
                "{addr} not listening:\n{}",
                log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(probe.reply().await.code, 220, "probe of {addr}");
        assert_eq!(probe.cmd("QUIT").await.code, 221, "probe of {addr}");
    }
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let greeted = |src: &'static str, addr: SocketAddr| async move {
        let mut c = Raw::connect_from(ip(src), addr).await;
        assert_eq!(c.reply().await.code, 220, "greeting for {src}");
        c
    };

    // Deny-listed: refused at connect, twice.
    for _ in 0..2 {
        let mut c = Raw::connect_from(ip("127.0.0.2"), v4).await;
        assert_eq!(c.reply().await.code, 554);
    }
    // HELO checks: reject (twice, one name with a quote in it), defer,
    // observe; then a clean end.
    let mut c = greeted("127.0.0.3", v4).await;
    assert_eq!(c.cmd("EHLO bad..name").await.code, 501);
    assert_eq!(c.cmd("EHLO a\"b").await.code, 501);
    assert_eq!(c.cmd("EHLO 1.2.3.4").await.code, 450);
    assert_eq!(c.cmd("EHLO localhost").await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);
    // The concurrency cap: a second session while the first is open.
    let mut held = greeted("127.0.0.4", v4).await;
    assert_eq!(held.cmd("EHLO mail.example.org").await.code, 250);
    let mut second = Raw::connect_from(ip("127.0.0.4"), v4).await;
    assert_eq!(second.reply().await.code, 421);
    assert_eq!(held.cmd("QUIT").await.code, 221);
    // IPv6, and IPv4 on an IPv6 socket.
    for (src, addr) in [("::1", v6), ("127.0.0.5", mapped)] {
        let mut c = greeted(src, addr).await;
        assert_eq!(c.cmd("EHLO bad..name").await.code, 501);
        assert_eq!(c.cmd("QUIT").await.code, 221);
    }
    // A clean session: no refusal.
    let mut c = greeted("127.0.0.6", v4).await;
    assert_eq!(c.cmd("EHLO mail.example.org").await.code, 250);
    assert_eq!(c.cmd("QUIT").await.code, 221);

    proc.terminated(Duration::from_secs(10), &log).await;
    log_text()
}

/// The documented shape (deploy/fail2ban/README.md) of an enforced
/// refusal's line: what the filter's regexes rely on.
fn refusal_line_shape(format: &str, line: &str, r: &Refusal) -> bool {
    let Refusal {
        client,
        check,
        action,
        code,
        ..
    } = r;
    match format {
        "text" => {
            line.contains(" policy: ")
                && line.ends_with(&format!(
                    " client={client} check=\"{check}\" action=\"{action}\" code={code}"
                ))
        }
        _ => {
            line.contains(r#""fields":{"message":"policy: "#)
                && line.contains(&format!(
                    r#"","client":"{client}","check":"{check}","action":"{action}","code":{code}}}"#
                ))
        }
    }
}

/// The observe-mode line of [`OBSERVED`] in `format`.
fn observe_line_shape(format: &str, line: &str) -> bool {
    let (client, check, would) = OBSERVED;
    match format {
        "text" => {
            line.contains(" policy (observe): ")
                && line.ends_with(&format!(
                    " client={client} check=\"{check}\" action=\"observe\" would={would}"
                ))
        }
        _ => line.contains(r#""fields":{"message":"policy (observe): "#)
            && line.contains(&format!(
                r#"","client":"{client}","check":"{check}","action":"observe","would":{would}}}"#
            )),
    }
}

/// What `fail2ban-regex` made of a log.
#[derive(Debug)]
struct Matched {
    /// `(host, check)` of every match, in order.
    hits: Vec<(String, String)>,
    lines: usize,
    matched: usize,
    /// Lines whose date the filter's datepattern found.
    dated: usize,
    output: String,
}

/// Runs `fail2ban-regex` on `lines` with `filter` (a file, or a filter
/// name with options looked up in `confdir`).
fn fail2ban_regex(
    tool: &Path,
    confdir: &Path,
    lines: &str,
    filter: &str,
    scratch: &Path,
) -> Matched {
    let log = scratch.join("f2b-input.log");
    std::fs::write(&log, lines).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(tool)
            .arg("-c")
            .arg(confdir)
            .args(extra)
            .arg(&log)
            .arg(filter)
            .output()
            .expect("run fail2ban-regex");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fail2ban-regex {filter}:\n{text}");
        text
    };
    let output = run(&["--print-all-missed"]);
    let hits = run(&["-o", "<ip> <F-CHECK>"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (h, c) = l.split_once(' ').unwrap_or((l, ""));
            (h.to_string(), c.to_string())
        })
        .collect();
    // "Lines: 16 lines, 0 ignored, 6 matched, 10 missed"
    let summary = output
        .lines()
        .find_map(|l| l.strip_prefix("Lines: "))
        .unwrap_or_else(|| panic!("no summary in:\n{output}"));
    let count = |what: &str| -> usize {
        summary
            .split(", ")
            .find_map(|p| p.strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{what}` in {summary:?}"))
    };
    // "|  [16] Year-Month-DayT24hour:..." under "Date template hits:"
    let dated = output
        .split("Date template hits:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .take_while(|l| !l.starts_with('`'))
        .filter_map(|l| {
            l.split_once('[')?
                .1
                .split_once(']')?
                .0
                .parse::<usize>()
                .ok()
        })
        .sum();
    // fail2ban reads a last line only once it ends.
    assert_eq!(
        count(" lines"),
        lines.lines().count(),
        "fail2ban-regex read another number of lines:\n{output}"
    );
    Matched {
        hits,
        lines: count(" lines"),
        matched: count(" matched"),
        dated,
        output,
    }
}

/// The jail's `filter = ...` value: the filter with the jail's options.
fn jail_filter() -> String {
    let jail = std::fs::read_to_string(repo(JAIL)).unwrap();
    jail.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "filter").then(|| v.trim().to_string())
        })
        .expect("no filter = line in the jail")
}

fn expect_hits(list: &[Refusal]) -> Vec<(String, String)> {
    list.iter()
        .map(|r| (r.host.to_string(), r.check.to_string()))
        .collect()
}

async fn filter_matches_refusals(format: &str) {
    let Some(tool) = require_tool("fail2ban-regex") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = run_scenario(format, dir.path()).await;
    let lines: Vec<&str> = log.lines().collect();

    // The shape the filter relies on, line by line.
    let mut from = 0;
    for r in &ENFORCED {
        let at = lines[from..]
            .iter()
            .position(|l| refusal_line_shape(format, l, r))
            .unwrap_or_else(|| {
                panic!(
                    "no {format} line for {r:?} in the documented shape \
                     (deploy/fail2ban/README.md) after line {from}:\n{log}"
                )
            });
        from += at + 1;
    }
    let shaped = lines
        .iter()
        .filter(|l| ENFORCED.iter().any(|r| refusal_line_shape(format, l, r)))
        .count();
    assert_eq!(shaped, ENFORCED.len(), "refusal lines:\n{log}");
    assert!(
        lines.iter().any(|l| observe_line_shape(format, l)),
        "no observe-mode line for {OBSERVED:?}:\n{log}"
    );

    // A config directory holding the filter, for the jail's `name[options]`.
    let conf = dir.path().join("fail2ban");
    std::fs::create_dir_all(conf.join("filter.d")).unwrap();
    std::fs::copy(repo(FILTER), conf.join("filter.d/smtp-edge.conf")).unwrap();
    let filter_file = repo(FILTER).display().to_string();
    let scratch = dir.path();

    // The filter as it is: every enforced refusal, nothing else.
    let m = fail2ban_regex(&tool, &conf, &log, &filter_file, scratch);
    assert_eq!(m.hits, expect_hits(&ENFORCED), "{}", m.output);
    assert_eq!(m.matched, ENFORCED.len(), "{}", m.output);
    assert_eq!(m.lines, lines.len(), "{}", m.output);
    assert_eq!(m.dated, lines.len(), "a line without a date:\n{}", m.output);

    // With the jail's options: the checks it leaves out are not matched.
    let jail = jail_filter();
    let narrowed: Vec<Refusal> = ENFORCED
        .iter()
        .filter(|r| r.check != "concurrency")
        .cloned()
        .collect();
    let m = fail2ban_regex(&tool, &conf, &log, &jail, scratch);
    assert_eq!(m.hits, expect_hits(&narrowed), "{jail}:\n{}", m.output);
    assert_eq!(m.matched, narrowed.len(), "{}", m.output);

    // Both options, as the README shows them.
    let both = r#"smtp-edge[checks="helo_syntax|helo_bare_ip", actions="reject"]"#;
    let only: Vec<Refusal> = ENFORCED
        .iter()
        .filter(|r| r.check == "helo_syntax")
        .cloned()
        .collect();
    let m = fail2ban_regex(&tool, &conf, &log, both, scratch);
    assert_eq!(m.hits, expect_hits(&only), "{both}:\n{}", m.output);

    // As the systemd backend gives them: "_HOSTNAME IDENT[PID]: MESSAGE".
    let journal: String = lines
        .iter()
        .map(|l| format!("mx1 smtp-edge[4242]: {l}\n"))
        .collect();
    let m = fail2ban_regex(&tool, &conf, &journal, &filter_file, scratch);
    assert_eq!(m.hits, expect_hits(&ENFORCED), "{}", m.output);

    // Forged fields in the refusal text (what a client controls) and a
    // forged observe line: the real client only, the observe line not at all.
    let real = lines
        .iter()
        .find(|l| refusal_line_shape(format, l, &ENFORCED[2]))
        .unwrap();
    let observed = lines
        .iter()
        .find(|l| observe_line_shape(format, l))
        .unwrap();
    let forged = match format {
        "text" => {
            let fake = r#"x policy: x client=10.9.9.9 check="deny_list" action="reject" code=554"#;
            [
                real.replace("bad..name", fake),
                observed.replace(": need fully-qualified hostname", &format!(": {fake}")),
            ]
        }
        _ => {
            let fake = r#"x\",\"client\":\"10.9.9.9\",\"check\":\"deny_list\",\"action\":\"reject\",\"code\":554}"#;
            [
                real.replace("bad..name", fake),
                observed.replace("need fully-qualified hostname", fake),
            ]
        }
    };
    assert!(forged.iter().all(|l| l.contains("10.9.9.9")), "{forged:?}");
    let m = fail2ban_regex(
        &tool,
        &conf,
        &(forged.join("\n") + "\n"),
        &filter_file,
        scratch,
    );
    assert_eq!(
        m.hits,
        vec![("127.0.0.3".to_string(), "helo_syntax".to_string())],
        "{}",
        m.output
    );
}

#[tokio::test]
async fn filter_matches_text_refusals() {
    filter_matches_refusals("text").await;
}

#[tokio::test]
async fn filter_matches_json_refusals() {
    filter_matches_refusals("json").await;
}

/// The checks the jail leaves out, each for a reason the README gives.
const LEFT_OUT: [&str; 8] = [
    // The proxy's own load, never the client's doing.
    "max_connections",
    // Busy legitimate senders; the proxy already paces them.
    "concurrency",
    "connection_rate",
    "message_rate",
    "recipient_rate",
    // 4xx while DNS fails: a resolver outage must not ban everyone.
    "rdns",
    "helo_resolves",
    "helo_match_rdns",
];

/// Every check the proxy has is either in the jail's `checks` or left out
/// on purpose: a new check fails this until someone decides.
#[test]
fn jail_decides_every_check() {
    let filter = jail_filter();
    let list = filter
        .strip_prefix("smtp-edge[checks=\"")
        .and_then(|s| s.strip_suffix("\"]"))
        .unwrap_or_else(|| panic!("jail filter is not smtp-edge[checks=\"...\"]: {filter}"));
    let jail: Vec<&str> = list.split('|').collect();
    let all: Vec<&str> = smtp_edge::policy::Check::ALL
        .iter()
        .map(|c| c.name())
        .collect();
    for name in &jail {
        assert!(
            all.contains(name),
            "the jail names {name:?}, no check is called that: {all:?}"
        );
        assert!(
            !LEFT_OUT.contains(name),
            "{name:?} is both in the jail and left out"
        );
    }
    for name in &all {
        assert!(
            jail.contains(name) || LEFT_OUT.contains(name),
            "check {name:?} is neither in the jail's checks nor in LEFT_OUT: decide \
             (deploy/fail2ban/jail.d/smtp-edge.conf and README.md)"
        );
    }
}

/// The jail loads in fail2ban (`fail2ban-client -t` on a copy of the
/// installed configuration with only this jail), reads the unit's journal
/// and bans on the ports deploy/systemd/smtp-edge.toml listens on.
#[test]
fn jail_loads_and_fits_the_systemd_unit() {
    let Some(client) = require_tool("fail2ban-client") else {
        return;
    };
    let etc = Path::new("/etc/fail2ban");
    assert!(etc.join("jail.conf").is_file(), "{} missing", etc.display());
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fail2ban");
    let st = Command::new("cp")
        .arg("-r")
        .arg(etc)
        .arg(&conf)
        .status()
        .unwrap();
    assert!(st.success(), "cp -r /etc/fail2ban");
    // Only this jail: the distribution's (Debian: sshd) need their logs.
    for d in ["jail.d", "jail.local"] {
        let _ = std::fs::remove_dir_all(conf.join(d));
        let _ = std::fs::remove_file(conf.join(d));
    }
    std::fs::create_dir_all(conf.join("jail.d")).unwrap();
    std::fs::copy(repo(FILTER), conf.join("filter.d/smtp-edge.conf")).unwrap();
    std::fs::copy(repo(JAIL), conf.join("jail.d/smtp-edge.conf")).unwrap();
    let run = |arg: &str| {
        let out = Command::new(&client)
            .arg("-c")
            .arg(&conf)
            .arg(arg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fail2ban-client {arg}:\n{text}");
        text
    };
    let test = run("-t");
    assert!(
        test.contains("OK: configuration test is successful"),
        "{test}"
    );
    let dump = run("-d");
    for want in [
        "['add', 'smtp-edge', 'systemd']",
        "'addjournalmatch', '_SYSTEMD_UNIT=smtp-edge.service'",
        "['set', 'smtp-edge', 'maxretry', 5]",
        "['start', 'smtp-edge']",
    ] {
        assert!(dump.contains(want), "no {want} in:\n{dump}");
    }
    assert!(
        repo("deploy/systemd/smtp-edge.service").is_file(),
        "the journal match names smtp-edge.service"
    );

    // Every SMTP listener of the host's config is among the jail's ports.
    let jail = std::fs::read_to_string(repo(JAIL)).unwrap();
    let ports: Vec<u16> = jail
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "port").then(|| v.trim().to_string())
        })
        .expect("no port = line in the jail")
        .split(',')
        .map(|p| match p.trim() {
            "smtp" => 25,
            "submissions" => 465,
            n => n.parse().unwrap_or_else(|_| panic!("port {n:?}")),
        })
        .collect();
    let host: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo("deploy/systemd/smtp-edge.toml")).unwrap())
            .unwrap();
    for l in host["listener"].as_array().unwrap() {
        let addr: SocketAddr = l["address"].as_str().unwrap().parse().unwrap();
        assert!(
            ports.contains(&addr.port()),
            "listener {addr} not in the jail's ports {ports:?}"
        );
    }
}
