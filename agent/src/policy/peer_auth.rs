//! `PeerAuthentication` (security.istio.io/v1), resolved per workload and port.
//!
//! The most specific policy wins: a policy whose selector matches the workload, then the
//! workload's namespace-wide policy, then the root namespace's; `UNSET` inherits from the
//! next level; `portLevelMtls` (selector policies only) overrides per target port; the
//! default is PERMISSIVE; `DISABLE` means PERMISSIVE (agents always speak mTLS).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Permissive,
    Strict,
    Disable,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

/// One `PeerAuthentication` document (`apiVersion`/`kind` may be present and are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    #[error("PeerAuthentication {namespace}/{name}: {problem}")]
    Invalid { namespace: String, name: String, problem: String },
}

impl PeerAuthentication {
    pub fn validate(&self) -> Result<(), PeerAuthError> {
        let bad = |problem: String| PeerAuthError::Invalid {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            problem,
        };
        if self.metadata.name.is_empty() || self.metadata.namespace.is_empty() {
            return Err(bad("metadata.name and metadata.namespace are required".into()));
        }
        if !self.spec.port_level_mtls.is_empty() && self.spec.selector.is_none() {
            return Err(bad("spec.portLevelMtls needs spec.selector (it applies to selected workloads only)".into()));
        }
        for port in self.spec.port_level_mtls.keys() {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad(format!("spec.portLevelMtls key {port:?} is not a port number"))),
            }
        }
        Ok(())
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec.selector.as_ref().is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    fn mode(&self) -> MtlsMode {
        self.spec.mtls.map(|m| m.mode).unwrap_or_default()
    }
}

/// The resolved inbound plaintext rule for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadMtls {
    /// Whether plaintext is refused on ports without their own rule.
    pub strict: bool,
    /// Ports whose rule differs from `strict`.
    pub ports: BTreeMap<u16, bool>,
    /// The workload's probe ports (`config::Workload::probe_ports`): plaintext from the
    /// node to them is admitted whatever the rule.
    pub probe_ports: BTreeSet<u16>,
}

impl WorkloadMtls {
    pub fn strict_for(&self, port: u16) -> bool {
        self.ports.get(&port).copied().unwrap_or(self.strict)
    }

    /// The kernel can only drop per pod: it does so when *every* port is STRICT and none
    /// is a probe port. Otherwise the kernel passes plaintext and the agent refuses it per
    /// port (admitting the node's probes).
    pub fn kernel_strict(&self) -> bool {
        self.strict && self.ports.values().all(|s| *s) && self.probe_ports.is_empty()
    }

    /// Is `port` one of the workload's probe ports?
    pub fn probe_port(&self, port: u16) -> bool {
        self.probe_ports.contains(&port)
    }
}

