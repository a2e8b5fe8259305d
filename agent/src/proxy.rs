//! Proxying captured connections.
//!
//! * `outbound`: the app's connect was redirected to 15001 in its own netns; the agent looks
//!   up where it was going and connects there from inside the same netns.
//! * `inbound`: a SYN from outside the pod was steered to 15006; the accepted socket's local
//!   address is the original destination, and the agent connects to the app over `lo`.
//!
//! Outbound to a meshed destination goes through an HBONE tunnel (`crate::hbone`); to
//! anything else, plain TCP. Plaintext copies end in [`relay`]: bytes both ways with
//! half-close carried across. Every connection produces one access-log event.

pub mod inbound;
pub mod outbound;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::{
    hbone::client::Pool,
    identity::{IdentityManager, SpiffeId},
    inpod::PodNetns,
    metrics::{ConnMetrics, LiveConnection, Metrics, TcpLabels, UNKNOWN},
    policy::{authorize, Action, CompiledPolicy, ConnFacts, Decision, WorkloadMtls},
    state::Directory,
};

/// Why a connection that was allowed got closed.
pub const DENIED_LATER: &str = "closed: denied after a policy change";

/// Per-direction copy buffer: large enough for bulk transfers, small enough idle.
const COPY_BUF: usize = 64 * 1024;

/// What the proxy knows about the pod a listener serves.
#[derive(Debug)]
pub struct PodContext {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub ips: Vec<std::net::IpAddr>,
    pub netns: PodNetns,
    /// Which inbound ports refuse plaintext; changes live with PeerAuthentication.
    pub mtls: parking_lot::RwLock<WorkloadMtls>,
    /// Its labels (AuthorizationPolicy selectors).
    pub labels: std::collections::BTreeMap<String, String>,
}

impl PodContext {
    /// The authorization decision for a connection to this pod (logged when reported by
    /// dry-run or AUDIT policies).
    pub fn authorize(&self, mesh: &Mesh, facts: &ConnFacts) -> Decision {
        let policies = mesh.policies.read().clone();
        let v = authorize(&policies, &self.namespace, &self.labels, facts);
        for (policy, action) in &v.dry_run {
            mesh.metrics.dry_run(policy, action_str(*action));
            tracing::info!(pod = %self.name, policy = %policy, action = action_str(*action), src = %facts.src_ip, "dry-run policy matched (not enforced)");
        }
        for policy in &v.audit {
            tracing::info!(pod = %self.name, policy = %policy, src = %facts.src_ip, "AUDIT policy matched");
        }
        v.decision
    }
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
        Action::Custom => "CUSTOM",
    }
}

/// Node-wide state the outbound path consults per connection.
#[derive(Debug)]
pub struct Mesh {
    /// Meshed workloads by IP (replaced whole on each config change).
    pub directory: parking_lot::RwLock<Arc<Directory>>,
    pub pool: Pool,
    pub ids: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    /// AuthorizationPolicies, compiled (replaced whole on each config change).
    pub policies: parking_lot::RwLock<Arc<Vec<CompiledPolicy>>>,
    /// Open inbound connections, re-checked when policies change.
    pub watchers: Arc<Watchers>,
}

/// One open inbound connection as authorization saw it.
#[derive(Debug)]
struct Watched {
    pod: Arc<PodContext>,
    facts: ConnFacts,
    cancel: Arc<Notify>,
}

/// Open inbound connections, so a policy change can close those it now denies.
#[derive(Debug, Default)]
pub struct Watchers {
    open: parking_lot::Mutex<std::collections::BTreeMap<u64, Watched>>,
    next: AtomicUsize,
}

/// Registration of one connection; dropping it unregisters.
#[derive(Debug)]
pub struct WatchGuard {
    watchers: Arc<Watchers>,
    id: u64,
    /// Notified when a policy change denies this connection.
    pub cancel: Arc<Notify>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.watchers.open.lock().remove(&self.id);
    }
}

