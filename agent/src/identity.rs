//! Workload identity: SPIFFE IDs, the certificate authorities that issue X.509-SVIDs, and
//! the per-service-account certificates the agent keeps current.
//!
//! # Layout
//! * `spiffe.rs` — [`SpiffeId`]: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`;
//! * `ca.rs`     — the built-in CA (`selvedge ca init`) and SVID issuance;
//! * `files.rs`  — certificates from watched files (SPIRE, cert-manager);
//! * `istio_ca.rs` — certificates from the Istio CA API (`IstioCertificateService`);
//! * `svid.rs`   — [`Svid`]: a certificate chain and its private key, parsed once;
//! * `manager.rs`— one SVID per service account on the node, renewed at half-life, kept
//!   while renewal fails, dropped at expiry (traffic is then refused, never sent plain).

mod ca;
mod files;
mod istio_ca;
mod manager;
mod spiffe;
mod svid;

pub use ca::{svid_params, BuiltinCa, CaError};
pub use files::FilesSource;
pub use istio_ca::{
    frame, unframe, IstioCaConfig, IstioCaSource, IstioCertificateRequest, IstioCertificateResponse,
    IMPERSONATED_IDENTITY, PATH as ISTIO_CA_PATH,
};
pub use manager::{
    key_der, new_key, BuiltinSource, CertSource, CertStatus, IdentityError, IdentityManager, IssueFuture, Issued,
};

pub use spiffe::{SpiffeError, SpiffeId};
pub use svid::{identity_of, identity_valid_at, Svid, SvidError};
