//! What the agent publishes about itself: the `/config_dump` document, readiness, and the
//! metrics that are read from state rather than counted on the data path.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use serde_json::{json, Value};

use super::Agent;

/// Every this many ticks (of 500 ms), walk the eBPF maps and list the kernel's programs:
/// both read a lot from the kernel, so the dump and the metrics share one recent result.
const KERNEL_VIEW_EVERY: u64 = 10;

/// What the occasional kernel walk found.
#[derive(Debug, Default)]
pub(super) struct KernelView {
    /// (map, entries, capacity)
    maps: Vec<(&'static str, u64, u64)>,
    /// (link, program id, program name, program type)
    programs: Vec<(String, u32, String, String)>,
}

impl Agent {
    /// Refresh readiness, the config dump and the state-derived metrics; `after_change`
    /// also re-reads the kernel (links and maps just changed).
    pub(super) fn refresh_observability(&mut self, after_change: bool) {
        self.ticks += 1;
        let metrics = &self.mesh.metrics;
        metrics.set_enrolled(self.pods.len());
        metrics.kernel_totals(&self.datapath.named_stats());
        metrics.handshake_totals(self.mesh.pool.handshakes());
        for c in self.mesh.ids.status() {
            metrics.cert_expiry(&c.identity, c.not_after);
        }
        if after_change || self.ticks.is_multiple_of(KERNEL_VIEW_EVERY) {
            self.kernel_view =
                KernelView { maps: self.datapath.occupancy(&self.flows), programs: self.datapath.programs() };
            for (map, entries, capacity) in &self.kernel_view.maps {
                self.mesh.metrics.map_occupancy(map, *entries, *capacity);
            }
        }
        let readiness = self.readiness();
        self.admin.ready.store(readiness.is_ok(), Ordering::SeqCst);
        *self.admin.not_ready.write() = readiness.err().unwrap_or_default();
        *self.admin.snapshot.write() = self.config_dump();
    }

    /// Ready: programs attached (done before this can run), the config (or the first
    /// complete cluster state) applied, each enrolled workload's certificate present, and —
    /// with a config file — every local workload enrolled. In a cluster a pod that cannot be
    /// enrolled is refused by the CNI plugin and reported, but does not make the node's
    /// agent unready (that would stall the DaemonSet's rollout on one bad pod).
    fn readiness(&self) -> Result<(), String> {
        if self.generation == 0 {
            return Err(match self.settings.source {
                crate::config::Source::Kube(_) => "waiting for the first complete list from the Kubernetes API".into(),
                crate::config::Source::File(_) => "config not applied yet".into(),
            });
        }
        if matches!(self.settings.source, crate::config::Source::File(_)) {
            if let Some((uid, f)) = self.failed.iter().next() {
                return Err(format!("workload {uid} not enrolled: {}", f.reason));
            }
            if let Some((uid, name)) = self.waiting.iter().next() {
                return Err(format!("workload {name} ({uid}) runs on this node but has no netns path"));
            }
        }
        for p in self.pods.values() {
            if self.mesh.ids.current(&p.spec.identity).is_none() {
                return Err(format!("no valid certificate for {}", p.spec.identity));
            }
        }
        Ok(())
    }

