//! Maps and shared helpers. Names, key/value types and capacities come from
//! `selvedge-common`, the ABI the agent reads with.

use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use selvedge_common::{capacity, OrigDstKey, PairKey, PodInfo, Setting, SockAddr, Stat, SETTINGS_LEN, STATS_LEN};

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

#[map(name = "SV_SETTINGS")]
pub static SETTINGS: Array<u64> = Array::pinned(SETTINGS_LEN, 0);

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

/// An address from a context's family + v4/v6 fields, in the ABI's IPv6 shape.
#[inline(always)]
pub fn sock_addr(family: u32, ip4: u32, ip6: [u32; 4], port: u16) -> SockAddr {
    if family == selvedge_common::AF_INET {
        SockAddr::from_v4_raw(ip4, port)
    } else {
        SockAddr::from_v6_raw(ip6, port)
    }
}
