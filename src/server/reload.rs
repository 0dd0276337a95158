//! Applying a new configuration to a running server (SIGHUP, `POST
//! /reload`, `smtp-edge reload`): everything that can fail is built first
//! (TLS acceptor, new backends, the policy's next generation, a moved
//! admin listener), then swapped in; what a reload cannot apply is named
//! by `needs_restart`.
//!
//! The TLS acceptor is built from the files again, taking over the running
//! one's ticket keys and session cache while the session settings are
//! unchanged (`tls::keeps_sessions`). New `Backends` are built only when
//! `[[backend]]`, `[[route]]`, `[policy.recipients]` (the cache of unknown
//! recipients is theirs) or the backend timeouts changed (`relay_inputs`); the
//! replaced set is retired (`Backends::retire`: idle connections QUIT now,
//! busy ones after their transaction; a session's XCLIENT connection of an
//! older set is let go at its next MAIL). `[admin]` is moved, opened or
//! closed through `admin::AdminCtl`, the new address bound before anything
//! changes. `Server::set_reload_hook` gives `POST /reload` the same path as
//! SIGHUP (main.rs: re-read the file, then `Reloader::reload`).

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::admin::AdminCtl;
use super::bind::{bind_now, tls_acceptor};
use crate::config::Config;
use crate::policy::Policy;
use crate::relay::Backends;
use crate::session::Shared;

/// Reloads a running [`Server`](super::Server) (SIGHUP); cloneable.
///
/// Applied: `[policy]` (limiter state, counters and caches carried over),
/// `[tls]` (the certificate files are read again even when the section is
/// unchanged: renewal; the ticket keys and the session cache carry over
/// while `session_tickets` and `session_cache_size` stay), `[[backend]]`,
/// `[[route]]` and the backend timeouts (new `Backends`; the old set's idle
/// connections get QUIT and its connections in use finish their
/// transaction, then QUIT), `[limits]`, `[timeouts]`,
/// `[smtp]`, `[telemetry] sample_ratio`. New connections get the new
/// settings; a session keeps the limits, timeouts and TLS it started with
/// and takes the current backends at each MAIL (with routes, at the RCPT
/// that begins a transaction). `hostname`, listeners
/// and the rest of `[telemetry]` need a restart (logged). Nothing
/// changes when any part fails.
#[derive(Clone)]
pub struct Reloader {
    live: Arc<ArcSwap<Shared>>,
    admin: Arc<std::sync::Mutex<AdminCtl>>,
    /// One reload at a time.
    lock: Arc<std::sync::Mutex<()>>,
}

impl Reloader {
    pub(super) fn new(
        live: Arc<ArcSwap<Shared>>,
        admin: Arc<std::sync::Mutex<AdminCtl>>,
    ) -> Reloader {
        Reloader {
            live,
            admin,
            lock: Arc::default(),
        }
    }

    /// Applies `cfg`; on Err the running configuration stays whole.
    pub fn reload(&self, cfg: &Config) -> Result<(), String> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.live.load_full();
        let running = &old.cfg;
        let pending = needs_restart(running, cfg);
        if !pending.is_empty() {
            warn!(
                sections = %pending.join(", "),
                "reload: changed settings not applied; restart to apply"
            );
        }
        // What a restart would take stays as running.
        let mut next = cfg.clone();
        next.hostname = running.hostname.clone();
        next.listeners = running.listeners.clone();
        // Ticket keys and cached sessions carry over while the session
        // settings stay; the certificates are always read again.
        let keep = old
            .tls
            .as_ref()
            .filter(|_| crate::tls::keeps_sessions(running.tls.as_ref(), next.tls.as_ref()));
        let tls = tls_acceptor(&next, keep).map_err(|e| e.to_string())?;
        // A moved admin listener is bound now (an address in use refuses
        // the reload) and started once everything else is in place.
        let address = |c: &Config| c.admin.as_ref().map(|a| a.address);
        let admin = if address(&next) != address(running) {
            Some(match &next.admin {
                Some(a) => {
                    Some(bind_now(a.address).map_err(|e| format!("admin {}: {e}", a.address))?)
                }
                None => None,
            })
        } else {
            None
        };
        let relay = if relay_inputs(&next) != relay_inputs(running) {
            let r = Backends::new(&next, &old.metrics).map_err(|e| format!("backend: {e}"))?;
            Some(r)
        } else {
            None
        };
        old.policy
            .reload(&next.policy, &running.hostname)
            .map(drop)?;
        crate::telemetry::set_sample_ratio(next.telemetry.sample_ratio);
        let mut applied = vec!["policy", "tls"];
        if let Some(r) = relay {
            r.spawn_reaper();
            let before = old.backends.swap(r.clone());
            info!(
                before = ?before.names(),
                after = ?r.names(),
                "reload: new backends; the old ones finish their transactions"
            );
            before.retire();
            applied.push("backend");
            applied.push("route");
        }
        if next.admin != running.admin {
            let ctl = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(state), Some(a)) = (&ctl.state, &next.admin) {
                state.write_from.store(Arc::new(a.write_from.clone()));
            }
            if admin.is_none() {
                applied.push("admin");
            }
        }
        if let Some(l) = admin {
            let mut ctl = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            match l {
                Some(l) => ctl.start(l),
                None => {
                    info!("reload: admin listener closed");
                    ctl.stop();
                }
            }
            applied.push("admin");
        }
        for (name, same) in [
            ("limits", next.limits == running.limits),
            ("timeouts", next.timeouts == running.timeouts),
            ("smtp", next.smtp == running.smtp),
            ("telemetry", next.telemetry == running.telemetry),
        ] {
            if !same {
                applied.push(name);
            }
        }
        self.live.store(Arc::new(Shared {
            cfg: Arc::new(next),
            backends: old.backends.clone(),
            tls,
            policy: old.policy.clone(),
            metrics: old.metrics.clone(),
            top: old.top.clone(),
            shutdown: old.shutdown.clone(),
        }));
        info!(applied = %applied.join(", "), "reload: applied to new connections");
        Ok(())
    }

    /// The policy it reloads.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }
}

/// What `Backends::new` builds from: a reload makes new `Backends` only
/// when these changed (a session timeout alone keeps the pooled connections).
type RelayInputs<'a> = (
    &'a [crate::config::BackendConfig],
    &'a [crate::config::RouteConfig],
    &'a crate::policy::settings::RecipientsConfig,
    [f64; 4],
);

fn relay_inputs(c: &Config) -> RelayInputs<'_> {
    let t = &c.timeouts;
    (
        &c.backends,
        &c.routes,
        &c.policy.recipients,
        [
            t.backend_connect,
            t.backend_command,
            t.backend_pool_wait,
            t.backend_data_end,
        ],
    )
}

/// The sections of `new` that differ from `running` and that a reload does
/// not apply (everything but `[policy]`), by their names in the file.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("hostname", running.hostname == new.hostname);
    check("listener", running.listeners == new.listeners);
    let t = |c: &Config| {
        let mut t = c.telemetry.clone();
        t.sample_ratio = 0.0;
        t
    };
    check("telemetry (all but sample_ratio)", t(running) == t(new));
    check("runtime", running.runtime == new.runtime);
    out
}
