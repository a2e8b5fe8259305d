//! Inbound plaintext: a SYN steered to the pod's 15006 by `sk_lookup`; the accepted
//! socket's local address is where the client was going. Deliver it to the app over `lo`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use selvedge_common::RESERVED_PORTS;
use tokio::net::TcpListener;

use super::{
    accept_loop, connect_in_pod, flow::Opened, relay, reset, ConnTracker, Direction, Flow, Mesh, Mover, PodContext,
    Refusal, Security, WatchGuard, WorkloadName,
};
use crate::{
    addr,
    cancel::Cancel,
    hbone::{headers::ConnectInfo, server::Outcome},
    identity::SpiffeId,
    inpod::Use,
    policy::ConnFacts,
    publish::metrics::ByteCount,
};

/// Connect to the pod's app at `app` as the client at `from` would have: from its own
/// address (transparent delivery: `inpod::route`), so the app sees who is calling, as it
/// would behind ztunnel or without a mesh. Where that cannot be done (the pod's routing was
/// not set up, families differ, the kernel map is full) it delivers from 127.0.0.6. Port 0
/// in `from`: any port but `avoid` (the client's own, when its connection ends in this
/// namespace: the agent's accepted socket holds that 4-tuple, reversed).
pub async fn deliver(
    pod: &PodContext,
    app: SocketAddr,
    from: SocketAddr,
    avoid: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let from = addr::canonical(from);
    if pod.netns.transparent() && from.is_ipv4() == app.is_ipv4() && !from.ip().is_loopback() {
        match deliver_as(pod, app, from, avoid, timeout).await {
            Ok(s) => return Ok(s),
            Err(Some(e)) => return Err(e),
            Err(None) => {} // could not be set up: the plain delivery below
        }
    }
    connect_in_pod(pod, Use::Deliver, app, timeout).await
}

/// A transparent delivery: Err(None) when it could not be set up (nothing was sent).
async fn deliver_as(
    pod: &PodContext,
    app: SocketAddr,
    from: SocketAddr,
    avoid: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, Option<String>> {
    let (sock, bound) = pod
        .netns
        .transparent_socket(from)
        .await
        .map_err(|e| tracing::debug!(pod = %pod.name, "delivery from {from} not possible: {e}"))
        .map_err(|()| None)?;
    if avoid != 0 && bound.port() == avoid {
        return Err(None); // one in tens of thousands: the plain delivery instead
    }
    let key =
        selvedge_common::DeliveryKey { slot: pod.slot, local_port: app.port(), _pad: 0, remote: addr::to_abi(bound) };
    let registered = pod
        .flows
        .begin_delivery(key, timeout)
        .map_err(|e| tracing::warn!(pod = %pod.name, "delivery from {from}: {e}"))
        .map_err(|()| None)?;
    let connected = tokio::time::timeout(timeout, sock.connect(app)).await;
    // The handshake is over either way: later packets of the connection never consult
    // `sk_lookup`. (Dropped with this future too, if it is cancelled mid-connect.)
    drop(registered);
    match connected {
        Ok(Ok(s)) => {
            crate::sys::arm_reset(&s).map(|()| s).map_err(|e| Some(format!("connect {app}: arm SO_LINGER: {e}")))
        }
        // The 4-tuple is taken (an earlier delivery's TIME_WAIT): no SYN left, so the
        // plain delivery can still be made.
        Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)) => {
            tracing::debug!(pod = %pod.name, "delivery from {bound}: {e}");
            Err(None)
        }
        Ok(Err(e)) => Err(Some(format!("connect {app} from {bound}: {e}"))),
        Err(_) => Err(Some(format!("connect {app} from {bound}: timed out after {}s", timeout.as_secs()))),
    }
}

/// Serve one inbound listener until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    mesh: Arc<Mesh>,
    conns: Arc<ConnTracker>,
    timeout: Duration,
) {
    let (p, m) = (pod.clone(), mesh.clone());
    accept_loop(listener, &p, &m, Direction::Inbound, conns, move |stream, peer| {
        handle(stream, peer, pod.clone(), mesh.clone(), timeout)
    })
    .await
}

