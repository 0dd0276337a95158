//! Listeners, the accept loop and graceful shutdown: stop accepting, let
//! sessions finish within a deadline, QUIT pooled backend connections.
//! Admission (`Policy::admit`: global cap, lists, per-IP limits) runs in the
//! accept loop, so a refused client costs one write and no session task.
//! A [`Reloader`] swaps in a new policy while running (SIGHUP in main.rs);
//! the other sections need a restart.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{Config, TlsMode};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::relay::Relay;
use crate::session::{self, Listener, Shared};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {addr}: {err}")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("backend: {0}")]
    Backend(std::io::Error),
    #[error("policy: {0}")]
    Policy(String),
}

/// Answers a client refused at connect and closes: one non-blocking write
/// (a fresh socket's send buffer always takes it), no session, no wait.
fn refuse(stream: tokio::net::TcpStream, v: &crate::policy::Verdict) {
    let (code, enh) = v.at_connect();
    let mut line = Vec::with_capacity(96);
    crate::smtp::reply::write_reply(&mut line, code, enh, &v.text);
    let _ = stream.try_write(&line);
}

/// A listening socket with a listen queue of `backlog` (std's and tokio's
/// 128 drops the SYNs, or with SYN cookies the handshake's last ACK, of a
/// burst of clients connecting at once).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(backlog)
}

/// Policy counters for the log at shutdown (until metrics are exported).
fn log_policy_totals(policy: &Policy) {
    for c in policy.counts() {
        if c.observed + c.enforced > 0 {
            info!(
                check = c.check.name(),
                observed = c.observed,
                enforced = c.enforced,
                "policy totals"
            );
        }
    }
    if let Some(dns) = policy.dns() {
        let s = dns.stats();
        info!(
            rdns_hits = s.rdns_hits,
            rdns_misses = s.rdns_misses,
            dnsbl_hits = s.dnsbl_hits,
            dnsbl_misses = s.dnsbl_misses,
            helo_hits = s.helo_hits,
            helo_misses = s.helo_misses,
            "dns cache totals"
        );
    }
}

/// Reloads the admission policy of a running [`Server`]; cloneable.
///
/// Only `[policy]` is applied. The other sections (hostname, listeners,
/// TLS, limits, timeouts, SMTP, backends) keep their values from the start
/// and a reload that changes them logs a warning naming them; the policy
/// keeps the running hostname too. Sessions read the policy they were
/// admitted under, never `Shared.cfg.policy` (which stays as started).
#[derive(Clone)]
pub struct Reloader {
    policy: Arc<Policy>,
    running: Arc<Config>,
}

impl Reloader {
    /// Applies `cfg.policy` (carrying the limiter state, counters and
    /// caches over); warns about changed sections that need a restart. On
    /// Err the running policy stays.
    pub fn reload(&self, cfg: &Config) -> Result<(), String> {
        let pending = needs_restart(&self.running, cfg);
        if !pending.is_empty() {
            warn!(
                sections = %pending.join(", "),
                "reload: changed settings not applied; restart to apply"
            );
        }
        self.policy
            .reload(&cfg.policy, &self.running.hostname)
            .map(drop)
    }

    /// The policy it reloads.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
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
    check("tls", running.tls == new.tls);
    check("limits", running.limits == new.limits);
    check("timeouts", running.timeouts == new.timeouts);
    check("smtp", running.smtp == new.smtp);
    check("backend", running.backends == new.backends);
    check("admin", running.admin == new.admin);
    out
}

/// Bound listeners plus everything sessions share; `serve` runs them.
pub struct Server {
    listeners: Vec<(TcpListener, Listener)>,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
}

