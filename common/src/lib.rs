//! The ABI between Selvedge's eBPF programs and its agent.
//!
//! Everything here is `#[repr(C)]`, fixed-size, free of `bool` and of hidden padding
//! (padding is an explicit field), and size-asserted at compile time. Pinned maps outlive
//! the agent, so a layout change must bump [`ABI_VERSION`]; the agent refuses to adopt
//! pins written under another version instead of misreading them.
//!
//! # Layout
//! * ports and map names: constants below;
//! * [`SockAddr`]: an IPv6-shaped address (IPv4 as `::ffff:a.b.c.d`) and a port;
//! * [`PodInfo`]: what the kernel knows about an enrolled pod, keyed by netns cookie;
//! * [`OrigDstKey`] / [`PairKey`]: keys of the original-destination and sockhash maps;
//! * [`Stat`]: indexes of the per-CPU counters the programs bump (append-only).
#![no_std]

/// Bumped whenever a pinned map's key or value layout changes.
pub const ABI_VERSION: u32 = 2;

/// Outbound capture listener, inside each enrolled pod's netns (127.0.0.1 and ::1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener, inside each enrolled pod's netns.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE (mTLS) listener; never redirected by `sk_lookup`.
pub const HBONE_PORT: u16 = 15008;
/// Ports a pod process may never bind: the agent owns them in every enrolled netns.
pub const RESERVED_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// `AF_INET` / `AF_INET6` as the kernel numbers them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Map names: the ELF symbol names and the file names under the pin directory
/// (at most 15 bytes: the kernel's object-name limit).
pub mod maps {
    /// netns cookie (u64) -> [`super::PodInfo`]. HASH; a full map is reported by the agent.
    pub const ENROLLED: &str = "SV_ENROLLED";
    /// socket cookie (u64) -> [`super::SockAddr`]: the address an app dialled, for `getpeername`.
    pub const ORIG_BY_COOKIE: &str = "SV_ORIG_COOKIE";
    /// [`super::OrigDstKey`] -> [`super::SockAddr`]: what the agent reads back on accept.
    pub const ORIG_DST: &str = "SV_ORIG_DST";
    /// pod id (u32) -> the agent's inbound (15006) listener in that pod. SOCKMAP.
    pub const INBOUND_LISTENERS: &str = "SV_INBOUND";
    /// [`super::PairKey`] -> socket, both ends of app<->agent loopback legs. SOCKHASH.
    pub const PAIRS: &str = "SV_PAIRS";
    /// [`super::PairKey`] -> u32: sockets that ever sent over plain TCP (fast path off for them).
    pub const FALLBACK: &str = "SV_FALLBACK";
    /// pod slot (u32) -> [`super::SLOT_ENROLLED`] | [`super::SLOT_STRICT`]: what a pod's own
    /// `sk_lookup` instance reads (that program type cannot read the netns cookie). ARRAY.
    pub const SLOTS: &str = "SV_SLOTS";
    /// u32 index -> u64 settings, see [`super::Setting`]. ARRAY.
    pub const SETTINGS: &str = "SV_SETTINGS";
    /// [`super::VerdictKey`] -> u32 ([`super::VERDICT_DENY`]): connects the source agent
    /// already knows the destination will refuse; refused in `connect4/6` with EPERM.
    /// LRU; cleared by the agent on every policy or workload change.
    pub const VERDICTS: &str = "SV_VERDICTS";
    /// u32 index -> u64 per-CPU counters, see [`super::Stat`]. PERCPU_ARRAY.
    pub const STATS: &str = "SV_STATS";
    /// netns cookie (u64) -> [`super::SockAddr`] (port 0): an enrolled pod's own IPv4
    /// address, what `getsockname()` tells an app its captured connection is from. HASH.
    pub const POD_ADDR: &str = "SV_POD_ADDR";
    /// [`super::DeliveryKey`] -> u64 deadline (CLOCK_MONOTONIC ns): connects the agent is
    /// making, inside a pod, to one of its apps from the client's own address; the pod's
    /// `sk_lookup` lets their SYNs through to the app instead of steering them back to the
    /// agent, until the deadline. LRU HASH; the agent removes an entry when its connect is
    /// over (or abandoned) and empties the map at start, and the deadline makes any entry
    /// left behind (an agent killed mid-connect) inert within seconds.
    pub const DELIVERING: &str = "SV_DELIVERING";
}

/// Capacity of the maps, shared so user space can report occupancy against it.
pub mod capacity {
    pub const ENROLLED: u32 = 4096;
    pub const ORIG: u32 = 65536;
    pub const PAIRS: u32 = 65536;
    pub const VERDICTS: u32 = 65536;
    pub const INBOUND_LISTENERS: u32 = 4096;
    /// Deliveries whose handshake is in flight on the node at once.
    pub const DELIVERING: u32 = 16384;
}

/// Indexes into the SETTINGS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// 1 = the sockmap fast path is on.
    FastPath = 0,
    /// cgroup v2 id of the agent itself: its sockets are never captured.
    AgentCgroup = 1,
    /// [`ABI_VERSION`] of whoever created the pinned maps.
    AbiVersion = 2,
}
pub const SETTINGS_LEN: u32 = 4;

