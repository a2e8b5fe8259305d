//! Policy, as pure functions over the agent's own types (../shared/docs/policy.md).
//!
//! # Layout
//! * `peer_auth.rs` — Istio `PeerAuthentication`: which inbound ports of a workload accept
//!   plaintext;
//! * `authz.rs` — Istio `AuthorizationPolicy` at L4: who may connect to which workload;
//! * `set.rs` — the compiled policies indexed by namespace, for deciding connections.

mod authz;
mod peer_auth;
mod set;

pub use authz::{
    applicable, authorize, decide, Action, AuthorizationPolicy, AuthzError, CompiledPolicy, ConnFacts, Decision, Scope,
    Verdict,
};
pub use peer_auth::{resolve_mtls, MtlsMode, PeerAuthError, PeerAuthentication, WorkloadMtls};
pub use set::PolicySet;
