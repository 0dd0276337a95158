//! The `smtp-edge` command: run the proxy (on a config file or the embedded
//! default) or check a configuration file. SIGTERM / Ctrl-C stop it
//! gracefully; SIGHUP (or `smtp-edge reload`, through the admin listener)
//! re-reads the config file and applies what can change while running.
//!
//! The CLI is clap (`Cli`): `check-config` prints every error with key and
//! line and exits 2 on an invalid file, as a start with one does. The
//! global allocator is mimalloc. The tokio runtime is built here; the
//! telemetry is installed inside it (the gRPC exporter needs it), and the
//! SIGHUP handler before the listeners are bound (SIGHUP's default action
//! would end the process). An invalid file at reload is logged error by
//! error and changes nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod cli;

use clap::{Parser, Subcommand};
use smtp_edge::config::Config;
use smtp_edge::server::{Reloader, Server};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// mimalloc: per-connection buffers come and go with every session; glibc's
/// malloc returned them to the kernel and faulted them back in (measured).
/// The feature `system-alloc` leaves it out, for DHAT
/// (loadtest/profile/dhat.sh).
#[cfg(not(feature = "system-alloc"))]
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
    /// Ask the running proxy to re-read its configuration file (as SIGHUP
    /// does), through its admin listener: the address given, or `[admin]
    /// address` of the --config file. Exit 0 when the new configuration
    /// was taken, 1 when it was refused (the errors are printed), 2 when
    /// the proxy could not be asked.
    Reload {
        /// The admin listener, host:port.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Bans through the admin listener (`/bans`): add, list, remove,
    /// clear. Needs a client address in `[admin] write_from` to change
    /// anything.
    Ban {
        #[command(subcommand)]
        cmd: cli::BanCmd,
        /// The admin listener, host:port (else `[admin] address` of
        /// --config).
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// Who is sending: the busiest client addresses (or prefixes) of the
    /// last minute from the admin listener's /top, refreshed in the
    /// terminal (keys s, m, r, f sort; p prefixes; q quits).
    Top {
        /// The admin listener, host:port (else `[admin] address` of
        /// --config).
        #[arg(long)]
        admin: Option<String>,
        /// sessions, messages, recipients or refusals.
        #[arg(long, default_value = "sessions")]
        by: String,
        /// Rows shown.
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Show prefixes instead of addresses.
        #[arg(long)]
        prefixes: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one table and exit (also when stdout is not a terminal).
        #[arg(long)]
        once: bool,
    },
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
    match cli.command {
        Some(Cmd::Reload { admin }) => return cli::reload(admin.as_deref(), cli.config.as_deref()),
        Some(Cmd::Ban { cmd, admin }) => {
            return cli::ban(cmd, admin.as_deref(), cli.config.as_deref())
        }
        Some(Cmd::Top {
            admin,
            by,
            n,
            prefixes,
            interval,
            once,
        }) => {
            return match cli::admin_address(admin.as_deref(), cli.config.as_deref()) {
                Ok(a) => cli::top::run(&a, cli::top::View { by, n, prefixes }, interval, once),
                Err(e) => {
                    eprintln!("smtp-edge top: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
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
    // The thread that runs the runtime (all of it, with one worker).
    smtp_edge::cores::no_cancellation();
    let rt = match cfg.runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        // Inside the runtime: the gRPC trace exporter needs it.
        let telemetry = smtp_edge::telemetry::install(&cfg.telemetry);
        tracing::info!(
            flavor = ?cfg.runtime.resolved(),
            workers = cfg.runtime.workers(),
            "runtime"
        );
        if cli.config.is_none() {
            tracing::info!("no --config given: running the embedded default (127.0.0.1:2525, STARTTLS, Maildir ./var/mail)");
        }
        // Before the listeners exist: the default action of SIGHUP, SIGTERM
        // and SIGINT would end the process, cutting off a client already
        // accepted, where a stop must be graceful.
        let hup = handled(SignalKind::hangup(), "SIGHUP (no policy reload)");
        let stop = shutdown_signal();
        let mut server = match Server::bind(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = cli.config.clone() {
            let reloader = server.reload_handle();
            server.set_reload_hook(std::sync::Arc::new(move || reload(&path, &reloader)));
        }
        if let Some(hup) = hup {
            tokio::spawn(reload_on_sighup(hup, cli.config, server.reload_handle()));
        }
        server.serve(stop).await;
        // Flush the spans still queued; the exporters block.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        ExitCode::SUCCESS
    })
}

/// On every SIGHUP: re-read and validate the config file and apply it
/// (`Reloader::reload`); an invalid file is reported error by error and
/// changes nothing.
async fn reload_on_sighup(mut hup: Signal, path: Option<PathBuf>, reloader: Reloader) {
    while hup.recv().await.is_some() {
        match &path {
            Some(path) => {
                let _ = reload(path, &reloader);
            }
            None => tracing::info!(
                "SIGHUP: running the embedded default configuration; nothing to reload"
            ),
        }
    }
}

/// Re-reads `path` and applies it; an invalid file or a part that cannot
/// be applied (a certificate that does not load) changes nothing. Logged
/// either way; Err carries the errors, one per line.
fn reload(path: &Path, reloader: &Reloader) -> Result<(), String> {
    tracing::info!(file = %path.display(), "reloading the configuration");
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.errors {
                tracing::error!("{}: {e}", errs.file);
            }
            tracing::error!(
                file = %path.display(),
                errors = errs.errors.len(),
                "reload refused: invalid configuration; keeping the running one"
            );
            return Err(errs.to_string());
        }
    };
    match reloader.reload(&cfg) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "configuration reloaded");
            Ok(())
        }
        Err(e) => {
            tracing::error!(
                file = %path.display(),
                "reload refused: {e}; keeping the running configuration"
            );
            Err(e)
        }
    }
}

/// The signal `kind` handled from now on; None, logged as "cannot handle
/// `what`", when it cannot be.
fn handled(kind: SignalKind, what: &str) -> Option<Signal> {
    signal(kind)
        .map_err(|e| tracing::warn!("cannot handle {what}: {e}"))
        .ok()
}

/// Resolves at the first SIGTERM or SIGINT. Both are handled from this
/// call on (not from the first poll), so that one arriving while the
/// server starts is a graceful stop. One that cannot be handled keeps its
/// default action (logged).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = handled(
        SignalKind::terminate(),
        "SIGTERM (it ends the process at once)",
    );
    let int = handled(
        SignalKind::interrupt(),
        "SIGINT (it ends the process at once)",
    );
    async move {
        let recv = |s: Option<Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = recv(term) => {}
            _ = recv(int) => {}
        }
    }
}