impl Watchers {
    pub fn add(self: &Arc<Self>, pod: Arc<PodContext>, facts: ConnFacts) -> WatchGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let cancel = Arc::new(Notify::new());
        self.open.lock().insert(id, Watched { pod, facts, cancel: cancel.clone() });
        WatchGuard { watchers: self.clone(), id, cancel }
    }

    /// Authorize every open connection again; close those now denied. Returns how many.
    pub fn recheck(&self, mesh: &Mesh) -> usize {
        let policies = mesh.policies.read().clone();
        let open = self.open.lock();
        let mut closed = 0;
        for w in open.values() {
            let v = authorize(&policies, &w.pod.namespace, &w.pod.labels, &w.facts);
            if let Decision::Deny { .. } = v.decision {
                tracing::info!(pod = %w.pod.name, src = %w.facts.src_ip, port = w.facts.dst_port, "{}: closing an open connection", v.decision.reason());
                // notify_one keeps a permit if the connection is not waiting yet.
                w.cancel.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

impl Mesh {
    /// The workload behind an address, by the directory.
    pub fn workload_at(&self, ip: std::net::IpAddr) -> Option<WorkloadName> {
        self.directory
            .read()
            .workloads
            .get(&ip.to_canonical())
            .map(|p| WorkloadName { name: p.name.clone(), namespace: p.namespace.clone() })
    }
}

/// Counts open connections so shutdown can drain them.
#[derive(Debug, Default)]
pub struct ConnTracker {
    active: AtomicUsize,
    idle: Notify,
}

/// Held by each open connection; dropping it may wake a drain.
#[derive(Debug)]
pub struct ConnGuard(Arc<ConnTracker>);

impl ConnTracker {
    pub fn open(self: &Arc<Self>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Wait until no connection is open, or `limit` passes; returns how many remain.
    pub async fn drain(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Why a connection was refused: a stable code for metrics and logs (append-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoOriginalDestination,
    NoEndpoints,
    UpstreamUnreachable,
    TunnelFailed,
    PlaintextStrict,
    ReservedPort,
    TlsHandshake,
    BadClientCertificate,
    BadTarget,
    MethodNotAllowed,
    /// An AuthorizationPolicy denied it.
    Policy,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::TunnelFailed => "tunnel_failed",
            Refusal::PlaintextStrict => "plaintext_strict",
            Refusal::ReservedPort => "reserved_port",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::BadClientCertificate => "bad_client_certificate",
            Refusal::BadTarget => "bad_target",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::Policy => "policy",
        }
    }

    /// Envoy-style response flags, as Istio dashboards expect them.
    fn response_flags(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination | Refusal::NoEndpoints => "NR",
            Refusal::UpstreamUnreachable | Refusal::TunnelFailed => "UF",
            _ => "DENY",
        }
    }
}

/// A workload's name and namespace, for labels.
#[derive(Debug, Clone, Default)]
pub struct WorkloadName {
    pub name: String,
    pub namespace: String,
}

/// One proxied connection: what the access log and the metrics say about it.
#[derive(Debug)]
pub struct Flow<'a> {
    pub direction: Direction,
    /// The pod whose listener accepted the connection.
    pub pod: &'a str,
    pub namespace: &'a str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub started: Instant,
    /// `mutual_tls` for HBONE, `none` for plaintext.
    pub security: &'static str,
    /// Verified identities (never taken from anything but a certificate).
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_identity: Option<&'a SpiffeId>,
    /// The workloads at either end, where known.
    pub src_workload: Option<WorkloadName>,
    pub dst_workload: Option<WorkloadName>,
    /// The service dialled, when the destination was a service VIP.
    pub service: Option<String>,
    metrics: Option<&'a Metrics>,
    /// Counter handles and the `/connections` entry, once opened.
    conn: Option<(ConnMetrics, u64)>,
}

fn id_str(id: Option<&SpiffeId>) -> String {
    id.map(ToString::to_string).unwrap_or_else(|| UNKNOWN.into())
}

impl<'a> Flow<'a> {
    pub fn new(direction: Direction, pod: &'a PodContext, src: SocketAddr, dst: SocketAddr) -> Self {
        let me = WorkloadName { name: pod.name.clone(), namespace: pod.namespace.clone() };
        let (src_workload, dst_workload) = match direction {
            Direction::Outbound => (Some(me), None),
            Direction::Inbound => (None, Some(me)),
        };
        Flow {
            direction,
            pod: &pod.name,
            namespace: &pod.namespace,
            src,
            dst,
            started: Instant::now(),
            security: "none",
            src_identity: None,
            dst_identity: None,
            src_workload,
            dst_workload,
            service: None,
            metrics: None,
            conn: None,
        }
    }

    /// Report to `metrics` (flows without it only log: in-process tests).
    pub fn with_metrics(mut self, metrics: &'a Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn labels(&self, response_flags: &'static str) -> TcpLabels {
        let name = |w: &Option<WorkloadName>| w.as_ref().map(|w| w.name.clone()).unwrap_or_else(|| UNKNOWN.into());
        let ns = |w: &Option<WorkloadName>| w.as_ref().map(|w| w.namespace.clone()).unwrap_or_else(|| UNKNOWN.into());
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
            source_workload: name(&self.src_workload),
            source_workload_namespace: ns(&self.src_workload),
            source_principal: id_str(self.src_identity),
            destination_workload: name(&self.dst_workload),
            destination_workload_namespace: ns(&self.dst_workload),
            destination_principal: id_str(self.dst_identity),
            destination_service: self.service.clone().unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: self.security,
        }
    }

    /// The connection is through: count it as opened (its labels are final now).
    pub fn opened(&mut self) {
        if let Some(m) = self.metrics {
            let counters = m.open(&self.labels("-"));
            let id = m.track(LiveConnection {
                id: 0,
                direction: self.direction.as_str(),
                pod: self.pod.to_string(),
                namespace: self.namespace.to_string(),
                src: self.src.to_string(),
                dst: self.dst.to_string(),
                security: self.security,
                src_identity: id_str(self.src_identity),
                dst_identity: id_str(self.dst_identity),
                opened_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or_default(),
            });
            self.conn = Some((counters, id));
        }
    }

    /// Log (and count) a connection refused before any byte moved.
    pub fn refused(&self, why: Refusal, detail: &str) {
        if let Some(m) = self.metrics {
            m.denied(why.code());
            m.open(&self.labels(why.response_flags())).close(0, 0);
        }
        tracing::warn!(
            target: "selvedge::access",
            direction = self.direction.as_str(),
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src, dst = %self.dst,
            security = self.security,
            src_identity = %id_str(self.src_identity), dst_identity = %id_str(self.dst_identity),
            service = %self.service.as_deref().unwrap_or(UNKNOWN),
            result = "refused", reason_code = why.code(), reason = detail,
            "connection refused"
        );
    }

    /// Log (and count) a finished connection.
    pub fn closed(&self, sent: u64, received: u64, error: Option<String>) {
        if let (Some((c, id)), Some(m)) = (&self.conn, self.metrics) {
            c.close(sent, received);
            m.untrack(*id);
        }
        tracing::info!(
            target: "selvedge::access",
            direction = self.direction.as_str(),
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src, dst = %self.dst,
            security = self.security,
            src_identity = %id_str(self.src_identity), dst_identity = %id_str(self.dst_identity),
            service = %self.service.as_deref().unwrap_or(UNKNOWN),
            bytes_sent = sent, bytes_received = received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            result = if error.is_some() { "error" } else { "ok" },
            reason = %error.unwrap_or_default(),
            "connection closed"
        );
    }
}

/// Accept forever (until the task is aborted), each connection in its own task counted
/// by `conns`. Accept errors (e.g. out of file descriptors) are logged and retried after a
/// short pause instead of spinning.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: &str,
    direction: Direction,
    conns: Arc<ConnTracker>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(pod, direction = direction.as_str(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = conns.open();
        let conn = handle(stream, peer);
        tokio::spawn(async move {
            let _guard = guard;
            conn.await;
        });
    }
}

/// Copy both ways until both sides are done, then log the connection.
pub async fn relay(mut flow: Flow<'_>, mut downstream: TcpStream, mut upstream: TcpStream, cancel: Option<&Notify>) {
    flow.opened();
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, COPY_BUF, COPY_BUF);
    let outcome = match cancel {
        Some(c) => tokio::select! {
            r = copy => Some(r),
            () = c.notified() => None,
        },
        None => Some(copy.await),
    };
    match outcome {
        Some(Ok((to_up, to_down))) => flow.closed(to_up, to_down, None),
        Some(Err(e)) => flow.closed(0, 0, Some(e.to_string())),
        None => {
            flow.closed(0, 0, Some(DENIED_LATER.into()));
            reset(downstream);
            reset(upstream);
        }
    }
}

