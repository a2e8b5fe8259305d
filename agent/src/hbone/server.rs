//! The HBONE listener inside one pod (port 15008). For each TLS connection: finish the
//! handshake in bounded time, take the client's identity from its verified certificate,
//! then serve CONNECT streams whose target is this pod, delivering each to the app.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::FutureExt as _;
use h2::SendStream;
use http::{Method, Request, Response, StatusCode};
use selvedge_common::RESERVED_PORTS;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    batch::Turns,
    coalesce::Coalesced,
    flood::{FloodGuard, FLOOD},
    headers::ConnectInfo,
    readahead::ReadAhead,
    splice, CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW, TLS_SEND_BUFFER,
};
use crate::{addr, cancel::Cancel, identity::SpiffeId, publish::metrics::ByteCount, tls};

/// What the server needs from the agent, for one pod.
pub trait Upstream: Send + Sync + 'static {
    /// Held for the life of one tunnelled connection (e.g. to let shutdown drain it).
    type Guard: Send;
    fn begin(&self) -> Self::Guard;
    /// Kept while an authorized stream is open; its notifier closes the stream.
    type Watch: Send;
    /// May `principal`, connecting from `peer`, reach `target`? Err(reason) answers 401.
    fn authorize(&self, principal: &SpiffeId, peer: SocketAddr, target: SocketAddr) -> Result<Self::Watch, String>;
    /// Cancelled when the connection must be closed (e.g. a policy now denies it).
    fn cancelled(watch: &Self::Watch) -> &Cancel;
    /// Connect to the app at `target` inside this pod, for the client at `client` (its
    /// pod's address, and its own port when its CONNECT said it; else 0).
    fn connect(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> impl std::future::Future<Output = Result<TcpStream, String>> + Send;
    /// A served stream while it is open (from its 200 on): counted as opened, listed, and
    /// counting its bytes as they move. Held by every open stream, so small: what the
    /// stream's record needs at the end and the task has anyway is passed back then.
    type Served: Send;
    /// The stream from `principal` at `peer` to `target` is through (answered 200); `info`
    /// is what its CONNECT said besides. `peer` is the client app's address when the
    /// CONNECT's `forwarded` gave it (same IP as the connection's), else the connection's
    /// peer — as in [`ended`](Self::ended).
    fn served(&self, principal: &SpiffeId, peer: SocketAddr, target: SocketAddr, info: ConnectInfo) -> Self::Served;
    /// Where its bytes are counted: (client → app, app → client).
    fn tally(served: &Self::Served) -> (&ByteCount, &ByteCount);
    /// The served stream ended; `error` says why when it ended abnormally.
    fn ended(
        &self,
        served: Self::Served,
        principal: &SpiffeId,
        peer: SocketAddr,
        target: SocketAddr,
        error: Option<String>,
    );
    /// Record one refused connection or stream.
    fn log(&self, record: Record<'_>);
}

/// Why an inbound HBONE connection or stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TLS or HTTP/2 handshake failed or timed out.
    Handshake,
    /// The client certificate verified but is not an acceptable SVID.
    Certificate,
    /// 400: the target is not this workload (or not an address, or an agent port).
    BadTarget,
    /// 405: not CONNECT.
    Method,
    /// 503: the app could not be reached.
    Unavailable,
    /// 401 (ztunnel's answer): an authorization policy denied it.
    Denied,
    /// Over the limit of TLS handshakes in progress.
    OverLimit,
}

/// One refused inbound HBONE connection or stream, for the access log.
#[derive(Debug)]
pub struct Record<'a> {
    pub outcome: Outcome,
    pub peer: SocketAddr,
    pub target: Option<SocketAddr>,
    /// The verified client identity (the source principal), once known.
    pub principal: Option<&'a SpiffeId>,
    /// The HTTP status answered (0: none, the connection failed before HTTP/2).
    pub status: u16,
    pub reason: &'a str,
}

