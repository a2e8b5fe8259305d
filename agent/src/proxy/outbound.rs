//! Outbound: accept on the pod's 15001, find the original destination, and carry the
//! connection there from inside the pod — through an HBONE tunnel when the destination is a
//! meshed workload, as plain TCP otherwise.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use selvedge_common::{OrigDstKey, PairKey, HBONE_PORT};
use tokio::net::{TcpListener, TcpStream};

use super::{
    accept_loop, connect_in_pod, relay, reset, same_node, ConnTracker, Direction, Flow, Mesh, Mover, PodContext,
    Refusal, Security, WorkloadName,
};
use crate::{
    addr,
    datapath::FlowMaps,
    hbone,
    inpod::Use,
    policy::{authorize, ConnFacts, Decision},
    state::{Directory, Peer},
};

/// At most this much of the app's first bytes rides with the CONNECT request.
const EARLY_MAX: usize = 16 * 1024;

/// Serve one outbound listener until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    flows: Arc<FlowMaps>,
    mesh: Arc<Mesh>,
    conns: Arc<ConnTracker>,
    timeout: Duration,
) {
    let name = pod.name.clone();
    accept_loop(listener, &name, Direction::Outbound, conns, move |stream, peer| {
        handle(stream, peer, pod.clone(), flows.clone(), mesh.clone(), timeout)
    })
    .await
}

/// One accepted connection, for its whole life. What an idle connection costs is mostly
/// this future, so what it holds across the long wait is kept small: the flow record, the
/// sockets and the copy's state. Setup (pool, dial, handshake, app connect) is boxed and
/// freed once done, and large values are lent to the paths below, never moved into them.
///
/// A plain function returning the future, not an `async fn`: an `async fn` keeps its
/// arguments beside the locals it moves them into. What choosing the path looks at (the
/// destination, its directory entry, the destination pod) lives in a block that ends
/// before the tunnel's long wait, so none of it is kept for the tunnel's life.
#[allow(clippy::manual_async_fn, reason = "an async fn would keep a second copy of its arguments (see above)")]
fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    flows: Arc<FlowMaps>,
    mesh: Arc<Mesh>,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let directory = mesh.directory.read().clone();
        let mut flow;
        let tunnel = {
            // Decided in a plain function: what it looks at (keys, addresses, the service) is
            // not kept in this future for the connection's life.
            let Some(Decided { flow: decided, dst, mover, to }) =
                decide(&stream, peer, &pod, &flows, &mesh, &directory)
            else {
                return reset(stream);
            };
            flow = decided;
            // Boxed, the plaintext relay and the handoff: a task is as large as its largest
            // possible state, and both are larger than a tunnel's (two splice pumps; the
            // handoff's second flow record and relay).
            let Some(to) = to else {
                return Box::pin(plain(&mut flow, stream, dst, mover, &pod, timeout)).await;
            };
            if let Some(dst_pod) = mesh.local_pod(dst.ip()) {
                let handoff = same_node::handoff(&mut flow, stream, mover, peer, dst, &pod, dst_pod, &mesh, timeout);
                return Box::pin(handoff).await;
            }
            tunnel(&mut flow, stream, peer, dst, &pod, to, &mesh, timeout)
        };
        tunnel.await
    }
}

/// To a destination outside the mesh: plain TCP from inside the pod.
async fn plain(
    flow: &mut Flow<'_>,
    stream: TcpStream,
    dst: SocketAddr,
    mover: Mover,
    pod: &PodContext,
    timeout: Duration,
) {
    match connect_in_pod(pod, Use::Dial, dst, timeout).await {
        Ok(upstream) => relay(flow, stream, upstream, mover, None).await,
        Err(reason) => {
            flow.refused(Refusal::UpstreamUnreachable, &reason);
            reset(stream);
        }
    }
}

/// An accepted connection allowed on: its record, where it goes, how its socket is read,
/// and the meshed workload there (None: not meshed, plain TCP).
struct Decided<'a> {
    flow: Flow<'a>,
    dst: SocketAddr,
    mover: Mover,
    to: Option<&'a Peer>,
}

/// Where the connection was going, and whether it may: None when it is refused here (the
/// refusal is logged; the caller resets the connection).
fn decide<'a>(
    stream: &TcpStream,
    peer: SocketAddr,
    pod: &'a PodContext,
    flows: &FlowMaps,
    mesh: &'a Mesh,
    directory: &'a Directory,
) -> Option<Decided<'a>> {
    let cookie = pod.netns.cookie();
    let app = addr::to_abi(peer);
    let key = OrigDstKey { netns_cookie: cookie, app, _pad: 0 };
    let Some(orig) = flows.original_destination(&key) else {
        // Not a connection the kernel captured (or its record was lost): never guess.
        Flow::new(Direction::Outbound, pod, peer, peer)
            .with_metrics(&mesh.metrics)
            .refused(Refusal::NoOriginalDestination, "no original destination recorded for this connection");
        return None;
    };
    let mut dst = addr::from_abi(&orig);
    let mut mover = Mover::Splice;
    // The pair key needs the socket's own address: asked only when the fast path is on.
    if let Some(local) = flows.fast_path().then(|| stream.local_addr().ok()).flatten() {
        let pair = PairKey { netns_cookie: cookie, local: addr::to_abi(local), remote: app };
        match flows.join_fast_path(&pair, stream) {
            Ok(true) => mover = Mover::Copy,
            Ok(false) => {}
            Err(e) => tracing::debug!(pod = %pod.name, "fast path not used for this connection: {e}"),
        }
    }
    // A service VIP stands for its endpoints: the agent picks one (the VIP itself is routed
    // nowhere; only captured connections can reach it).
    let mut service = None;
    if let Some(svc) = directory.services.get(&addr::canonical(dst)) {
        service = Some(svc.fqdn.as_str());
        match svc.pick() {
            Some(endpoint) => dst = endpoint,
            None => {
                let mut flow = Flow::new(Direction::Outbound, pod, peer, dst).with_metrics(&mesh.metrics);
                flow.service = service;
                flow.refused(Refusal::NoEndpoints, &format!("service {} has no endpoints", svc.name));
                return None;
            }
        }
    }
    let via_service = service.is_some();
    let mut flow = Flow::new(Direction::Outbound, pod, peer, dst).with_metrics(&mesh.metrics);
    flow.service = service;
    let to = directory.workloads.get(&dst.ip().to_canonical());
    if let Some(to) = to {
        flow.dst_workload = Some(WorkloadName::from(to));
        // Who was refused, and by whom: a source-side denial names both identities.
        flow.src_identity = Some(&pod.identity);
        flow.dst_identity = Some(&to.identity);
        // Refused at the source when the destination's policies already say no: this
        // connection is reset, and the kernel refuses the next ones at connect().
        if let decision @ Decision::Deny { .. } = source_verdict(pod, to, dst, mesh) {
            if !via_service {
                if let Err(e) = flows.cache_denial(cookie, &orig) {
                    tracing::debug!(pod = %pod.name, "denial not cached: {e}");
                }
            }
            flow.refused(Refusal::Policy, &format!("{} (decided at the source)", decision.reason()));
            return None;
        }
    }
    Some(Decided { flow, dst, mover, to })
}

