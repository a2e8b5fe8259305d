//! Outbound: accept on the pod's 15001, find the original destination, connect to it
//! from inside the pod.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use selvedge_common::{OrigDstKey, PairKey};
use tokio::net::TcpListener;

use super::{accept_loop, connect_in_pod, relay, reset, ConnTracker, Direction, Flow, PodContext};
use crate::{addr, datapath::FlowMaps};

/// Serve one outbound listener until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<PodContext>,
    flows: Arc<FlowMaps>,
    conns: Arc<ConnTracker>,
    timeout: Duration,
) {
    let name = pod.name.clone();
    accept_loop(listener, &name, Direction::Outbound, conns, move |stream, peer| {
        let (pod, flows) = (pod.clone(), flows.clone());
        async move { handle(stream, peer, &pod, &flows, timeout).await }
    })
    .await
}

async fn handle(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    flows: &FlowMaps,
    timeout: Duration,
) {
    let started = Instant::now();
    let cookie = pod.netns.cookie();
    let app = addr::to_abi(peer);
    let key = OrigDstKey { netns_cookie: cookie, app, _pad: 0 };
    let Some(orig) = flows.original_destination(&key) else {
        // Not a connection the kernel captured (or its record was lost): never guess.
        let flow = Flow {
            direction: Direction::Outbound,
            pod: &pod.name,
            namespace: &pod.namespace,
            src: peer,
            dst: peer,
            started,
        };
        flow.refused("no original destination recorded for this connection");
        reset(stream);
        return;
    };
    let dst = addr::from_abi(&orig);
    let flow =
        Flow { direction: Direction::Outbound, pod: &pod.name, namespace: &pod.namespace, src: peer, dst, started };
    if let Ok(local) = stream.local_addr() {
        let pair = PairKey { netns_cookie: cookie, local: addr::to_abi(local), remote: app };
        if let Err(e) = flows.join_fast_path(&pair, &stream) {
            tracing::debug!(pod = %pod.name, "fast path not used for this connection: {e}");
        }
    }
    let _ = stream.set_nodelay(true);
    match connect_in_pod(pod, None, dst, timeout).await {
        Ok(upstream) => relay(flow, stream, upstream).await,
        Err(reason) => {
            flow.refused(&reason);
            reset(stream);
        }
    }
}
