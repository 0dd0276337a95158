//! Backend faults under load with exact no-loss accounting (issue 17), the
//! short version of loadtest/scenarios/faultrun.sh: smtp-load sends
//! messages with unique ids through the proxy to two Postfix smtp-sink
//! backends that dump every stored message and a real Postfix delivering
//! into a Maildir, while the backends are killed and started again, frozen
//! (SIGSTOP), restarted answering 421 at RCPT, dropping the connection
//! after the dot or at DATA, and Postfix is stopped and started. Then every
//! client's outcome is compared with what the backends stored: each 250
//! stored exactly once, nothing else stored unless its dot went out and
//! the reply was lost (explained, and only while a backend dropped
//! connections after the dot or died). Meanwhile `/metrics` shows a dead or
//! frozen backend taken out of rotation and probed back. Skips when
//! smtp-sink is not installed, runs without Postfix when it cannot start
//! one (not root); under CI=true both fail instead.
mod common;
mod postfix_instance;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use postfix_instance::Postfix;
use smtp_load::account::{Accounting, Store};

const CONNECT_TIMEOUT: f64 = 0.5;
/// Backend command and end-of-data timeouts: below the freeze, so that the
/// transactions stuck on a frozen backend give their connection slots up
/// and new connects (whose greetings time out) take it out of rotation.
const BACKEND_TIMEOUT: f64 = 1.0;
const MAX_CONNECTIONS: usize = 8;
const CLIENTS: usize = 16;

/// One backend: a port and a dump directory that outlive its smtp-sink
/// incarnations.
struct Backend {
    addr: String,
    dump: PathBuf,
    sink: Option<Sink>,
}

impl Backend {
    fn start(dump: PathBuf) -> Option<Backend> {
        let addr = format!("127.0.0.1:{}", free_port());
        let sink = Sink::start_dumping(&addr, &[], Some(&dump))?;
        Some(Backend {
            addr,
            dump,
            sink: Some(sink),
        })
    }

    /// SIGKILL (transactions in progress are cut mid-way).
    fn kill(&mut self) {
        tokio::task::block_in_place(|| self.sink = None);
    }

    /// (Re)starts it on the same port with these smtp-sink flags.
    fn restart(&mut self, flags: &[&str]) {
        tokio::task::block_in_place(|| {
            drop(self.sink.take());
            self.sink = Sink::start_dumping(&self.addr, flags, Some(&self.dump));
        });
    }

    fn signal(&self, sig: &str) {
        let pid = self.sink.as_ref().expect("running").pid();
        let st = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    }
}

/// `smtp_edge_backend_up` and the connect failures of one backend, as an
/// operator scrapes them.
async fn health(admin: std::net::SocketAddr, backend: &str) -> (f64, f64) {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let s = parse_metrics(&body);
    let l = [("backend", backend)];
    (
        metric_value(&s, "smtp_edge_backend_up", &l),
        metric_value(&s, "smtp_edge_backend_connect_failures_total", &l),
    )
}