/// Connect from inside the pod's netns to `dst`, optionally from `source`.
pub async fn connect_in_pod(
    pod: &PodContext,
    source: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let sock = pod.netns.stream_socket(dst.is_ipv6()).await.map_err(|e| e.to_string())?;
    if let Some(src) = source {
        sock.bind(src).map_err(|e| format!("bind {src}: {e}"))?;
    }
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect {dst}: {e}")),
        Err(_) => Err(format!("connect {dst}: timed out after {}s", timeout.as_secs())),
    }
}

/// Close with RST so the app sees a reset rather than a clean end of stream.
pub fn reset(stream: TcpStream) {
    // A zero linger makes close() send RST at once; it never blocks.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relay_copies_both_ways_and_carries_half_close() {
        let (mut app, downstream) = pair().await;
        let (upstream, mut server) = pair().await;
        let flow = Flow {
            direction: Direction::Outbound,
            pod: "a",
            namespace: "ns",
            src: app.local_addr().unwrap(),
            dst: server.local_addr().unwrap(),
            started: Instant::now(),
            security: "none",
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            service: None,
            metrics: None,
            conn: None,
        };
        let relayed = tokio::spawn(async move { relay(flow, downstream, upstream, None).await });

        app.write_all(b"hello").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "the app's half-close reached the server after its bytes");

        // The other direction still flows after the first one closed.
        server.write_all(b"world").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world");
        relayed.await.unwrap();
    }

    #[tokio::test]
    async fn drain_waits_for_open_connections() {
        let conns = Arc::new(ConnTracker::default());
        let guard = conns.open();
        assert_eq!(conns.drain(Duration::from_millis(50)).await, 1, "times out with one open");
        let waiter = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.drain(Duration::from_secs(5)).await })
        };
        drop(guard);
        assert_eq!(waiter.await.unwrap(), 0, "returns once the last one closes");
    }
}
