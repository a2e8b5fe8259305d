//! Cluster state → the agent's one internal state (`LocalConfig`), the same type the local
//! file produces. Pure: the watch side hands in what its reflectors hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, Service};
use kube::api::DynamicObject;
use serde_json::json;

use crate::{
    config::{self, LocalConfig},
    policy::{AuthorizationPolicy, PeerAuthentication},
};

/// What the reflectors hold at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub authorization_policies: Vec<Arc<DynamicObject>>,
    pub peer_authentications: Vec<Arc<DynamicObject>>,
}

/// Where a local pod's network lives, as the CNI plugin (or the /proc scan) reported it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// From the cluster CNI's result; used until the API reports the pod's IPs.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The label value that enrolls (on a namespace or pod) and the one that opts a pod out.
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";

/// Does this pod belong in the mesh? hostNetwork pods never (they share the node's
/// namespace); a pod label `disabled` opts out; `enabled` on the pod or its namespace opts in.
pub fn meshed(
    pod_labels: Option<&BTreeMap<String, String>>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    host_network: bool,
    key: &str,
) -> bool {
    if host_network {
        return false;
    }
    match pod_labels.and_then(|l| l.get(key)).map(String::as_str) {
        Some(DISABLED) => false,
        Some(ENABLED) => true,
        _ => namespace_labels.and_then(|l| l.get(key)).is_some_and(|v| v == ENABLED),
    }
}

/// Whether `pod` is meshed given the namespaces known.
pub fn pod_meshed(pod: &Pod, namespaces: &BTreeMap<&str, &Namespace>, key: &str) -> bool {
    let ns = pod.metadata.namespace.as_deref().and_then(|n| namespaces.get(n));
    let host = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    meshed(pod.metadata.labels.as_ref(), ns.and_then(|n| n.metadata.labels.as_ref()), host, key)
}

fn namespaces_by_name(s: &Snapshot) -> BTreeMap<&str, &Namespace> {
    s.namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, n.as_ref()))).collect()
}

/// A pod that has finished: its IP may already be someone else's.
fn finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// What the CNI side needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub node: Option<String>,
    pub meshed: bool,
}

/// Find a pod by uid, or by namespace/name when the runtime gave no uid.
pub fn find_pod(s: &Snapshot, uid: Option<&str>, namespace: &str, name: &str, key: &str) -> Option<PodFacts> {
    let pod = s.pods.iter().find(|p| match uid {
        Some(u) => p.metadata.uid.as_deref() == Some(u),
        None => p.metadata.namespace.as_deref() == Some(namespace) && p.metadata.name.as_deref() == Some(name),
    })?;
    let namespaces = namespaces_by_name(s);
    Some(PodFacts {
        uid: pod.metadata.uid.clone()?,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        meshed: pod_meshed(pod, &namespaces, key),
    })
}

/// The result, and what was dropped or replaced on the way (each said once per snapshot).
#[derive(Debug, Default)]
pub struct Converted {
    pub config: LocalConfig,
    pub problems: Vec<String>,
}

/// Build the internal state: meshed pods become workloads (local ones get their netns from
/// `networks`), Services with selectors become services, Istio policies are parsed — one
/// that cannot be is replaced by its fail-closed reading (see [`fail_closed_authz`]).
pub fn to_config(s: &Snapshot, node: &str, key: &str, networks: &BTreeMap<String, PodNetwork>) -> Converted {
    let mut out = Converted::default();
    let namespaces = namespaces_by_name(s);
    let mut candidates: Vec<(&Pod, config::Workload)> = Vec::new();
    for pod in &s.pods {
        if !pod_meshed(pod, &namespaces, key) {
            continue;
        }
        if let Some(w) = workload(pod, node, networks) {
            candidates.push((pod, w));
        }
    }
    resolve_ip_conflicts(&mut candidates, &mut out.problems);
    let mut netns_seen = BTreeSet::new();
    for (_, mut w) in candidates {
        if let Some(ns) = &w.netns {
            if !netns_seen.insert(ns.clone()) {
                out.problems.push(format!(
                    "pod {}/{}: netns {} is another pod's; ignored",
                    w.namespace,
                    w.name,
                    ns.display()
                ));
                w.netns = None;
            }
        }
        out.config.workloads.push(w);
    }
    let mut vips = BTreeSet::new();
    for svc in &s.services {
        if let Some(svc) = service(svc, &mut vips, &mut out.problems) {
            // The agent resolves a VIP only to meshed endpoints: a service with any
            // unmeshed (or no) running pod behind it is left to the cluster's own service
            // routing, so meshed clients still reach it (in plaintext, as without a mesh).
            let running = |p: &&Arc<Pod>| {
                p.metadata.namespace.as_deref() == Some(svc.namespace.as_str())
                    && !finished(p)
                    && p.metadata.labels.as_ref().is_some_and(|l| svc.selector.iter().all(|(k, v)| l.get(k) == Some(v)))
            };
            let mut backends = s.pods.iter().filter(running).peekable();
            if backends.peek().is_none() || !backends.all(|p| pod_meshed(p, &namespaces, key)) {
                continue;
            }
            out.config.services.push(svc);
        }
    }
    for obj in &s.authorization_policies {
        out.config.authorization_policies.push(authz(obj, &mut out.problems));
    }
    for obj in &s.peer_authentications {
        out.config.peer_authentications.push(peer_auth(obj, &mut out.problems));
    }
    out
}

