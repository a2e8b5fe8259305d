//! Proxying captured connections.
//!
//! * `outbound`: the app's connect was redirected to 15001 in its own netns; the agent looks
//!   up where it was going and connects there from inside the same netns.
//! * `inbound`: a SYN from outside the pod was steered to 15006; the accepted socket's local
//!   address is the original destination, and the agent connects to the app over `lo`.
//!
//! Outbound to a meshed destination goes through an HBONE tunnel (`crate::hbone`), or, when
//! this agent serves the destination too, is handed to it directly (`same_node`); to
//! anything else, plain TCP. Plaintext copies end in [`relay`]: bytes both ways with
//! half-close carried across, moved by `splice(2)` (`zerocopy`). Every connection
//! produces one access-log event per leg (`accesslog`: closed connections' lines are
//! logged off the data path's thread).

pub mod accesslog;
mod flow;
pub mod inbound;
pub mod outbound;
mod same_node;
mod watch;
mod zerocopy;

pub use flow::{Flow, Refusal, Security, WorkloadName};
pub use watch::{WatchGuard, Watchers};
pub use zerocopy::Mover;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::FutureExt;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::{
    addr,
    cancel::Cancel,
    datapath::FlowMaps,
    hbone::client::Pool,
    identity::{IdentityManager, SpiffeId},
    inpod::{PodNetns, Use},
    policy::{Action, ConnFacts, Decision, PolicySet, Verdict, WorkloadMtls},
    publish::metrics::{Count, Metrics},
    state::Directory,
    sys::{arm_reset, disarm_reset, reset},
};

pub use crate::hbone::server::DENIED_LATER;

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
    /// What its metrics say of it (owning workload, canonical service and revision).
    pub meta: Arc<crate::state::WorkloadMeta>,
    /// Its slot in the kernel's per-pod maps.
    pub slot: u32,
    /// The `baggage` its HBONE CONNECTs carry (made once: it names the pod's workload).
    pub baggage: http::HeaderValue,
    /// The kernel maps connections use (deliveries from a client's address register there).
    pub flows: Arc<FlowMaps>,
    /// Its connections in flight, both directions (`--max-conns-per-pod`).
    pub conns: Arc<crate::limits::Share>,
}

impl PodContext {
    /// The authorization decision for a connection to this pod (logged when reported by
    /// dry-run or AUDIT policies).
    pub fn authorize(&self, mesh: &Mesh, facts: &ConnFacts) -> Decision {
        let policies = mesh.policies.read().clone();
        let Verdict { decision, dry_run, audit } = policies.decide(&self.namespace, &self.labels, facts);
        for (policy, action) in &dry_run {
            mesh.metrics.dry_run(policy, action_str(*action));
        }
        // Their lines are logged by the access-log thread, not formatted here.
        if (!dry_run.is_empty() || !audit.is_empty()) && accesslog::PolicyMatch::enabled() {
            let dry_run = dry_run.into_iter().map(|(policy, a)| (policy, Some(action_str(a))));
            for (policy, dry_run) in dry_run.chain(audit.into_iter().map(|policy| (policy, None))) {
                let pod = self.name.clone();
                accesslog::log(accesslog::PolicyMatch { pod, policy, src: facts.src_ip, dry_run });
            }
        }
        decision
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
    pub policies: parking_lot::RwLock<Arc<PolicySet>>,
    /// Open inbound connections, re-checked when policies change.
    pub watchers: Arc<Watchers>,
    /// Pods this agent serves, by IP (canonical): destinations of same-node handoffs.
    pub local: parking_lot::RwLock<std::collections::HashMap<std::net::IpAddr, Arc<PodContext>>>,
    /// Connections in flight on the node (`--max-conns`).
    pub node_conns: Arc<crate::limits::Share>,
}

/// What [`Mesh::install`] replaced, to be freed off the runtime's thread.
pub type Replaced = (Arc<Directory>, Arc<PolicySet>);

impl Mesh {
    /// An empty mesh (no peers, no policies) over `ids`, with the HBONE client's pool, a
    /// node share of `conns_total` connections in flight, and metrics naming `cluster`.
    pub fn new(ids: Arc<IdentityManager>, conns_total: usize, cluster: &str) -> Self {
        Mesh {
            directory: parking_lot::RwLock::new(Arc::new(Directory::default())),
            pool: Pool::new(ids.clone()),
            ids,
            metrics: Arc::new(Metrics::new(cluster)),
            policies: parking_lot::RwLock::new(Arc::default()),
            watchers: Arc::new(Watchers::default()),
            local: parking_lot::RwLock::new(std::collections::HashMap::new()),
            node_conns: crate::limits::Share::new(conns_total),
        }
    }

