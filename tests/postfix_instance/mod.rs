//! A private, real Postfix owned by one test: its own config directory,
//! queue, data directory, Maildir and log file under a temp dir, smtpd on one
//! free loopback port. Started with `postfix -c DIR/conf start`, stopped in
//! Drop. Needs `mod common;` beside it (tool lookup, free ports).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{ci, free_port, is_root, require_tool};

const MAIN_CF: &str = include_str!("main.cf.in");
const MASTER_CF: &str = include_str!("master.cf.in");

/// One running Postfix instance (master, qmgr, smtpd, virtual, postlogd, ...).
pub struct Postfix {
    /// `127.0.0.1:port` of its smtpd.
    pub addr: String,
    pub port: u16,
    /// Everything of the instance lives here; removed on drop.
    pub dir: tempfile::TempDir,
    postfix: PathBuf,
    /// Source port of the start-up probe connection (not counted as a
    /// client by `connects`).
    probe_port: u16,
}

fn uid_gid(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").arg(flag).arg(user).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Skip (or, under CI, fail) with a message.
fn unavailable(why: &str) -> Option<Postfix> {
    if ci() {
        panic!("real-Postfix tests need {why} when CI=true");
    }
    eprintln!("SKIP: real-Postfix test: {why}");
    None
}

impl Postfix {
    /// Starts a fresh instance; `extra_main_cf` is appended to main.cf
    /// (later settings win). None (with a SKIP message) when Postfix is not
    /// installed or we are not root; under CI=true that panics instead.
    pub fn start(extra_main_cf: &str) -> Option<Postfix> {
        let postfix = require_tool("postfix")?;
        if !is_root() {
            return unavailable("root (Postfix's master must start as root)");
        }
        let Some((pf_uid, _)) = uid_gid("postfix") else {
            return unavailable("the `postfix` user");
        };
        // The Maildir owner; virtual(8) delivers as this uid.
        let Some((uid, gid)) = uid_gid("nobody") else {
            return unavailable("the `nobody` user");
        };
        let dir = tempfile::Builder::new()
            .prefix("smtp-edge-postfix.")
            .tempdir()
            .unwrap();
        let d = dir.path();
        // Postfix daemons (user postfix) and virtual (nobody) must reach in.
        chmod(d, 0o755);
        for sub in ["conf", "queue", "data", "mail"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            chmod(&d.join(sub), 0o755);
        }
        std::os::unix::fs::chown(d.join("data"), Some(pf_uid), None).unwrap();
        std::os::unix::fs::chown(d.join("mail"), Some(uid), Some(gid)).unwrap();
        // Postfix's own user must be able to write the log too: before
        // postlogd runs, `postfix start`'s postsuper writes to it directly as
        // that user, and a warning it cannot write (a queue file an abort left
        // half-written: "bogus file name") is fatal to the start.
        std::fs::write(d.join("maillog"), "").unwrap();
        std::os::unix::fs::chown(d.join("maillog"), Some(pf_uid), None).unwrap();

        let mut last_err = String::new();
        for _attempt in 0..4 {
            let port = free_port();
            let fill = |t: &str| {
                t.replace("{DIR}", &d.display().to_string())
                    .replace("{PORT}", &port.to_string())
                    .replace("{UID}", &uid.to_string())
                    .replace("{GID}", &gid.to_string())
            };
            let mut main_cf = fill(MAIN_CF);
            main_cf.push_str("\n# Test-specific settings\n");
            main_cf.push_str(extra_main_cf);
            main_cf.push('\n');
            std::fs::write(d.join("conf/main.cf"), main_cf).unwrap();
            std::fs::write(d.join("conf/master.cf"), fill(MASTER_CF)).unwrap();
            let addr = format!("127.0.0.1:{port}");
            // `postfix start` runs master with -w: it returns once master
            // has bound its sockets (or failed).
            let out = Command::new(&postfix)
                .arg("-c")
                .arg(d.join("conf"))
                .arg("start")
                .output()
                .expect("run postfix start");
            if out.status.success() {
                if let Some(probe_port) = wait_listening(&addr, Duration::from_secs(5)) {
                    return Some(Postfix {
                        addr,
                        port,
                        dir,
                        postfix,
                        probe_port,
                    });
                }
            }
            last_err = format!(
                "postfix start: {}\nstdout: {}\nstderr: {}\nmaillog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(d.join("maillog")).unwrap_or_default()
            );
            shutdown(&postfix, d);
            if !last_err.contains("in use") {
                break;
            }
            // Somebody took the free port in between: try another one.
            std::fs::write(d.join("maillog"), "").unwrap();
        }
        panic!(
            "could not start a private Postfix instance in {}:\n{last_err}",
            d.display()
        );
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// The Maildir all example.org recipients are delivered to.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail/box")
    }

    /// The whole log (postlogd's `maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The log lines of one queue id.
    pub fn log_of(&self, queue_id: &str) -> Vec<String> {
        let tag = format!(": {queue_id}: ");
        self.log()
            .lines()
            .filter(|l| l.contains(&tag))
            .map(str::to_string)
            .collect()
    }

    /// Polls the log until `pred` holds for it; panics with the log after
    /// `t`.
    pub async fn wait_log(&self, what: &str, t: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + t;
        loop {
            let log = self.log();
            if pred(&log) {
                return log;
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what} in the Postfix log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the message `queue_id` was delivered (status=sent in the
    /// log) and returns the Maildir file holding it (Postfix's own Received
    /// header names the queue id).
    pub async fn wait_delivered(&self, queue_id: &str, t: Duration) -> (PathBuf, Vec<u8>) {
        let sent = format!(": {queue_id}: to=<");
        self.wait_log(&format!("delivery of {queue_id}"), t, |log| {
            log.lines()
                .any(|l| l.contains(&sent) && l.contains("status="))
        })
        .await;
        let lines = self.log_of(queue_id);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&sent) && l.contains("status=sent")),
            "{queue_id} was not delivered:\n{}",
            self.log()
        );
        let marker = format!(" id {queue_id}\n");
        for (path, bytes) in self.delivered() {
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return (path, bytes);
            }
        }
        panic!(
            "{queue_id} logged as delivered but not found in {}:\n{}",
            self.maildir().display(),
            self.log()
        );
    }

    /// Every delivered message (Maildir new/ and cur/), oldest first.
    pub fn delivered(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(rd) = std::fs::read_dir(self.maildir().join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                files.push(e.path());
            }
        }
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .into_iter()
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect()
    }

    /// Number of SMTP connections smtpd accepted so far (the start-up
    /// probe not counted).
    pub fn connects(&self) -> usize {
        let probe = format!("[127.0.0.1]:{}", self.probe_port);
        self.log()
            .lines()
            .filter(|l| l.contains("/smtpd[") && l.contains("]: connect from "))
            .filter(|l| !l.trim_end().ends_with(&probe))
            .count()
    }
}

