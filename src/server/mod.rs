//! The composition root: the only code that knows every subsystem. Binds
//! the listeners and builds what sessions share (TLS acceptor, backends,
//! policy, metrics), runs the accept loop with admission (`Policy::admit`:
//! global cap, lists, per-IP limits, so a refused client costs one write
//! and no session task) and the PROXY protocol header, and stops
//! gracefully: stop accepting, let sessions finish within a deadline, QUIT
//! pooled backend connections. `reload` applies a new configuration while
//! running (SIGHUP, `POST /reload`), `admin` serves the admin endpoints,
//! `live_stats` reads the subsystems' numbers at scrape time.
//!
//! # Accept loop
//! One loop per listener. Each connection gets its `smtp.session` span,
//! then `admit`: the policy judges the address inside that span, and a
//! refusal is answered by `refuse` (one `try_write`) and closed, with no
//! task spawned. Accept errors (EMFILE at the fd limit) back off 50 ms
//! instead of spinning. On a `proxy_protocol` listener (`ProxyListen`) an
//! untrusted source is closed in the loop; a trusted one gets a task that
//! reads the header (`proxy_protocol::read_header`, within
//! `proxy_header_timeout`; at most `backlog` such tasks per listener, a
//! semaphore) and then runs the same `admit` with the header's client
//! address. From there on nothing knows the balancer but the span's
//! `network.peer.*`.
//!
//! # What sessions share
//! A `Shared` behind an `ArcSwap` (`live`): the accept loop loads it per
//! connection, and a session keeps its `Shared` (configuration, TLS
//! acceptor, policy) for life, except the backends, which sit in an
//! `ArcSwap` of their own (`Shared::backends`) and are loaded at each MAIL.
//!
//! # Stopping
//! When `stop` completes the drain flag turns `/readyz` to 503 while the
//! listeners keep accepting for `timeouts.drain_delay`; then the accept
//! loops end and the shutdown watch fires: a session waiting for a command
//! outside a transaction gets 421 4.3.2, one inside a transaction finishes
//! it (a message in DATA gets its final reply, then 421), all bounded by
//! `timeouts.shutdown_grace`. Then idle pooled connections get QUIT and the
//! policy and DNS cache totals are logged.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::policy::Policy;
use crate::relay::Backends;
use crate::session::{self, Listener, Shared};
use crate::telemetry::metrics::Metrics;

pub mod admin;
mod bind;
mod cores;
pub mod live_stats;
mod reload;

use bind::{bind_now, listen_shares, tls_acceptor};
use live_stats::LiveStats;
pub use reload::{needs_restart, Reloader};

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
            let destination = proxied.map(|(_, d)| d);
            // The session's future is the task's: no wrapper around it
            // (its metrics and `done` are held in it till it ends).
            tokio::spawn(session::handle(
                stream,
                peer,
                destination,
                shared,
                listener,
                pol,
                span,
                done.clone(),
            ));
        }
        Err(v) => {
            shared.metrics.refused(v.check.name());
            shared.top.refused_at_accept(peer.ip(), v.check.name());
            session::record_refusal(&span, &v);
            refuse(stream, &v)
        }
    }
}

/// A listener's PROXY protocol settings (a clone, one per core, shares
/// the `pending` bound).
#[derive(Clone)]
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
    /// address in it. A LOCAL (v2) or UNKNOWN (v1) header is served as a
    /// session of the balancer itself: admission judges the socket's peer.
    /// Nothing is written before a valid header: a refused connection is
    /// closed without a greeting.
    fn accept(
        &self,
        mut stream: tokio::net::TcpStream,
        via: SocketAddr,
        shared: Arc<Shared>,
        listener: Listener,
        done: &mpsc::Sender<()>,
    ) {
        let m = &shared.metrics;
        if !crate::proxy_protocol::trusted(&self.trusted, via.ip()) {
            m.proxy_header(crate::proxy_protocol::Refusal::Untrusted.name());
            debug!(source = %via, "PROXY protocol: untrusted source closed");
            return;
        }
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            m.proxy_header(crate::proxy_protocol::Refusal::Busy.name());
            return;
        };
        let timeout = self.timeout;
        let done = done.clone();
        tokio::spawn(async move {
            let header = crate::proxy_protocol::read_header(&mut stream, timeout).await;
            drop(permit);
            let m = &shared.metrics;
            match header {
                Ok(crate::proxy_protocol::Header::Proxied {
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
                Ok(crate::proxy_protocol::Header::Local) => {
                    // The balancer speaking for itself (a health check such
                    // as HAProxy's `option smtpchk`): an ordinary session
                    // whose client is the socket's peer, as the spec says.
                    m.proxy_header("local");
                    debug!(source = %via, "PROXY protocol: LOCAL header; served as the balancer's own session");
                    admit(stream, via, None, shared, listener, &done);
                }
                Err(r) => {
                    m.proxy_header(r.name());
                    debug!(source = %via, reason = r.name(), "PROXY protocol: header refused; closed");
                }
            }
        });
    }
}

