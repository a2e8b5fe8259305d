//! In-process tests of the HBONE client and server: real TLS 1.3 and HTTP/2 on loopback,
//! certificates from a real built-in CA, no eBPF.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use parking_lot::Mutex;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    client::{Pool, PoolKey, Tunnel, TunnelError},
    headers::{ConnectHeaders, ConnectInfo},
    server::{self, Record, ServerOptions, Upstream},
};
use crate::{
    cancel::Cancel,
    identity::{svid_params, BuiltinCa, BuiltinSource, IdentityManager, SpiffeId},
    publish::metrics::{ByteCount, Tally},
    tls,
};

const TD: &str = "lab.local";

/// What the in-process client's CONNECTs say besides the target.
fn headers() -> ConnectHeaders {
    let meta = crate::state::WorkloadMeta::of("web", "shop", &Default::default());
    let baggage = super::headers::baggage(&meta, "web", "c1");
    ConnectHeaders::new("198.18.1.10:40000".parse().unwrap(), Some("db.shop.svc.cluster.local"), baggage)
}

pub(super) fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn ca(name: &str) -> BuiltinCa {
    let dir = std::env::temp_dir().join(format!("selvedge-hbone-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    BuiltinCa::init(&dir, TD).unwrap();
    let ca = BuiltinCa::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    ca
}

pub(super) fn manager(ca: BuiltinCa) -> Arc<IdentityManager> {
    let provider = Arc::new(crate::tls::crypto_provider());
    IdentityManager::new(Arc::new(BuiltinSource { ca, lifetime: Duration::from_secs(3600) }), provider, TD).unwrap()
}

/// Delivers to a loopback echo server and keeps every record: (status, reason, principal),
/// and for served streams the bytes (client → app, app → client).
#[derive(Default)]
struct Recorder {
    echo: Mutex<Option<SocketAddr>>,
    records: Mutex<Vec<(u16, String, Option<String>)>>,
    served_bytes: Mutex<Vec<(u64, u64)>>,
    /// What each served stream's CONNECT said besides its target.
    connect_info: Mutex<Vec<ConnectInfo>>,
}

impl Upstream for Recorder {
    type Guard = ();

    fn begin(&self) {}

    type Watch = Cancel;

    fn authorize(&self, principal: &SpiffeId, _: SocketAddr, _: SocketAddr) -> Result<Self::Watch, String> {
        // The in-process server denies one identity, to exercise the 401 path.
        if principal.service_account == "denied" {
            Err("denied by test policy".into())
        } else {
            Ok(Cancel::default())
        }
    }

    fn cancelled(watch: &Self::Watch) -> &Cancel {
        watch
    }

    async fn connect(&self, target: SocketAddr, _: SocketAddr) -> Result<TcpStream, String> {
        let echo = self.echo.lock().ok_or("no app")?;
        // The target's IP is this listener's (checked by the server); the app is the echo.
        assert_eq!(target.ip(), echo.ip());
        TcpStream::connect(echo).await.map_err(|e| e.to_string())
    }

    type Served = Tally;

    fn served(&self, _: &SpiffeId, _: SocketAddr, _: SocketAddr, info: ConnectInfo) -> Tally {
        self.connect_info.lock().push(info);
        Tally::default()
    }

    fn tally(served: &Tally) -> (&ByteCount, &ByteCount) {
        (&served.sent, &served.received)
    }

    fn ended(&self, tally: Tally, principal: &SpiffeId, _: SocketAddr, _: SocketAddr, error: Option<String>) {
        self.served_bytes.lock().push((tally.sent.get(), tally.received.get()));
        self.records.lock().push((200, error.unwrap_or_default(), Some(principal.to_string())));
    }

    fn log(&self, r: Record<'_>) {
        self.records.lock().push((r.status, r.reason.to_string(), r.principal.map(|p| p.to_string())));
    }
}

struct Fixture {
    /// The root the agent's manager issues from, held by the test too (to sign bad certs).
    ca: BuiltinCa,
    ids: Arc<IdentityManager>,
    server_id: SpiffeId,
    server: SocketAddr,
    echo: SocketAddr,
    up: Arc<Recorder>,
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// The same root loaded twice: once for the agent's manager, once for the test.
pub(super) fn shared_ca() -> (BuiltinCa, BuiltinCa) {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("selvedge-hbone-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    BuiltinCa::init(&dir, TD).unwrap();
    let pair = (BuiltinCa::load(&dir).unwrap(), BuiltinCa::load(&dir).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
    pair
}

async fn fixture(handshake_timeout: Duration) -> Fixture {
    fixture_idle(handshake_timeout, super::SERVER_IDLE).await
}

async fn fixture_idle(handshake_timeout: Duration, idle_timeout: Duration) -> Fixture {
    fixture_with(handshake_timeout, idle_timeout, 1024).await
}

async fn fixture_with(handshake_timeout: Duration, idle_timeout: Duration, handshakes: usize) -> Fixture {
    let (for_agent, for_test) = shared_ca();
    let ids = manager(for_agent);
    let server_id = id("shop", "db");
    ids.acquire(&server_id).await.unwrap();
    ids.acquire(&id("shop", "web")).await.unwrap();
    let up = Arc::new(Recorder::default());
    let echo = echo_server().await;
    *up.echo.lock() = Some(echo);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let opts = ServerOptions {
        tls: TlsAcceptor::from(tls::server_config(&ids, &server_id).unwrap()),
        trust_domain: TD.into(),
        handshake_timeout,
        idle_timeout,
        handshakes: crate::limits::Share::new(handshakes),
        ping_interval: Duration::from_millis(200),
    };
    tokio::spawn(server::serve(listener, opts, up.clone()));
    Fixture { ca: for_test, ids, server_id, server, echo, up }
}

fn key(f: &Fixture, src: SpiffeId, dst: SpiffeId) -> PoolKey {
    PoolKey { src_pod: 1, src, dst, dst_addr: f.server }
}

async fn open(pool: &Pool, k: &PoolKey, target: SocketAddr) -> Result<super::client::Tunnel, TunnelError> {
    let to = k.dst_addr;
    pool.open(k, target, &headers(), &Bytes::new(), || TcpStream::connect(to)).await
}

/// Send `data` through a tunnel, half-close, read everything back.
async fn round_trip(t: super::client::Tunnel, data: &[u8]) -> Vec<u8> {
    let super::client::Tunnel { mut send, mut recv, slot } = t;
    let _slot = slot;
    send.send_data(Bytes::copy_from_slice(data), true).unwrap();
    read_stream(&mut recv).await.unwrap()
}

/// Everything a stream carries until END_STREAM, releasing capacity as it reads (also for
/// the pump's tests).
pub(super) async fn read_stream(recv: &mut h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        got.extend_from_slice(&chunk);
    }
    Ok(got)
}

async fn records_settle(up: &Recorder, n: usize) -> Vec<(u16, String, Option<String>)> {
    for _ in 0..100 {
        if up.records.lock().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    up.records.lock().clone()
}

#[tokio::test]
async fn tunnels_bytes_with_verified_identities_and_pools_connections() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..3 {
        let t = open(&pool, &k, target).await.unwrap();
        assert_eq!(round_trip(t, &payload).await, payload);
    }
    assert_eq!(pool.len(), 1, "three tunnels shared one pooled connection");
    let recs = records_settle(&f.up, 3).await;
    assert!(
        recs.iter().all(|(s, _, p)| *s == 200 && p.as_deref() == Some("spiffe://lab.local/ns/shop/sa/web")),
        "{recs:?}"
    );
    let n = payload.len() as u64;
    assert_eq!(*f.up.served_bytes.lock(), [(n, n); 3], "each stream's bytes, both ways");
}

#[tokio::test]
async fn more_streams_than_one_connection_carries_open_another_connection() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    // Held open at once: one more than a connection's stream limit.
    let n = super::MAX_STREAMS as usize + 1;
    let mut held = Vec::new();
    for i in 0..n {
        let t = tokio::time::timeout(Duration::from_secs(10), open(&pool, &k, target))
            .await
            .unwrap_or_else(|_| panic!("tunnel {i} waited instead of opening"))
            .unwrap();
        held.push(t);
    }
    assert_eq!(pool.len(), 2, "the {n}th stream went on a second connection");
    // Freed slots are reused: closing one and opening another dials nothing new.
    let t = held.pop().unwrap();
    assert_eq!(round_trip(t, b"ping").await, b"ping");
    let again = open(&pool, &k, target).await.unwrap();
    assert_eq!(round_trip(again, b"pong").await, b"pong");
    assert_eq!(pool.len(), 2);
    // Idle connections are closed; busy ones stay.
    assert_eq!(pool.reap(Duration::ZERO), 1, "the connection with no stream left is closed");
    drop(held);
    assert_eq!(pool.reap(Duration::from_secs(3600)), 0, "not idle for long enough");
    assert_eq!(pool.reap(Duration::ZERO), 1);
    assert!(pool.is_empty());
}

/// Streams held open on `pool` until a quarter of a connection's slots is left, then one
/// more: the point where a connection is wanted ahead of need.
async fn hold_until_short(pool: &Pool, k: &PoolKey, target: SocketAddr) -> Vec<Tunnel> {
    let limit = super::MAX_STREAMS as usize;
    let mut held = Vec::new();
    for _ in 0..limit - limit.div_ceil(4) {
        held.push(open(pool, k, target).await.unwrap());
    }
    assert!(!pool.short_of_slots(k), "a quarter of the slots left is enough");
    held.push(open(pool, k, target).await.unwrap());
    assert!(pool.short_of_slots(k), "fewer than a quarter left");
    held
}

#[tokio::test]
async fn a_connection_is_dialled_ahead_before_the_slots_run_out() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    assert!(!pool.short_of_slots(&k), "no connection yet: the first stream dials it");
    let mut held = hold_until_short(&pool, &k, target).await;
    let to = k.dst_addr;
    assert!(pool.prewarm(&k, || TcpStream::connect(to)).await);
    assert_eq!((pool.len(), pool.dialled_ahead()), (2, 1));
    assert!(!pool.short_of_slots(&k), "the new connection's slots are the headroom");
    assert!(!pool.prewarm(&k, || TcpStream::connect(to)).await, "nothing more to dial");
    assert_eq!(pool.reap(Duration::from_secs(3600)), 0, "unused, but not idle for long yet");
    // The streams beyond the first connection's limit go on it, dialling nothing.
    let dials = std::sync::atomic::AtomicUsize::new(0);
    let counted = || {
        dials.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        TcpStream::connect(to)
    };
    while held.len() < super::MAX_STREAMS as usize + 10 {
        held.push(pool.open(&k, target, &headers(), &Bytes::new(), counted).await.unwrap());
    }
    assert_eq!((dials.into_inner(), pool.len()), (0, 2));
    assert_eq!(round_trip(held.pop().unwrap(), b"ahead").await, b"ahead");
    drop(held);
    assert_eq!(pool.reap(Duration::ZERO), 2, "idle, both are closed");
}

#[tokio::test]
async fn streams_that_find_no_slot_wait_for_the_connection_dialled_ahead() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Arc::new(Pool::new(f.ids.clone()));
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let held = hold_until_short(&pool, &k, target).await;
    // A slow dial ahead; meanwhile more streams than the first connection has room for.
    let ahead = {
        let (pool, k) = (pool.clone(), k.clone());
        tokio::spawn(async move {
            let slow = || async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                TcpStream::connect(k.dst_addr).await
            };
            pool.prewarm(&k, slow).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pool.short_of_slots(&k), "a dial is under way");
    let (tunnels, dials) = burst(&pool, &k, target, 40, TcpStream::connect).await;
    assert!(ahead.await.unwrap());
    assert_eq!((dials, pool.len()), (0, 2), "the streams with no slot took the one dialled ahead");
    for t in tunnels {
        assert_eq!(round_trip(t.unwrap(), b"x").await, b"x");
    }
    drop(held);
}

/// `n` streams opened at once on `pool`, each dialling with `dial` when it finds no free
/// slot; returns their results and how many dials were made.
async fn burst<D, F>(
    pool: &Arc<Pool>,
    k: &PoolKey,
    target: SocketAddr,
    n: usize,
    dial: D,
) -> (Vec<Result<Tunnel, TunnelError>>, usize)
where
    D: Fn(SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = std::io::Result<TcpStream>> + Send + 'static,
{
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let opens = (0..n).map(|_| {
        let (pool, k, dials, dial) = (pool.clone(), k.clone(), dials.clone(), dial.clone());
        tokio::spawn(async move {
            let counted = || {
                dials.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                dial(k.dst_addr)
            };
            pool.open(&k, target, &headers(), &Bytes::new(), counted).await
        })
    });
    let results = futures::future::join_all(opens).await.into_iter().map(|r| r.unwrap()).collect();
    (results, dials.load(std::sync::atomic::Ordering::SeqCst))
}

#[tokio::test]
async fn a_burst_of_new_streams_shares_one_dial() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Arc::new(Pool::new(f.ids.clone()));
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    // 20 streams to one destination at once, on an empty pool: they all find no free slot.
    let (tunnels, dials) = burst(&pool, &k, target, 20, TcpStream::connect).await;
    assert_eq!(dials, 1, "one dial served the whole burst");
    assert_eq!(pool.len(), 1);
    for t in tunnels {
        assert_eq!(round_trip(t.unwrap(), b"x").await, b"x");
    }
}

#[tokio::test]
async fn streams_waiting_on_a_failed_dial_fail_with_it() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Arc::new(Pool::new(f.ids.clone()));
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let failing = |_| async {
        // Slow to fail, so the others queue behind it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))
    };
    let (results, dials) = burst(&pool, &k, target, 5, failing).await;
    for r in results {
        let err = r.expect_err("no tunnel through a failed dial").to_string();
        assert!(err.contains("connect timed out"), "{err}");
    }
    assert_eq!(dials, 1, "the waiters did not each dial again");
    assert!(pool.is_empty());
    // A later stream dials afresh (the failure is not cached beyond those that waited).
    let ok = open(&pool, &k, target).await.unwrap();
    assert_eq!(round_trip(ok, b"y").await, b"y");
}

#[tokio::test]
async fn early_bytes_ride_with_the_request_and_come_first() {
    let f = fixture(Duration::from_secs(5)).await;
    f.ids.acquire(&id("shop", "denied")).await.unwrap();
    let pool = Pool::new(f.ids.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let from = &headers();
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let dial = || TcpStream::connect(f.server);
    for _ in 0..2 {
        // Sent before the 200 arrives; the server holds them until the app is connected.
        let t = pool.open(&k, target, from, &Bytes::from_static(b"early "), dial).await.unwrap();
        assert_eq!(round_trip(t, b"and late").await, b"early and late");
    }
    assert_eq!(pool.len(), 1, "the second went on the pooled connection");
    // A refusal is the answer, not a sign of a broken connection: nothing is re-dialled.
    let denied = key(&f, id("shop", "denied"), f.server_id.clone());
    for _ in 0..2 {
        let err = pool.open(&denied, target, from, &Bytes::from_static(b"x"), dial).await.unwrap_err();
        assert!(matches!(err, TunnelError::Denied(_, StatusCode::UNAUTHORIZED)), "{err}");
    }
    assert_eq!(pool.len(), 2, "one connection per key, kept after a 401");
}

#[tokio::test]
async fn reconnections_resume_the_tls_session_and_keep_each_identity() {
    let f = fixture(Duration::from_secs(5)).await;
    f.ids.acquire(&id("shop", "other")).await.unwrap();
    let pool = Pool::new(f.ids.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let web = key(&f, id("shop", "web"), f.server_id.clone());
    let other = key(&f, id("shop", "other"), f.server_id.clone());
    for (k, round) in [(&web, 0), (&web, 1), (&other, 2), (&web, 3)] {
        let t = open(&pool, k, target).await.unwrap();
        assert_eq!(round_trip(t, b"x").await, b"x");
        // Close the pooled connection: the next tunnel needs a new one.
        assert_eq!(pool.reap(Duration::ZERO), 1, "round {round}");
    }
    // web: full, then resumed twice; other: its own full handshake, never web's session.
    assert_eq!(pool.handshakes(), (2, 2));
    let recs = records_settle(&f.up, 4).await;
    let principals: Vec<_> = recs.iter().map(|(_, _, p)| p.clone().unwrap_or_default()).collect();
    let (w, o) = ("spiffe://lab.local/ns/shop/sa/web", "spiffe://lab.local/ns/shop/sa/other");
    assert_eq!(principals, [w, w, o, w], "a resumed session carries the identity that made it");
}

#[tokio::test]
async fn a_denied_principal_gets_401_and_never_reaches_the_app() {
    let f = fixture(Duration::from_secs(5)).await;
    f.ids.acquire(&id("shop", "denied")).await.unwrap();
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "denied"), f.server_id.clone());
    let err = open(&pool, &k, SocketAddr::new(f.server.ip(), f.echo.port())).await.unwrap_err();
    assert!(matches!(err, TunnelError::Denied(_, StatusCode::UNAUTHORIZED)), "{err}");
    let recs = records_settle(&f.up, 1).await;
    assert!(recs.iter().any(|(s, r, _)| *s == 401 && r.contains("denied by test policy")), "{recs:?}");
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), id("shop", "not-db"));
    let err = open(&pool, &k, SocketAddr::new(f.server.ip(), f.echo.port())).await.unwrap_err();
    assert!(matches!(err, TunnelError::Tls(..)), "{err}");
    assert!(err.to_string().contains("not-db"), "names the identity it expected: {err}");
}