/// Polls until the backend's `up` gauge is `want`; how long it took, or
/// None after `within`.
async fn wait_up(
    admin: std::net::SocketAddr,
    backend: &str,
    want: f64,
    within: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if health(admin, backend).await.0 == want {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_or_duplicated_while_backends_fail() {
    let store = tempfile::tempdir().unwrap();
    let Some(mut a) = Backend::start(store.path().join("a")) else {
        return;
    };
    let Some(mut b) = Backend::start(store.path().join("b")) else {
        return;
    };
    let pf = match tokio::task::spawn_blocking(|| Postfix::start("")).await {
        Ok(pf) => pf,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let backend = |addr: &str| {
        format!(
            "[[backend]]\naddress = \"{addr}\"\nmax_connections = {MAX_CONNECTIONS}\ndown_after = 3\nprobe_interval = 0.1\nprobe_interval_max = 0.4\n"
        )
    };
    let proxy = Proxy::start(&format!(
        "hostname = \"edge.test\"\n[timeouts]\nbackend_connect = {CONNECT_TIMEOUT}\nbackend_command = {BACKEND_TIMEOUT}\nbackend_data_end = {BACKEND_TIMEOUT}\nbackend_pool_wait = 5\n[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n{}{}{}",
        backend(&a.addr),
        backend(&b.addr),
        pf.as_ref().map_or(String::new(), |pf| backend(&pf.addr))
    ))
    .await;
    let admin = proxy.admin.expect("admin listener");
    assert_eq!(health(admin, &a.addr).await.0, 1.0);

    let outcomes = store.path().join("outcomes.tsv");
    let mut cfg = smtp_load::RunConfig::new(proxy.addr);
    cfg.connections = CLIENTS;
    cfg.messages_per_conn = 5;
    cfg.messages = None;
    cfg.duration = Some(Duration::from_secs(12));
    cfg.sizes = smtp_load::message::SizeDist::fixed(2048);
    cfg.timeout = Duration::from_secs(20);
    cfg.outcomes = Some(outcomes.clone());
    cfg.id_prefix = "t".into();
    let t0 = Instant::now();
    let load = tokio::spawn(smtp_load::run(cfg, Arc::new(AtomicBool::new(false))));
    let at = |t: f64| tokio::time::sleep_until((t0 + Duration::from_secs_f64(t)).into());
    let now = || t0.elapsed().as_secs_f64();
    // Windows (start, end) in which a stored message may have been told
    // something else than 250: its backend died or dropped the connection
    // after the dot.
    let mut reply_lost = Vec::new();

    // 1. Backend a dies: out of rotation, probed back once it is started.
    at(1.0).await;
    let start = now();
    a.kill();
    let down = wait_up(admin, &a.addr, 0.0, Duration::from_secs(3)).await;
    at(2.5).await;
    a.restart(&[]);
    let up = wait_up(admin, &a.addr, 1.0, Duration::from_secs(3)).await;
    reply_lost.push((start, now()));
    assert!(down.is_some(), "a killed backend stayed in rotation");
    assert!(up.is_some(), "a restarted backend was not probed back");

    // 1b. Postfix stopped (sessions in progress cut) and started again: what
    // it accepted is delivered from its queue.
    let mut pf_cycle = None;
    let mut pf_window: Option<(f64, f64)> = None;
    if let Some(pf) = &pf {
        at(3.0).await;
        let start = now();
        tokio::task::block_in_place(|| pf.stop());
        let down = wait_up(admin, &pf.addr, 0.0, Duration::from_secs(1)).await;
        at(4.0).await;
        tokio::task::block_in_place(|| pf.start_again());
        let up = wait_up(admin, &pf.addr, 1.0, Duration::from_secs(3)).await;
        let window = (start, now());
        reply_lost.push(window);
        pf_window = Some(window);
        pf_cycle = Some((down, up));
        assert!(up.is_some(), "a restarted Postfix was not probed back");
    }

    // 2. Backend b frozen for 2.5 s: the transactions on it time out after
    // BACKEND_TIMEOUT (451), new connects' greetings after CONNECT_TIMEOUT,
    // three in a row take it out of rotation; sessions then go to the
    // others without paying the connect timeout each.
    at(4.5).await;
    let (_, failures_before) = health(admin, &b.addr).await;
    let start = now();
    b.signal("-STOP");
    let frozen_down = wait_up(admin, &b.addr, 0.0, Duration::from_millis(2400)).await;
    at(7.0).await;
    let (_, failures_frozen) = health(admin, &b.addr).await;
    b.signal("-CONT");
    let thawed_up = wait_up(admin, &b.addr, 1.0, Duration::from_secs(3)).await;
    reply_lost.push((start, now() + BACKEND_TIMEOUT));
    assert!(frozen_down.is_some(), "a frozen backend stayed in rotation");
    assert!(thawed_up.is_some(), "a resumed backend was not probed back");

    // 3. Backend b drops the connection after the dot, without a reply
    // (smtp-sink has stored the message): those clients hear 451.
    at(7.8).await;
    let start = now();
    b.restart(&["-q", "."]);
    at(9.0).await;
    b.restart(&[]);
    reply_lost.push((start, now()));

    // 4. Backend a answers 421 at RCPT, then drops the connection at DATA.
    at(9.5).await;
    let start = now();
    a.restart(&["-Q", "RCPT"]);
    at(10.5).await;
    a.restart(&["-q", "DATA"]);
    at(11.2).await;
    a.restart(&[]);
    reply_lost.push((start, now()));

    let report = load.await.unwrap().expect("load ran");
    // Everything a backend answered for is on disk by now.
    a.kill();
    b.kill();
    let mut dirs = vec![a.dump.clone(), b.dump.clone()];
    if let Some(pf) = &pf {
        let drained = tokio::task::block_in_place(|| pf.wait_queue_empty(Duration::from_secs(30)));
        assert!(
            drained,
            "Postfix did not deliver its queue:\n{}\n{}",
            pf.queue_files(),
            pf.log()
        );
        dirs.push(pf.maildir());
    }
    let log = smtp_load::outcome::read_log(&outcomes).unwrap();
    let stored = Store::scan(&dirs).unwrap();
    let acc = Accounting::compute(&log, &stored);
    let table = acc.to_table();
    eprintln!("{table}");
    assert!(acc.pass, "lost, duplicated or stored unexplained:\n{table}");
    assert_eq!(acc.sent, report.messages.attempted, "{table}");
    assert!(
        acc.sent >= 500,
        "too little load to mean anything:\n{table}"
    );
    assert!(
        acc.ok * 10 >= acc.sent * 7,
        "most messages should get through:\n{table}"
    );
    assert!(acc.temp > 0, "the faults were not felt:\n{table}");
    assert_eq!(
        acc.perm, 0,
        "a backend fault must never become a 5xx:\n{table}"
    );
    // Postfix stopped between writing a Maildir file and marking the
    // recipient done delivers it again after its start (at least once, as
    // it promises; the accounting's `redelivered`: two copies from one
    // backend transaction). Only in Postfix's Maildir, and only for a
    // message it accepted before its stop ended (one told 250 at 2.97 s,
    // 40 ms before the stop, was delivered twice in a CI run).
    let pf_box = pf.as_ref().map(|pf| pf.maildir());
    for (kind, c) in &acc.cases {
        let by_postfix = kind == "redelivered"
            && pf_window.is_some_and(|(_, end)| c.t <= end)
            && c.files
                .iter()
                .all(|f| pf_box.as_ref().is_some_and(|b| f.starts_with(b)));
        assert!(
            by_postfix
                || (kind == "explained"
                    && reply_lost.iter().any(|(s, e)| c.t >= *s && c.t <= *e + 1.0)),
            "{kind} {c:?} outside the windows {reply_lost:?}:\n{table}"
        );
    }

    // The freeze cost at most one connect timeout per backend connection
    // slot (the connects in progress when it began) and the probes, not
    // one per session: the rest went to a at once.
    let failed_connects = failures_frozen - failures_before;
    assert!(
        failed_connects <= (MAX_CONNECTIONS + 8) as f64,
        "{failed_connects} connects to the frozen backend failed"
    );
    let slow: Vec<f64> = log
        .iter()
        .filter(|o| o.latency >= CONNECT_TIMEOUT)
        .map(|o| o.latency)
        .collect();
    eprintln!(
        "Postfix stopped and started: down after, up after {pf_cycle:?}; a down after {down:?}, up {up:?}; b down after {frozen_down:?}, up {thawed_up:?}; {failed_connects} failed connects to frozen b; {} of {} messages took >= {CONNECT_TIMEOUT} s",
        slow.len(),
        log.len()
    );
    assert!(
        slow.len() <= 2 * (MAX_CONNECTIONS + CLIENTS),
        "{} messages took longer than the connect timeout: {slow:?}",
        slow.len()
    );
    proxy.stop().await;
}

/// An abort can leave a half-written queue file behind. The next `postfix
/// start` then has postsuper warn about it ("bogus file name") before
/// postlogd runs, so postsuper writes the log file itself, as Postfix's
/// user: a log that user cannot write made the start fail, again and again
/// (the cause of "postfix start again" not listening, the flake a fresh
/// clone once saw). It must start at once.
#[test]
fn postfix_starts_again_over_a_half_written_queue_file() {
    let Some((pf, _)) = stopped_with_incoming("609135.21425") else {
        return;
    };
    let t = Instant::now();
    pf.start_again();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "started only after {:?}:\n{}",
        t.elapsed(),
        pf.log()
    );
    assert!(pf.log().contains("bogus file name"), "{}", pf.log());
}

/// A cleanup killed after naming its file by queue ID but before marking
/// it complete (the owner's execute bit, set before its 250) leaves a file
/// qmgr never delivers: nothing was acknowledged for it, so the harness
/// does not wait for it (`fault_run` once waited 30 s for such a file),
/// while a complete file is delivered and waited for.
#[test]
fn an_incomplete_queue_file_is_not_waited_for() {
    use std::os::unix::fs::PermissionsExt;
    let Some((pf, half)) = stopped_with_incoming("4dQfWk1pGVzFbYP") else {
        return;
    };
    std::fs::set_permissions(&half, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Owned as cleanup leaves it: by the queue's owner (Postfix's user).
    let queue = half.parent().unwrap();
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(queue).unwrap());
    std::os::unix::fs::chown(&half, Some(owner), None).unwrap();
    pf.start_again();
    assert!(
        pf.wait_queue_empty(Duration::from_secs(5)),
        "{}\n{}",
        pf.queue_files(),
        pf.log()
    );
    // Postfix keeps it (postsuper may rename it to match its inode), not
    // delivered.
    assert!(pf.queue_files().contains(" 600 "), "{}", pf.log());
}

/// A Postfix stopped with a half-written file `name` left in its
/// `incoming/` queue, as an abort leaves one (None: no Postfix here).
fn stopped_with_incoming(name: &str) -> Option<(Postfix, std::path::PathBuf)> {
    let pf = Postfix::start("")?;
    pf.stop();
    let queue = pf.conf_dir().parent().unwrap().join("queue/incoming");
    std::fs::create_dir_all(&queue).unwrap();
    let file = queue.join(name);
    std::fs::write(&file, "half").unwrap();
    Some((pf, file))
}