/// One listening socket's accept loop, until the shutdown watch fires:
/// admission and a session task per connection (`admit`), or the PROXY
/// header first (`ProxyListen::accept`). Runs on the thread whose runtime
/// registered `sock` (a core's, in the thread-per-core layout).
async fn accept_loop(
    sock: TcpListener,
    listener: Listener,
    proxy: Option<ProxyListen>,
    live: Arc<ArcSwap<Shared>>,
    done: mpsc::Sender<()>,
    mut sd: watch::Receiver<bool>,
) {
    let accepted = live.load().metrics.core(crate::cores::current());
    loop {
        tokio::select! {
            r = sock.accept() => match r {
                Ok((stream, peer)) => {
                    accepted.inc();
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
}

/// Policy counters for the log at shutdown (they are on `/metrics` too).
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

/// One configured listener: its sockets (one per core; one without the
/// thread-per-core layout), what it offers, its PROXY protocol settings.
type Listening = (Vec<TcpListener>, Listener, Option<ProxyListen>);

/// Bound listeners plus everything sessions share; `serve` runs them.
pub struct Server {
    listeners: Vec<Listening>,
    admin: Option<TcpListener>,
    /// What new connections get; a reload swaps it.
    live: Arc<ArcSwap<Shared>>,
    stats: Arc<LiveStats>,
    shutdown_tx: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    reload_hook: Option<admin::ReloadHook>,
    admin_ctl: Arc<std::sync::Mutex<admin::AdminCtl>>,
}

impl Server {
    /// Binds every listener and prepares TLS and backends.
    pub async fn bind(cfg: Config) -> Result<Server, ServerError> {
        let tls = tls_acceptor(&cfg, None)?;
        let mut listeners = Vec::new();
        for l in &cfg.listeners {
            let socks =
                listen_shares(l.address, l.backlog, cfg.runtime.cores()).map_err(|err| {
                    ServerError::Bind {
                        addr: l.address,
                        err,
                    }
                })?;
            let proxy = l.proxy_protocol.then(|| ProxyListen {
                trusted: l.trusted_proxies.clone().into(),
                timeout: Duration::from_secs_f64(l.proxy_header_timeout),
                pending: Arc::new(Semaphore::new(l.backlog as usize)),
            });
            listeners.push((
                socks,
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
        let relay = Backends::new(&cfg, &metrics).map_err(ServerError::Backend)?;
        let policy = Policy::new(&cfg.policy, &cfg.hostname).map_err(ServerError::Policy)?;
        let backends = Arc::new(ArcSwap::new(relay));
        let stats = Arc::new(LiveStats::new(
            metrics.clone(),
            policy.clone(),
            backends.clone(),
        ));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let l = &cfg.policy.limits;
        let top = Arc::new(crate::telemetry::top::Top::new(
            cfg.telemetry.top_size,
            l.ipv4_prefix,
            l.ipv6_prefix,
        ));
        Ok(Server {
            listeners,
            admin,
            live: Arc::new(ArcSwap::from_pointee(Shared {
                cfg: Arc::new(cfg),
                backends,
                tls,
                policy,
                metrics,
                top,
                shutdown: shutdown_rx,
            })),
            stats,
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
            .filter_map(|(l, _, _)| l.first()?.local_addr().ok())
            .collect()
    }

    /// The admission policy (counters, limiters, DNS caches), reloadable.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }

    /// A handle that reloads the policy while the server runs.
    pub fn reload_handle(&self) -> Reloader {
        Reloader::new(self.live.clone(), self.admin_ctl.clone())
    }

    /// The current backends (a reload may replace them).
    pub fn backends(&self) -> Arc<Backends> {
        self.live.load().backends()
    }

    /// The counters the subsystems write into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.live.load().metrics.clone()
    }

    /// What `/metrics` serves: the counters and the live values.
    pub fn stats(&self) -> Arc<LiveStats> {
        self.stats.clone()
    }

    /// What `POST /reload` on the admin listener runs (main.rs: re-read the
    /// config file and apply it, as SIGHUP does).
    pub fn set_reload_hook(&mut self, hook: admin::ReloadHook) {
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
            stats,
            shutdown_tx,
            draining,
            reload_hook,
            admin_ctl,
        } = self;
        let shared = live.load_full();
        shared.backends().spawn_reaper();
        shared.policy.start();
        {
            let mut ctl = admin_ctl.lock().unwrap_or_else(|e| e.into_inner());
            ctl.state = Some(admin::AdminState {
                reload: reload_hook,
                stats: stats.clone(),
                backends: shared.backends.clone(),
                draining: draining.clone(),
                policy: shared.policy.clone(),
                top: shared.top.clone(),
                write_from: Arc::new(arc_swap::ArcSwap::from_pointee(
                    shared
                        .cfg
                        .admin
                        .as_ref()
                        .map(|a| a.write_from.clone())
                        .unwrap_or_default(),
                )),
            });
            if let Some(l) = admin {
                ctl.start(l);
            }
        }
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        for (socks, listener, proxy) in &listeners {
            if let Some(a) = socks.first().and_then(|s| s.local_addr().ok()) {
                info!(address = %a, tls = ?listener.tls, proxy_protocol = proxy.is_some(), sockets = socks.len(), "listening");
            }
        }
        let ncores = shared.cfg.runtime.cores();
        let mut accepts = Vec::new();
        let mut core_threads = None;
        if ncores <= 1 {
            for (socks, listener, proxy) in listeners {
                for sock in socks {
                    accepts.push(tokio::spawn(accept_loop(
                        sock,
                        listener,
                        proxy.clone(),
                        live.clone(),
                        done_tx.clone(),
                        shutdown_tx.subscribe(),
                    )));
                }
            }
        } else {
            core_threads = Some(cores::Cores::start(
                ncores,
                &shared.cfg.runtime,
                listeners,
                &live,
                &done_tx,
                &shutdown_tx,
            ));
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
        if let Some(c) = &mut core_threads {
            c.accepting_ended().await;
        }
        let shared = live.load_full();
        let grace = Duration::from_secs_f64(shared.cfg.timeouts.shutdown_grace);
        if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
            warn!("shutdown grace period over; closing remaining sessions");
        }
        shared.backends().close_idle().await;
        if let Some(c) = core_threads {
            // After the QUITs: their sockets are polled by the cores' loops.
            c.finish().await;
        }
        log_policy_totals(&shared.policy);
        admin_ctl.lock().unwrap_or_else(|e| e.into_inner()).stop();
        info!("stopped");
    }
}
