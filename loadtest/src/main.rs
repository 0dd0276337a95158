//! `smtp-load` command line: parses the flags, builds a multi-thread tokio
//! runtime and runs `run`, `sink`, `idle`, `slow` or `otlp-sink` (`account`
//! needs no runtime; `copy` builds a current-thread one). Exit codes: 0 success, 1 the
//! load did not fully succeed (see the counts), 2 bad flags or setup.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use smtp_load::cli::{
    threads, AccountArgs, Cli, Cmd, CopyArgs, IdleArgs, OtlpSinkArgs, RunArgs, SinkArgs, SlowArgs,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Account(a) = &cli.cmd {
        return account(a);
    }
    // Many connections need many fds: use all the hard limit allows.
    smtp_load::procstat::raise_nofile();
    if let Cmd::Copy(a) = cli.cmd {
        return copy(a);
    }
    let n = match &cli.cmd {
        Cmd::Run(a) => a.threads,
        Cmd::Sink(a) => a.threads,
        Cmd::Idle(a) => a.held.threads,
        Cmd::Slow(a) => a.held.threads,
        Cmd::OtlpSink(a) => a.threads,
        Cmd::Account(_) | Cmd::Copy(_) => 1,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads(n))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let code = rt.block_on(async {
        match cli.cmd {
            Cmd::Run(a) => run(*a).await,
            Cmd::Sink(a) => sink(a).await,
            Cmd::Idle(a) => idle(a).await,
            Cmd::Slow(a) => slow(a).await,
            Cmd::OtlpSink(a) => otlp_sink(a).await,
            Cmd::Account(a) => account(&a),
            Cmd::Copy(_) => ExitCode::SUCCESS,
        }
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

fn fail(msg: String) -> ExitCode {
    eprintln!("smtp-load: {msg}");
    ExitCode::from(2)
}

fn print(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

/// Prints a report as one JSON line or as the human table.
fn print_report<T: serde::Serialize>(json: bool, r: &T, table: impl FnOnce() -> String) {
    if json {
        print(&format!(
            "{}\n",
            serde_json::to_string(r).unwrap_or_default()
        ));
    } else {
        print(&table());
    }
}

/// Resolves on SIGINT or SIGTERM, both handled from this call on (not
/// from the first poll): call it before saying "listening", so that a
/// signal right after that line ends the command as it should rather than
/// by the signal's default action.
fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let [term, int] = [SignalKind::terminate(), SignalKind::interrupt()].map(|k| signal(k).ok());
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            if let Some(mut s) = s {
                s.recv().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = wait(term) => {}
            _ = wait(int) => {}
        }
    }
}

async fn run(a: RunArgs) -> ExitCode {
    let cfg = match a.to_config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let quiet = a.quiet;
    let interrupt = interrupted();
    tokio::spawn(async move {
        interrupt.await;
        if !quiet {
            eprintln!("smtp-load: interrupted, finishing the messages in progress");
        }
        s.store(true, Ordering::Relaxed);
    });
    match smtp_load::run(cfg, stop).await {
        Ok(r) => {
            if a.json {
                print(&format!("{}\n", r.to_json()));
            } else {
                print(&r.to_table());
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                if a.json || a.quiet {
                    let m = &r.messages;
                    eprintln!(
                        "smtp-load: not every message was accepted: attempted {} accepted {} rejected {} failed {} dropped {}",
                        m.attempted, m.accepted, m.rejected, m.failed, m.dropped
                    );
                }
                ExitCode::from(1)
            }
        }
        Err(e) => fail(e),
    }
}

async fn sink(a: SinkArgs) -> ExitCode {
    let cfg = match a.to_config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let server = match smtp_load::SinkServer::start(cfg).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot listen on {}: {e}", a.listen)),
    };
    let interrupt = interrupted();
    if !a.quiet {
        eprintln!("smtp-load sink: listening on {}", server.local_addr());
    }
    tokio::select! {
        _ = interrupt => {}
        _ = server.reached() => {
            // Let the last replies and QUITs go out.
            server.drain(Duration::from_secs(2)).await;
        }
    }
    server.stop();
    let r = server.report();
    print_report(a.json, &r, || r.to_table());
    ExitCode::SUCCESS
}

async fn idle(a: IdleArgs) -> ExitCode {
    let cfg = match a.to_config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match smtp_load::idle::idle(cfg).await {
        Ok(r) => {
            print_report(a.held.json, &r, || r.to_table());
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(e),
    }
}

async fn slow(a: SlowArgs) -> ExitCode {
    let cfg = match a.to_config() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match smtp_load::slow::slow(cfg).await {
        Ok(r) => {
            print_report(a.held.json, &r, || r.to_table());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn otlp_sink(a: OtlpSinkArgs) -> ExitCode {
    let listen = match smtp_load::cli::resolve(&a.listen) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let server = match smtp_load::OtlpSink::start(listen, a.protocol()).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot listen on {}: {e}", a.listen)),
    };
    let interrupt = interrupted();
    if !a.quiet {
        eprintln!(
            "smtp-load otlp-sink: listening on {} (OTLP/{})",
            server.local_addr(),
            a.protocol().name()
        );
    }
    interrupt.await;
    server.stop();
    let r = server.report();
    print_report(a.json, &r, || r.to_table());
    ExitCode::SUCCESS
}

/// `copy`: one current-thread runtime, as smtp-edge with one worker.
fn copy(a: CopyArgs) -> ExitCode {
    let (listen, target) = match (
        smtp_load::cli::resolve(&a.listen),
        smtp_load::cli::resolve(&a.target),
    ) {
        (Ok(l), Ok(t)) => (l, t),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        let interrupt = interrupted();
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(format!("cannot listen on {}: {e}", a.listen)),
        };
        tokio::select! {
            _ = smtp_load::copy::copy(listener, target) => {}
            _ = interrupt => {}
        }
        ExitCode::SUCCESS
    })
}

/// `account`: exit 0 when nothing was lost, duplicated or stored
/// unexplained, 1 otherwise, 2 when a file cannot be read.
fn account(a: &AccountArgs) -> ExitCode {
    let log = match smtp_load::outcome::read_log(&a.outcomes) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let store = match smtp_load::account::Store::scan(&a.store) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = smtp_load::account::Accounting::compute(&log, &store);
    print_report(a.json, &r, || r.to_table());
    if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
