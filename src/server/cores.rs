//! The thread-per-core layout (`[runtime] flavor = "thread_per_core"`):
//! one OS thread per core, each running a current-thread runtime of its
//! own with one `SO_REUSEPORT` socket of every listener (the kernel spreads
//! new connections over them). A session lives and dies on the thread that
//! accepted it, and takes backend connections from that core's share of
//! each pool (`crate::cores::current`, `relay::pool`), so nothing on the
//! hot path wakes another thread. What is not per connection stays on the
//! main thread: the admin listener, signals, reloads, the pool reaper, the
//! policy's background tasks. The policy's caps and rate limits, the bans
//! and the metrics are the process's, shared by every core.
//!
//! The threads are named `edge-core-K` (what `top -H` and `/proc` show;
//! Linux keeps 15 bytes of a name).
//!
//! Stopping: the shutdown watch ends every core's accept loops
//! (`accepting_ended`); sessions finish as anywhere else; then `finish`,
//! sent after the main thread QUIT the idle pooled connections (whose
//! sockets the cores' loops still poll), ends the cores' runtimes and
//! joins their threads.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error};

use super::{accept_loop, Listening};
use crate::config::RuntimeConfig;
use crate::session::Shared;

/// The running cores.
pub(super) struct Cores {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each core's accept loops ended (a core sends once).
    ended: mpsc::Receiver<()>,
    finish: watch::Sender<bool>,
}

impl Cores {
    /// Starts `n` cores; core k gets the k-th socket of every listener.
    pub(super) fn start(
        n: usize,
        runtime: &RuntimeConfig,
        listeners: Vec<Listening>,
        live: &Arc<ArcSwap<Shared>>,
        done: &mpsc::Sender<()>,
        shutdown: &watch::Sender<bool>,
    ) -> Cores {
        // Sockets leave the main runtime's reactor here and join their
        // core's in its thread.
        let mut per_core: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
        for (socks, listener, proxy) in listeners {
            for (k, sock) in socks.into_iter().enumerate() {
                match sock.into_std() {
                    Ok(std) => per_core[k % n].push((std, listener, proxy.clone())),
                    Err(e) => error!("listener socket for core {k}: {e}"),
                }
            }
        }
        let (ended_tx, ended) = mpsc::channel(n.max(1));
        let (finish, _) = watch::channel(false);
        let mut threads = Vec::with_capacity(n);
        for (k, socks) in per_core.into_iter().enumerate() {
            let runtime = runtime.clone();
            let live = live.clone();
            let done = done.clone();
            let sd = shutdown.subscribe();
            let mut fin = finish.subscribe();
            let ended_tx = ended_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("edge-core-{k}"))
                .spawn(move || {
                    crate::cores::enter(k);
                    let rt = match runtime.build_core() {
                        Ok(rt) => rt,
                        Err(e) => {
                            error!(
                                core = k,
                                "cannot start the core's runtime: {e}; its sockets are closed"
                            );
                            let _ = ended_tx.try_send(());
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let mut loops = Vec::new();
                        for (std, listener, proxy) in socks {
                            match TcpListener::from_std(std) {
                                Ok(sock) => loops.push(tokio::spawn(accept_loop(
                                    sock,
                                    listener,
                                    proxy,
                                    live.clone(),
                                    done.clone(),
                                    sd.clone(),
                                ))),
                                Err(e) => error!(core = k, "listener socket: {e}"),
                            }
                        }
                        drop(done);
                        debug!(core = k, sockets = loops.len(), "core accepting");
                        for l in loops {
                            let _ = l.await;
                        }
                        let _ = ended_tx.try_send(());
                        // Sessions and the QUITs of idle connections still
                        // run on this loop until the main thread is done.
                        let _ = fin.wait_for(|v| *v).await;
                    });
                })
                .expect("spawn a core thread");
            threads.push(t);
        }
        Cores {
            threads,
            ended,
            finish,
        }
    }

    /// Waits until every core's accept loops have ended (after the
    /// shutdown watch fired).
    pub(super) async fn accepting_ended(&mut self) {
        for _ in 0..self.threads.len() {
            if self.ended.recv().await.is_none() {
                return;
            }
        }
    }

    /// Ends the cores' runtimes (a session still running is dropped, as
    /// at the end of the main runtime) and joins their threads.
    pub(super) async fn finish(self) {
        let _ = self.finish.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}
