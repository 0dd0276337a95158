//! Listeners, the accept loop and graceful shutdown: stop accepting, let
//! sessions finish within a deadline, QUIT pooled backend connections.
//! Admission (`Policy::admit`: global cap, lists, per-IP limits) runs in the
//! accept loop, so a refused client costs one write and no session task.
//! A [`Reloader`] swaps in a new policy while running (SIGHUP in main.rs);
//! the other sections need a restart.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

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

/// Admits a client at accept (global cap, lists, per-IP limits) and starts
/// its session, or refuses it with one write. `proxied` is (the balancer,
/// the destination in the header) when `peer` came in a PROXY header.
fn admit(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proxied: Option<(SocketAddr, SocketAddr)>,
    shared: Arc<Shared>,
    listener: Listener,
    done: &mpsc::Sender<()>,
) {
    let via = proxied.map(|(via, _)| via);
    let span = session::session_span(peer, via);
    // Admission's lookups start in this span.
    let admitted = span.in_scope(|| shared.policy.admit(peer.ip()));
    match admitted {
        Ok(pol) => {
            let done = done.clone();
            tokio::spawn(async move {
                let m = shared.metrics.clone();
                m.connections_accepted.inc();
                m.sessions_active.inc();
                let t0 = std::time::Instant::now();
                let destination = proxied.map(|(_, d)| d);
                session::handle(stream, peer, destination, shared, listener, pol, span).await;
                m.session_duration.observe(t0.elapsed().as_secs_f64());
                m.sessions_active.dec();
                drop(done);
            });
        }
        Err(v) => {
            shared.metrics.refused(v.check.name());
            session::record_refusal(&span, &v);
            refuse(stream, &v)
        }
    }
}

/// A listener's PROXY protocol settings.
struct ProxyListen {
    trusted: Arc<[ipnet::IpNet]>,
    timeout: Duration,
    /// Connections whose header is still being read: at most the listen
    /// backlog, so even trusted sources cannot hold sockets without bound.
    pending: Arc<Semaphore>,
}

impl ProxyListen {
    /// A connection on a PROXY protocol listener: an untrusted source is
    /// closed at once; a trusted one's header is read in its own task (the
    /// accept loop never waits on a client), then admission judges the
    /// address in it. Nothing is written before a valid header: a refused
    /// connection is closed without a greeting.
    fn accept(
        &self,
        mut stream: tokio::net::TcpStream,
        via: SocketAddr,
        shared: Arc<Shared>,
        listener: Listener,
        done: &mpsc::Sender<()>,
    ) {
        let m = &shared.metrics;
        if !crate::proxy::trusted(&self.trusted, via.ip()) {
            m.proxy_header(crate::proxy::Refusal::Untrusted.name());
            debug!(source = %via, "PROXY protocol: untrusted source closed");
            return;
        }
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            m.proxy_header(crate::proxy::Refusal::Busy.name());
            return;
        };
        let timeout = self.timeout;
        let done = done.clone();
        tokio::spawn(async move {
            let header = crate::proxy::read_header(&mut stream, timeout).await;
            drop(permit);
            let m = &shared.metrics;
            match header {
                Ok(crate::proxy::Header::Proxied {
                    client,
                    destination,
                }) => {
                    m.proxy_header("accepted");
                    admit(
                        stream,
                        client,
                        Some((via, destination)),
                        shared,
                        listener,
                        &done,
                    );
                }
                Ok(crate::proxy::Header::Local) => {
                    // A health check: close cleanly, nothing said.
                    m.proxy_header("local");
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                }
                Err(r) => {
                    m.proxy_header(r.name());
                    debug!(source = %via, reason = r.name(), "PROXY protocol: header refused; closed");
                }
            }
        });
    }
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

/// Reloads a running [`Server`] (SIGHUP); cloneable.
///
/// Applied: `[policy]` (limiter state, counters and caches carried over),
/// `[tls]` (the certificate files are read again even when the section is
/// unchanged: renewal; the ticket keys and the session cache carry over
/// while `session_tickets` and `session_cache_size` stay), `[[backend]]` and the backend timeouts (a new
/// relay; the old one's idle connections get QUIT and its connections in
/// use finish their transaction, then QUIT), `[limits]`, `[timeouts]`,
/// `[smtp]`, `[telemetry] sample_ratio`. New connections get the new
/// settings; a session keeps the limits, timeouts and TLS it started with
/// and takes the current backends at each MAIL. `hostname`, listeners
/// and the rest of `[telemetry]` need a restart (logged). Nothing
/// changes when any part fails.
#[derive(Clone)]
pub struct Reloader {
    live: Arc<ArcSwap<Shared>>,
    admin: Arc<std::sync::Mutex<crate::admin::AdminCtl>>,
    /// One reload at a time.
    lock: Arc<std::sync::Mutex<()>>,
}