/// The destination's decision, computed here: every fact it uses is known at the source
/// (our identity, our pod's address, the destination and port).
fn source_verdict(pod: &PodContext, to: &Peer, dst: SocketAddr, mesh: &Mesh) -> Decision {
    let facts = ConnFacts {
        principal: Some(pod.identity.principal()),
        src_ip: pod.ips.first().copied().unwrap_or(dst.ip()),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let policies = mesh.policies.read().clone();
    authorize(&policies, &to.namespace, &to.labels, &facts).decision
}

/// Through HBONE to the destination pod's agent: mTLS with our pod's identity, expecting
/// the destination's. Any failure resets the app's connection — never a plaintext retry.
#[allow(clippy::too_many_arguments, reason = "one call site; the pieces are what a tunnel needs")]
fn tunnel<'f, 'a: 'f>(
    flow: &'f mut Flow<'a>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    pod: &'a PodContext,
    to: &'a Peer,
    mesh: &'a Mesh,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + use<'f, 'a> {
    // A plain function returning the future, not an `async fn`: an `async fn` keeps every
    // argument for its whole life, and this future lives as long as the tunnel. What the
    // setup needs is moved into its box here; the tunnel's future holds the flow record's
    // reference, the socket and the box.
    flow.security = Security::MutualTls;
    flow.src_identity = Some(&pod.identity);
    flow.dst_identity = Some(&to.identity);
    let ready = match early_bytes(&stream) {
        Ok(early) => {
            let early_len = early.len() as u64;
            // Boxed: the setup (pool lookup, maybe a dial and a TLS handshake) is a large
            // state that lives only until the tunnel is open; inline, every idle
            // connection's task would carry its size for the connection's whole life.
            let setup = Box::pin(async move {
                let key = hbone::client::PoolKey {
                    src_pod: pod.netns.cookie(),
                    src: pod.identity.clone(),
                    dst: to.identity.clone(),
                    dst_addr: SocketAddr::new(dst.ip(), HBONE_PORT),
                };
                let source = SocketAddr::new(pod.ips.first().copied().unwrap_or(peer.ip()), 0);
                let dial = || async {
                    let sock = pod
                        .netns
                        .stream_socket(key.dst_addr.is_ipv6(), Use::Dial)
                        .await
                        .map_err(std::io::Error::other)?;
                    tokio::time::timeout(timeout, sock.connect(key.dst_addr))
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
                };
                mesh.pool.open(&key, dst, source, &early, dial).await
            });
            Some((stream, setup, early_len))
        }
        Err(e) => {
            // The app's connection already failed (e.g. it reset it): nothing to carry,
            // and reading on would turn its reset into a clean end.
            flow.closed(Some(format!("app connection: {e}")));
            reset(stream);
            None
        }
    };
    async move {
        let Some((stream, setup, early_len)) = ready else { return };
        // Awaited and matched in a block of its own: the result would otherwise stay in this
        // future for the tunnel's life.
        let hbone::client::Tunnel { send, recv, slot } = {
            let opened = setup.await;
            match opened {
                Ok(t) => t,
                Err(e) => {
                    flow.refused(Refusal::TunnelFailed, &e.to_string());
                    return reset(stream);
                }
            }
        };
        flow.opened();
        flow.state.tally.sent.add(early_len); // went with the CONNECT request
        let t = &flow.state.tally;
        let result = hbone::splice(stream, send, recv, &t.sent, &t.received).await;
        drop(slot); // the stream is done: its place on the connection is free
        flow.closed(result.err().map(|e| e.to_string()));
    }
}

/// What the app has already written (a client that speaks first usually has by the time
/// its connection is accepted): it goes out with the CONNECT request. Never waits; empty
/// when nothing is there yet or the app has already half-closed (the copy sees the end).
///
/// Read into the stack and copied out at its exact length: a heap buffer of the maximum
/// size per accepted connection would be held by every connection still being set up, and
/// a burst of them leaves the allocator's high-water mark (the agent's RSS) up for good.
fn early_bytes(stream: &TcpStream) -> std::io::Result<bytes::Bytes> {
    let mut buf = [0u8; EARLY_MAX];
    match stream.try_read(&mut buf) {
        Ok(n) => Ok(bytes::Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(bytes::Bytes::new()),
        Err(e) => Err(e),
    }
}
