//! HBONE client: tunnels are HTTP/2 streams on pooled mTLS connections.
//!
//! Pool key: (source pod, source identity, destination identity, destination IP). The
//! source *pod* is part of the key because the agent's sockets live in each pod's network
//! namespace: two pods sharing a service account must not share an outer connection, or one
//! pod's traffic would leave from the other's address.
//!
//! A key may have several connections: a stream goes on the first one with a free slot
//! under the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` (at most [`MAX_STREAMS`]); when all
//! are full, another connection is dialled — a stream never waits for another to end.
//! One dial per key at a time: streams that find no slot while a connection is being
//! dialled wait for it and take its slots, so a burst of new streams to one destination
//! opens one connection per [`MAX_STREAMS`], not one each (every connection costs a TLS
//! handshake and some 35 KB of buffers).
//!
//! Ahead of need: once a stream leaves a key's connections with fewer free slots than a
//! quarter of the newest one's limit, the next connection is dialled in the background
//! ([`Pool::short_of_slots`], [`Pool::prewarm`]), so the streams of a growing burst find
//! it ready instead of each waiting for a TCP and TLS handshake. Unused, it is closed with
//! the idle ones.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    batch::Turns, coalesce::Coalesced, headers::ConnectHeaders, keepalive, readahead::ReadAhead, CONNECTION_WINDOW,
    HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_HEADER_LIST_CLIENT, MAX_STREAMS, STREAM_WINDOW, TLS_SEND_BUFFER,
};
use crate::{
    identity::{identity_valid_at, IdentityManager, SpiffeId},
    tls,
};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect to {0}: {1}")]
    Dial(SocketAddr, String),
    #[error("TLS to {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 to {0}: {1}")]
    H2(SocketAddr, h2::Error),
    #[error("{0} answered {1} to CONNECT")]
    Status(SocketAddr, StatusCode),
    /// The destination's policy refused it (401, or 403 from older agents).
    #[error("{0} answered {1} to CONNECT: denied by the destination's policy")]
    Denied(SocketAddr, StatusCode),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod (its netns cookie): sockets are created in its netns.
    pub src_pod: u64,
    pub src: SpiffeId,
    pub dst: SpiffeId,
    /// The destination pod's HBONE address (`<pod IP>:15008`).
    pub dst_addr: SocketAddr,
}

/// A tunnel ready to carry bytes. It holds its connection's stream slot until dropped.
#[derive(Debug)]
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub slot: Slot,
}

/// One stream's place on a pooled connection; released on drop.
#[derive(Debug)]
pub struct Slot(Arc<Usage>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since_ms.store(self.0.now_ms(), Ordering::Release);
        }
    }
}

/// One key's dial gate: held while dialling; the last failure (when, why).
#[derive(Debug, Default)]
struct Gate {
    failed: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// How busy a pooled connection is, and since when it has carried nothing.
#[derive(Debug)]
struct Usage {
    active: AtomicUsize,
    epoch: Instant,
    idle_since_ms: AtomicU64,
}

impl Usage {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A pooled connection and how many streams it carries.
#[derive(Debug, Clone)]
struct Pooled {
    id: u64,
    sender: SendRequest<Bytes>,
    usage: Arc<Usage>,
}

impl Pooled {
    /// Streams it may carry at once: the peer's limit, at most ours.
    fn limit(&self) -> usize {
        self.sender.current_max_send_streams().min(MAX_STREAMS as usize)
    }

    fn free(&self) -> usize {
        self.limit().saturating_sub(self.usage.active.load(Ordering::Acquire))
    }

    /// Take a slot if the connection has one free.
    fn reserve(&self) -> Option<Slot> {
        let limit = self.limit();
        self.usage
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.usage.clone()))
    }

    fn idle_for(&self, d: Duration) -> bool {
        let u = &self.usage;
        u.active.load(Ordering::Acquire) == 0
            && u.now_ms().saturating_sub(u.idle_since_ms.load(Ordering::Acquire)) >= d.as_millis() as u64
    }
}

/// Destination addresses whose session tickets each (source identity, destination
/// identity) pair keeps (rustls keeps up to 8 tickets per address; ours send one per
/// handshake).
const SESSIONS_PER_PAIR: usize = 8;
/// Pairs whose configs (and tickets) are kept; beyond, all are dropped and rebuilt on use
/// (costing only full handshakes): bounds the memory tickets take.
const MAX_PAIRS: usize = 256;

