//! The compiled AuthorizationPolicies of the mesh, indexed by the namespace they apply in,
//! so deciding a connection looks only at the policies that can select its workload.

use std::collections::{BTreeMap, HashMap};

use super::authz::{decide, CompiledPolicy, ConnFacts, Scope, Verdict};

/// Every compiled policy, in the order it was given, with an index by namespace.
#[derive(Debug, Default)]
pub struct PolicySet {
    all: Vec<CompiledPolicy>,
    /// Positions in `all` of the root namespace's policies without a selector (every
    /// workload).
    mesh_wide: Vec<usize>,
    /// Positions in `all` of the policies that apply within one namespace.
    by_namespace: HashMap<String, Vec<usize>>,
}

impl PolicySet {
    pub fn new(all: Vec<CompiledPolicy>) -> Self {
        let mut set = PolicySet { mesh_wide: Vec::new(), by_namespace: HashMap::new(), all: Vec::new() };
        for (i, p) in all.iter().enumerate() {
            match &p.scope {
                Scope::Mesh => set.mesh_wide.push(i),
                Scope::Namespace(ns) | Scope::Selector { namespace: ns, .. } => {
                    set.by_namespace.entry(ns.clone()).or_default().push(i);
                }
                Scope::NotApplicable => {}
            }
        }
        set.all = all;
        set
    }

    /// The decision for a connection `c` to a workload in `namespace` with `labels`: the
    /// one entry point of every authorization decision (source, destination, recheck).
    pub fn decide(&self, namespace: &str, labels: &BTreeMap<String, String>, c: &ConnFacts) -> Verdict {
        self.for_workload(namespace, labels).decide(c)
    }

    /// The policies that apply to one workload, selected once, to decide many of its
    /// connections (a recheck after a policy change).
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Applicable<'_> {
        Applicable(self.applicable(namespace, labels))
    }

    /// The policies that apply to a workload in `namespace` with `labels`, in the set's
    /// order (what a scan of every policy would select), without reading the other
    /// namespaces' policies.
    fn applicable(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<&CompiledPolicy> {
        let local = self.by_namespace.get(namespace).map_or(&[][..], Vec::as_slice);
        let mesh = &self.mesh_wide[..];
        // Both lists ascend: merge them to keep the set's order (which DENY policy is named
        // first, the order of dry-run and AUDIT reports).
        let (mut a, mut b) = (0, 0);
        let mut out = Vec::new();
        while a < mesh.len() || b < local.len() {
            let i = if b == local.len() || (a < mesh.len() && mesh[a] < local[b]) {
                a += 1;
                mesh[a - 1]
            } else {
                b += 1;
                local[b - 1]
            };
            let p = &self.all[i];
            if p.selects(namespace, labels) {
                out.push(p);
            }
        }
        out
    }
}

/// The policies that apply to one workload ([`PolicySet::for_workload`]).
#[derive(Debug)]
pub struct Applicable<'a>(Vec<&'a CompiledPolicy>);

impl Applicable<'_> {
    pub fn decide(&self, c: &ConnFacts) -> Verdict {
        decide(&self.0, c)
    }
}

impl std::ops::Deref for PolicySet {
    type Target = [CompiledPolicy];

    fn deref(&self) -> &[CompiledPolicy] {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::AuthorizationPolicy;

    fn policy(ns: &str, name: &str, spec: &str) -> CompiledPolicy {
        let doc = format!("metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}");
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(&doc).unwrap();
        p.compile("istio-system").unwrap()
    }

    #[test]
    fn the_index_selects_what_a_scan_of_every_policy_selects_in_the_same_order() {
        let scopes = [
            "{}",
            "{selector: {matchLabels: {app: db}}}",
            "{selector: {matchLabels: {app: web}}}",
            "{selector: {matchLabels: {app: db, tier: x}}}",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]}",
        ];
        let mut all = Vec::new();
        for (i, ns) in ["shop", "istio-system", "other", "shop", "istio-system", "other", "shop"].iter().enumerate() {
            for (j, scope) in scopes.iter().enumerate() {
                all.push(policy(ns, &format!("p{i}-{j}"), scope));
            }
        }
        let set = PolicySet::new(all.clone());
        for ns in ["shop", "istio-system", "other", "empty"] {
            for labels in [&[][..], &[("app", "db")], &[("app", "web")], &[("app", "db"), ("tier", "x")]] {
                let labels: BTreeMap<String, String> =
                    labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
                let want: Vec<String> = all.iter().filter(|p| p.selects(ns, &labels)).map(|p| p.id()).collect();
                let got: Vec<String> = set.applicable(ns, &labels).iter().map(|p| p.id()).collect();
                assert_eq!(got, want, "{ns} {labels:?}");
            }
        }
        assert!(!set.applicable("shop", &BTreeMap::from([("app".into(), "db".into())])).is_empty());
        assert_eq!(set.len(), all.len(), "every policy kept, the not-applicable ones too (for /config_dump)");
    }
}
