//! Selvedge node agent.
//!
//! # Layout
//! * [`config`]   — the local config file and the resolved settings (pure);
//! * [`state`]    — desired enrollment and the plan towards it (pure);
//! * [`addr`]     — std addresses <-> the kernel ABI's address form (pure);
//! * [`sys`]      — cgroup v2, netns cookies, `setns`;
//! * [`tuning`]   — the one restart that sets glibc's copy tunable (why: the module);
//! * [`datapath`] — eBPF load/attach/pin and maps: the only module that imports aya;
//! * [`inpod`]    — one thread per pod netns that creates the agent's sockets there;
//! * [`proxy`]    — outbound (15001) and inbound (15006) proxying and the access log;
//! * [`app`]      — wires all of the above; the run loop, reloads and shutdown.

pub mod accept;
pub mod addr;
pub mod app;
pub mod cancel;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod k8s;
pub mod limits;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod publish;
pub mod state;
pub mod sys;
pub mod tls;
pub mod tuning;