impl Reloader {
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
        let admin = if next.admin != running.admin {
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
            let r = Relay::new(&next, &old.metrics).map_err(|e| format!("backend: {e}"))?;
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
            let before = old.relays.swap(r.clone());
            old.metrics.attach(old.policy.clone(), r.clone());
            info!(
                before = ?before.names(),
                after = ?r.names(),
                "reload: new backends; the old ones finish their transactions"
            );
            before.retire();
            applied.push("backend");
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
            relays: old.relays.clone(),
            tls,
            policy: old.policy.clone(),
            metrics: old.metrics.clone(),
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

/// What `Relay::new` builds from: a reload makes a new relay only when
/// these changed (a session timeout alone keeps the pooled connections).
fn relay_inputs(c: &Config) -> (&[crate::config::BackendConfig], [f64; 4]) {
    let t = &c.timeouts;
    (
        &c.backends,
        [
            t.backend_connect,
            t.backend_command,
            t.backend_pool_wait,
            t.backend_data_end,
        ],
    )
}

/// A listening socket bound at once (from any thread inside the runtime).
fn bind_now(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// The TLS acceptor for `cfg` (certificate files read now), when a
/// listener needs one; `keep`: the running one, whose session state
/// (ticket keys, session cache) the new one takes over.
fn tls_acceptor(
    cfg: &Config,
    keep: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<tokio_rustls::TlsAcceptor>, crate::tls::TlsError> {
    if !cfg.listeners.iter().any(|l| l.tls != TlsMode::None) {
        return Ok(None);
    }
    if cfg.tls.is_none() {
        warn!(
            "no [tls] configured: using a self-signed certificate for {}",
            cfg.hostname
        );
    }
    let keep = keep.map(|a| a.config().as_ref());
    crate::tls::acceptor(cfg.tls.as_ref(), &cfg.hostname, keep).map(Some)
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
    out
}

/// Bound listeners plus everything sessions share; `serve` runs them.
pub struct Server {
    listeners: Vec<(TcpListener, Listener, Option<ProxyListen>)>,
    admin: Option<TcpListener>,
    /// What new connections get; a reload swaps it.
    live: Arc<ArcSwap<Shared>>,
    shutdown_tx: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    reload_hook: Option<crate::admin::ReloadHook>,
    admin_ctl: Arc<std::sync::Mutex<crate::admin::AdminCtl>>,
}

impl Server {
    /// Binds every listener and prepares TLS and backends.
    pub async fn bind(cfg: Config) -> Result<Server, ServerError> {
        let tls = tls_acceptor(&cfg, None)?;
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let sock = listen(l.address, l.backlog).map_err(|err| ServerError::Bind {
                addr: l.address,
                err,
            })?;
            let proxy = l.proxy_protocol.then(|| ProxyListen {
                trusted: l.trusted_proxies.clone().into(),
                timeout: Duration::from_secs_f64(l.proxy_header_timeout),
                pending: Arc::new(Semaphore::new(l.backlog as usize)),
            });
            listeners.push((
                sock,
                Listener {
                    tls: l.tls,
                    require_tls: l.require_tls,
                },
                proxy,
            ));
        }
        let admin = match &cfg.admin {
            Some(a) => Some(bind_now(a.address).map_err(|err| ServerError::Bind {
                addr: a.address,
                err,
            })?),
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
            live: Arc::new(ArcSwap::from_pointee(Shared {
                cfg: Arc::new(cfg),
                relays: Arc::new(ArcSwap::new(relay)),
                tls,
                policy,
                metrics,
                shutdown: shutdown_rx,
            })),
            shutdown_tx,
            draining: Arc::default(),
            reload_hook: None,
            admin_ctl: Arc::default(),
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _, _)| l.local_addr().ok())
            .collect()
    }

    /// The admission policy (counters, limiters, DNS caches), reloadable.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }

    /// A handle that reloads the policy while the server runs.
    pub fn reload_handle(&self) -> Reloader {
        Reloader {
            live: self.live.clone(),
            admin: self.admin_ctl.clone(),
            lock: Arc::default(),
        }
    }

    /// The current backends (a reload may replace them).
    pub fn relay(&self) -> Arc<Relay> {
        self.live.load().relay()
    }

    /// The metrics (what `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.live.load().metrics.clone()
    }

    /// What `POST /reload` on the admin listener runs (main.rs: re-read the
    /// config file and apply it, as SIGHUP does).
    pub fn set_reload_hook(&mut self, hook: crate::admin::ReloadHook) {
        self.reload_hook = Some(hook);
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
            live,
            shutdown_tx,
            draining,
            reload_hook,
            admin_ctl,
        } = self;
        let shared = live.load_full();
        shared.relay().spawn_reaper();
        crate::otlp_metrics::spawn(
            &shared.cfg.telemetry,
            shared.metrics.clone(),
            shutdown_tx.subscribe(),
        );
        shared.policy.start();
        {
            let mut ctl = admin_ctl.lock().unwrap_or_else(|e| e.into_inner());
            ctl.state = Some(crate::admin::AdminState {
                reload: reload_hook,
                metrics: shared.metrics.clone(),
                relays: shared.relays.clone(),
                draining: draining.clone(),
            });
            if let Some(l) = admin {
                ctl.start(l);
            }
        }
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let mut accepts = Vec::new();
        for (sock, listener, proxy) in listeners {
            if let Ok(a) = sock.local_addr() {
                info!(address = %a, tls = ?listener.tls, proxy_protocol = proxy.is_some(), "listening");
            }
            let live = live.clone();
            let done = done_tx.clone();
            let mut sd = shutdown_tx.subscribe();
            accepts.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = sock.accept() => match r {
                            Ok((stream, peer)) => {
                                let shared = live.load_full();
                                match &proxy {
                                    None => admit(stream, peer, None, shared, listener, &done),
                                    Some(p) => p.accept(stream, peer, shared, listener, &done),
                                }
                            }
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
        let shared = live.load_full();
        let grace = Duration::from_secs_f64(shared.cfg.timeouts.shutdown_grace);
        if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
            warn!("shutdown grace period over; closing remaining sessions");
        }
        shared.relay().close_idle().await;
        log_policy_totals(&shared.policy);
        admin_ctl.lock().unwrap_or_else(|e| e.into_inner()).stop();
        info!("stopped");
    }
}