#[tokio::test]
async fn targets_other_than_this_workload_are_refused() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    for (target, why) in [
        ("127.0.0.2:8080", "another pod's address (tunnel-target spoofing)"),
        ("127.0.0.1:15001", "the agent's own port"),
    ] {
        let err = open(&pool, &k, target.parse().unwrap()).await.unwrap_err();
        assert!(matches!(err, TunnelError::Status(_, StatusCode::BAD_REQUEST)), "{why}: {err}");
    }
}

/// A raw HTTP/2 client on an mTLS connection, for requests the pool would never send.
async fn raw_h2(f: &Fixture) -> h2::client::SendRequest<Bytes> {
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let tcp = TcpStream::connect(f.server).await.unwrap();
    let tls = TlsConnector::from(cfg).connect(ServerName::IpAddress(f.server.ip().into()), tcp).await.unwrap();
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    sender
}

async fn status_of(sender: &h2::client::SendRequest<Bytes>, req: Request<()>) -> StatusCode {
    let mut s = sender.clone().ready().await.unwrap();
    let (resp, _send) = s.send_request(req, false).unwrap();
    resp.await.unwrap().status()
}

#[tokio::test]
async fn non_connect_and_malformed_targets_get_errors() {
    let f = fixture(Duration::from_secs(5)).await;
    let sender = raw_h2(&f).await;
    let get = Request::builder().method(Method::GET).uri(format!("https://{}/", f.server)).body(()).unwrap();
    assert_eq!(status_of(&sender, get).await, StatusCode::METHOD_NOT_ALLOWED);
    let bad = Request::builder().method(Method::CONNECT).uri("not-an-address:80").body(()).unwrap();
    assert_eq!(status_of(&sender, bad).await, StatusCode::BAD_REQUEST);
    let recs = records_settle(&f.up, 2).await;
    assert!(recs.iter().any(|(s, r, _)| *s == 405 && r.contains("not CONNECT")), "{recs:?}");
    assert!(recs.iter().any(|(s, r, _)| *s == 400 && r.contains("not an IP:port")), "{recs:?}");
}