impl Server {
    /// Binds every listener and prepares TLS and backends.
    pub async fn bind(cfg: Config) -> Result<Server, ServerError> {
        let needs_tls = cfg.listeners.iter().any(|l| l.tls != TlsMode::None);
        let tls = if needs_tls {
            if cfg.tls.is_none() {
                warn!(
                    "no [tls] configured: using a self-signed certificate for {}",
                    cfg.hostname
                );
            }
            Some(crate::tls::acceptor(cfg.tls.as_ref(), &cfg.hostname)?)
        } else {
            None
        };
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let sock = listen(l.address, l.backlog).map_err(|err| ServerError::Bind {
                addr: l.address,
                err,
            })?;
            listeners.push((
                sock,
                Listener {
                    tls: l.tls,
                    require_tls: l.require_tls,
                },
            ));
        }
        let admin = match &cfg.admin {
            Some(a) => {
                Some(
                    TcpListener::bind(a.address)
                        .await
                        .map_err(|err| ServerError::Bind {
                            addr: a.address,
                            err,
                        })?,
                )
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let relay = Relay::new(&cfg, &metrics).map_err(ServerError::Backend)?;
        let policy = Policy::new(&cfg.policy, &cfg.hostname).map_err(ServerError::Policy)?;
        metrics.attach(policy.clone(), relay.clone());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        Ok(Server {
            listeners,
            admin,
            shared: Arc::new(Shared {
                cfg: Arc::new(cfg),
                relay,
                tls,
                policy,
                metrics,
                shutdown: shutdown_rx,
            }),
            shutdown_tx,
            draining: Arc::default(),
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// The admission policy (counters, limiters, DNS caches), reloadable.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.policy.clone()
    }

    /// A handle that reloads the policy while the server runs.
    pub fn reload_handle(&self) -> Reloader {
        Reloader {
            policy: self.shared.policy.clone(),
            running: self.shared.cfg.clone(),
        }
    }

    /// Idle pooled connections per backend.
    pub fn relay(&self) -> Arc<Relay> {
        self.shared.relay.clone()
    }

    /// The metrics (what `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Accepts until `stop` completes, then shuts down gracefully.
    pub async fn serve(self, stop: impl Future<Output = ()>) {
        let Server {
            listeners,
            admin,
            shared,
            shutdown_tx,
            draining,
        } = self;
        shared.relay.spawn_reaper();
        shared.policy.start();
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        if let Some(l) = admin {
            if let Ok(a) = l.local_addr() {
                info!(address = %a, "admin listening (/metrics, /livez, /readyz)");
            }
            let state = crate::admin::AdminState {
                metrics: shared.metrics.clone(),
                relay: shared.relay.clone(),
                draining: draining.clone(),
            };
            tokio::spawn(crate::admin::serve(l, state, admin_stop_rx));
        }
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let mut accepts = Vec::new();
        for (sock, listener) in listeners {
            if let Ok(a) = sock.local_addr() {
                info!(address = %a, tls = ?listener.tls, "listening");
            }
            let shared = shared.clone();
            let done = done_tx.clone();
            let mut sd = shutdown_tx.subscribe();
            accepts.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = sock.accept() => match r {
                            Ok((stream, peer)) => {
                                let span = session::session_span(peer);
                                // Admission's lookups start in this span.
                                let admitted = span.in_scope(|| shared.policy.admit(peer.ip()));
                                match admitted {
                                Ok(pol) => {
                                    let shared = shared.clone();
                                    let done = done.clone();
                                    tokio::spawn(async move {
                                        let m = shared.metrics.clone();
                                        m.connections_accepted.inc();
                                        m.sessions_active.inc();
                                        let t0 = std::time::Instant::now();
                                        session::handle(stream, peer, shared, listener, pol, span).await;
                                        m.session_duration.observe(t0.elapsed().as_secs_f64());
                                        m.sessions_active.dec();
                                        drop(done);
                                    });
                                }
                                Err(v) => {
                                    shared.metrics.refused(v.check.name());
                                    session::record_refusal(&span, v.check.name());
                                    refuse(stream, &v)
                                }
                            }},
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning.
                                warn!("accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        _ = async { let _ = sd.wait_for(|v| *v).await; } => return,
                    }
                }
            }));
        }
        drop(done_tx);
        stop.await;
        draining.store(true, Ordering::Release);
        shared.metrics.draining.set(1);
        let delay = Duration::from_secs_f64(shared.cfg.timeouts.drain_delay);
        if !delay.is_zero() {
            info!(
                "draining: /readyz answers 503; still accepting for {:?}",
                delay
            );
            tokio::time::sleep(delay).await;
        }
        info!("shutting down: no longer accepting; waiting for sessions");
        let _ = shutdown_tx.send(true);
        for a in accepts {
            let _ = a.await;
        }
        let grace = Duration::from_secs_f64(shared.cfg.timeouts.shutdown_grace);
        if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
            warn!("shutdown grace period over; closing remaining sessions");
        }
        shared.relay.close_idle().await;
        log_policy_totals(&shared.policy);
        let _ = admin_stop.send(true);
        info!("stopped");
    }
}
