//! `bind()` guard: a process in an enrolled pod may not bind the agent's ports, so it can
//! neither hijack captured traffic nor squat a port the agent needs after a restart.

use aya_ebpf::{helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use selvedge_common::{Stat, RESERVED_PORTS};

use crate::maps::{bump, enrolled, is_agent};

#[cgroup_sock_addr(bind4)]
pub fn guard_bind4(ctx: SockAddrContext) -> i32 {
    verdict(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn guard_bind6(ctx: SockAddrContext) -> i32 {
    verdict(&ctx)
}

#[inline(always)]
fn verdict(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    if !RESERVED_PORTS.contains(&port) || is_agent() {
        return 1;
    }
    // SAFETY: helper allowed in cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if enrolled(netns).is_none() {
        return 1;
    }
    bump(Stat::BindRefused);
    warn!(ctx, "selvedge: refused bind of agent port {} by a process in an enrolled pod", port);
    0
}