#[tokio::test]
async fn a_flood_of_streams_is_bounded() {
    let f = fixture(Duration::from_secs(5)).await;
    let sender = raw_h2(&f).await;
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let connect = || Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).unwrap();
    // Hold the maximum number of open streams.
    let mut open = Vec::new();
    for _ in 0..super::MAX_STREAMS {
        let mut s = sender.clone().ready().await.unwrap();
        let (resp, send) = s.send_request(connect(), false).unwrap();
        open.push((resp.await.unwrap(), send));
    }
    // One more must wait: the server advertised the limit and holds it.
    let waiting = tokio::time::timeout(Duration::from_millis(300), async {
        let mut s = sender.clone().ready().await.unwrap();
        let (resp, _send) = s.send_request(connect(), false).unwrap();
        resp.await
    })
    .await;
    assert!(waiting.is_err(), "stream 101 was served while 100 were open");
    // Finishing one frees a slot.
    let (_, mut send) = open.pop().unwrap();
    send.send_reset(h2::Reason::CANCEL);
    let mut s = tokio::time::timeout(Duration::from_secs(5), sender.clone().ready()).await.unwrap().unwrap();
    let (resp, _send) = s.send_request(connect(), false).unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), resp).await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_once_idle_and_one_with_a_stream_is_not() {
    let f = fixture_idle(Duration::from_secs(5), Duration::from_millis(300)).await;
    // One connection holds a stream open past the idle time; it keeps working.
    let busy = raw_h2(&f).await;
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let connect = || Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).unwrap();
    let (resp, mut send) = busy.clone().ready().await.unwrap().send_request(connect(), false).unwrap();
    let mut recv = resp.await.unwrap().into_body();
    // Another has no stream at all: closed (GOAWAY, then the connection ends).
    let idle = raw_h2(&f).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = tokio::time::timeout(Duration::from_secs(5), async {
        let (resp, _send) = idle.ready().await?.send_request(connect(), false)?;
        resp.await
    })
    .await;
    assert!(matches!(late, Ok(Err(_))), "the idle connection was closed: {late:?}");
    send.send_data(Bytes::from_static(b"still here"), false).unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), recv.data()).await.unwrap().unwrap().unwrap();
    assert_eq!(&echoed[..], b"still here", "the connection with an open stream stays");
}

