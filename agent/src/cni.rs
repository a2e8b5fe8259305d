//! Race-free enrollment: the chained CNI plugin `selvedge-cni` and the agent's side of it.
//!
//! * `protocol.rs` — what the plugin and the agent say to each other over the unix socket;
//! * `plugin.rs`   — the plugin binary: CNI spec 1.0 ADD, DEL, CHECK, VERSION, and `install`;
//! * `server.rs`   — the agent's socket: requests handed to the run loop, answers back;
//! * `install.rs`  — `selvedge-cni install`: binary, kubeconfig, chained conf;
//! * `registry.rs` — pod uid → network namespace, persisted in the state directory.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod server;
