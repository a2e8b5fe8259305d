//! The agent's HTTP endpoints, each on its own listener in the node's network namespace:
//!
//! | port  | address      | paths |
//! |-------|--------------|-------|
//! | 15000 | 127.0.0.1    | `/config_dump`, `/connections`, `/logging[?level=…]`, `/version`, `/quitquitquit`, `/readiness/handover` |
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

use crate::publish::metrics::Metrics;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS: &str = "0.0.0.0:15021";

/// How long `/config_dump` waits for the run loop (busy applying a change, or draining at
/// shutdown) before serving the last document it built.
pub const DUMP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The log filter at runtime (`/logging`): `Some(filter)` sets it, `None` only reads it;
/// either way it answers the filter in force after the call.
pub type SetLogLevel = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// This build's version and commit (`/version`, `selvedge version`).
pub fn version() -> serde_json::Value {
    serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "commit": env!("SELVEDGE_GIT_COMMIT")})
}

/// The levels a log filter directive may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Refuse a filter with a directive that names no level: the log filter would read
/// `verbose` as "everything from the target `verbose`", and silence every other log.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let usage = "want a level (off, error, warn, info, debug, trace) or TARGET=LEVEL directives, comma-separated";
    if filter.trim().is_empty() {
        return Err(format!("empty log filter: {usage}"));
    }
    for directive in filter.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("bad log filter {filter:?}: {directive:?} names no level; {usage}"));
        }
    }
    Ok(())
}

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
    /// `/readiness/handover`: a newer agent on this node wants the readiness port
    /// ([`serve_readiness`]).
    pub handover: Notify,
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

/// How long an agent that handed its readiness port over waits before it takes the port
/// back if it is free again (the newer agent went away before this one was stopped).
pub const HANDBACK: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve the readiness endpoint on `addr`, starting with `listener` when this agent could
/// bind it.
///
/// During a DaemonSet rolling update the old agent and the new one share the node's network
/// and the kubelet probes the new pod at the same port, so whoever holds it answers: the old
/// agent, ready, would make the new pod ready before it is, and the rollout would stop the
/// old agent early. So an agent that finds the port taken asks the holder (its admin API,
/// `admin`) to hand it over, and the holder closes its listener: the new pod is then ready
/// when the new agent says so. The old agent keeps serving traffic until it is stopped, and
/// takes the port back after [`HANDBACK`] if it is free again (never by asking).
pub async fn serve_readiness(
    listener: Option<TcpListener>,
    addr: SocketAddr,
    admin: SocketAddr,
    state: Arc<AdminState>,
) {
    let mut listener = match listener {
        Some(l) => l,
        None => take_over(addr, admin).await,
    };
    loop {
        tokio::select! {
            () = serve(listener, Endpoints::Readiness, state.clone()) => return,
            () = state.handover.notified() => {}
        }
        tracing::info!(%addr, "readiness port handed over to a newer agent on this node; taken back if free after {HANDBACK:?}");
        tokio::time::sleep(HANDBACK).await;
        listener = bind_when_free(addr).await;
    }
}

/// Bind `addr`; when another agent holds it, ask that agent to hand it over, then bind it
/// once it is free.
pub async fn take_over(addr: SocketAddr, admin: SocketAddr) -> TcpListener {
    if let Ok(l) = TcpListener::bind(addr).await {
        return l;
    }
    match ask_handover(admin).await {
        Ok(()) => tracing::info!(%addr, "readiness port: the agent holding it was asked to hand it over"),
        Err(e) => {
            tracing::warn!(%addr, "readiness port: could not ask its holder to hand it over ({e}); taking it when it frees up")
        }
    }
    bind_when_free(addr).await
}