#[tokio::test]
async fn handshakes_in_progress_are_bounded_and_the_excess_is_refused_at_once() {
    let f = fixture_with(Duration::from_secs(5), super::SERVER_IDLE, 1).await;
    // A client that never speaks holds the one handshake place.
    let silent = TcpStream::connect(f.server).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let name = ServerName::IpAddress(f.server.ip().into());
    let tcp = TcpStream::connect(f.server).await.unwrap();
    let refused =
        tokio::time::timeout(Duration::from_secs(3), TlsConnector::from(cfg.clone()).connect(name.clone(), tcp)).await;
    assert!(matches!(refused, Ok(Err(_))), "over the limit: refused at once, not queued: {refused:?}");
    let recs = records_settle(&f.up, 1).await;
    assert!(recs.iter().any(|(_, r, _)| r.contains("TLS handshakes in progress")), "{recs:?}");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tcp = TcpStream::connect(f.server).await.unwrap();
    TlsConnector::from(cfg).connect(name, tcp).await.expect("the freed place serves the next handshake");
}

#[tokio::test]
async fn a_ping_flood_closes_the_connection_and_ordinary_pings_do_not() {
    let f = fixture(Duration::from_secs(5)).await;
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let connect = || async {
        let tcp = TcpStream::connect(f.server).await.unwrap();
        let tls =
            TlsConnector::from(cfg.clone()).connect(ServerName::IpAddress(f.server.ip().into()), tcp).await.unwrap();
        let (sender, mut conn) = h2::client::handshake(tls).await.unwrap();
        let pings = conn.ping_pong().unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, pings)
    };
    // A keepalive's worth: answered.
    let (_keep, mut pings) = connect().await;
    for _ in 0..50 {
        pings.ping(h2::Ping::opaque()).await.expect("ordinary pings are answered");
    }
    // Thousands, back to back: the server closes the connection and says why.
    let (_flood, mut pings) = connect().await;
    let mut answered = 0u32;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                break;
            }
            answered += 1;
        }
    })
    .await;
    assert!(ended.is_ok(), "the flood was never cut off ({answered} pings answered)");
    assert!(answered <= super::flood::MAX_CONTROL_FRAMES + 1, "{answered} answered before it was closed");
    let recs = records_settle(&f.up, 1).await;
    assert!(recs.iter().any(|(_, r, _)| r.contains("control-frame flood")), "{recs:?}");
}