    fn config_dump(&self) -> Value {
        let workloads: Vec<Value> = self
            .pods
            .values()
            .map(|p| {
                let s = &p.spec;
                json!({
                    "uid": s.uid, "name": s.name, "namespace": s.namespace,
                    "identity": s.identity.to_string(), "ips": s.ips, "node": self.settings.node,
                    "netns": s.netns, "netns_cookie": p.ctx.netns.cookie(), "pod_slot": p.pod_id,
                    "mtls": {"strict": s.mtls.strict, "kernel_drops_plaintext": s.mtls.kernel_strict(), "ports": s.mtls.ports},
                    "enrolled": true,
                })
            })
            .chain(self.failed.iter().map(|(uid, f)| json!({"uid": uid, "enrolled": false, "reason": f.reason, "closed": f.closed.is_some()})))
            .chain(self.waiting.iter().map(|(uid, name)| json!({"uid": uid, "name": name, "enrolled": false, "reason": "waiting for its network namespace (CNI ADD, or a running process found in /proc)"})))
            .collect();
        let directory = self.mesh.directory.read().clone();
        let peers: Vec<Value> = directory
            .workloads
            .iter()
            .map(|(ip, p)| json!({"ip": ip, "name": p.name, "namespace": p.namespace, "node": p.node, "identity": p.identity.to_string()}))
            .collect();
        let services: Vec<Value> = directory
            .services
            .iter()
            .map(|(vip, s)| json!({"vip": vip, "name": s.name, "hostname": s.fqdn, "endpoints": s.endpoints}))
            .collect();
        let cfg = &self.last_config;
        let policies: Vec<Value> = cfg
            .peer_authentications
            .iter()
            .map(|pa| {
                let selects: Vec<String> = cfg
                    .workloads
                    .iter()
                    .filter(|w| {
                        let in_scope = pa.metadata.namespace == self.settings.root_namespace && pa.spec.selector.is_none()
                            || pa.metadata.namespace == w.namespace
                                && pa.spec.selector.as_ref().is_none_or(|sel| sel.match_labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
                        in_scope
                    })
                    .map(|w| format!("{}/{}", w.namespace, w.name))
                    .collect();
                json!({
                    "kind": "PeerAuthentication",
                    "namespace": pa.metadata.namespace, "name": pa.metadata.name,
                    "mode": format!("{:?}", pa.spec.mtls.map(|m| m.mode).unwrap_or_default()).to_uppercase(),
                    "port_level": pa.spec.port_level_mtls.iter().map(|(p, m)| (p.clone(), format!("{:?}", m.mode).to_uppercase())).collect::<BTreeMap<_, _>>(),
                    "selects": selects,
                })
            })
            .chain(self.mesh.policies.read().iter().map(|p| {
                let selects: Vec<String> = cfg
                    .workloads
                    .iter()
                    .filter(|w| p.selects(&w.namespace, &w.labels))
                    .map(|w| format!("{}/{}", w.namespace, w.name))
                    .collect();
                let applies = match (&p.scope, p.action) {
                    (crate::policy::Scope::NotApplicable, _) => "not applicable at L4 (targetRef: waypoint or gateway)",
                    (_, crate::policy::Action::Custom) => "not applicable: CUSTOM needs an external authorizer",
                    _ if p.dry_run => "dry-run: evaluated and reported, never enforced",
                    _ => "enforced",
                };
                json!({
                    "kind": "AuthorizationPolicy",
                    "namespace": p.namespace, "name": p.name,
                    "mode": format!("{:?}", p.action).to_uppercase(),
                    "applies": applies,
                    "selects": selects,
                })
            }))
            .collect();
        json!({
            "node": self.settings.node,
            "ready": self.admin.ready.load(Ordering::SeqCst),
            "not_ready": *self.admin.not_ready.read(),
            "generation": self.generation,
            "trust_domain": self.settings.trust_domain,
            "workloads": workloads,
            "peers": peers,
            "services": services,
            "policies": policies,
            "certificates": self.mesh.ids.status(),
            "pooled_hbone_connections": self.mesh.pool.len(),
            "kernel": {
                "pin_dir": self.datapath.pin_dir(),
                "cgroup": self.settings.cgroup,
                "fast_path": self.settings.fast_path,
                "links": self.datapath.links(),
                "programs": self.kernel_view.programs.iter()
                    .map(|(link, id, name, kind)| json!({"link": link, "program_id": id, "program": name, "type": kind}))
                    .collect::<Vec<_>>(),
                "maps": self.kernel_view.maps.iter()
                    .map(|(m, e, c)| json!({"name": m, "entries": e, "capacity": c})).collect::<Vec<_>>(),
                "counters": self.datapath.named_stats().into_iter().collect::<BTreeMap<_, _>>(),
            },
        })
    }
}
