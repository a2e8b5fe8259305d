//! Inbound capture, attached to each enrolled pod's netns: a TCP SYN that arrives from
//! outside the pod goes to the agent's 15006 listener, whatever port it was for. Port
//! 15008 (HBONE) keeps its normal lookup; STRICT pods drop plaintext here; with no agent
//! listener (agent down) the SYN is dropped, never delivered to the app directly.
//!
//! `sk_lookup` programs cannot call `bpf_get_netns_cookie`, so each pod gets its own
//! instance of this program with its slot set at load time ([`POD_SLOT`]); the slot indexes
//! the pod's flags and its listener. Enrollment itself stays keyed on the netns: the
//! program is attached to exactly that namespace.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
    Global,
};
use selvedge_common::{DeliveryKey, Stat, AF_INET6, HBONE_PORT, SLOT_ENROLLED, SLOT_STRICT};

use crate::maps::{bump, ctx_addr, ctx_u32, DELIVERING, INBOUND, IPPROTO_TCP, LOOPBACK_IFINDEX, SLOTS};

/// Did this SYN come from inside the pod (including the agent delivering to the app)?
///
/// Not just "ingress is lo": for a connection to the pod's *own* IP the kernel reports the
/// route's device (eth0) as the ingress interface (`orig_oif` of a local route). So: lo,
/// or a loopback source (the agent delivers from 127.0.0.6, as Istio does; a loopback
/// source arriving from outside is a martian and never gets this far), or, for IPv6,
/// source == destination.
#[inline(always)]
fn from_inside(lk: *mut aya_ebpf::bindings::bpf_sk_lookup) -> bool {
    if ctx_u32!(lk, ingress_ifindex) == LOOPBACK_IFINDEX {
        return true;
    }
    let family = ctx_u32!(lk, family);
    let remote = ctx_addr!(lk, family, remote_ip4, remote_ip6, 0);
    let local = ctx_addr!(lk, family, local_ip4, local_ip6, 0);
    remote.is_loopback() || (family == AF_INET6 && remote.ip == local.ip)
}

/// Is this the SYN of a delivery the agent registered (its socket bound to the client's
/// address, so by address it looks like a client from outside)?
#[inline(always)]
fn delivering(lk: *mut aya_ebpf::bindings::bpf_sk_lookup, slot: u32) -> bool {
    let family = ctx_u32!(lk, family);
    let key = DeliveryKey {
        slot,
        local_port: ctx_u32!(lk, local_port) as u16,
        _pad: 0,
        remote: ctx_addr!(lk, family, remote_ip4, remote_ip6, remote_port(lk)),
    };
    // SAFETY: a lookup in a map of plain-old-data values; a helper without arguments.
    unsafe { DELIVERING.get(&key).is_some_and(|deadline| aya_ebpf::helpers::bpf_ktime_get_ns() < *deadline) }
}

/// `remote_port` of `bpf_sk_lookup` is a `__be16`.
#[inline(always)]
fn remote_port(lk: *mut aya_ebpf::bindings::bpf_sk_lookup) -> u16 {
    // SAFETY: the context pointer is valid for the program's run; a fixed-offset field.
    u16::from_be(unsafe { core::ptr::read_volatile(&raw const (*lk).remote_port) })
}

/// This instance's pod slot; overridden by the agent when it loads the program per pod.
#[unsafe(no_mangle)]
static SV_POD_SLOT: Global<u32> = Global::new(u32::MAX);

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    if ctx_u32!(lk, protocol) != IPPROTO_TCP || ctx_u32!(lk, local_port) == u32::from(HBONE_PORT) || from_inside(lk) {
        return SK_PASS;
    }
    let slot = SV_POD_SLOT.load();
    if delivering(lk, slot) {
        // The agent itself, connecting to the app from the client's address.
        return SK_PASS;
    }
    let flags = SLOTS.get(slot).copied().unwrap_or(0);
    if flags & SLOT_ENROLLED == 0 {
        // Attached means "this netns is meshed"; an unset slot means enrollment has not
        // finished (or failed): stay closed. Unenrolling detaches this program first.
        bump(Stat::InboundNoListener);
        return SK_DROP;
    }
    if flags & SLOT_STRICT != 0 {
        bump(Stat::InboundStrictDrop);
        return SK_DROP;
    }
    match INBOUND.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => {
            bump(Stat::InboundAssigned);
            SK_PASS
        }
        Err(_) => {
            bump(Stat::InboundNoListener);
            SK_DROP
        }
    }
}