#[tokio::test]
async fn a_client_silent_after_tls_is_dropped_and_frees_its_handshake_place() {
    let f = fixture_with(Duration::from_millis(300), super::SERVER_IDLE, 1).await;
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let name = ServerName::IpAddress(f.server.ip().into());
    let tcp = TcpStream::connect(f.server).await.unwrap();
    let mut silent = TlsConnector::from(cfg.clone()).connect(name.clone(), tcp).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the server's SETTINGS
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed a connection that never sent the HTTP/2 preface");
    let recs = records_settle(&f.up, 1).await;
    assert!(recs.iter().any(|(_, r, _)| r.contains("HTTP/2 handshake timed out")), "{recs:?}");
    let tcp = TcpStream::connect(f.server).await.unwrap();
    TlsConnector::from(cfg).connect(name, tcp).await.expect("its handshake place was freed");
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_dropped() {
    let f = fixture(Duration::from_millis(300)).await;
    let mut idle = TcpStream::connect(f.server).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the server closed the silent connection: {closed:?}");
    let recs = records_settle(&f.up, 1).await;
    assert!(recs.iter().any(|(_, r, _)| r.contains("timed out")), "{recs:?}");
}

#[tokio::test]
async fn close_notify_right_after_client_hello_is_handled() {
    let f = fixture(Duration::from_secs(5)).await;
    // A rustls client that sends its ClientHello and then a close_notify alert.
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, ServerName::IpAddress(f.server.ip().into())).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    conn.send_close_notify();
    conn.write_tls(&mut hello).unwrap();
    let mut tcp = TcpStream::connect(f.server).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut rest)).await.expect("server closes");
    // The server is unharmed: a real tunnel still works.
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let t = open(&pool, &k, SocketAddr::new(f.server.ip(), f.echo.port())).await.unwrap();
    assert_eq!(round_trip(t, b"still here").await, b"still here");
}

