//! Policy, as pure functions over the agent's own types (../shared/docs/policy.md).
//!
//! # Layout
//! * `peer_auth.rs` — Istio `PeerAuthentication`: which inbound ports of a workload accept
//!   plaintext.

mod peer_auth;

pub use peer_auth::{resolve_mtls, MtlsMode, PeerAuthError, PeerAuthentication, WorkloadMtls};