fn workload(pod: &Pod, node: &str, networks: &BTreeMap<String, PodNetwork>) -> Option<config::Workload> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    let pod_node = spec.node_name.clone()?; // not scheduled yet: nowhere to enroll, no IP
    let status = pod.status.as_ref();
    if finished(pod) {
        return None;
    }
    let uid = m.uid.clone()?;
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|i| i.parse::<IpAddr>().ok()));
    }
    let local = pod_node == node;
    let network = if local { networks.get(&uid) } else { None };
    if ips.is_empty() {
        ips = network.map(|n| n.ips.clone()).unwrap_or_default();
    }
    Some(config::Workload {
        uid,
        name: m.name.clone()?,
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node: pod_node,
        ips,
        netns: network.map(|n| n.netns.clone()),
        labels: m.labels.clone().unwrap_or_default(),
        workload_name: owner_workload(pod),
        probe_ports: probe_ports(spec),
    })
}

/// The workload that owns a pod, as Istio's metrics name it: a ReplicaSet made by a
/// Deployment counts as the Deployment (its name less the `-<pod-template-hash>`), a Job
/// made by a CronJob as the CronJob (less the `-<scheduled time>` digits), any other owner
/// (StatefulSet, DaemonSet, Job, ReplicaSet, a custom controller) by its own name. None for
/// a bare pod (its own name is then the workload's).
pub fn owner_workload(pod: &Pod) -> Option<String> {
    let owners = pod.metadata.owner_references.as_ref()?;
    let owner = owners.iter().find(|o| o.controller == Some(true)).or_else(|| owners.first())?;
    let name = owner.name.as_str();
    let trimmed = match owner.kind.as_str() {
        "ReplicaSet" => pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .and_then(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-')),
        "Job" => name
            .rsplit_once('-')
            .filter(|(_, t)| (8..=10).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
            .map(|(cron, _)| cron),
        _ => None,
    };
    Some(trimmed.filter(|t| !t.is_empty()).unwrap_or(name).to_owned())
}

/// The ports the kubelet probes (liveness, readiness, startup; TCP, HTTP or gRPC) in any
/// container, init containers included (a sidecar may be probed); a named port resolved
/// against that container's own ports, one that names none skipped.
fn probe_ports(spec: &PodSpec) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut out = BTreeSet::new();
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let named =
            |name: &str| c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port);
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe].into_iter().flatten() {
            let ports = [probe.tcp_socket.as_ref().map(|t| &t.port), probe.http_get.as_ref().map(|h| &h.port)];
            for port in ports.into_iter().flatten() {
                let n = match port {
                    IntOrString::Int(n) => Some(*n),
                    IntOrString::String(name) => named(name).or_else(|| name.parse().ok()),
                };
                out.extend(n.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0));
            }
            out.extend(probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()).filter(|n| *n > 0));
        }
    }
    out.into_iter().collect()
}

/// One IP, one workload. A pod being deleted loses its IPs to a live one, then the newest
/// pod wins; the loser keeps its identity but no address, so traffic to the IP is never
/// attributed to it.
fn resolve_ip_conflicts(pods: &mut [(&Pod, config::Workload)], problems: &mut Vec<String>) {
    let rank = |p: &Pod| {
        let live = p.metadata.deletion_timestamp.is_none();
        (live, p.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    let mut owner: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for i in 0..pods.len() {
        for ip in pods[i].1.ips.clone() {
            let ip = ip.to_canonical();
            match owner.get(&ip).copied() {
                None => {
                    owner.insert(ip, i);
                }
                Some(j) if rank(pods[i].0) > rank(pods[j].0) => {
                    owner.insert(ip, i);
                }
                Some(_) => {}
            }
        }
    }
    for (i, (_, w)) in pods.iter_mut().enumerate() {
        let before = w.ips.len();
        w.ips.retain(|ip| owner.get(&ip.to_canonical()) == Some(&i));
        if w.ips.len() != before {
            problems.push(format!("pod {}/{}: an IP it claims belongs to a newer pod; dropped", w.namespace, w.name));
        }
    }
}

fn service(svc: &Service, vips: &mut BTreeSet<(IpAddr, u16)>, problems: &mut Vec<String>) -> Option<config::Service> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = svc.spec.as_ref()?;
    // No selector: endpoints managed by hand, not resolvable from workloads; headless: no VIP.
    let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
    let mut ips: Vec<IpAddr> = spec.cluster_ips.iter().flatten().filter_map(|i| i.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok()));
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else { continue };
        let target = match &p.target_port {
            None => port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                u16::try_from(*t).ok().filter(|t| *t > 0)?
            }
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(named)) => {
                problems.push(format!(
                    "service {namespace}/{name} port {port}: named targetPort {named:?} is not resolved; \
                     connections to it pass to the cluster's service routing"
                ));
                continue;
            }
        };
        if port == 0 || ips.iter().any(|ip| vips.contains(&(ip.to_canonical(), port))) {
            continue;
        }
        ports.push(config::ServicePort { port, target_port: Some(target) });
    }
    if ips.is_empty() || ports.is_empty() {
        return None;
    }
    for ip in &ips {
        for p in &ports {
            vips.insert((ip.to_canonical(), p.port));
        }
    }
    Some(config::Service { name, namespace, vips: ips, ports, selector })
}

