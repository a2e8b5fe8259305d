//! Inbound capture, attached to each enrolled pod's netns: a TCP SYN that arrives from
//! outside the pod goes to the agent's 15006 listener, whatever port it was for. Port
//! 15008 (HBONE) keeps its normal lookup; STRICT pods drop plaintext here; with no agent
//! listener (agent down) the SYN is dropped, never delivered to the app directly.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::debug;
use selvedge_common::{Stat, HBONE_PORT, POD_FLAG_STRICT};

use crate::maps::{bump, enrolled, INBOUND, IPPROTO_TCP, LOOPBACK_IFINDEX};

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP || lk.ingress_ifindex == LOOPBACK_IFINDEX || lk.local_port == u32::from(HBONE_PORT) {
        return SK_PASS;
    }
    // SAFETY: helper allowed in sk_lookup programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.lookup.cast()) };
    let Some(pod) = enrolled(netns) else {
        // Attached but no longer enrolled: the agent is detaching this pod.
        return SK_PASS;
    };
    if pod.flags & POD_FLAG_STRICT != 0 {
        bump(Stat::InboundStrictDrop);
        return SK_DROP;
    }
    match INBOUND.redirect_sk_lookup(&ctx, pod.pod_id, 0) {
        Ok(()) => {
            bump(Stat::InboundAssigned);
            SK_PASS
        }
        Err(_) => {
            bump(Stat::InboundNoListener);
            debug!(&ctx, "selvedge: no inbound listener for pod {}; SYN dropped", pod.pod_id);
            SK_DROP
        }
    }
}