/// How one pod's HBONE listener is set up.
#[derive(Clone)]
pub struct ServerOptions {
    pub tls: TlsAcceptor,
    pub trust_domain: Arc<str>,
    /// Normally [`HANDSHAKE_TIMEOUT`](super::HANDSHAKE_TIMEOUT).
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed (GOAWAY): normally
    /// [`SERVER_IDLE`](super::SERVER_IDLE). Without it a peer could hold a connection, and
    /// with it a deleted pod's network namespace, open for as long as it liked.
    pub idle_timeout: Duration,
    /// TLS handshakes in progress, shared by every pod's listener: a connection over it
    /// is reset at once (a flood of slow handshakes must not take the node's descriptors).
    pub handshakes: Arc<crate::limits::Share>,
    /// Normally [`PING_INTERVAL`](super::keepalive::PING_INTERVAL); a PING unanswered for
    /// twice that drops the connection.
    pub ping_interval: Duration,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// Serve `listener` until the task is aborted.
pub async fn serve<U: Upstream>(listener: TcpListener, opts: ServerOptions, upstream: Arc<U>) {
    loop {
        let (tcp, peer) = crate::accept::next("HBONE listener", || listener.accept()).await;
        let Some(handshake) = opts.handshakes.take() else {
            let reason = format!("{} TLS handshakes in progress, the limit (--max-handshakes)", opts.handshakes.max());
            let peer = addr::canonical(peer);
            upstream.log(Record {
                outcome: Outcome::OverLimit,
                peer,
                target: None,
                principal: None,
                status: 0,
                reason: &reason,
            });
            crate::sys::reset(tcp);
            continue;
        };
        let turns = Turns::default();
        super::batch::spawn(
            turns.clone(),
            connection(tcp, addr::canonical(peer), opts.clone(), upstream.clone(), turns, handshake),
        );
    }
}

async fn connection<U: Upstream>(
    tcp: TcpStream,
    peer: SocketAddr,
    opts: ServerOptions,
    up: Arc<U>,
    turns: Turns,
    handshake: crate::limits::Held,
) {
    let refuse = |outcome, reason: &str| {
        up.log(Record { outcome, peer, target: None, principal: None, status: 0, reason });
    };
    let Ok(local) = tcp.local_addr().map(addr::canonical) else { return };
    let _ = tcp.set_nodelay(true);
    let mut stream = match tokio::time::timeout(opts.handshake_timeout, opts.tls.accept(ReadAhead::new(tcp))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refuse(Outcome::Handshake, &format!("TLS handshake failed: {e}")),
        Err(_) => return refuse(Outcome::Handshake, "TLS handshake timed out"),
    };
    stream.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    let principal = match tls::peer_identity(stream.get_ref().1.peer_certificates(), &opts.trust_domain) {
        Ok(id) => Arc::new(id),
        Err(e) => return refuse(Outcome::Certificate, &format!("client certificate rejected: {e}")),
    };
    // Bounded too: a client that finishes TLS and then says nothing would otherwise hold
    // its handshake place (and a descriptor) for as long as it liked.
    let h2 = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(super::MAX_HEADER_LIST_SERVER)
        .handshake::<_, Bytes>(FloodGuard::new(Coalesced::new(stream, turns.clone())));
    let mut conn = match tokio::time::timeout(opts.handshake_timeout, h2).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refuse(Outcome::Handshake, &format!("HTTP/2 handshake failed: {e}")),
        Err(_) => return refuse(Outcome::Handshake, "HTTP/2 handshake timed out (no client preface)"),
    };
    drop(handshake);
    turns.arm();
    let interval = opts.ping_interval;
    let mut unanswered = std::pin::pin!(super::keepalive::until_unanswered(conn.ping_pong(), interval, 2 * interval));
    // Streams open on this connection: each stream's task holds one clone.
    let open = Arc::new(());
    let mut idle_since = tokio::time::Instant::now();
    let mut closing = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            why = &mut unanswered => {
                // Dropping the connection resets its streams: their apps see a reset, not a
                // clean end.
                tracing::info!(%peer, "inbound HBONE connection dropped: {why}");
                break;
            }
            () = tokio::time::sleep_until(idle_since + opts.idle_timeout), if !closing => {
                if Arc::strong_count(&open) == 1 {
                    // GOAWAY, then the loop runs until the connection has ended.
                    conn.graceful_shutdown();
                    closing = true;
                } else {
                    idle_since = tokio::time::Instant::now();
                }
                continue;
            }
        };
        let (req, respond) = match next {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                let flood = e.get_io().map(ToString::to_string).filter(|m| m.contains(FLOOD));
                if let Some(reason) = flood {
                    up.log(Record {
                        outcome: Outcome::OverLimit,
                        peer,
                        target: None,
                        principal: Some(&principal),
                        status: 0,
                        reason: &reason,
                    });
                }
                break;
            }
            None => break,
        };
        idle_since = tokio::time::Instant::now();
        let held = open.clone();
        let stream = serve_stream(req, respond, peer, local, principal.clone(), up.clone());
        tokio::spawn(stream.map(move |()| drop(held)));
    }
}

/// Check a CONNECT request; Ok(target) or Err((status, reason)).
pub fn check_target(req: &Request<h2::RecvStream>, local: SocketAddr) -> Result<SocketAddr, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, format!("method {} is not CONNECT", req.method())));
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or_default();
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| (StatusCode::BAD_REQUEST, format!("CONNECT target {authority:?} is not an IP:port")))?;
    let target = addr::canonical(target);
    if target.ip() != local.ip() {
        // A tunnel reaches the pod whose identity it presented, never another one.
        return Err((StatusCode::BAD_REQUEST, format!("CONNECT target {target} is not the workload behind {local}")));
    }
    if RESERVED_PORTS.contains(&target.port()) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("CONNECT target port {} is reserved for the agent", target.port()),
        ));
    }
    Ok(target)
}