fn document(obj: &DynamicObject) -> serde_json::Value {
    let mut doc = json!({
        "metadata": {
            "name": obj.metadata.name.clone().unwrap_or_default(),
            "namespace": obj.metadata.namespace.clone().unwrap_or_default(),
        },
        "spec": obj.data.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    // The one annotation the policies read: without it a dry-run policy from the API
    // would be enforced.
    if let Some(v) = obj.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN)) {
        doc["metadata"]["annotations"] = json!({ DRY_RUN: v });
    }
    doc
}

/// Istio's annotation that makes an AuthorizationPolicy reported, never enforced.
const DRY_RUN: &str = "istio.io/dry-run";

fn authz(obj: &DynamicObject, problems: &mut Vec<String>) -> AuthorizationPolicy {
    let doc = document(obj);
    let parsed = serde_json::from_value::<AuthorizationPolicy>(doc.clone()).map_err(|e| e.to_string()).and_then(|p| {
        // Validation does not depend on the root namespace.
        p.compile(config::DEFAULT_ROOT_NAMESPACE).map(|_| p).map_err(|e| e.to_string())
    });
    match parsed {
        Ok(p) => p,
        Err(e) => {
            let replacement = fail_closed_authz(&doc);
            problems.push(format!(
                "AuthorizationPolicy {}/{} is not understood ({e}); enforced as {}",
                doc["metadata"]["namespace"].as_str().unwrap_or_default(),
                doc["metadata"]["name"].as_str().unwrap_or_default(),
                if replacement.1 { "DENY of everything it selects" } else { "an ALLOW that matches nothing" }
            ));
            replacement.0
        }
    }
}

/// A policy the agent cannot read must never widen access: an ALLOW becomes an ALLOW with
/// no rules (allow policies exist, none matches: the selected workloads accept only what
/// other ALLOWs grant); anything else (DENY, or an unreadable action) becomes a DENY of
/// everything. The scope is kept when its selector is readable, else the whole namespace.
/// Returns the policy and whether it denies everything.
pub fn fail_closed_authz(doc: &serde_json::Value) -> (AuthorizationPolicy, bool) {
    let spec = &doc["spec"];
    let selector = readable_selector(spec);
    // Only an absent or a plain "ALLOW" action reads as ALLOW; anything else (another
    // word, a number, a list) is unreadable and becomes a DENY.
    let allow = spec.get("action").is_none_or(|a| a.as_str() == Some("ALLOW"));
    let mut new_spec = if allow { json!({"action": "ALLOW"}) } else { json!({"action": "DENY", "rules": [{}]}) };
    if let Some(sel) = selector {
        new_spec["selector"] = json!({"matchLabels": sel["matchLabels"].clone()});
    }
    // Name and namespace only: a dry-run annotation must not turn the fail-closed
    // replacement of an unreadable policy into one that is never enforced.
    let metadata = json!({"name": doc["metadata"]["name"].clone(), "namespace": doc["metadata"]["namespace"].clone()});
    let fixed = json!({"metadata": metadata, "spec": new_spec});
    let policy = serde_json::from_value(fixed).expect("fail-closed policy shape is valid");
    (policy, !allow)
}

/// A policy's `selector`, when it is a well-formed `matchLabels` of strings (the scope a
/// fail-closed replacement keeps).
fn readable_selector(spec: &serde_json::Value) -> Option<&serde_json::Value> {
    spec.get("selector")
        .filter(|s| s.get("matchLabels").and_then(|m| m.as_object()).is_some_and(|m| m.values().all(|v| v.is_string())))
}

fn peer_auth(obj: &DynamicObject, problems: &mut Vec<String>) -> PeerAuthentication {
    let doc = document(obj);
    let parsed = serde_json::from_value::<PeerAuthentication>(doc.clone())
        .map_err(|e| e.to_string())
        .and_then(|p| p.validate().map(|()| p).map_err(|e| e.to_string()));
    match parsed {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!(
                "PeerAuthentication {}/{} is not understood ({e}); enforced as STRICT",
                doc["metadata"]["namespace"].as_str().unwrap_or_default(),
                doc["metadata"]["name"].as_str().unwrap_or_default(),
            ));
            let selector = readable_selector(&doc["spec"]);
            let mut spec = json!({"mtls": {"mode": "STRICT"}});
            if let Some(sel) = selector {
                spec["selector"] = json!({"matchLabels": sel["matchLabels"].clone()});
            }
            serde_json::from_value(json!({"metadata": doc["metadata"].clone(), "spec": spec}))
                .expect("fail-closed PeerAuthentication shape is valid")
        }
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