async fn handle(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    mesh: Arc<Mesh>,
    timeout: Duration,
) {
    // Decided in a plain function: what it looks at is not kept in this future for the
    // connection's life (see `outbound::handle`).
    let Some((mut flow, local, watch)) = decide(&stream, peer, &pod, &mesh) else {
        return reset(stream);
    };
    // Not from the client's own port: its connection to this very address ends here, in
    // this namespace (the agent's accepted socket holds that 4-tuple).
    match deliver(&pod, local, SocketAddr::new(peer.ip(), 0), peer.port(), timeout).await {
        Ok(app) => relay(&mut flow, stream, app, Mover::Splice, watch.as_ref().map(|w| &*w.cancel)).await,
        Err(reason) => {
            flow.refused(Refusal::UpstreamUnreachable, &reason);
            reset(stream);
        }
    }
}

/// May this plaintext connection reach the app? Its record, the app's address (where the
/// client was going) and its registration with the policy watcher (none for the node's
/// probes, which policy does not govern); None when refused (logged; the caller resets it).
fn decide<'a>(
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
    pod: &'a Arc<PodContext>,
    mesh: &'a Mesh,
) -> Option<(Flow<'a>, SocketAddr, Option<WatchGuard>)> {
    let peer = addr::canonical(peer);
    let local = stream.local_addr().map(addr::canonical).ok()?;
    let mut flow = Flow::new(Direction::Inbound, pod, peer, local).with_metrics(&mesh.metrics);
    // Plaintext: the source workload is known only by address, never its principal.
    flow.src_workload = mesh.workload_at(peer.ip());
    flow.service = mesh.service_of(local, None);
    if RESERVED_PORTS.contains(&local.port()) {
        // Delivering to the agent's own port would loop back into this listener.
        flow.refused(Refusal::ReservedPort, "destination is a port reserved for the agent");
        return None;
    }
    if node_probe(pod, peer, local.port()) {
        // The kubelet's health check: admitted as Istio's ambient mode admits it (there it
        // never reaches ztunnel), whatever STRICT or AuthorizationPolicy say; marked as such
        // in the access log, metrics and `/connections`.
        flow.security = Security::NodeProbe;
        return Some((flow, local, None));
    }
    if pod.mtls.read().strict_for(local.port()) {
        // PeerAuthentication STRICT: the kernel drops plaintext for all-STRICT pods; a pod
        // with some plaintext ports gets it refused here, port by port.
        flow.refused(Refusal::PlaintextStrict, "plaintext refused: PeerAuthentication STRICT for this port");
        return None;
    }
    // Plaintext carries no principal: it matches no `principals` and every `notPrincipals`.
    let facts = ConnFacts { principal: None, src_ip: peer.ip(), dst_ip: local.ip(), dst_port: local.port() };
    match mesh.watchers.admit(pod, mesh, facts) {
        Ok(watch) => Some((flow, local, Some(watch))),
        Err(decision) => {
            flow.refused(Refusal::Policy, &decision.reason());
            None
        }
    }
}

/// Plaintext to one of the pod's probe ports from an address of the node itself (the
/// agent's runtime thread lives in the node's network namespace). Another node, a pod, or
/// an address the agent cannot check is not the node.
fn node_probe(pod: &PodContext, peer: SocketAddr, port: u16) -> bool {
    if !pod.mtls.read().probe_port(port) {
        return false;
    }
    crate::sys::is_own_address(peer.ip()).unwrap_or_else(|e| {
        tracing::warn!(pod = %pod.name, src = %peer, "cannot list the node's addresses, not admitting as a probe: {e}");
        false
    })
}

/// What authorization knows of a tunnelled connection.
fn hbone_facts(principal: &SpiffeId, peer: SocketAddr, target: SocketAddr) -> ConnFacts {
    ConnFacts {
        principal: Some(principal.principal()),
        src_ip: peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
    }
}