/// Connect with a hand-made client certificate and report what the server logged.
async fn with_client_cert(f: &Fixture, chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> String {
    let verifier = tls::SpiffeServerVerifier::new(&f.ids, f.server_id.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(f.ids.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    cfg.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    let before = f.up.records.lock().len();
    let tcp = TcpStream::connect(f.server).await.unwrap();
    if let Ok(mut s) = TlsConnector::from(Arc::new(cfg)).connect(ServerName::IpAddress(f.server.ip().into()), tcp).await
    {
        // TLS 1.3: a rejected client certificate surfaces on the first read.
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut [0u8; 64])).await;
    }
    let recs = records_settle(&f.up, before + 1).await;
    recs.get(before).map(|r| r.1.clone()).unwrap_or_default()
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let f = fixture(Duration::from_secs(5)).await;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let web = id("shop", "web");
    let sign = |p: rcgen::CertificateParams| vec![f.ca.sign(&p, &key).unwrap()];

    // Signed by a root the server does not trust (even with the same trust-domain name).
    let stranger = ca("stranger").issue(&web, &key, Duration::from_secs(600)).unwrap();
    let r = with_client_cert(&f, stranger, &key).await;
    assert!(r.contains("TLS handshake failed"), "unknown root: {r}");

    let mut expired = svid_params(&web).unwrap();
    expired.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(7200);
    expired.not_after = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let r = with_client_cert(&f, sign(expired), &key).await;
    assert!(r.contains("TLS handshake failed"), "expired: {r}");

    let mut two = svid_params(&web).unwrap();
    two.subject_alt_names.push(rcgen::SanType::URI("spiffe://lab.local/ns/shop/sa/admin".try_into().unwrap()));
    let r = with_client_cert(&f, sign(two), &key).await;
    assert!(r.contains("2 URI SANs"), "two URI SANs: {r}");

    let mut none = svid_params(&web).unwrap();
    none.subject_alt_names.clear();
    let r = with_client_cert(&f, sign(none), &key).await;
    assert!(r.contains("0 URI SANs"), "no URI SAN: {r}");

    let other_td = svid_params(&SpiffeId::new("elsewhere.local", "shop", "web").unwrap()).unwrap();
    let r = with_client_cert(&f, sign(other_td), &key).await;
    assert!(r.contains("not in trust domain"), "another trust domain: {r}");

    // The same path with a good certificate gets through the handshake (its CONNECT-less
    // connection then ends with the HTTP/2 preface only, logged as such or not at all).
    let good = with_client_cert(&f, sign(svid_params(&web).unwrap()), &key).await;
    assert!(!good.contains("rejected") && !good.contains("TLS handshake failed"), "good certificate: {good}");
}

#[tokio::test]
async fn a_connect_says_where_from_which_service_and_who_as_ztunnel_does() {
    let f = fixture(Duration::from_secs(5)).await;
    let pool = Pool::new(f.ids.clone());
    let k = key(&f, id("shop", "web"), f.server_id.clone());
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    for _ in 0..2 {
        let t = open(&pool, &k, target).await.unwrap();
        assert_eq!(round_trip(t, b"hi").await, b"hi");
    }
    records_settle(&f.up, 2).await;
    let infos = f.up.connect_info.lock().clone();
    assert_eq!(infos.len(), 2);
    for info in &infos {
        assert_eq!(info.host.as_deref(), Some("db.shop.svc.cluster.local"), "forwarded's host");
        let source = info.source.as_ref().expect("baggage names the source workload");
        assert_eq!((source.workload.as_str(), source.namespace.as_str()), ("web", "shop"));
        assert_eq!(source.cluster.as_deref(), Some("c1"));
        assert!(info.traceparent.is_some(), "a traceparent");
    }
    assert_ne!(infos[0].traceparent, infos[1].traceparent, "a new trace context per stream");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_and_its_streams_reset() {
    // The fixture's server pings every 200 ms and gives up after 400 ms without an answer.
    let f = fixture(Duration::from_secs(5)).await;
    let cfg = tls::client_config(&f.ids, &id("shop", "web"), &f.server_id, 0).unwrap();
    let tcp = TcpStream::connect(f.server).await.unwrap();
    let tls = TlsConnector::from(cfg).connect(ServerName::IpAddress(f.server.ip().into()), tcp).await.unwrap();
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    let (freeze, frozen) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = &mut conn => {}
            // Frozen: the connection (and its socket) stays open, but nothing reads it or
            // answers the server's PINGs — a peer whose node went away.
            _ = frozen => std::future::pending::<()>().await,
        }
    });
    let target = SocketAddr::new(f.server.ip(), f.echo.port());
    let req = Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).unwrap();
    let mut ready = sender.ready().await.unwrap();
    let (resp, _send) = ready.send_request(req, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK, "the stream is open");
    freeze.send(()).unwrap();
    let recs = records_settle(&f.up, 1).await;
    let (status, error, _) = &recs[0];
    assert_eq!(*status, 200);
    assert!(!error.is_empty(), "the open stream ended with an error, not a clean end: {recs:?}");
}