impl Postfix {
    /// Stops the whole instance (master and children: smtpd sessions in
    /// progress are cut), as a crash or an operator's stop would.
    pub fn stop(&self) {
        shutdown(&self.postfix, self.dir.path());
    }

    /// Starts it again after `stop`, on the same port, with its queue.
    /// Robust against a slow or failed start on a busy machine (it once
    /// failed in CI's first full run, listening not within 5 s; the cause
    /// found later was a log file Postfix's user could not write, see
    /// `start`, and tests/fault_run.rs has its regression test): the
    /// stop's leftovers (processes killed but not yet gone) are awaited
    /// first, and a start that is not listening within 8 s is stopped and
    /// tried again, for up to 25 s in all.
    pub fn start_again(&self) {
        let end = Instant::now() + Duration::from_secs(25);
        let mut tries = Vec::new();
        loop {
            let gone_by = Instant::now() + Duration::from_secs(3);
            while !processes(self.dir.path()).is_empty() && Instant::now() < gone_by {
                std::thread::sleep(Duration::from_millis(25));
            }
            let t = Instant::now();
            let out = Command::new(&self.postfix)
                .arg("-c")
                .arg(self.conf_dir())
                .arg("start")
                .output()
                .expect("run postfix start");
            if out.status.success() && wait_listening(&self.addr, Duration::from_secs(8)).is_some()
            {
                return;
            }
            tries.push(format!(
                "start exit {:?} after {:?}: {}",
                out.status.code(),
                t.elapsed(),
                String::from_utf8_lossy(&out.stderr)
            ));
            assert!(
                Instant::now() < end,
                "postfix start again:\n{}\n{}",
                tries.join("\n"),
                self.log()
            );
            shutdown(&self.postfix, self.dir.path());
        }
    }

