//! Outbound: accept on the pod's 15001, find the original destination, and carry the
//! connection there from inside the pod — through an HBONE tunnel when the destination is a
//! meshed workload, as plain TCP otherwise.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::future::Either;
use selvedge_common::{OrigDstKey, PairKey, HBONE_PORT};
use tokio::net::{TcpListener, TcpStream};

use super::{
    accept_loop, connect_in_pod, relay, reset, same_node, ConnTracker, Direction, Flow, Mesh, Mover, PodContext,
    Refusal, Security, WorkloadName,
};
use crate::{
    addr,
    datapath::FlowMaps,
    hbone::{self, headers::ConnectHeaders},
    inpod::Use,
    policy::{ConnFacts, Decision},
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
    let (p, m) = (pod.clone(), mesh.clone());
    accept_loop(listener, &p, &m, Direction::Outbound, conns, move |stream, peer| {
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
/// arguments beside the locals it moves them into. A value an `async` block captures stays
/// in it for the block's whole life even once moved out, so what only the decision and
/// the setup use (the socket on its way to the pump, the peer, the flow maps, the timeout)
/// comes in one box, unpacked in a block that ends before the connection's one long wait;
/// so does everything choosing the path looks at (the destination, its directory entry,
/// the destination pod). That wait is a single `await`: a value live at two of them would
/// be kept for the life of both.
#[allow(clippy::manual_async_fn, reason = "an async fn would keep a second copy of its arguments (see above)")]
fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    flows: Arc<FlowMaps>,
    mesh: Arc<Mesh>,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let accepted = Box::new(Accepted { stream, peer, flows, timeout });
    async move {
        let directory = mesh.directory.read().clone();
        let mut flow;
        let path = {
            let Accepted { stream, peer, flows, timeout } = *accepted;
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
            match to {
                None => Either::Right(Box::pin(plain(&mut flow, stream, dst, mover, &pod, timeout)) as Boxed<'_>),
                Some(to) => match mesh.local_pod(dst.ip()) {
                    Some(dst_pod) => Either::Right(Box::pin(same_node::handoff(
                        &mut flow, stream, mover, peer, dst, &pod, dst_pod, &mesh, timeout,
                    )) as Boxed<'_>),
                    None => Either::Left(tunnel(&mut flow, stream, peer, dst, &pod, to, &mesh, timeout)),
                },
            }
        };
        path.await
    }
}

/// What an accepted connection brings that only its decision and setup use.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    flows: Arc<FlowMaps>,
    timeout: Duration,
}

/// A path other than a tunnel, boxed.
type Boxed<'f> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'f>>;

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
        service = Some(svc.service.clone());
        match svc.pick() {
            Some(endpoint) => dst = endpoint,
            None => {
                let mut flow = Flow::new(Direction::Outbound, pod, peer, dst).with_metrics(&mesh.metrics);
                flow.service = service;
                flow.refused(Refusal::NoEndpoints, &format!("service {} has no endpoints", svc.service));
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
    policies.decide(&to.namespace, &to.labels, &facts).decision
}

/// Through HBONE to the destination pod's agent: mTLS with our pod's identity, expecting
/// the destination's. Any failure resets the app's connection — never a plaintext retry.
#[allow(clippy::too_many_arguments, reason = "one call site; the pieces are what a tunnel needs")]
fn tunnel<'f, 'a: 'f>(
    flow: &'f mut Flow<'a>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    pod: &'a Arc<PodContext>,
    to: &'a Peer,
    mesh: &'a Arc<Mesh>,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + use<'f, 'a> {
    // A plain function returning the future, not an `async fn`: an `async fn` keeps every
    // argument for its whole life, and this future lives as long as the tunnel. What the
    // setup needs, the app's socket included, is moved into its box here; the tunnel's
    // future holds the flow record's reference and the box, then the pump.
    flow.security = Security::MutualTls;
    flow.src_identity = Some(&pod.identity);
    flow.dst_identity = Some(&to.identity);
    // What the CONNECT says besides: the app's address as the destination would see it
    // without the mesh (the pod's IP and the app's own port), the service dialled, and who
    // the source is.
    let source = SocketAddr::new(pod.ips.first().copied().unwrap_or(peer.ip()), peer.port());
    let host = flow.service.as_deref().map(|s| s.fqdn.as_str());
    let headers = ConnectHeaders::new(source, host, pod.baggage.clone());
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
                let opened = mesh.pool.open(&key, dst, &headers, &early, || dial(pod, key.dst_addr, timeout)).await;
                // The key's free stream slots are running low: the next connection is
                // dialled now, off every stream's path (`hbone::client`, "Ahead of need").
                if opened.is_ok() && mesh.pool.short_of_slots(&key) {
                    let (pod, mesh) = (pod.clone(), mesh.clone());
                    tokio::spawn(async move { mesh.pool.prewarm(&key, || dial(&pod, key.dst_addr, timeout)).await });
                }
                (stream, opened, early_len)
            });
            Some(setup)
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
        let Some(setup) = ready else { return };
        // Awaited and matched in a block of its own: the result would otherwise stay in this
        // future for the tunnel's life. The app's socket rides in the setup's box until
        // then: captured here, it would stay beside the pump's for the tunnel's life.
        let (stream, hbone::client::Tunnel { send, recv, slot }, early_len) = {
            let (stream, opened, early_len) = setup.await;
            match opened {
                Ok(t) => (stream, t, early_len),
                Err(e) => {
                    let why = match e {
                        hbone::client::TunnelError::Denied(..) => Refusal::Policy,
                        _ => Refusal::TunnelFailed,
                    };
                    flow.refused(why, &e.to_string());
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

/// A TCP connection from inside `pod` to a peer agent's HBONE port.
async fn dial(pod: &PodContext, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = pod.netns.stream_socket(to.is_ipv6(), Use::Dial).await.map_err(std::io::Error::other)?;
    tokio::time::timeout(timeout, sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// What the app has already written (a client that speaks first usually has by the time
/// its connection is accepted): it goes out with the CONNECT request. Never waits; empty
/// when nothing is there yet or the app has already half-closed (the copy sees the end).
///
/// Read into the stack and copied out at its exact length: a heap buffer of the maximum
/// size per accepted connection would be held by every connection still being set up, and
/// a burst of them leaves the allocator's high-water mark (the agent's RSS) up for good.
///
/// A read shorter than the buffer has emptied the socket: its readiness is cleared then (as
/// the HBONE pump does, `hbone::pump::read_draining`), so the pump's first poll waits for
/// new bytes instead of spending a `recvfrom` that returns EAGAIN (one per connection).
fn early_bytes(stream: &TcpStream) -> std::io::Result<bytes::Bytes> {
    let mut buf = [0u8; EARLY_MAX];
    let mut got = 0;
    let read = stream.try_io(tokio::io::Interest::READABLE, || {
        got = stream.try_read(&mut buf)?;
        if got > 0 && got < EARLY_MAX {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match read {
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(bytes::Bytes::copy_from_slice(&buf[..got])),
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, known without calling it.
    fn size_of_output<A, B, C, D, E, G, R>(_: fn(A, B, C, D, E, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every open client-side connection is one task holding this future. tokio's task cell
    /// is its 32 B header, scheduler and id (16 B), the future with the accept loop's guard
    /// (16 B more), a 48 B trailer, in 128-byte steps: up to 528 B the cell is 640 B. It was
    /// 752 B (an 896 B cell), then 616 B (768), then 464 B with the accept-time values boxed
    /// and the setup carrying the app's socket (nightly rustc's `-Zprint-type-sizes`).
    #[test]
    fn an_accepted_connections_task_fits_a_640_byte_cell() {
        let size = size_of_output(super::handle);
        assert!(size <= 528, "the outbound task's future is {size} B");
    }
}