    /// Close pooled HBONE connections idle for [`POOL_IDLE`](crate::hbone::POOL_IDLE),
    /// checking twice per that period; runs for the agent's life.
    pub async fn reap_idle_tunnels(self: Arc<Self>) {
        let idle = crate::hbone::POOL_IDLE;
        let mut every = tokio::time::interval(idle / 2);
        loop {
            every.tick().await;
            let closed = self.pool.reap(idle);
            if closed > 0 {
                tracing::debug!(closed, "idle HBONE connections closed");
            }
        }
    }

    /// Put a new directory and policy set in force: cached connect verdicts are forgotten
    /// (an IP may now be someone else's, a verdict may have changed), and open inbound
    /// connections the new policies deny are closed now, not at their next connect — on a
    /// blocking thread (thousands of connections take milliseconds); if that fails, every
    /// open inbound connection is closed (fail closed). Returns what was replaced.
    pub async fn install(&self, directory: Directory, policies: PolicySet, flows: &FlowMaps) -> Replaced {
        let old_directory = std::mem::replace(&mut *self.directory.write(), Arc::new(directory));
        let old_policies = std::mem::replace(&mut *self.policies.write(), Arc::new(policies));
        let forgot = flows.clear_verdicts();
        if forgot > 0 {
            tracing::debug!(forgot, "cached connect verdicts cleared");
        }
        let (watchers, policies) = (self.watchers.clone(), self.policies.read().clone());
        let closed = match tokio::task::spawn_blocking(move || watchers.recheck(&policies)).await {
            Ok(closed) => closed,
            Err(e) => {
                let closed = self.watchers.close_all();
                tracing::error!(closed, "policy recheck failed ({e}); closed every open inbound connection");
                closed
            }
        };
        if closed > 0 {
            tracing::info!(closed, "open connections closed after a policy change");
        }
        (old_directory, old_policies)
    }

    /// The workload behind an address, by the directory.
    pub fn workload_at(&self, ip: std::net::IpAddr) -> Option<WorkloadName<'static>> {
        self.directory.read().workloads.get(&ip.to_canonical()).map(|p| WorkloadName::from(p).owned())
    }

    /// The service an endpoint serves, as the destination reports it: the one the client
    /// named (`host`) when the endpoint serves it (a claim checked against what this agent
    /// knows, never taken as is), else the first in config order (ztunnel's guess).
    pub fn service_of(&self, endpoint: SocketAddr, host: Option<&str>) -> Option<Arc<crate::state::ServiceName>> {
        let directory = self.directory.read();
        let served = directory.by_endpoint.get(&addr::canonical(endpoint))?;
        served.iter().find(|s| Some(s.fqdn.as_str()) == host).or(served.first()).cloned()
    }

    /// The pod behind an address when this agent serves it.
    pub fn local_pod(&self, ip: std::net::IpAddr) -> Option<Arc<PodContext>> {
        self.local.read().get(&ip.to_canonical()).cloned()
    }

    /// Serve same-node handoffs to `pod` (replacing any pod that had its IPs).
    pub fn add_local(&self, pod: &Arc<PodContext>) {
        let mut local = self.local.write();
        local.retain(|_, p| p.uid != pod.uid);
        for ip in &pod.ips {
            local.insert(ip.to_canonical(), pod.clone());
        }
    }

