//! `sockops` on the pods' cgroup: for each captured connect, publish its original
//! destination under the key the agent can compute on accept (netns + the app's local
//! address), put the app's socket in the fast-path sockhash, and clean up on close.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use selvedge_common::{OrigDstKey, PairKey, Setting};

use crate::maps::{ctx_addr, ctx_u32, remote_port_host, setting, FALLBACK, ORIG_BY_COOKIE, ORIG_DST, PAIRS};

/// `TCP_CLOSE` from include/net/tcp_states.h.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn track_captured(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper allowed in sockops programs.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

#[inline(always)]
fn pair_key(ctx: &SockOpsContext) -> PairKey {
    let ops = ctx.ops;
    let family = ctx_u32!(ops, family);
    PairKey {
        // SAFETY: helper allowed in sockops programs (kernel >= 5.15).
        netns_cookie: unsafe { bpf_get_netns_cookie(ops.cast()) },
        local: ctx_addr!(ops, family, local_ip4, local_ip6, ctx_u32!(ops, local_port) as u16),
        remote: ctx_addr!(ops, family, remote_ip4, remote_ip6, remote_port_host(ctx_u32!(ops, remote_port))),
    }
}

/// The local port is chosen by now (inet_hash_connect runs before tcp_connect), so the
/// agent's accept-side key is known: publish the original destination under it.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    // SAFETY: value copied out of the map.
    let Some(dst) = (unsafe { ORIG_BY_COOKIE.get(&cookie).copied() }) else {
        return;
    };
    let pair = pair_key(ctx);
    let key = OrigDstKey { netns_cookie: pair.netns_cookie, app: pair.local, _pad: 0 };
    // An LRU map makes room rather than fail; if it still fails, the agent finds no
    // entry on accept and refuses the connection (fail closed).
    let _ = ORIG_DST.insert(&key, &dst, u64::from(BPF_ANY));
    // Ask for the close callback so the entries above do not outlive the socket.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    if setting(Setting::FastPath) != 1 {
        return;
    }
    // SAFETY: lookup only.
    if unsafe { ORIG_BY_COOKIE.get(&cookie(ctx)) }.is_none() {
        return; // not a captured connection: leave it alone
    }
    let mut key = pair_key(ctx);
    // SAFETY: the sockops context is the socket to insert.
    let _ = PAIRS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let pair = pair_key(ctx);
    let _ = ORIG_BY_COOKIE.remove(&cookie(ctx));
    let _ = ORIG_DST.remove(&OrigDstKey { netns_cookie: pair.netns_cookie, app: pair.local, _pad: 0 });
    let _ = FALLBACK.remove(&pair);
}
