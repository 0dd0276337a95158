//! The admin HTTP listener (`[admin] address`): `/metrics` (Prometheus
//! text), `/livez` (the process runs), `/readyz` (listeners bound, a
//! backend in rotation, not draining), `POST /reload` (re-read the
//! config file, as SIGHUP does; `smtp-edge reload` calls it) and `/bans`
//! (`GET` the list, `POST` one, `DELETE` one or all of a source; the API
//! `smtp-edge ban` calls), `/top` (the busiest senders of the last minute;
//! `smtp-edge top` shows it). `POST` and `DELETE` are answered only for
//! clients in `[admin] write_from` (403 and a log line otherwise).
//! HTTP/1.1 by hyper; what the answers say comes from `live_stats`, the
//! backends, the policy's ban list and the reload hook, this module only
//! serves them.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::live_stats::LiveStats;
use crate::policy::bans::{now_ms, parse_net, Source};
use crate::policy::Policy;
use crate::relay::Backends;
use crate::telemetry::top::{By, Counts, Top, WINDOW_SECS};

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
    /// The ban list (`/bans`).
    pub policy: Arc<Policy>,
    /// `[admin] write_from` (a reload replaces it).
    pub write_from: Arc<ArcSwap<Vec<IpNet>>>,
    /// Who is sending (`/top`).
    pub top: Arc<Top>,
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

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(status, format!("{v}\n"));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn json_error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

/// The most a request body may hold (a ban is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

async fn answer(
    state: &AdminState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let writes = req.method() == Method::POST || req.method() == Method::DELETE;
    if writes {
        let ip = peer.ip().to_canonical();
        if !state.write_from.load().iter().any(|n| n.contains(&ip)) {
            tracing::warn!(client = %ip, method = %req.method(), path = req.uri().path(), "admin: write refused, client not in [admin] write_from");
            return text(
                StatusCode::FORBIDDEN,
                format!("{ip} may not change anything here ([admin] write_from)\n"),
            );
        }
    }
    match req.uri().path() {
        "/reload" => return reload(state).await,
        "/bans" => return bans(state, req, peer.ip()).await,
        _ => {}
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
        "/top" => top(state, req.uri().query()),
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

/// The most rows `/top` gives per view.
const TOP_MAX: usize = 1000;

/// `GET /top?by=sessions|messages|recipients|refusals&n=20`: the busiest
/// addresses and prefixes over the last minute, with their ban.
fn top(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut by = By::Sessions;
    let mut n = 20;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "by" => match By::parse(&v) {
                Some(b) => by = b,
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        format!("by={v:?}: sessions, messages, recipients or refusals"),
                    )
                }
            },
            "n" => match v.parse::<usize>() {
                Ok(x) if x > 0 => n = x.min(TOP_MAX),
                _ => return json_error(StatusCode::BAD_REQUEST, format!("n={v:?}: a count > 0")),
            },
            _ => {}
        }
    }
    let bans = state.policy.bans();
    let now = now_ms();
    let row = |key: (&str, String), ip: IpAddr, c: &Counts| {
        let refusals: serde_json::Map<String, serde_json::Value> = c
            .refusals
            .iter()
            .map(|(why, n)| (why.to_string(), (*n).into()))
            .collect();
        let ban = bans.find(ip).map(|b| {
            serde_json::json!({
                "address": b.address(),
                "source": b.source.name(),
                "expires_in": b.expires.saturating_sub(now).div_ceil(1000),
            })
        });
        serde_json::json!({
            key.0: key.1,
            "open": c.open,
            "sessions": c.sessions,
            "messages": c.messages,
            "recipients": c.recipients,
            "refusals": refusals,
            "refusals_total": c.refusals_total(),
            "ban": ban,
        })
    };
    let (addrs, prefixes) = state.top.read(by, n);
    let (tracked_addrs, tracked_prefixes) = state.top.tracked();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "window": WINDOW_SECS,
            "by": format!("{by:?}").to_lowercase(),
            "tracked": { "addresses": tracked_addrs, "prefixes": tracked_prefixes },
            "addresses": addrs.iter().map(|(ip, c)| row(("address", ip.to_string()), *ip, c)).collect::<Vec<_>>(),
            "prefixes": prefixes.iter().map(|(net, c)| row(("prefix", net.to_string()), net.addr(), c)).collect::<Vec<_>>(),
        }),
    )
}