/// `POST /readiness/handover` to the admin API at `admin`; Ok once it answered 200.
async fn ask_handover(admin: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(
            b"POST /readiness/handover HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))??;
    let status = String::from_utf8_lossy(answer.split(|b| *b == b'\n').next().unwrap_or_default()).trim().to_string();
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("answered {status:?}")))
    }
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
        let (tcp, _) = crate::accept::next("admin endpoint", || listener.accept()).await;
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
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(percent_decode))
}

/// A query value as sent: `%XX` escapes decoded (`selvedge log` sends `selvedge%3Dtrace`),
/// `+` a space; a malformed escape is kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex =
            b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        (Endpoints::Admin, &Method::GET, "/version") => json(&version()),
        (Endpoints::Admin, _, "/logging") => match query(req, "level") {
            Some(level) => match check_log_filter(&level).and_then(|()| (state.set_log_level)(Some(&level))) {
                Ok(now) => {
                    tracing::info!(level = %now, "log level changed");
                    reply(StatusCode::OK, "text/plain", format!("level set to {now}\n"))
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            },
            // No level: the filter in force (JSON, for `selvedge log`).
            None => match (state.set_log_level)(None) {
                Ok(now) => json(&serde_json::json!({ "level": now })),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
            },
        },
        (Endpoints::Admin, &Method::POST, "/readiness/handover") => {
            state.handover.notify_waiters();
            reply(StatusCode::OK, "text/plain", "handing the readiness port over\n")
        }
        (Endpoints::Admin, &Method::POST, "/quitquitquit") => {
            state.quit.notify_one();
            reply(StatusCode::OK, "text/plain", "shutting down\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn state(ready: bool) -> Arc<AdminState> {
        Arc::new(AdminState {
            snapshot: RwLock::new(serde_json::Value::Null),
            dump_wanted: Notify::new(),
            dump_built: tokio::sync::watch::Sender::new(0),
            ready: AtomicBool::new(ready),
            not_ready: RwLock::new("starting".into()),
            metrics: Arc::new(Metrics::default()),
            set_log_level: Box::new(|l| Ok(l.unwrap_or("info").to_string())),
            quit: Notify::new(),
            handover: Notify::new(),
        })
    }

    /// The status line of `GET /healthz/ready` at `addr`, as the kubelet's probe sees it.
    async fn probe(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn a_log_filter_must_name_a_level_in_each_directive() {
        for good in ["debug", "INFO", "selvedge=trace", "warn,selvedge::access=info", "h2=off, info"] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        for bad in ["", "verbose", "selvedge=loud", "info,selvedge", "[bad"] {
            let e = check_log_filter(bad).expect_err(bad);
            assert!(e.contains("want a level"), "{bad}: {e}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("selvedge%3Dtrace%2Cinfo"), "selvedge=trace,info");
        assert_eq!(percent_decode("a+b%zz%4"), "a b%zz%4");
    }

    #[tokio::test]
    async fn a_newer_agent_takes_the_readiness_port_over_and_answers_for_itself() {
        // The old agent, ready: its admin API and its readiness endpoint.
        let old = state(true);
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ready_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (admin, ready) = (admin_listener.local_addr().unwrap(), ready_listener.local_addr().unwrap());
        tokio::spawn(serve(admin_listener, Endpoints::Admin, old.clone()));
        tokio::spawn(serve_readiness(Some(ready_listener), ready, admin, old.clone()));
        assert!(probe(ready).await.contains("200"), "the old agent answers while it holds the port");

        // A new agent on the same node, not ready yet, finds the port taken and asks for it.
        let new = state(false);
        let taken = tokio::time::timeout(std::time::Duration::from_secs(10), take_over(ready, admin))
            .await
            .expect("the old agent hands the port over");
        tokio::spawn(serve(taken, Endpoints::Readiness, new.clone()));
        let answer = probe(ready).await;
        assert!(answer.contains("503"), "the probe now sees the new agent, not ready: {answer}");
        new.ready.store(true, Ordering::SeqCst);
        assert!(probe(ready).await.contains("200"), "and ready once it says so");
    }
}
