//! The `smtp-edge` command: run the proxy (on a config file or the embedded
//! default) or check a configuration file. SIGTERM / Ctrl-C stop it
//! gracefully; SIGHUP reloads the `[policy]` section of the config file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smtp_edge::config::Config;
use smtp_edge::server::{Reloader, Server};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// mimalloc: per-connection buffers come and go with every session; glibc's
/// malloc returned them to the kernel and faulted them back in (measured).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "smtp-edge", version, about = "Inbound SMTP edge proxy")]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default runs:
    /// 127.0.0.1:2525 with STARTTLS, delivering into ./var/mail.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a configuration file; prints every error with key and line.
    CheckConfig { path: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckConfig { path }) = cli.command {
        return match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    let cfg = match &cli.config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        None => Config::embedded_default(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Inside the runtime: the gRPC trace exporter needs it.
        let telemetry = smtp_edge::telemetry::install(&cfg.telemetry);
        if cli.config.is_none() {
            tracing::info!("no --config given: running the embedded default (127.0.0.1:2525, STARTTLS, Maildir ./var/mail)");
        }
        // Before the listeners exist: SIGHUP's default action would end
        // the process.
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP (no policy reload): {e}");
                None
            }
        };
        let server = match Server::bind(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(hup) = hup {
            tokio::spawn(reload_on_sighup(hup, cli.config, server.reload_handle()));
        }
        server.serve(shutdown_signal()).await;
        // Flush the spans still queued; the exporters block.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        ExitCode::SUCCESS
    })
}

/// On every SIGHUP: re-read and validate the config file and reload the
/// policy; an invalid file is reported error by error and changes nothing.
async fn reload_on_sighup(mut hup: Signal, path: Option<PathBuf>, reloader: Reloader) {
    while hup.recv().await.is_some() {
        match &path {
            Some(path) => reload(path, &reloader),
            None => tracing::info!(
                "SIGHUP: running the embedded default configuration; nothing to reload"
            ),
        }
    }
}

fn reload(path: &Path, reloader: &Reloader) {
    tracing::info!(file = %path.display(), "SIGHUP: reloading the policy");
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.errors {
                tracing::error!("{}: {e}", errs.file);
            }
            tracing::error!(
                file = %path.display(),
                errors = errs.errors.len(),
                "reload refused: invalid configuration; keeping the running policy"
            );
            return;
        }
    };
    match reloader.reload(&cfg) {
        Ok(()) => tracing::info!(file = %path.display(), "policy reloaded"),
        Err(e) => tracing::error!(
            file = %path.display(),
            "reload failed: {e}; keeping the running policy"
        ),
    }
}

async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
