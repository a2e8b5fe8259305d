//! What the agent publishes about itself: the `/config_dump` document, readiness, and the
//! metrics that are read from state rather than counted on the data path.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use serde_json::{json, Value};

use super::{Publisher, View};
use crate::datapath::KernelFacts;

/// How every workload in the directory is reached: each one is meshed (enrolled by its
/// node's agent), so by HBONE.
const PEER_PROTOCOL: &str = "HBONE";

/// Fill in a local workload's names from the config (a failed or waiting one is known by
/// uid): its namespace, name and IPs, for `selvedge workloads` to match it with the
/// directory.
fn named(w: &mut Value, v: &View<'_>, uid: &str) {
    if let Some(c) = v.config.workloads.iter().find(|c| c.uid == uid) {
        w["name"] = c.name.clone().into();
        w["namespace"] = c.namespace.clone().into();
        w["ips"] = json!(c.ips);
    }
}

/// Every this many ticks (of 500 ms), walk the eBPF maps and list the kernel's programs;
/// the dump and the metrics share the latest result.
const KERNEL_VIEW_EVERY: u64 = 10;

/// The kernel as the agent last read it. The counters are read each tick (a few lookups);
/// the maps' entries and the programs come from a walk on a blocking thread (thousands of
/// lookups), so the dump's and the metrics' copy of them lags a change by up to a tick.
#[derive(Debug, Default)]
pub(super) struct KernelView {
    facts: Option<KernelFacts>,
    counters: Vec<(&'static str, u64)>,
    walking: Option<tokio::task::JoinHandle<KernelFacts>>,
    /// Something changed while a walk ran: walk again once it ends.
    again: bool,
    /// Maps last seen at least [`NEAR_FULL_PERCENT`] full (warned once per crossing).
    near_full: std::collections::BTreeSet<&'static str>,
}

/// A map this full is reported: an LRU map (the original destinations) then starts
/// evicting the oldest captured connections' entries instead of failing an insert, and a
/// hash map refuses new pods or verdicts.
const NEAR_FULL_PERCENT: u64 = 90;

/// The maps that became near full (`now` holds those that are) since `before`.
fn newly_near_full(
    maps: &[(&'static str, u64, u64)],
    before: &std::collections::BTreeSet<&'static str>,
) -> (std::collections::BTreeSet<&'static str>, Vec<(&'static str, u64, u64)>) {
    let now: std::collections::BTreeSet<&'static str> = maps
        .iter()
        .filter(|(_, entries, capacity)| *capacity > 0 && entries * 100 >= capacity * NEAR_FULL_PERCENT)
        .map(|(m, _, _)| *m)
        .collect();
    let new = maps.iter().filter(|(m, _, _)| now.contains(m) && !before.contains(m)).copied().collect();
    (now, new)
}

impl KernelView {
    pub(super) fn counters(&self) -> &[(&'static str, u64)] {
        &self.counters
    }
}

impl Publisher {
    /// Refresh readiness and the state-derived metrics; `after_change`
    /// also has the kernel walked again (links and maps just changed).
    pub fn refresh(&mut self, v: &View<'_>, after_change: bool) {
        self.ticks += 1;
        let metrics = &v.mesh.metrics;
        metrics.set_enrolled(v.pods.enrolled().len());
        self.kernel_view.counters = v.pods.datapath().named_stats();
        metrics.kernel_totals(&self.kernel_view.counters);
        metrics.handshake_totals(v.mesh.pool.handshakes());
        metrics.dialled_ahead_total(v.mesh.pool.dialled_ahead());
        for c in v.mesh.ids.status() {
            metrics.cert_expiry(&c.identity, c.not_after);
        }
        self.collect_kernel_walk(v);
        if after_change || self.ticks.is_multiple_of(KERNEL_VIEW_EVERY) {
            self.walk_kernel(v);
        }
        let readiness = self.readiness(v);
        self.admin.ready.store(readiness.is_ok(), Ordering::SeqCst);
        *self.admin.not_ready.write() = readiness.err().unwrap_or_default();
    }

    /// Build the `/config_dump` document and hand it to the admin endpoint that asked.
    /// Only on request: with thousands of peers and services it takes milliseconds, and
    /// built every tick it stalled every connection on the runtime's thread that long.
    pub fn publish_dump(&mut self, v: &View<'_>) {
        *self.admin.snapshot.write() = self.config_dump(v);
        self.admin.dump_built.send_modify(|n| *n += 1);
    }

    /// Start a walk of the kernel's maps and programs on a blocking thread, or ask for one
    /// after the walk running now. The very first walk runs here, so the dump describes
    /// the kernel from the start.
    fn walk_kernel(&mut self, v: &View<'_>) {
        if self.kernel_view.walking.is_some() {
            self.kernel_view.again = true;
            return;
        }
        let walker = v.pods.datapath().walker();
        let inbound = v.pods.datapath().inbound_listeners();
        if self.kernel_view.facts.is_none() {
            self.publish_kernel_facts(v, walker.walk(inbound));
        } else {
            self.kernel_view.walking = Some(tokio::task::spawn_blocking(move || walker.walk(inbound)));
        }
    }

    /// Take the result of a walk that has ended, if any.
    fn collect_kernel_walk(&mut self, v: &View<'_>) {
        if !self.kernel_view.walking.as_ref().is_some_and(tokio::task::JoinHandle::is_finished) {
            return;
        }
        let Some(done) = self.kernel_view.walking.take().and_then(futures::FutureExt::now_or_never) else { return };
        match done {
            Ok(facts) => self.publish_kernel_facts(v, facts),
            Err(e) => tracing::warn!("walking the kernel's maps failed: {e}"),
        }
        if std::mem::take(&mut self.kernel_view.again) {
            self.walk_kernel(v);
        }
    }

    fn publish_kernel_facts(&mut self, v: &View<'_>, facts: KernelFacts) {
        for (map, entries, capacity) in &facts.maps {
            v.mesh.metrics.map_occupancy(map, *entries, *capacity);
        }
        let (now, new) = newly_near_full(&facts.maps, &self.kernel_view.near_full);
        for (map, entries, capacity) in new {
            tracing::warn!(
                map,
                entries,
                capacity,
                "eBPF map {map} is {}% full: an LRU map now evicts the oldest entries (captured connections lose their original destination and are refused), a hash map refuses new ones",
                entries * 100 / capacity
            );
        }
        self.kernel_view.near_full = now;
        self.kernel_view.facts = Some(facts);
    }

    /// Ready: programs attached (done before this can run), the config (or the first
    /// complete cluster state) applied, each enrolled workload's certificate present, and —
    /// with a config file — every local workload enrolled. In a cluster a pod that cannot be
    /// enrolled is refused by the CNI plugin and reported, but does not make the node's
    /// agent unready (that would stall the DaemonSet's rollout on one bad pod).
    fn readiness(&self, v: &View<'_>) -> Result<(), String> {
        if self.generation == 0 {
            return Err(match v.settings.source {
                crate::config::Source::Kube(_) => "waiting for the first complete list from the Kubernetes API".into(),
                crate::config::Source::File(_) => "config not applied yet".into(),
            });
        }
        if matches!(v.settings.source, crate::config::Source::File(_)) {
            if let Some((uid, f)) = v.pods.failed().iter().next() {
                return Err(format!("workload {uid} not enrolled: {}", f.reason));
            }
            if let Some((uid, name)) = v.pods.waiting().iter().next() {
                return Err(format!("workload {name} ({uid}) runs on this node but has no netns path"));
            }
        }
        for p in v.pods.enrolled().values() {
            if v.mesh.ids.current(&p.spec.identity).is_none() {
                return Err(format!("no valid certificate for {}", p.spec.identity));
            }
        }
        Ok(())
    }

    fn config_dump(&self, v: &View<'_>) -> Value {
        let workloads: Vec<Value> = v
            .pods
            .enrolled()
            .values()
            .map(|p| {
                let s = &p.spec;
                json!({
                    "uid": s.uid, "name": s.name, "namespace": s.namespace,
                    "identity": s.identity.to_string(), "ips": s.ips, "node": v.settings.node,
                    "netns": s.netns, "netns_cookie": p.ctx.netns.cookie(), "pod_slot": p.pod_id,
                    "mtls": {"strict": s.mtls.strict, "kernel_drops_plaintext": s.mtls.kernel_strict(), "ports": s.mtls.ports, "probe_ports": s.mtls.probe_ports},
                    "enrolled": true,
                })
            })
            .chain(v.pods.failed().iter().map(|(uid, f)| {
                let mut w = json!({"uid": uid, "enrolled": false, "reason": f.reason, "closed": f.closed.is_some(), "netns_cookie": f.closed, "node": v.settings.node});
                named(&mut w, v, uid);
                w
            }))
            .chain(v.pods.waiting().iter().map(|(uid, name)| {
                let mut w = json!({"uid": uid, "name": name, "enrolled": false, "node": v.settings.node, "reason": "waiting for its network namespace (CNI ADD, or a running process found in /proc)"});
                named(&mut w, v, uid);
                w
            }))
            .collect();
        let none = KernelFacts::default();
        let facts = self.kernel_view.facts.as_ref().unwrap_or(&none);
        let directory = v.mesh.directory.read().clone();
        let peers: Vec<Value> = directory
            .workloads
            .iter()
            .map(|(ip, p)| json!({"ip": ip, "name": p.name, "namespace": p.namespace, "node": p.node, "identity": p.identity.to_string(), "workload": p.meta.workload, "canonicalService": p.meta.canonical_service, "canonicalRevision": p.meta.canonical_revision, "protocol": PEER_PROTOCOL}))
            .collect();
        let services: Vec<Value> = directory
            .services
            .iter()
            .map(|(vip, s)| json!({"vip": vip, "name": s.service.to_string(), "hostname": s.service.fqdn, "endpoints": s.endpoints}))
            .collect();
        let cfg = &v.config;
        let policies: Vec<Value> = cfg
            .peer_authentications
            .iter()
            .map(|pa| {
                let selects: Vec<String> = cfg
                    .workloads
                    .iter()
                    .filter(|w| {
                        let in_scope = pa.metadata.namespace == v.settings.root_namespace && pa.spec.selector.is_none()
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
            .chain(v.mesh.policies.read().iter().map(|p| {
                let selects: Vec<String> = cfg
                    .workloads
                    .iter()
                    .filter(|w| p.selects(&w.namespace, &w.labels))
                    .map(|w| format!("{}/{}", w.namespace, w.name))
                    .collect();
                let applies = match (&p.scope, p.action) {
                    (crate::policy::Scope::NotApplicable, _) => "not applicable at L4 (targetRef: waypoint or gateway)".into(),
                    (_, crate::policy::Action::Custom) => "not applicable: CUSTOM needs an external authorizer".into(),
                    _ if p.dry_run => "dry-run: evaluated and reported, never enforced".to_string(),
                    _ => match p.l7_note() {
                        Some(note) => format!("enforced at L4 only: {note}"),
                        None => "enforced".into(),
                    },
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
            "node": v.settings.node,
            "ready": self.admin.ready.load(Ordering::SeqCst),
            "not_ready": *self.admin.not_ready.read(),
            "generation": self.generation,
            "config_rejected_total": self.rejections.total,
            "config_last_rejected": self.rejections.last,
            "trust_domain": v.settings.trust_domain,
            "workloads": workloads,
            "peers": peers,
            "services": services,
            "policies": policies,
            "certificates": certificates(v),
            "trust_bundle": trust_bundle(&v.settings.certs),
            "version": super::admin::version(),
            "pooled_hbone_connections": v.mesh.pool.len(),
            "kernel": {
                "pin_dir": v.pods.datapath().pin_dir(),
                "cgroup": v.settings.cgroup,
                "fast_path": v.settings.fast_path,
                "links": v.pods.datapath().links(),
                "programs": facts.programs.iter()
                    .map(|(link, id, name, kind)| json!({"link": link, "program_id": id, "program": name, "type": kind}))
                    .collect::<Vec<_>>(),
                "maps": facts.maps.iter()
                    .map(|(m, e, c)| json!({"name": m, "entries": e, "capacity": c})).collect::<Vec<_>>(),
                "counters": self.kernel_view.counters.iter().copied().collect::<BTreeMap<_, _>>(),
            },
        })
    }
}

/// Each workload certificate the agent holds or wants: identity, serial, validity (unix
/// seconds and RFC 3339) and its state ([`cert_state`]) by this node's clock.
fn certificates(v: &View<'_>) -> Vec<Value> {
    let now = unix(std::time::SystemTime::now()).unwrap_or_default();
    v.mesh
        .ids
        .status()
        .into_iter()
        .map(|c| {
            let svid = c.identity.parse().ok().and_then(|id| v.mesh.ids.current(&id));
            let leaf = svid.as_ref().and_then(|s| s.certified.cert.first().map(|der| describe(der)));
            let not_before = leaf.as_ref().and_then(|l| l["not_before"].as_u64());
            let mut out = json!({
                "identity": c.identity,
                "serial": leaf.as_ref().map(|l| l["serial"].clone()),
                "not_before": not_before,
                "not_after": c.not_after,
                "not_before_utc": not_before.map(rfc3339),
                "not_after_utc": c.not_after.map(rfc3339),
                "state": cert_state(not_before, c.not_after, now),
                "chain_length": svid.as_ref().map(|s| s.certified.cert.len()),
                "last_error": c.last_error,
            });
            if let Some(issuer) = leaf.as_ref().map(|l| l["issuer"].clone()) {
                out["issuer"] = issuer;
            }
            out
        })
        .collect()
}

/// `valid`; `expiring` in the last quarter of its life (renewal, due at half-life, has
/// failed for a while); `expired`; `missing` (never issued, or forgotten).
pub(crate) fn cert_state(not_before: Option<u64>, not_after: Option<u64>, now: u64) -> &'static str {
    let Some(after) = not_after else { return "missing" };
    if now >= after {
        return "expired";
    }
    let life = not_before.map_or(0, |b| after.saturating_sub(b));
    if life > 0 && now >= after - life / 4 {
        "expiring"
    } else {
        "valid"
    }
}

/// The roots peers are verified against, read from where the certificate source reads
/// them (`root-cert.pem` in `--ca-dir` or `--cert-dir`, or `--istio-ca-root`).
fn trust_bundle(certs: &crate::config::CertSourceConfig) -> Value {
    use crate::config::CertSourceConfig;
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let file = match certs {
        CertSourceConfig::Builtin { ca_dir: dir, .. } | CertSourceConfig::Files { dir } => dir.join("root-cert.pem"),
        CertSourceConfig::Istio(c) => c.root_file.clone(),
    };
    match CertificateDer::pem_file_iter(&file).and_then(Iterator::collect::<Result<Vec<_>, _>>) {
        Ok(ders) => json!({"file": file, "roots": ders.iter().map(|d| describe(d)).collect::<Vec<_>>()}),
        Err(e) => json!({"file": file, "roots": [], "error": e.to_string()}),
    }
}

/// A certificate's subject, issuer, serial and validity.
fn describe(der: &[u8]) -> Value {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => {
            let (before, after) = (c.validity().not_before.timestamp(), c.validity().not_after.timestamp());
            let (before, after) = (u64::try_from(before).ok(), u64::try_from(after).ok());
            json!({
                "subject": c.subject().to_string(),
                "issuer": c.issuer().to_string(),
                "serial": c.raw_serial_as_string(),
                "not_before": before, "not_after": after,
                "not_before_utc": before.map(rfc3339), "not_after_utc": after.map(rfc3339),
            })
        }
        Err(e) => json!({"error": format!("unparsable certificate: {e}")}),
    }
}

fn unix(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Unix seconds as RFC 3339 in UTC (`2026-01-31T23:59:59Z`).
pub(crate) fn rfc3339(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix {unix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{cert_state, newly_near_full, rfc3339};

    #[test]
    fn certificate_states_and_dates() {
        // A 100 s certificate: expiring in its last 25 s.
        assert_eq!(cert_state(Some(1000), Some(1100), 1050), "valid");
        assert_eq!(cert_state(Some(1000), Some(1100), 1075), "expiring");
        assert_eq!(cert_state(Some(1000), Some(1100), 1100), "expired");
        assert_eq!(cert_state(None, None, 5), "missing");
        assert_eq!(cert_state(None, Some(10), 5), "valid", "no start known: valid until it expires");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_694_839), "2026-12-08T01:53:59Z");
    }

    #[test]
    fn a_map_is_reported_once_when_it_crosses_ninety_percent() {
        let none = Default::default();
        let (now, new) = newly_near_full(&[("SV_ORIG_DST", 59_000, 65_536), ("SV_ENROLLED", 3, 4096)], &none);
        assert_eq!(new, vec![("SV_ORIG_DST", 59_000, 65_536)]);
        let (again, new) = newly_near_full(&[("SV_ORIG_DST", 65_536, 65_536)], &now);
        assert!(new.is_empty(), "still full: not reported again");
        let (cleared, _) = newly_near_full(&[("SV_ORIG_DST", 100, 65_536)], &again);
        assert!(cleared.is_empty(), "below the mark it can be reported again later");
    }
}
