//! Outbound capture: `connect()` from an enrolled pod goes to the agent's in-pod listener,
//! `getpeername()` hands the app back the address it dialled, and `getsockname()` its pod's
//! own address.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use selvedge_common::{SockAddr, Stat, VerdictKey, OUTBOUND_PORT, VERDICT_DENY};

use crate::maps::{
    bump, ctx_ip6, ctx_set_ip6, ctx_u32, enrolled, is_agent, IPPROTO_TCP, ORIG_BY_COOKIE, POD_ADDR, VERDICTS,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// 127.0.0.1 in network byte order.
const LOCALHOST4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 in network byte order words.
const LOCALHOST6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(dst) = captured_dst(&ctx, sa.protocol, SockAddr::from_v4_raw(sa.user_ip4, port_of(sa.user_port))) else {
        return ALLOW;
    };
    if denied(&ctx, &dst) || !remember(&ctx, &dst) {
        return REFUSE;
    }
    sa.user_ip4 = LOCALHOST4;
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let sp = ctx.sock_addr;
    // connect6 programs may not read user_ip4: only the IPv6 words.
    let dst = SockAddr::from_v6_raw(ctx_ip6!(sp, user_ip6), port_of(ctx_u32!(sp, user_port)));
    let Some(dst) = captured_dst(&ctx, sa.protocol, dst) else {
        return ALLOW;
    };
    if denied(&ctx, &dst) || !remember(&ctx, &dst) {
        return REFUSE;
    }
    // An IPv4-mapped destination stays IPv4 on the wire: send it to the agent's IPv4 listener.
    ctx_set_ip6!(
        sp,
        user_ip6,
        if dst.v4_raw().is_some() { SockAddr::from_v4_raw(LOCALHOST4, 0).ip } else { LOCALHOST6 }
    );
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original(&ctx) {
        if let Some(v4) = orig.v4_raw() {
            sa.user_ip4 = v4;
            sa.user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(orig) = original(&ctx) {
        ctx_set_ip6!(ctx.sock_addr, user_ip6, orig.ip);
        sa.user_port = u32::from(orig.port.to_be());
    }
    ALLOW
}

/// A captured connection really runs from the app to the agent over loopback; the app is
/// told it runs from its pod's address (the port is the connection's own), as it would be
/// without the mesh.
#[cgroup_sock_addr(getsockname4)]
pub fn reveal_self4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(v4) = pod_addr(&ctx).and_then(|a| a.v4_raw()) {
        sa.user_ip4 = v4;
    }
    ALLOW
}

#[cgroup_sock_addr(getsockname6)]
pub fn reveal_self6(ctx: SockAddrContext) -> i32 {
    if let Some(a) = pod_addr(&ctx) {
        // An IPv6 socket on an IPv4 path keeps the mapped form it had.
        ctx_set_ip6!(ctx.sock_addr, user_ip6, a.ip);
    }
    ALLOW
}

/// The pod's address, for a connection this hook captured (else None: left alone).
#[inline(always)]
fn pod_addr(ctx: &SockAddrContext) -> Option<SockAddr> {
    original(ctx)?;
    // SAFETY: helper allowed in cgroup sock_addr programs; value copied out of the map.
    unsafe {
        let netns = bpf_get_netns_cookie(ctx.sock_addr.cast());
        POD_ADDR.get(&netns).copied()
    }
}

/// `user_port` holds the network-order port in its low 16 bits.
#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// The destination to capture, or `None` when this connect is not ours to touch.
#[inline(always)]
fn captured_dst(ctx: &SockAddrContext, protocol: u32, dst: SockAddr) -> Option<SockAddr> {
    if protocol != IPPROTO_TCP || is_agent() || dst.is_loopback() {
        // Loopback stays inside the pod (and 127.0.0.1:15001 itself never loops).
        return None;
    }
    // SAFETY: helper allowed in cgroup sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    enrolled(netns)?;
    Some(dst)
}

/// Has the agent already learned that this pod's connect to `dst` will be denied?
#[inline(always)]
fn denied(ctx: &SockAddrContext, dst: &SockAddr) -> bool {
    // SAFETY: helper allowed in cgroup sock_addr programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let key = VerdictKey { netns_cookie, dst: *dst, _pad: 0 };
    // SAFETY: value copied out of the map.
    if unsafe { VERDICTS.get(&key).copied() } == Some(VERDICT_DENY) {
        bump(Stat::PolicyRefused);
        return true;
    }
    false
}

/// Record the original destination under the socket's cookie; false refuses the connect.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &SockAddr) -> bool {
    // SAFETY: helper allowed in cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if ORIG_BY_COOKIE.insert(&cookie, dst, 0).is_err() {
        bump(Stat::OrigMapFull);
        warn!(ctx, "selvedge: original-destination map refused an entry; connect refused");
        return false;
    }
    bump(Stat::Captured);
    true
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: helper allowed in cgroup sock_addr programs; value copied out of the map.
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx.sock_addr.cast());
        ORIG_BY_COOKIE.get(&cookie).copied()
    }
}