pub struct Pool {
    ids: Arc<IdentityManager>,
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Per key while anyone is dialling or waiting for a dial: the gate that lets one dial
    /// at a time, and the last failure (when, why) for those that waited on it.
    gates: Mutex<HashMap<PoolKey, Arc<Gate>>>,
    next_id: AtomicU64,
    /// One client config per (source, destination) identity pair, with its own session
    /// tickets: a session is only ever resumed by the identity that authenticated it,
    /// towards the identity that was verified.
    configs: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<rustls::ClientConfig>>>,
    /// Handshakes made: full, resumed.
    handshakes: [AtomicU64; 2],
    /// Connections dialled ahead of need.
    ahead: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("connections", &self.len()).finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(ids: Arc<IdentityManager>) -> Self {
        Self {
            ids,
            conns: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            configs: Mutex::new(HashMap::new()),
            handshakes: [AtomicU64::new(0), AtomicU64::new(0)],
            ahead: AtomicU64::new(0),
        }
    }

    /// Connections dialled ahead of need so far.
    pub fn dialled_ahead(&self) -> u64 {
        self.ahead.load(Ordering::Relaxed)
    }

    /// TLS handshakes made so far: (full, resumed).
    pub fn handshakes(&self) -> (u64, u64) {
        (self.handshakes[0].load(Ordering::Relaxed), self.handshakes[1].load(Ordering::Relaxed))
    }

    fn client_config(&self, key: &PoolKey) -> Result<Arc<rustls::ClientConfig>, TunnelError> {
        let pair = (key.src.clone(), key.dst.clone());
        if let Some(cfg) = self.configs.lock().get(&pair) {
            return Ok(cfg.clone());
        }
        let cfg = tls::client_config(&self.ids, &key.src, &key.dst, SESSIONS_PER_PAIR)
            .map_err(|e| TunnelError::Tls(key.dst_addr, e.to_string()))?;
        let mut configs = self.configs.lock();
        if configs.len() >= MAX_PAIRS {
            configs.clear();
        }
        Ok(configs.entry(pair).or_insert(cfg).clone())
    }

