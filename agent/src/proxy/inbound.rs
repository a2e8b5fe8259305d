//! Inbound plaintext: a SYN steered to the pod's 15006 by `sk_lookup`; the accepted
//! socket's local address is where the client was going. Deliver it to the app over `lo`.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use selvedge_common::RESERVED_PORTS;
use tokio::net::TcpListener;

use super::{accept_loop, connect_in_pod, relay, reset, ConnTracker, Direction, Flow, PodContext};
use crate::addr;

/// Source of the agent's connections to the app: a loopback address, which the pod's
/// `sk_lookup` recognises as "from inside the pod" and leaves alone (Istio uses the same).
pub const DELIVERY_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

async fn deliver(pod: &PodContext, app: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream, String> {
    let source = match app {
        SocketAddr::V4(_) => Some(SocketAddr::from((DELIVERY_SOURCE_V4, 0))),
        // IPv6 has no spare loopback addresses; the pod's own address is used, and
        // sk_lookup treats source == destination as local.
        SocketAddr::V6(_) => None,
    };
    connect_in_pod(pod, source, app, timeout).await
}

/// Serve one inbound listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, conns: Arc<ConnTracker>, timeout: Duration) {
    let name = pod.name.clone();
    accept_loop(listener, &name, Direction::Inbound, conns, move |stream, peer| {
        let pod = pod.clone();
        async move { handle(stream, peer, &pod, timeout).await }
    })
    .await
}

async fn handle(stream: tokio::net::TcpStream, peer: SocketAddr, pod: &PodContext, timeout: Duration) {
    let started = Instant::now();
    let peer = addr::canonical(peer);
    let Ok(local) = stream.local_addr().map(addr::canonical) else {
        reset(stream);
        return;
    };
    let flow = Flow {
        direction: Direction::Inbound,
        pod: &pod.name,
        namespace: &pod.namespace,
        src: peer,
        dst: local,
        started,
    };
    if RESERVED_PORTS.contains(&local.port()) {
        // Delivering to the agent's own port would loop back into this listener.
        flow.refused("destination is a port reserved for the agent");
        reset(stream);
        return;
    }
    let _ = stream.set_nodelay(true);
    match deliver(pod, local, timeout).await {
        Ok(app) => relay(flow, stream, app).await,
        Err(reason) => {
            flow.refused(&reason);
            reset(stream);
        }
    }
}