/// Effective PERMISSIVE/STRICT for a workload in `namespace` with `labels`.
pub fn resolve_mtls(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> WorkloadMtls {
    // Among several matches Istio picks the oldest; with no timestamps here, the first by
    // name, which is at least deterministic.
    let pick = |f: &dyn Fn(&PeerAuthentication) -> bool| {
        policies.iter().filter(|p| f(p)).min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
    };
    let workload = pick(&|p| p.metadata.namespace == namespace && p.selects(labels));
    let ns = pick(&|p| p.metadata.namespace == namespace && p.spec.selector.is_none());
    let root = pick(&|p| p.metadata.namespace == root_namespace && p.spec.selector.is_none());
    let inherited = [workload, ns, root].into_iter().flatten().map(|p| p.mode()).find(|m| *m != MtlsMode::Unset);
    let strict = inherited == Some(MtlsMode::Strict);
    let mut ports = BTreeMap::new();
    if let Some(w) = workload {
        for (port, m) in &w.spec.port_level_mtls {
            let Ok(port) = port.parse::<u16>() else { continue };
            let s = match m.mode {
                MtlsMode::Unset => strict,
                MtlsMode::Strict => true,
                MtlsMode::Permissive | MtlsMode::Disable => false,
            };
            if s != strict {
                ports.insert(port, s);
            }
        }
    }
    WorkloadMtls { strict, ports, probe_ports: BTreeSet::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, name: &str, yaml_spec: &str) -> PeerAuthentication {
        let doc = format!("metadata: {{name: {name}, namespace: {ns}}}\nspec: {yaml_spec}");
        let p: PeerAuthentication = serde_yaml_ng::from_str(&doc).unwrap();
        p.validate().unwrap();
        p
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    #[test]
    fn default_is_permissive() {
        let m = resolve_mtls(&[], "istio-system", "shop", &labels("db"));
        assert!(!m.strict && !m.kernel_strict());
    }

    #[test]
    fn most_specific_wins_and_unset_inherits() {
        let root = pa("istio-system", "default", "{mtls: {mode: STRICT}}");
        let ns = pa("shop", "default", "{mtls: {mode: PERMISSIVE}}");
        let wl = pa("shop", "db", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}");
        let unset = pa("shop", "web", "{selector: {matchLabels: {app: web}}, mtls: {mode: UNSET}}");
        let all = [root.clone(), ns.clone(), wl, unset];
        assert!(resolve_mtls(&all, "istio-system", "shop", &labels("db")).strict, "workload > namespace");
        assert!(!resolve_mtls(&all, "istio-system", "shop", &labels("web")).strict, "UNSET inherits the namespace's");
        assert!(!resolve_mtls(&all, "istio-system", "shop", &labels("cache")).strict, "namespace > root");
        assert!(
            resolve_mtls(std::slice::from_ref(&root), "istio-system", "other", &labels("x")).strict,
            "root applies mesh-wide"
        );
        let disable = pa("other", "default", "{mtls: {mode: DISABLE}}");
        assert!(!resolve_mtls(&[root, disable], "istio-system", "other", &labels("x")).strict, "DISABLE is PERMISSIVE");
    }

    #[test]
    fn port_level_overrides_and_the_kernel_only_drops_all_strict_pods() {
        let p = pa(
            "shop",
            "db",
            "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}, portLevelMtls: {\"9090\": {mode: PERMISSIVE}}}",
        );
        let m = resolve_mtls(&[p], "istio-system", "shop", &labels("db"));
        assert!(m.strict_for(5432) && !m.strict_for(9090));
        assert!(!m.kernel_strict(), "one plaintext port: the agent, not the kernel, refuses the others");
        let q = pa("shop", "db", "{selector: {matchLabels: {app: db}}, portLevelMtls: {\"5432\": {mode: STRICT}}}");
        let m = resolve_mtls(&[q], "istio-system", "shop", &labels("db"));
        assert!(m.strict_for(5432) && !m.strict_for(80) && !m.kernel_strict());
    }

    #[test]
    fn a_probe_port_keeps_the_kernel_from_dropping_a_strict_pods_plaintext() {
        let p = pa("shop", "db", "{mtls: {mode: STRICT}}");
        let mut m = resolve_mtls(&[p], "istio-system", "shop", &labels("db"));
        assert!(m.kernel_strict() && !m.probe_port(8080));
        m.probe_ports.insert(8080);
        assert!(m.probe_port(8080) && m.strict_for(8080), "still STRICT; only the node's probes pass");
        assert!(!m.kernel_strict(), "the agent must see plaintext to admit the node's probes");
    }

    #[test]
    fn invalid_documents_are_rejected_with_the_field() {
        let no_selector: PeerAuthentication = serde_yaml_ng::from_str(
            "metadata: {name: x, namespace: shop}\nspec: {portLevelMtls: {\"80\": {mode: STRICT}}}",
        )
        .unwrap();
        assert!(no_selector.validate().unwrap_err().to_string().contains("portLevelMtls needs spec.selector"));
        let bad_port: PeerAuthentication = serde_yaml_ng::from_str(
            "metadata: {name: x, namespace: shop}\nspec: {selector: {}, portLevelMtls: {http: {mode: STRICT}}}",
        )
        .unwrap();
        assert!(bad_port.validate().unwrap_err().to_string().contains("\"http\""));
        let bad_mode = serde_yaml_ng::from_str::<PeerAuthentication>(
            "metadata: {name: x, namespace: shop}\nspec: {mtls: {mode: SOMETIMES}}",
        );
        assert!(bad_mode.is_err());
    }
}
