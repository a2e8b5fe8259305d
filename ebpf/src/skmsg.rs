//! Loopback fast path: a send on one end of an app<->agent connection goes straight into
//! the other end's receive queue.
//!
//! Ordering: `tcp_bpf_recvmsg` serves the redirected-message queue before bytes already in
//! the TCP receive queue, so a socket that has ever sent over plain TCP must keep doing so
//! or its peer could read out of order. A miss therefore marks the sender in FALLBACK and
//! it never redirects again.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use selvedge_common::{PairKey, Setting, Stat};

use crate::maps::{bump, ctx_addr, ctx_u32, remote_port_host, setting, FALLBACK, PAIRS};

#[sk_msg]
pub fn redirect_loopback(ctx: SkMsgContext) -> u32 {
    if setting(Setting::FastPath) != 1 {
        bump(Stat::FastPathMiss);
        return SK_PASS;
    }
    let md = ctx.msg;
    let family = ctx_u32!(md, family);
    let me = PairKey {
        // SAFETY: helper allowed in sk_msg programs (kernel >= 5.15).
        netns_cookie: unsafe { bpf_get_netns_cookie(md.cast()) },
        local: ctx_addr!(md, family, local_ip4, local_ip6, ctx_u32!(md, local_port) as u16),
        remote: ctx_addr!(md, family, remote_ip4, remote_ip6, remote_port_host(ctx_u32!(md, remote_port))),
    };
    // SAFETY: lookup only.
    if unsafe { FALLBACK.get(&me) }.is_some() {
        bump(Stat::FastPathMiss);
        return SK_PASS;
    }
    let mut peer = me.reversed();
    if PAIRS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(Stat::FastPathHit);
    } else {
        // Peer not (yet) in the sockhash: this message goes over TCP, and so must every
        // later one from this socket.
        let _ = FALLBACK.insert(&me, &1, 0);
        bump(Stat::FastPathMiss);
    }
    SK_PASS
}
