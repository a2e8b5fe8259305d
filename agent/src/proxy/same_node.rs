//! Same-node handoff: when the destination is a pod this agent serves, the connection does
//! not go through HBONE to ourselves. The agent holds both ends' identities already (each
//! pod's listeners live in that pod's netns, and the kernel told us which pod connected),
//! so it makes the destination's decision itself — the same authorization the HBONE server
//! would make, with the source's principal — then connects to the app from inside the
//! destination pod and relays with `splice(2)`: the bytes never enter user space and never
//! leave the node. Both legs are logged and counted with security `same_node`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use selvedge_common::RESERVED_PORTS;
use tokio::net::TcpStream;

use super::{carry, inbound, reset, Direction, Flow, Mesh, Mover, PodContext, Refusal, Security};
use crate::policy::ConnFacts;

/// Carry `stream` (from `src_pod`'s app, going to `dst`) to `dst_pod`'s app on this node.
/// `outbound` is the source leg's record, already labelled with both workloads; `mover`
/// says how the app's socket can be read (see [`Mover`]).
#[allow(clippy::too_many_arguments, reason = "one call site; the pieces are what a handoff needs")]
pub async fn handoff(
    outbound: &mut Flow<'_>,
    stream: TcpStream,
    mover: Mover,
    peer: SocketAddr,
    dst: SocketAddr,
    src_pod: &PodContext,
    dst_pod: Arc<PodContext>,
    mesh: &Mesh,
    timeout: Duration,
) {
    outbound.security = Security::SameNode;
    let src_ip = src_pod.ips.first().copied().unwrap_or(peer.ip());
    let mut inbound =
        Flow::new(Direction::Inbound, &dst_pod, SocketAddr::new(src_ip, peer.port()), dst).with_metrics(&mesh.metrics);
    inbound.security = Security::SameNode;
    inbound.src_identity = Some(&src_pod.identity);
    inbound.dst_identity = Some(&dst_pod.identity);
    inbound.src_workload = outbound.src_workload.clone();
    inbound.service = outbound.service.clone();
    let refuse = |why: Refusal, detail: &str, stream: TcpStream| {
        inbound.refused(why, detail);
        outbound.refused(why, detail);
        reset(stream);
    };
    if RESERVED_PORTS.contains(&dst.port()) {
        return refuse(Refusal::BadTarget, "destination is a port reserved for the agent", stream);
    }
    // Exactly what the destination's HBONE server would see: our principal, our pod's IP.
    let facts =
        ConnFacts { principal: Some(src_pod.identity.principal()), src_ip, dst_ip: dst.ip(), dst_port: dst.port() };
    let watch = match mesh.watchers.admit(&dst_pod, mesh, facts) {
        Ok(watch) => watch,
        Err(decision) => return refuse(Refusal::Policy, &decision.reason(), stream),
    };
    let app = match Box::pin(inbound::deliver(&dst_pod, dst, SocketAddr::new(src_ip, peer.port()), 0, timeout)).await {
        Ok(app) => app,
        Err(reason) => return refuse(Refusal::UpstreamUnreachable, &reason, stream),
    };
    outbound.opened();
    inbound.opened();
    // Each byte counts for both records (the source's and the destination's).
    let (sent, received) = (
        (&outbound.state.tally.sent, &inbound.state.tally.sent),
        (&outbound.state.tally.received, &inbound.state.tally.received),
    );
    let error = carry(stream, app, mover, Some(&watch.cancel), &sent, &received).await;
    inbound.closed(error.clone());
    outbound.closed(error);
}
