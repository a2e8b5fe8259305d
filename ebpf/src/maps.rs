//! Maps and shared helpers. Names, key/value types and capacities come from
//! `selvedge-common`, the ABI the agent reads with.

use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use selvedge_common::{
    capacity, DeliveryKey, OrigDstKey, PairKey, PodInfo, Setting, SockAddr, Stat, VerdictKey, SETTINGS_LEN, STATS_LEN,
};

#[map(name = "SV_ENROLLED")]
pub static ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(capacity::ENROLLED, 0);

#[map(name = "SV_ORIG_COOKIE")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(capacity::ORIG, 0);

#[map(name = "SV_ORIG_DST")]
pub static ORIG_DST: LruHashMap<OrigDstKey, SockAddr> = LruHashMap::pinned(capacity::ORIG, 0);

#[map(name = "SV_INBOUND")]
pub static INBOUND: SockMap = SockMap::pinned(capacity::INBOUND_LISTENERS, 0);

#[map(name = "SV_PAIRS")]
pub static PAIRS: SockHash<PairKey> = SockHash::pinned(capacity::PAIRS, 0);

#[map(name = "SV_FALLBACK")]
pub static FALLBACK: LruHashMap<PairKey, u32> = LruHashMap::pinned(capacity::PAIRS, 0);

#[map(name = "SV_SLOTS")]
pub static SLOTS: Array<u32> = Array::pinned(capacity::INBOUND_LISTENERS, 0);

#[map(name = "SV_VERDICTS")]
pub static VERDICTS: LruHashMap<VerdictKey, u32> = LruHashMap::pinned(capacity::VERDICTS, 0);

#[map(name = "SV_SETTINGS")]
pub static SETTINGS: Array<u64> = Array::pinned(SETTINGS_LEN, 0);

#[map(name = "SV_POD_ADDR")]
pub static POD_ADDR: HashMap<u64, SockAddr> = HashMap::pinned(capacity::ENROLLED, 0);

#[map(name = "SV_DELIVERING")]
pub static DELIVERING: LruHashMap<DeliveryKey, u64> = LruHashMap::pinned(capacity::DELIVERING, 0);

#[map(name = "SV_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

pub const IPPROTO_TCP: u32 = 6;
/// `LOOPBACK_IFINDEX`: `lo` is interface 1 in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn setting(s: Setting) -> u64 {
    SETTINGS.get(s as u32).copied().unwrap_or(0)
}

/// True when the calling task is the agent itself (its sockets are never captured).
#[inline(always)]
pub fn is_agent() -> bool {
    let agent = setting(Setting::AgentCgroup);
    // SAFETY: helper without arguments, allowed in cgroup sock_addr programs.
    agent != 0 && unsafe { bpf_get_current_cgroup_id() } == agent
}

#[inline(always)]
pub fn enrolled(netns_cookie: u64) -> Option<PodInfo> {
    // SAFETY: plain-old-data copied out of the map.
    unsafe { ENROLLED.get(&netns_cookie).copied() }
}

/// The kernel's `remote_port` in `bpf_sock_ops` / `sk_msg_md` is the network-order port,
/// shifted into the upper half of the u32 on little-endian hosts (a historical quirk kept
/// for ABI compatibility). Accept both placements: a real port is never 0.
#[inline(always)]
pub fn remote_port_host(raw: u32) -> u16 {
    let be = if raw & 0xffff == 0 { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be)
}

/// An address read out of a program context, in the ABI's IPv6 shape.
///
/// The verifier only accepts context loads of the form `*(u32 *)(ctx + const)`. Copying a
/// `[u32; 4]` field, or loading one field or another depending on the family, lets LLVM
/// compute `ctx + off` into a register first ("dereference of modified ctx ptr"). So every
/// word is read unconditionally with its own volatile load (volatile loads are never
/// merged or sunk into branches) and only the *values* are chosen by family.
macro_rules! ctx_addr {
    ($ctx:expr, $family:expr, $ip4:ident, $ip6:ident, $port:expr) => {{
        let ctx = $ctx;
        let port: u16 = $port;
        let v4 = $crate::maps::ctx_u32!(ctx, $ip4);
        let v6 = $crate::maps::ctx_ip6!(ctx, $ip6);
        if $family == selvedge_common::AF_INET {
            selvedge_common::SockAddr::from_v4_raw(v4, port)
        } else {
            selvedge_common::SockAddr::from_v6_raw(v6, port)
        }
    }};
}
pub(crate) use ctx_addr;

/// The four words of an IPv6 context field, each a fixed-offset load.
macro_rules! ctx_ip6 {
    ($ctx:expr, $field:ident) => {{
        let ctx = $ctx;
        // SAFETY: `ctx` is the program's context pointer; each load is a fixed-offset field.
        unsafe {
            [
                core::ptr::read_volatile(&raw const (*ctx).$field[0]),
                core::ptr::read_volatile(&raw const (*ctx).$field[1]),
                core::ptr::read_volatile(&raw const (*ctx).$field[2]),
                core::ptr::read_volatile(&raw const (*ctx).$field[3]),
            ]
        }
    }};
}
pub(crate) use ctx_ip6;

/// Store four IPv6 words into a context field, one fixed-offset store each (an array
/// assignment would become a byte-wise memcpy into the context, which the verifier rejects).
macro_rules! ctx_set_ip6 {
    ($ctx:expr, $field:ident, $words:expr) => {{
        let ctx = $ctx;
        let w: [u32; 4] = $words;
        // SAFETY: `ctx` is the program's context pointer; each store is a fixed-offset field.
        unsafe {
            core::ptr::write_volatile(&raw mut (*ctx).$field[0], w[0]);
            core::ptr::write_volatile(&raw mut (*ctx).$field[1], w[1]);
            core::ptr::write_volatile(&raw mut (*ctx).$field[2], w[2]);
            core::ptr::write_volatile(&raw mut (*ctx).$field[3], w[3]);
        }
    }};
}
pub(crate) use ctx_set_ip6;

/// One `u32` context field as a single fixed-offset load (see [`ctx_addr`]).
macro_rules! ctx_u32 {
    ($ctx:expr, $field:ident) => {{
        // SAFETY: `$ctx` is the program's context pointer.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx).$field) }
    }};
}
pub(crate) use ctx_u32;
