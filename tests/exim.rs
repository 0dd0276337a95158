//! Exim 4.96 as the sending client, as an operator meets it: Exim sends
//! `MAIL, RCPT.., BDAT n LAST, QUIT` in one go and shuts its side of the
//! connection down before it reads the replies. Exim's package conflicts
//! with Postfix's, so `.ci/run` unpacks its `.deb` under
//! `/opt/smtp-edge-ci/exim` (`SMTP_EDGE_EXIM` names another exim4 binary)
//! and the test runs it with a config of its own (`-C`, spool and log in a
//! scratch directory; as root, Exim keeps running as root and says so).
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// The exim4 binary: `SMTP_EDGE_EXIM`, the one `.ci/run` unpacks, or an
/// installed one. None (skip) when absent outside CI.
fn exim_binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SMTP_EDGE_EXIM").map(PathBuf::from),
        Some(PathBuf::from("/opt/smtp-edge-ci/exim/usr/sbin/exim4")),
        Some(PathBuf::from("/usr/sbin/exim4")),
    ];
    if let Some(p) = candidates.into_iter().flatten().find(|p| p.is_file()) {
        return Some(p);
    }
    if ci() {
        panic!("exim4 is required when CI=true (.ci/run unpacks it into /opt/smtp-edge-ci/exim)");
    }
    eprintln!("SKIP: exim4 not found");
    None
}

/// One Exim client: its config sends every recipient to `port` on
/// loopback; its spool and log live in `dir`.
struct Exim {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Exim {
    fn new(port: u16) -> Option<Exim> {
        let bin = exim_binary()?;
        if !is_root() {
            if ci() {
                panic!("the Exim test needs root when CI=true");
            }
            eprintln!("SKIP: the Exim test needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let _ = Command::new("chmod").arg("-R").arg("777").arg(d).status();
        let conf = format!(
            "primary_hostname = exim-client.test\n\
             exim_path = {bin}\n\
             spool_directory = {d}/spool\n\
             log_file_path = {d}/log/%slog\n\
             keep_environment =\n\
             begin routers\n\
             to_edge:\n  driver = manualroute\n  route_list = * 127.0.0.1\n  transport = remote_smtp\n  self = send\n\
             begin transports\n\
             remote_smtp:\n  driver = smtp\n  port = {port}\n  hosts_avoid_tls = *\n\
             begin retry\n\
             * * F,1h,1s\n",
            bin = bin.display(),
            d = d.display(),
        );
        std::fs::write(d.join("exim.conf"), conf).unwrap();
        Some(Exim { bin, dir })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-C").arg(self.dir.path().join("exim.conf"));
        c
    }

    /// Submits a message and delivers it in the foreground (`-odi`).
    fn send(&self, from: &str, rcpts: &[&str], body: &str) {
        let mut c = self.cmd();
        c.arg("-odi").arg("-f").arg(from).args(rcpts);
        c.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c.spawn().expect("run exim4");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        child.wait().unwrap();
    }

    /// One forced queue run (what Exim's daemon does at its interval).
    fn queue_run(&self) {
        let mut c = self.cmd();
        c.arg("-qff").stdout(Stdio::null()).stderr(Stdio::null());
        c.status().expect("exim4 -qff");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/mainlog")).unwrap_or_default()
    }

    fn queue_empty(&self) -> bool {
        fn files(p: &Path) -> usize {
            std::fs::read_dir(p).map_or(0, |rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            files(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
        }
        files(&self.dir.path().join("spool/input")) == 0
    }
}

/// A fresh edge (its pool empty, so the MAIL waits for a backend connection
/// while Exim has already half-closed): the message is delivered. Before
/// the fix, the edge took the end of input for a hang-up and Exim deferred
/// every first message with "Remote host closed connection in response to
/// pipelined end of data".
#[tokio::test]
async fn exim_first_message_through_a_fresh_edge() {
    let Some(sink) = Sink::start(&[]) else { return };
    let p = Proxy::to_backend(&sink.addr, "").await;
    let Some(exim) = Exim::new(p.addr.port()) else {
        return;
    };
    let e = tokio::task::spawn_blocking(move || {
        exim.send(
            "sender@example.org",
            &["box@example.org"],
            "Subject: from exim\n\nhello\n",
        );
        exim
    })
    .await
    .unwrap();
    let m = sink.wait_messages(1, WAIT);
    assert_eq!(m.len(), 1, "{}", e.log());
    assert!(m[0].contains("Subject: from exim"), "{}", m[0]);
    assert!(e.log().contains("=> box@example.org"), "{}", e.log());
    assert!(!e.log().contains("closed connection"), "{}", e.log());
}

/// Exim sends one message to three routes: the first route's recipients
/// in the first transaction, the others (452 4.5.3, deferred by Exim) in
/// its next queue runs, each at its group's backend exactly once.
#[tokio::test]
async fn exim_sends_one_message_to_three_routes() {
    let Some(sinks) = (|| Some([Sink::start(&[])?, Sink::start(&[])?, Sink::start(&[])?]))() else {
        return;
    };
    let mut t = String::from("hostname = \"edge.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for (s, g) in sinks.iter().zip(["ga", "gb", "gc"]) {
        t.push_str(&format!(
            "[[backend]]\naddress = \"{}\"\ngroup = \"{g}\"\n",
            s.addr
        ));
    }
    t.push_str(
        "[[route]]\ndomains = [\"a.example\"]\ngroup = \"ga\"\n\
         [[route]]\ndomains = [\"b.example\"]\ngroup = \"gb\"\n\
         [[route]]\ndomains = [\"*.c.example\"]\ngroup = \"gc\"\n",
    );
    let p = Proxy::start(&t).await;
    let Some(exim) = Exim::new(p.addr.port()) else {
        return;
    };
    let exim = tokio::task::spawn_blocking(move || {
        exim.send(
            "sender@example.org",
            &[
                "a1@a.example",
                "b1@b.example",
                "a2@a.example",
                "c1@x.c.example",
            ],
            "Subject: three routes\nMessage-ID: <exim3@example.org>\n\nhello\n",
        );
        let end = Instant::now() + Duration::from_secs(30);
        while !exim.queue_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1100));
            exim.queue_run();
        }
        exim
    })
    .await
    .unwrap();
    assert!(exim.queue_empty(), "{}", exim.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let want: [&[&str]; 3] = [
        &["a1@a.example", "a2@a.example"],
        &["b1@b.example"],
        &["c1@x.c.example"],
    ];
    for (s, want) in sinks.iter().zip(want) {
        let m = s.messages();
        assert_eq!(m.len(), 1, "{}: {m:?}\n{}", s.addr, exim.log());
        assert_eq!(Sink::rcpts(&m[0]), want.to_vec());
        assert!(m[0].contains("Message-ID: <exim3@example.org>"), "{}", m[0]);
    }
    let log = exim.log();
    assert!(log.contains("452 4.5.3"), "{log}");
    assert!(!log.contains("**"), "nothing bounced: {log}");
}