/// The pod's side of its HBONE listener: deliver each tunnel to the app like plaintext
/// inbound, and log it with the verified source identity.
#[derive(Debug)]
pub struct HboneUpstream {
    pub pod: Arc<PodContext>,
    pub mesh: Arc<Mesh>,
    pub conns: Arc<ConnTracker>,
    pub timeout: Duration,
}

impl HboneUpstream {
    /// The record of a tunnelled connection from `principal` at `peer` to `target`, as
    /// the access log has it.
    fn flow<'a>(&'a self, principal: Option<&'a SpiffeId>, peer: SocketAddr, target: SocketAddr) -> Flow<'a> {
        let mut flow = Flow::new(Direction::Inbound, &self.pod, peer, target).with_metrics(&self.mesh.metrics);
        flow.security = Security::MutualTls;
        flow.src_identity = principal;
        flow.dst_identity = Some(&self.pod.identity);
        flow
    }

    /// [`Self::flow`] with the source workload and the service looked up (`host`: the one
    /// the client's CONNECT named, if any), for the labels it is counted under (at open or
    /// refusal; closing only adds to counters resolved then).
    fn labelled<'a>(
        &'a self,
        principal: Option<&'a SpiffeId>,
        peer: SocketAddr,
        target: SocketAddr,
        host: Option<&str>,
    ) -> Flow<'a> {
        let mut flow = self.flow(principal, peer, target);
        flow.src_workload = self.mesh.workload_at(peer.ip());
        flow.service = self.mesh.service_of(target, host);
        flow
    }
}

impl crate::hbone::server::Upstream for HboneUpstream {
    type Guard = super::ConnGuard;
    type Watch = super::WatchGuard;

    fn begin(&self) -> Self::Guard {
        self.conns.open()
    }

    async fn connect(&self, target: SocketAddr, client: SocketAddr) -> Result<tokio::net::TcpStream, String> {
        deliver(&self.pod, target, client, 0, self.timeout).await
    }

    fn authorize(&self, principal: &SpiffeId, peer: SocketAddr, target: SocketAddr) -> Result<Self::Watch, String> {
        let facts = hbone_facts(principal, peer, target);
        self.mesh.watchers.admit(&self.pod, &self.mesh, facts).map_err(|deny| deny.reason())
    }

    fn cancelled(watch: &Self::Watch) -> &Cancel {
        &watch.cancel
    }

    type Served = Opened;

    fn served(&self, principal: &SpiffeId, peer: SocketAddr, target: SocketAddr, info: ConnectInfo) -> Opened {
        let mut flow = self.labelled(Some(principal), peer, target, info.host.as_deref());
        // A source this agent does not know (another cluster's, or a peer ahead of this
        // agent's view) is labelled as its own agent describes it.
        if flow.src_workload.is_none() {
            flow.src_workload = info.source.map(WorkloadName::Owned);
        }
        flow.opened();
        flow.detach()
    }

    fn tally(served: &Opened) -> (&ByteCount, &ByteCount) {
        (&served.tally.sent, &served.tally.received)
    }

    fn ended(&self, served: Opened, principal: &SpiffeId, peer: SocketAddr, target: SocketAddr, error: Option<String>) {
        self.flow(Some(principal), peer, target).attach(served).closed(error);
    }

    fn log(&self, r: crate::hbone::server::Record<'_>) {
        let flow = self.labelled(r.principal, r.peer, r.target.unwrap_or(r.peer), None);
        let why = match r.outcome {
            Outcome::Handshake => Refusal::TlsHandshake,
            Outcome::Certificate => Refusal::BadClientCertificate,
            Outcome::BadTarget => Refusal::BadTarget,
            Outcome::Method => Refusal::MethodNotAllowed,
            Outcome::Unavailable => Refusal::UpstreamUnreachable,
            Outcome::Denied => Refusal::Policy,
            Outcome::OverLimit => Refusal::OverLimit,
        };
        flow.refused(why, r.reason);
    }
}