    /// Stop serving same-node handoffs to the pod with this uid.
    pub fn remove_local(&self, uid: &str) {
        self.local.write().retain(|_, p| p.uid != uid);
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

/// Accept forever (until the task is aborted), each connection in its own task counted
/// by `conns` (failed accepts: see `accept::next`).
///
/// Each connection takes a place in its pod's share and the node's (`limits`); one over
/// either is refused at once (logged, counted, reset), so a pod that opens connections
/// without end runs into its own limit, not the node's descriptors.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: &PodContext,
    mesh: &Mesh,
    direction: Direction,
    conns: Arc<ConnTracker>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let shares = crate::limits::ConnShares { pod: pod.conns.clone(), node: mesh.node_conns.clone() };
    let what = format!("pod {} {}", pod.name, direction.as_str());
    loop {
        let (stream, peer) = crate::accept::next(&what, || listener.accept()).await;
        let held = match shares.take() {
            Ok(held) => held,
            Err(why) => {
                refuse_over_limit(pod, mesh, direction, stream, peer, &why);
                continue;
            }
        };
        let guard = conns.open();
        // The guards ride on a combinator, not in an `async` block around the connection:
        // a block would hold the connection's future twice (as captured, and as awaited),
        // doubling what every open connection costs.
        tokio::spawn(handle(stream, peer).map(move |()| drop((guard, held))));
    }
}

/// Refuse a connection over a limit: logged with `why`, counted, reset.
fn refuse_over_limit(
    pod: &PodContext,
    mesh: &Mesh,
    direction: Direction,
    stream: TcpStream,
    peer: SocketAddr,
    why: &str,
) {
    let local = stream.local_addr().unwrap_or(peer);
    Flow::new(direction, pod, addr::canonical(peer), addr::canonical(local))
        .with_metrics(&mesh.metrics)
        .refused(Refusal::OverLimit, why);
    reset(stream);
}

/// Copy both ways until both sides are done, then log the connection. (The flow is
/// borrowed, never moved into the future: an `async fn` keeps its arguments for its
/// whole life, so a moved one would be held twice by every open connection.)
pub async fn relay(
    flow: &mut Flow<'_>,
    downstream: TcpStream,
    upstream: TcpStream,
    mover: Mover,
    cancel: Option<&Cancel>,
) {
    flow.opened();
    let t = &flow.state.tally;
    let error = carry(downstream, upstream, mover, cancel, &t.sent, &t.received).await;
    flow.closed(error);
}

/// Move bytes both ways until both sides are done, or until `cancel` fires (a policy
/// change now denies the connection: both sides are reset). Counts downstream → upstream
/// (source → destination) into `sent` and the other way into `received` as they move;
/// returns why it ended abnormally.
async fn carry(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    mover: Mover,
    cancel: Option<&Cancel>,
    sent: &impl Count,
    received: &impl Count,
) -> Option<String> {
    let copy = zerocopy::relay(&mut downstream, &mut upstream, mover, sent, received);
    let outcome = match cancel {
        Some(c) => tokio::select! {
            r = copy => Some(r),
            () = c.cancelled() => None,
        },
        None => Some(copy.await),
    };
    match outcome {
        Some(Ok(())) => {
            // Both directions ended cleanly: close with FIN, after what is still queued.
            disarm_reset(&downstream);
            disarm_reset(&upstream);
            None
        }
        Some(Err(e)) => {
            // An end by error must not look like a complete stream to either app.
            reset(downstream);
            reset(upstream);
            Some(e.to_string())
        }
        None => {
            reset(downstream);
            reset(upstream);
            Some(DENIED_LATER.into())
        }
    }
}

/// Connect from inside the pod's netns to `dst`, with a socket made ready for `use_`
/// (`TCP_NODELAY`; a delivery's source bound: see `inpod::Use`) and armed to reset on
/// close ([`arm_reset`]) until its relay ends cleanly.
pub async fn connect_in_pod(
    pod: &PodContext,
    use_: Use,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let sock = pod.netns.stream_socket(dst.is_ipv6(), use_).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(Ok(s)) => arm_reset(&s).map(|()| s).map_err(|e| format!("connect {dst}: arm SO_LINGER: {e}")),
        Ok(Err(e)) => Err(format!("connect {dst}: {e}")),
        Err(_) => Err(format!("connect {dst}: timed out after {}s", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair of loopback sockets (also for the other proxy modules' tests).
    pub(super) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn relay_copies_both_ways_and_carries_half_close() {
        let (mut app, downstream) = pair().await;
        let (upstream, mut server) = pair().await;
        let mut flow = Flow::for_test(app.local_addr().unwrap(), server.local_addr().unwrap());
        let relayed = tokio::spawn(async move { relay(&mut flow, downstream, upstream, Mover::Splice, None).await });

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
    async fn connections_a_listener_accepts_inherit_its_armed_reset() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        arm_reset(&l).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(socket2::SockRef::from(&s).linger().unwrap(), Some(Duration::ZERO));
    }

    /// The server sends `len` bytes, then ends cleanly or resets; what the app reads.
    async fn relay_ending(len: usize, server_resets: bool) -> (usize, std::io::Result<()>) {
        let (mut app, downstream) = pair().await;
        let (upstream, mut server) = pair().await;
        arm_reset(&downstream).unwrap();
        arm_reset(&upstream).unwrap();
        let mut flow = Flow::for_test(app.local_addr().unwrap(), server.local_addr().unwrap());
        let relayed = tokio::spawn(async move { relay(&mut flow, downstream, upstream, Mover::Copy, None).await });
        server.write_all(&vec![7u8; len]).await.unwrap();
        if server_resets {
            // Let the bytes through first: the reset must not overtake them at the relay.
            tokio::time::sleep(Duration::from_millis(100)).await;
            reset(server);
        } else {
            app.shutdown().await.unwrap();
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
        }
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match app.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        };
        relayed.await.unwrap();
        (got, end)
    }

    #[tokio::test]
    async fn a_relay_that_ends_by_an_error_resets_the_app_and_a_clean_one_ends_with_fin() {
        let (got, end) = relay_ending(1 << 20, false).await;
        assert_eq!(got, 1 << 20);
        end.expect("a clean end is a clean end of stream, every byte delivered first");
        let (_, end) = relay_ending(4096, true).await;
        let e = end.expect_err("the upstream's reset must reach the app as a reset, not as EOF");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
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
