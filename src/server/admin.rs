//! The admin HTTP listener (`[admin] address`): `/metrics` (Prometheus
//! text), `/livez` (the process runs), `/readyz` (listeners bound, a
//! backend in rotation, not draining) and `POST /reload` (re-read the
//! config file, as SIGHUP does; `smtp-edge reload` calls it). HTTP/1.1 by
//! hyper; what the answers say comes from `live_stats`, the backends and
//! the reload hook, this module only serves them.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::live_stats::LiveStats;
use crate::relay::Backends;

/// Re-reads the configuration and applies it: Ok, or every error.
pub type ReloadHook = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// `POST /reload`; None: the endpoint answers 501.
    pub reload: Option<ReloadHook>,
    /// `/metrics`.
    pub stats: Arc<LiveStats>,
    /// The current backends (a reload may swap them).
    pub backends: Arc<arc_swap::ArcSwap<Backends>>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
}

impl AdminState {
    /// Ready: not draining and at least one backend in rotation.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining");
        }
        if !self.backends.load().backends_up().into_iter().any(|up| up) {
            return Err("no backend in rotation");
        }
        Ok(())
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/reload" {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
        }
        let Some(hook) = state.reload.clone() else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "no configuration file to reload\n",
            );
        };
        return match tokio::task::spawn_blocking(move || hook()).await {
            Ok(Ok(())) => text(StatusCode::OK, "reloaded\n"),
            Ok(Err(e)) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload refused; the running configuration stays:\n{e}\n"),
            ),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "reload failed\n"),
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.stats.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the admin endpoints on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: AdminState, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|v| *v).await; } => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // A scrape never needs long: bound a slow or idle client.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

/// The running admin listener: started by `Server::serve`, moved to another
/// address or stopped by a reload.
#[derive(Default)]
pub struct AdminCtl {
    /// What the endpoints serve (set when the server starts).
    pub state: Option<AdminState>,
    stop: Option<watch::Sender<bool>>,
}

impl AdminCtl {
    /// Serves on `listener` from now on, stopping the listener before.
    pub fn start(&mut self, listener: TcpListener) {
        self.stop();
        let Some(state) = self.state.clone() else {
            return;
        };
        if let Ok(a) = listener.local_addr() {
            tracing::info!(address = %a, "admin listening (/metrics, /livez, /readyz, POST /reload)");
        }
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, state, rx));
        self.stop = Some(tx);
    }

    /// Stops accepting admin connections (answers in progress finish).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
    }
}