    /// Open a CONNECT stream to `target` through the pooled connection for `key`, dialling
    /// a new one with `dial` when there is none (or the pooled one has gone away).
    ///
    /// `early` (possibly empty) is the app's first bytes, sent right behind the request
    /// instead of a round trip later, after the 200. A pooled connection that fails before
    /// the request leaves, or whose peer refuses the stream unprocessed (REFUSED_STREAM),
    /// is dropped and the next one tried with the same bytes; with early bytes sent, any
    /// other failure is final (they may have reached the app, and must not reach it twice).
    pub async fn open<D, F>(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        headers: &ConnectHeaders,
        early: &Bytes,
        dial: D,
    ) -> Result<Tunnel, TunnelError>
    where
        D: Fn() -> F,
        F: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        loop {
            let (conn, slot, fresh) = match self.reserve(key) {
                Some((conn, slot)) => (conn, slot, false),
                // Boxed: dialling (TCP, TLS, HTTP/2 handshakes) is a large state that most
                // streams, finding a free slot, never need; inline, every stream being set
                // up would carry its size.
                None => Box::pin(self.grow(key, &dial)).await?,
            };
            match stream(conn.sender.clone(), key.dst_addr, target, headers, early, slot).await {
                Ok(t) => return Ok(t),
                Err(Failure::Retry(e)) if !fresh => {
                    tracing::debug!(dst = %key.dst_addr, "pooled HBONE connection unusable, dropping it: {e}");
                    self.forget(key, conn.id);
                }
                Err(Failure::Retry(e) | Failure::Final(e)) => {
                    if fresh && matches!(e, TunnelError::H2(..)) {
                        self.forget(key, conn.id);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A free slot on a pooled connection for `key`, if there is one.
    fn reserve(&self, key: &PoolKey) -> Option<(Pooled, Slot)> {
        self.conns.lock().get(key).and_then(|cs| cs.iter().find_map(|c| c.reserve().map(|slot| (c.clone(), slot))))
    }

    /// No free slot: dial a new connection for `key` — or, when another stream is already
    /// dialling one, wait for it and take a slot on it. Returns the connection, the slot,
    /// and whether this call dialled it.
    async fn grow<D, F>(&self, key: &PoolKey, dial: &D) -> Result<(Pooled, Slot, bool), TunnelError>
    where
        D: Fn() -> F,
        F: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let since = Instant::now();
        let gate = self.gates.lock().entry(key.clone()).or_default().clone();
        let result = async {
            let mut failed = gate.failed.lock().await;
            if let Some((conn, slot)) = self.reserve(key) {
                return Ok((conn, slot, false));
            }
            if let Some((at, why)) = failed.as_ref() {
                if *at >= since {
                    // The dial this stream waited for failed: fail with it, rather than
                    // each waiter trying (and timing out) in turn.
                    return Err(TunnelError::Dial(key.dst_addr, format!("{why} (dialled for an earlier stream)")));
                }
            }
            let sender =
                self.connect(key, dial).await.inspect_err(|e| *failed = Some((Instant::now(), e.to_string())))?;
            *failed = None;
            // A fresh connection has room for at least this stream. In the pool before the
            // gate opens: the waiters find it.
            let conn = self.add(key, sender, 1);
            let slot = Slot(conn.usage.clone());
            Ok((conn, slot, true))
        }
        .await;
        self.release(key, gate);
        result
    }

    /// Whether a connection should be dialled for `key` ahead of its streams: it has
    /// connections, their free stream slots are fewer than a quarter of the newest one's
    /// limit, and nobody is dialling for it already. (No connection at all: the next
    /// stream dials, there is nothing to be ahead of.)
    pub fn short_of_slots(&self, key: &PoolKey) -> bool {
        self.slots_short(key) && !self.gates.lock().contains_key(key)
    }

    fn slots_short(&self, key: &PoolKey) -> bool {
        let conns = self.conns.lock();
        let Some(cs) = conns.get(key) else { return false };
        let free: usize = cs.iter().map(Pooled::free).sum();
        cs.last().is_some_and(|newest| free < newest.limit().div_ceil(4))
    }

    /// Dial one more connection for `key` before a stream needs it (see
    /// [`Pool::short_of_slots`]); it joins the pool carrying nothing. Streams that find no
    /// free slot meanwhile wait for it instead of dialling their own. Does nothing when a
    /// dial for `key` is under way or the slots are no longer short; a failure is only
    /// logged (the next stream that finds no slot dials, and fails, for itself). Returns
    /// whether a connection was added.
    pub async fn prewarm<D, F>(&self, key: &PoolKey, dial: D) -> bool
    where
        D: Fn() -> F,
        F: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let gate = self.gates.lock().entry(key.clone()).or_default().clone();
        let added = async {
            let Ok(_dialling) = gate.failed.try_lock() else { return false };
            if !self.slots_short(key) {
                return false;
            }
            match self.connect(key, dial).await {
                Ok(sender) => {
                    self.add(key, sender, 0);
                    self.ahead.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    tracing::debug!(dst = %key.dst_addr, "HBONE connection dialled ahead of need: {e}");
                    false
                }
            }
        }
        .await;
        self.release(key, gate);
        added
    }

    /// A new connection for `key`, carrying `active` streams, in the pool.
    fn add(&self, key: &PoolKey, sender: SendRequest<Bytes>, active: usize) -> Pooled {
        let usage = Usage { active: AtomicUsize::new(active), epoch: Instant::now(), idle_since_ms: AtomicU64::new(0) };
        let conn = Pooled { id: self.next_id.fetch_add(1, Ordering::Relaxed), sender, usage: Arc::new(usage) };
        self.conns.lock().entry(key.clone()).or_default().push(conn.clone());
        conn
    }

    /// Done with `key`'s gate: removed when nobody else holds it (nobody is waiting).
    fn release(&self, key: &PoolKey, gate: Arc<Gate>) {
        let mut gates = self.gates.lock();
        if Arc::strong_count(&gate) == 2 {
            gates.remove(key);
        }
    }

    /// Close the connections that have carried nothing for `idle` (dropping the last
    /// handle ends the connection); returns how many.
    pub fn reap(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock();
        let before: usize = conns.values().map(Vec::len).sum();
        conns.retain(|_, cs| {
            cs.retain(|c| !c.idle_for(idle));
            !cs.is_empty()
        });
        before - conns.values().map(Vec::len).sum::<usize>()
    }

    fn forget(&self, key: &PoolKey, id: u64) {
        let mut conns = self.conns.lock();
        if let Some(cs) = conns.get_mut(key) {
            cs.retain(|c| c.id != id);
            if cs.is_empty() {
                conns.remove(key);
            }
        }
    }

    async fn connect<D, F>(&self, key: &PoolKey, dial: D) -> Result<SendRequest<Bytes>, TunnelError>
    where
        D: Fn() -> F,
        F: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        let to = key.dst_addr;
        // A resumed handshake would not ask for our certificate: check it is still there
        // (an identity whose certificate expired makes no new connections, resumed or not).
        if self.ids.current(&key.src).is_none() {
            return Err(TunnelError::Tls(to, format!("no valid certificate for {}", key.src)));
        }
        let tcp = dial().await.map_err(|e| TunnelError::Dial(to, e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let cfg = self.client_config(key)?;
        let name = ServerName::IpAddress(to.ip().into());
        let mut tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(cfg).connect(name, ReadAhead::new(tcp)))
                .await
                .map_err(|_| TunnelError::Tls(to, "handshake timed out".into()))?
                .map_err(|e| TunnelError::Tls(to, e.to_string()))?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        if resumed {
            // The server's certificate was verified in the first handshake; it must still
            // be valid (rustls already checked it is the one `key.dst` presented then).
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let now = std::time::SystemTime::now();
            match leaf.map(|l| identity_valid_at(l, now)) {
                Some(Ok(id)) if id == key.dst => {}
                Some(Err(e)) => return Err(TunnelError::Tls(to, format!("resumed session: {e}"))),
                _ => return Err(TunnelError::Tls(to, "resumed session: not the expected server".into())),
            }
        }
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        self.handshakes[usize::from(resumed)].fetch_add(1, Ordering::Relaxed);
        let turns = Turns::default();
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            // ztunnel's: answers carry no more than this in headers.
            .max_header_list_size(MAX_HEADER_LIST_CLIENT)
            .handshake::<_, Bytes>(Coalesced::new(tls, turns.clone()))
            .await
            .map_err(|e| TunnelError::H2(to, e))?;
        turns.arm();
        let pings = conn.ping_pong();
        super::batch::spawn(turns, async move {
            if let Some(why) = keepalive::drive(conn, pings, keepalive::PING_INTERVAL, keepalive::PING_TIMEOUT).await {
                tracing::info!(dst = %to, "HBONE connection dropped: {why}");
            }
        });
        Ok(sender)
    }

    /// Pooled connections (for status).
    pub fn len(&self) -> usize {
        self.conns.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a stream did not open: `Retry` when the peer certainly did not act on it.
enum Failure {
    Retry(TunnelError),
    Final(TunnelError),
}

/// One CONNECT stream, with `early` bytes behind the request; a non-200 answer is an error
/// (the caller resets the app).
async fn stream(
    sender: SendRequest<Bytes>,
    to: SocketAddr,
    target: SocketAddr,
    headers: &ConnectHeaders,
    early: &Bytes,
    slot: Slot,
) -> Result<Tunnel, Failure> {
    let h2 = |e| TunnelError::H2(to, e);
    let mut ready = sender.ready().await.map_err(|e| Failure::Retry(h2(e)))?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(super::headers::FORWARDED, headers.forwarded.clone())
        .header(super::headers::BAGGAGE, headers.baggage.clone())
        .header(super::headers::TRACEPARENT, super::headers::traceparent())
        .body(())
        .map_err(|e| Failure::Final(TunnelError::Dial(to, e.to_string())))?;
    let (response, mut send) = ready.send_request(req, false).map_err(|e| Failure::Retry(h2(e)))?;
    if !early.is_empty() {
        // At most 16 KiB, within any peer's initial stream window (64 KiB by default): sent
        // at once, no capacity to wait for.
        send.send_data(early.clone(), false).map_err(|e| Failure::Retry(h2(e)))?;
    }
    let response = response.await.map_err(|e| {
        // Only RST_STREAM(REFUSED_STREAM) guarantees the peer did nothing with the bytes. A
        // GOAWAY error is ambiguous here (h2 gives it both to streams above the last one the
        // peer processed and, once the connection ends, to those at or below it), so a race
        // with a closing pooled connection resets the app rather than risk a duplicate.
        if e.reason() == Some(h2::Reason::REFUSED_STREAM) || early.is_empty() {
            Failure::Retry(h2(e))
        } else {
            Failure::Final(h2(e))
        }
    })?;
    match response.status() {
        StatusCode::OK => {}
        // A policy denial: 401 from ztunnel and Selvedge, 403 from earlier Selvedge agents.
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(Failure::Final(TunnelError::Denied(to, response.status())))
        }
        status => return Err(Failure::Final(TunnelError::Status(to, status))),
    }
    Ok(Tunnel { send, recv: response.into_body(), slot })
}