/// `POST /reload`.
async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(hook) = state.reload.clone() else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "no configuration file to reload\n",
        );
    };
    match tokio::task::spawn_blocking(move || hook()).await {
        Ok(Ok(())) => text(StatusCode::OK, "reloaded\n"),
        Ok(Err(e)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused; the running configuration stays:\n{e}\n"),
        ),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "reload failed\n"),
    }
}

/// `/bans`: `GET` (optionally `?source=`), `POST` a JSON ban,
/// `DELETE ?address=` one, `DELETE ?source=` all of a source (`all`: every
/// ban).
async fn bans(state: &AdminState, req: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let list = state.policy.bans();
    let source = match param("source") {
        None | Some("all") => Ok(None),
        Some(s) => Source::parse(s).map(Some).ok_or(s),
    };
    let source = match source {
        Ok(s) => s,
        Err(s) => {
            let names: Vec<&str> = Source::ALL.iter().map(|s| s.name()).collect();
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("unknown source {s:?}; one of {}, or all", names.join(", ")),
            );
        }
    };
    match *req.method() {
        Method::GET | Method::HEAD => {
            let now = now_ms();
            let bans: Vec<serde_json::Value> = list
                .list()
                .iter()
                .filter(|b| source.is_none_or(|s| b.source == s))
                .map(|b| b.to_json(now))
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({ "count": bans.len(), "bans": bans }),
            )
        }
        Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("body: {e}")),
            };
            let v: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("not JSON: {e}")),
            };
            let Some(net) = v
                .get("address")
                .and_then(|a| a.as_str())
                .and_then(parse_net)
            else {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "\"address\" must be an IP address or a CIDR network",
                );
            };
            let ttl = match v.get("ttl") {
                None => Some(3600.0),
                Some(t) => t.as_f64().filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9),
            };
            let Some(ttl) = ttl else {
                return json_error(StatusCode::BAD_REQUEST, "\"ttl\" must be seconds > 0");
            };
            let reason = v.get("reason").and_then(|r| r.as_str()).unwrap_or("");
            match list.add(net, Duration::from_secs_f64(ttl), Source::Admin, reason) {
                Ok(b) => {
                    tracing::info!(admin = %peer, client = %b.address(), "admin: ban added");
                    json(StatusCode::CREATED, &b.to_json(now_ms()))
                }
                Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        Method::DELETE => match param("address") {
            Some(a) => {
                let Some(net) = parse_net(a) else {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        format!("{a:?} is not an address or network"),
                    );
                };
                match list.remove(net) {
                    Some(b) => json(
                        StatusCode::OK,
                        &serde_json::json!({ "removed": 1, "bans": [b.to_json(now_ms())] }),
                    ),
                    None => json_error(StatusCode::NOT_FOUND, format!("no ban of {a}")),
                }
            }
            None if param("source").is_some() => {
                let n = list.clear(source);
                tracing::info!(admin = %peer, source = param("source").unwrap_or("all"), removed = n, "admin: bans cleared");
                json(StatusCode::OK, &serde_json::json!({ "removed": n }))
            }
            None => json_error(
                StatusCode::BAD_REQUEST,
                "give ?address=ADDRESS|CIDR, or ?source=SOURCE|all to clear",
            ),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET, POST or DELETE\n"),
    }
}

/// Serves the admin endpoints on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: AdminState, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
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
                async move { Ok::<_, Infallible>(answer(&state, req, peer).await) }
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
            tracing::info!(address = %a, "admin listening (/metrics, /livez, /readyz, /bans, /top, POST /reload)");
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
