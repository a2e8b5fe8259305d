//! What Istio's telemetry says of a workload and of a service (pure): the owning workload's
//! name, its canonical service and revision (from its labels, the way istiod derives them),
//! and a service's names. Worked out once per config change, shared by every connection's
//! labels.

use std::collections::BTreeMap;

/// Istio's workload labels of one workload (`source_*` / `destination_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// The owning workload: a Deployment's, StatefulSet's, DaemonSet's, Job's… name; the
    /// pod's own name for a bare pod.
    pub workload: String,
    pub namespace: String,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else
    /// the workload's name. Also `*_app`, as ztunnel reports it.
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else
    /// `version`, else `latest`. Also `*_version`.
    pub canonical_revision: String,
    /// Its cluster when another one's (a peer's `baggage` says so); None: this agent's.
    pub cluster: Option<String>,
}

pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

impl WorkloadMeta {
    pub fn of(workload: &str, namespace: &str, labels: &BTreeMap<String, String>) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).filter(|v| !v.is_empty())).cloned();
        WorkloadMeta {
            workload: workload.to_owned(),
            namespace: namespace.to_owned(),
            canonical_service: first(&[CANONICAL_NAME, "app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| workload.to_owned()),
            canonical_revision: first(&[CANONICAL_REVISION, "app.kubernetes.io/version", "version"])
                .unwrap_or_else(|| "latest".to_owned()),
            cluster: None,
        }
    }
}

/// A service as Istio's `destination_service*` labels name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    /// `name.namespace.svc.cluster.local` (`destination_service`).
    pub fqdn: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    pub fn new(name: &str, namespace: &str) -> Self {
        ServiceName {
            fqdn: format!("{name}.{namespace}.svc.cluster.local"),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }
}

impl std::fmt::Display for ServiceName {
    /// `namespace/name`, as logs name it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn canonical_names_follow_istios_order_of_labels() {
        let m = WorkloadMeta::of("reviews-v2", "shop", &labels(&[]));
        assert_eq!((m.canonical_service.as_str(), m.canonical_revision.as_str()), ("reviews-v2", "latest"));
        let m = WorkloadMeta::of("reviews-v2", "shop", &labels(&[("app", "reviews"), ("version", "v2")]));
        assert_eq!((m.canonical_service.as_str(), m.canonical_revision.as_str()), ("reviews", "v2"));
        let m = WorkloadMeta::of(
            "reviews-v2",
            "shop",
            &labels(&[
                ("app", "reviews"),
                ("app.kubernetes.io/name", "reviews-k8s"),
                ("version", "v2"),
                ("app.kubernetes.io/version", "2.0"),
            ]),
        );
        assert_eq!((m.canonical_service.as_str(), m.canonical_revision.as_str()), ("reviews-k8s", "2.0"));
        let m = WorkloadMeta::of(
            "reviews-v2",
            "shop",
            &labels(&[(CANONICAL_NAME, "rev"), (CANONICAL_REVISION, "canary"), ("app", "reviews"), ("version", "")]),
        );
        assert_eq!((m.canonical_service.as_str(), m.canonical_revision.as_str()), ("rev", "canary"));
        assert_eq!(ServiceName::new("db", "shop").fqdn, "db.shop.svc.cluster.local");
        assert_eq!(ServiceName::new("db", "shop").to_string(), "shop/db");
    }
}