    /// Every file in its message queues (maildrop, incoming, active,
    /// deferred, hold), with its permission bits and length (None: its
    /// metadata could not be read).
    fn queue_entries(&self) -> Vec<(PathBuf, Option<(u32, u64)>)> {
        use std::os::unix::fs::PermissionsExt;
        fn walk(p: &Path, out: &mut Vec<(PathBuf, Option<(u32, u64)>)>) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path(), out),
                    Ok(m) => out.push((e.path(), Some((m.permissions().mode() & 0o7777, m.len())))),
                    Err(_) => out.push((e.path(), None)),
                }
            }
        }
        let q = self.dir.path().join("queue");
        let mut out = Vec::new();
        for d in ["maildrop", "incoming", "active", "deferred", "hold"] {
            walk(&q.join(d), &mut out);
        }
        out
    }

    /// The files in its queue directories with their modes, for a failure
    /// message: what `wait_queue_empty` waited for.
    pub fn queue_files(&self) -> String {
        self.queue_entries()
            .iter()
            .map(|(p, meta)| match meta {
                Some((mode, len)) => format!("{} {mode:o} {len} bytes", p.display()),
                None => format!("{} (no metadata)", p.display()),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until its queue holds no message (every one accepted has been
    /// delivered or bounced); false after `t`.
    pub fn wait_queue_empty(&self, t: Duration) -> bool {
        /// Whether a 250 was given for the file, so it must be delivered.
        fn accepted(path: &Path, meta: Option<(u32, u64)>) -> bool {
            // A cleanup killed mid-write leaves its temporary file
            // (`incoming/PID.USEC`, never a queue ID, which has no dot)
            // that nothing will deliver or remove: no 250 was given for it
            // (the file is renamed to its queue ID before cleanup answers).
            let temporary = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains('.'));
            // Or the file already under its queue ID but not yet marked
            // complete: cleanup sets the owner's execute bit (Postfix's
            // MAIL_QUEUE_STAT_READY, rwx) last, before its 250; qmgr never
            // opens a file without it.
            // (A file whose mode cannot be read is waited for.)
            let complete = meta.is_none_or(|(mode, _)| mode & 0o700 == 0o700);
            !temporary && complete
        }
        let end = Instant::now() + t;
        loop {
            let left = self
                .queue_entries()
                .into_iter()
                .filter(|(path, meta)| accepted(path, *meta))
                .count();
            if left == 0 {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        shutdown(&self.postfix, self.dir.path());
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Polls until smtpd accepts on `addr`; returns the probe's source port.
fn wait_listening(addr: &str, t: Duration) -> Option<u16> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        if let Ok(s) = std::net::TcpStream::connect(addr) {
            return s.local_addr().ok().map(|a| a.port());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Processes of the instance in `dir`: their environment names its config
/// directory (master passes MAIL_CONFIG to every child), or their command
/// line names the directory.
fn processes(dir: &Path) -> Vec<u32> {
    let env = format!("MAIL_CONFIG={}\0", dir.join("conf").display());
    let dir = dir.display().to_string();
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let has = |file: &str, needle: &[u8]| {
            std::fs::read(e.path().join(file))
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        };
        if has("environ", env.as_bytes()) || has("cmdline", dir.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Stops the instance in `dir`: SIGTERM to its master (which stops its
/// children), or `postfix -c DIR/conf stop` when there is no pid file; then
/// SIGKILL, by pid, for anything of the instance still running after 3 s.
fn shutdown(postfix: &Path, dir: &Path) {
    let master = std::fs::read_to_string(dir.join("queue/pid/master.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|pid| processes(dir).contains(pid));
    match master {
        Some(pid)
            if Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .output()
                .is_ok_and(|o| o.status.success()) => {}
        _ => {
            let _ = Command::new(postfix)
                .arg("-c")
                .arg(dir.join("conf"))
                .arg("stop")
                .output();
        }
    }
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() > end {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(left.iter().map(u32::to_string))
                .output();
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
