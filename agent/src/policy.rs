//! Policy, as pure functions over the agent's own types (docs/policy.md).
//!
//! # Layout
//! * `peer_auth.rs` — Istio `PeerAuthentication`: which inbound ports of a workload accept
//!   plaintext;
//! * `authz.rs` — Istio `AuthorizationPolicy` at L4: who may connect to which workload;
//! * `set.rs` — the compiled policies indexed by namespace: `PolicySet::decide` is the one
//!   entry point every connection's decision goes through.

mod authz;
mod peer_auth;
mod set;

pub use authz::{Action, AuthorizationPolicy, AuthzError, CompiledPolicy, ConnFacts, Decision, Scope, Verdict};
pub use peer_auth::{resolve_mtls, MtlsMode, PeerAuthError, PeerAuthentication, WorkloadMtls};
pub use set::{Applicable, PolicySet};