/// Counters the programs bump; reasons are append-only (dashboards key on them).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect() redirected to the outbound listener.
    Captured = 0,
    /// connect() from an enrolled pod refused because its original destination map was full.
    OrigMapFull = 1,
    /// inbound SYN assigned to the agent's 15006 listener.
    InboundAssigned = 2,
    /// inbound SYN dropped: the pod is STRICT.
    InboundStrictDrop = 3,
    /// inbound SYN dropped: no agent listener (agent down or restarting).
    InboundNoListener = 4,
    /// bind() of a reserved port refused.
    BindRefused = 5,
    /// sk_msg sends redirected to the peer socket.
    FastPathHit = 6,
    /// sk_msg sends that went over plain TCP.
    FastPathMiss = 7,
    /// connect() refused at once: a cached policy verdict says the destination denies it.
    PolicyRefused = 8,
}
pub const STATS_LEN: u32 = 9;

/// A [`maps::VERDICTS`] value.
pub const VERDICT_DENY: u32 = 1;

/// Key of a cached verdict: the source pod (netns cookie) and the address it dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct VerdictKey {
    pub netns_cookie: u64,
    pub dst: SockAddr,
    pub _pad: u32,
}

/// A delivery in flight: the pod (its slot), the app's port, and the address the agent's
/// socket is bound to (the client's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct DeliveryKey {
    pub slot: u32,
    /// The app's port, host order.
    pub local_port: u16,
    pub _pad: u16,
    pub remote: SockAddr,
}

/// Bits of [`PodInfo::flags`].
pub const POD_FLAG_STRICT: u32 = 1;

/// Bits of a [`maps::SLOTS`] entry.
pub const SLOT_ENROLLED: u32 = 1;
pub const SLOT_STRICT: u32 = 2;

/// Name of the load-time constant that tells a pod's `sk_lookup` instance its slot.
pub const POD_SLOT_GLOBAL: &str = "SV_POD_SLOT";

/// What the kernel knows of an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// Index of the pod's inbound listener in [`maps::INBOUND_LISTENERS`].
    pub pod_id: u32,
    /// [`POD_FLAG_STRICT`], …
    pub flags: u32,
}

/// An address in IPv6 shape: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
/// `ip` holds the 16 address bytes as four `u32` words in network byte order, exactly as
/// the kernel's `user_ip6` / `local_ip6` fields do; `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 2],
}

impl SockAddr {
    /// From an IPv4 address as the kernel hands it over (network order in a `u32`).
    pub const fn from_v4_raw(ip_be: u32, port: u16) -> Self {
        Self { ip: [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip_be], port, _pad: [0; 2] }
    }

    /// From the kernel's four IPv6 words.
    pub const fn from_v6_raw(ip: [u32; 4], port: u16) -> Self {
        Self { ip, port, _pad: [0; 2] }
    }

    /// The IPv4 address (network order `u32`) if this is IPv4-mapped.
    pub const fn v4_raw(&self) -> Option<u32> {
        if self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            Some(self.ip[3])
        } else {
            None
        }
    }

    /// True for 127.0.0.0/8 (mapped) and ::1.
    pub const fn is_loopback(&self) -> bool {
        match self.v4_raw() {
            Some(v4) => v4.to_ne_bytes()[0] == 127,
            None => {
                self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0 && self.ip[3] == u32::from_ne_bytes([0, 0, 0, 1])
            }
        }
    }
}

/// Key under which the agent finds a captured connection's original destination:
/// the app's end of the app->agent loopback connection, in the pod's netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    pub app: SockAddr,
    pub _pad: u32,
}

/// Key of one socket in the [`maps::PAIRS`] sockhash: its netns and both ends, seen from
/// that socket. The peer of `k` is `k.reversed()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PairKey {
    pub netns_cookie: u64,
    pub local: SockAddr,
    pub remote: SockAddr,
}

impl PairKey {
    pub const fn reversed(&self) -> Self {
        Self { netns_cookie: self.netns_cookie, local: self.remote, remote: self.local }
    }
}

// The ABI: sizes are fixed; a change here must bump ABI_VERSION.
const _: () = assert!(core::mem::size_of::<PodInfo>() == 8);
const _: () = assert!(core::mem::size_of::<SockAddr>() == 20);
const _: () = assert!(core::mem::size_of::<OrigDstKey>() == 32);
const _: () = assert!(core::mem::size_of::<PairKey>() == 48);
const _: () = assert!(core::mem::size_of::<VerdictKey>() == 32);
const _: () = assert!(core::mem::size_of::<DeliveryKey>() == 28);

#[cfg(feature = "user")]
mod user {
    // SAFETY (all six): plain-old-data, `#[repr(C)]`, every bit pattern valid, and no
    // implicit padding (the size asserts above match the sum of the fields).
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::PairKey {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::DeliveryKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let raw = u32::from_ne_bytes([198, 18, 1, 2]);
        let a = SockAddr::from_v4_raw(raw, 8080);
        assert_eq!(a.v4_raw(), Some(raw));
        assert!(!a.is_loopback());
        assert!(SockAddr::from_v4_raw(u32::from_ne_bytes([127, 0, 0, 1]), 1).is_loopback());
        let v6_lo = SockAddr::from_v6_raw([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])], 1);
        assert!(v6_lo.is_loopback());
        assert_eq!(v6_lo.v4_raw(), None);
    }

    #[test]
    fn pair_reversal_swaps_ends() {
        let k = PairKey { netns_cookie: 7, local: SockAddr::from_v4_raw(1, 2), remote: SockAddr::from_v4_raw(3, 4) };
        assert_eq!(k.reversed().local, k.remote);
        assert_eq!(k.reversed().reversed(), k);
    }
}
