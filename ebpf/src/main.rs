//! Selvedge's kernel programs.
//!
//! # Layout
//! * `maps.rs`    — every map (pinned by name, so a restarted agent re-adopts them) and the
//!   small helpers the programs share: enrollment lookup, settings, counters;
//! * `connect.rs` — `cgroup/connect4|6` (outbound capture) and `cgroup/getpeername4|6`;
//! * `bind.rs`    — `cgroup/bind4|6`: pods cannot bind the agent's ports;
//! * `sockops.rs` — records where a captured connect was going, fills the sockhash;
//! * `skmsg.rs`   — loopback fast path between an app and the agent;
//! * `lookup.rs`  — `sk_lookup`: inbound SYNs to the agent's 15006 listener, STRICT drops.
//!
//! Entry points stay a few lines; anything that could live in user space does.
#![no_std]
#![no_main]

mod bind;
mod connect;
mod lookup;
mod maps;
mod skmsg;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
