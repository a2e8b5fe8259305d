//! SPIFFE IDs in the shape Istio uses: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.

use std::{fmt, str::FromStr, sync::Arc};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE ID {id:?}: {problem}")]
    Invalid { id: String, problem: &'static str },
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// Istio's principal form, made once: every connection authorized under this identity
    /// shares it (a policy watcher keeps one per open connection).
    principal: Arc<str>,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Build one, validating each part as the parser would.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }
}

impl SpiffeId {
    /// Istio's principal form: the ID without the scheme (`td/ns/x/sa/y`), shared.
    pub fn principal(&self) -> Arc<str> {
        self.principal.clone()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal)
    }
}

/// Trust domain: lowercase letters, digits, `.`, `-`, `_` (SPIFFE ID spec §2.1).
fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// Path segment: letters, digits, `.`, `-`, `_`; not `.` or `..` (SPIFFE ID spec §2.2).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let bad = |problem| SpiffeError::Invalid { id: id.to_string(), problem };
        if id.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = id.strip_prefix(SCHEME).ok_or_else(|| bad("does not start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("has no path"))?;
        if !valid_trust_domain(td) {
            return Err(bad("trust domain must be lowercase letters, digits, '.', '-' or '_'"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_kw, ns, sa_kw, sa] = parts.as_slice() else {
            return Err(bad("path must be /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_kw != "ns" || *sa_kw != "sa" {
            return Err(bad("path must be /ns/<namespace>/sa/<service-account>"));
        }
        if !valid_segment(ns) || !valid_segment(sa) {
            return Err(bad("namespace and service account must be letters, digits, '.', '-' or '_'"));
        }
        Ok(Self {
            trust_domain: td.into(),
            namespace: (*ns).into(),
            service_account: (*sa).into(),
            principal: rest.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web-0".parse().unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "web-0");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web-0");
        assert_eq!(&*id.principal(), "cluster.local/ns/shop/sa/web-0");
        assert_eq!(SpiffeId::new("td", "ns", "sa").unwrap().to_string(), "spiffe://td/ns/ns/sa/sa");
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td",
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/namespace/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a b/sa/b",
            "spiffe://td:8080/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} must be rejected");
        }
        let e = "spiffe://td/x".parse::<SpiffeId>().unwrap_err();
        assert!(e.to_string().contains("/ns/"), "{e}");
    }
}
