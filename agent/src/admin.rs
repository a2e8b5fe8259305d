//! The agent's HTTP endpoints, each on its own listener in the node's network namespace:
//!
//! | port  | address      | paths |
//! |-------|--------------|-------|
//! | 15000 | 127.0.0.1    | `/config_dump`, `/connections`, `/logging?level=…`, `/quitquitquit` |
//! | 15020 | all          | `/metrics`, `/stats/prometheus` |
//! | 15021 | all          | `/healthz/ready` |
//!
//! Handlers read state the agent publishes ([`AdminState`]); none of them touches the
//! datapath or blocks the proxy. `/config_dump` asks the run loop for a fresh document
//! and waits for it (up to [`DUMP_WAIT`]): the document grows with the cluster, so it is
//! built only when someone reads it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use tokio::{net::TcpListener, sync::Notify};

use crate::metrics::Metrics;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS: &str = "0.0.0.0:15021";

/// How long `/config_dump` waits for the run loop (busy applying a change, or draining at
/// shutdown) before serving the last document it built.
pub const DUMP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Changes the log filter at runtime (`/logging?level=…`).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the endpoints serve, kept current by the agent.
pub struct AdminState {
    /// The `/config_dump` document, replaced whole each time the run loop answers
    /// [`AdminState::dump_wanted`].
    pub snapshot: RwLock<serde_json::Value>,
    /// A `/config_dump` request wakes the run loop to build the document.
    pub dump_wanted: Notify,
    /// Counts the documents built; a request waits for it to move.
    pub dump_built: tokio::sync::watch::Sender<u64>,
    pub ready: AtomicBool,
    /// Why not ready, for the readiness body.
    pub not_ready: RwLock<String>,
    pub metrics: Arc<Metrics>,
    pub set_log_level: SetLogLevel,
    /// `/quitquitquit` wakes the agent's run loop.
    pub quit: Notify,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").field("ready", &self.ready).finish_non_exhaustive()
    }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    Admin,
    Metrics,
    Readiness,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API address {0} is not a loopback address; it must never be reachable from the network")]
    NotLoopback(SocketAddr),
    #[error("{what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Bind the three listeners (before serving, so a taken port is a start-up error).
/// Bind the three endpoints. A port another agent still holds (the overlap of a DaemonSet
/// rolling update: both agents share the node's network) is not fatal: it is returned as
/// `None` and [`bind_when_free`] takes it once the old agent is gone.
pub async fn bind(
    admin: SocketAddr,
    metrics: SocketAddr,
    ready: SocketAddr,
) -> Result<Vec<(SocketAddr, Endpoints, Option<TcpListener>)>, AdminError> {
    if !admin.ip().is_loopback() {
        return Err(AdminError::NotLoopback(admin));
    }
    let mut out = Vec::new();
    for (what, addr, which) in [
        ("admin API", admin, Endpoints::Admin),
        ("metrics", metrics, Endpoints::Metrics),
        ("readiness", ready, Endpoints::Readiness),
    ] {
        match TcpListener::bind(addr).await {
            Ok(l) => out.push((addr, which, Some(l))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::warn!(%addr, "{what}: address in use (another agent during a rolling update?); taking it when it frees up");
                out.push((addr, which, None));
            }
            Err(source) => return Err(AdminError::Bind { what, addr, source }),
        }
    }
    Ok(out)
}

/// Bind `addr` as soon as nobody else holds it.
pub async fn bind_when_free(addr: SocketAddr) -> TcpListener {
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "listening (the address was freed)");
                return l;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
}

/// Serve one listener until the task is aborted.
pub async fn serve(listener: TcpListener, which: Endpoints, state: Arc<AdminState>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    if which == Endpoints::Admin && req.method() == Method::GET && req.uri().path() == "/config_dump" {
                        fresh_dump(&state).await;
                    }
                    Ok::<_, Infallible>(handle(&req, which, &state))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(v).unwrap_or_default())
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

/// Have the run loop build a new `/config_dump` document, and wait for it (at most
/// [`DUMP_WAIT`]).
async fn fresh_dump(state: &AdminState) {
    let mut built = state.dump_built.subscribe();
    built.borrow_and_update();
    state.dump_wanted.notify_one();
    if tokio::time::timeout(DUMP_WAIT, built.changed()).await.is_err() {
        tracing::debug!("config dump: the run loop did not answer in time; serving the last document");
    }
}

/// Route one request (`/config_dump` serves the last document built: see [`fresh_dump`]).
pub fn handle(req: &Request<Incoming>, which: Endpoints, state: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (which, req.method(), path) {
        (Endpoints::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => {
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", state.metrics.encode())
        }
        (Endpoints::Readiness, &Method::GET, "/healthz/ready") => {
            if state.ready.load(Ordering::SeqCst) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {}\n", state.not_ready.read()))
            }
        }
        (Endpoints::Admin, &Method::GET, "/config_dump") => json(&state.snapshot.read()),
        (Endpoints::Admin, &Method::GET, "/connections") => json(&state.metrics.live_connections()),
        (Endpoints::Admin, _, "/logging") => match query(req, "level") {
            Some(level) => match (state.set_log_level)(&level) {
                Ok(()) => {
                    tracing::info!(level = %level, "log level changed");
                    reply(StatusCode::OK, "text/plain", format!("level set to {level}\n"))
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            },
            None => reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "usage: /logging?level=<filter, e.g. debug or selvedge=trace>\n",
            ),
        },
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => {
            state.quit.notify_one();
            reply(StatusCode::OK, "text/plain", "shutting down\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