/// Why a connection that was allowed got closed (HBONE streams and plaintext relays).
pub const DENIED_LATER: &str = "closed: denied after a policy change";

/// The access-log record of a refused stream.
fn record<'a>(
    peer: SocketAddr,
    principal: &'a SpiffeId,
    target: Option<SocketAddr>,
    status: StatusCode,
    reason: &'a str,
) -> Record<'a> {
    Record {
        outcome: match status {
            StatusCode::METHOD_NOT_ALLOWED => Outcome::Method,
            StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
            StatusCode::UNAUTHORIZED => Outcome::Denied,
            _ => Outcome::BadTarget,
        },
        peer,
        target,
        principal: Some(principal),
        status: status.as_u16(),
        reason,
    }
}

fn reply(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) -> Result<SendStream<Bytes>, h2::Error> {
    let resp = Response::builder().status(status).body(()).unwrap_or_default();
    respond.send_response(resp, status != StatusCode::OK)
}

/// An accepted stream, connected to the app.
struct Open<W> {
    app: tokio::net::TcpStream,
    send: SendStream<Bytes>,
    recv: h2::RecvStream,
    watch: W,
    target: SocketAddr,
    info: ConnectInfo,
    /// The client app's address (its CONNECT's `forwarded`), else the connection's peer.
    source: SocketAddr,
}

/// Check, decide, connect to the app and answer 200 — or answer the refusal and log it.
async fn open_stream<U: Upstream>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    principal: Arc<SpiffeId>,
    up: Arc<U>,
) -> Option<Open<U::Watch>> {
    let (principal, up) = (&*principal, &*up);
    let target = match check_target(&req, local) {
        Ok(t) => t,
        Err((status, reason)) => {
            let _ = reply(&mut respond, status);
            up.log(record(peer, principal, None, status, reason.as_str()));
            return None;
        }
    };
    // Decided before the app sees a byte: a denied tunnel never connects to it. 401, as
    // ztunnel answers a policy denial.
    let watch = match up.authorize(principal, peer, target) {
        Ok(w) => w,
        Err(reason) => {
            let _ = reply(&mut respond, StatusCode::UNAUTHORIZED);
            up.log(record(peer, principal, Some(target), StatusCode::UNAUTHORIZED, reason.as_str()));
            return None;
        }
    };
    // The client's pod is the HBONE connection's peer (its agent, or ztunnel, dials from
    // inside it); its port, what its `forwarded` says when that names the same address.
    let info = ConnectInfo::read(req.headers());
    let forwarded = info.client.filter(|f| f.ip() == peer.ip());
    let client = SocketAddr::new(peer.ip(), forwarded.map_or(0, |f| f.port()));
    // What the stream's record calls its source: the client app's address when known.
    let source = forwarded.unwrap_or(peer);
    let app = match up.connect(target, client).await {
        Ok(s) => s,
        Err(reason) => {
            let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            let status = StatusCode::SERVICE_UNAVAILABLE;
            up.log(record(peer, principal, Some(target), status, reason.as_str()));
            return None;
        }
    };
    let send = match reply(&mut respond, StatusCode::OK) {
        Ok(s) => s,
        // Allowed and connected, but the client went away first: a served stream that
        // ended at once.
        Err(e) => {
            let served = up.served(principal, source, target, info);
            up.ended(served, principal, source, target, Some(format!("stream gone: {e}")));
            return None;
        }
    };
    Some(Open { app, send, recv: req.into_body(), watch, target, info, source })
}

/// One stream's task. What an idle stream costs is mostly this future, so it holds little
/// across the long wait: the request, the checks and the connect to the app are boxed and
/// freed once the stream is open, and the box is made here, outside the task's future,
/// which would otherwise keep the request itself (an argument) for the stream's whole life.
fn serve_stream<U: Upstream>(
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    principal: Arc<SpiffeId>,
    up: Arc<U>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let guard = up.begin();
    let opening = Box::pin(open_stream(req, respond, peer, local, principal.clone(), up.clone()));
    async move {
        let _guard = guard;
        let Some(Open { app, send, recv, watch, target, info, source }) = opening.await else { return };
        let served = up.served(&principal, source, target, info);
        let (to_app, to_client) = U::tally(&served);
        let result = tokio::select! {
            r = splice(app, send, recv, to_client, to_app) => r.err().map(|e| e.to_string()),
            // Dropping the splice resets the stream and closes the app's socket.
            () = U::cancelled(&watch).cancelled() => Some(DENIED_LATER.to_string()),
        };
        up.ended(served, &principal, source, target, result);
    }
}
