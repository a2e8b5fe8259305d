//! Desired enrollment state and the plan that moves the kernel towards it. Pure: the
//! caller (`app`) carries the plan out.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use crate::{
    config::{ConfigError, LocalConfig, Workload},
    identity::SpiffeId,
    policy::{resolve_mtls, WorkloadMtls},
};

pub mod meta;
pub use meta::{ServiceName, WorkloadMeta};

/// Istio's metadata of a configured workload.
fn meta_of(w: &Workload) -> Arc<WorkloadMeta> {
    Arc::new(WorkloadMeta::of(w.workload_name.as_deref().unwrap_or(&w.name), &w.namespace, &w.labels))
}

/// Mesh-wide facts the config is read against.
#[derive(Debug, Clone)]
pub struct Mesh<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
    pub root_namespace: &'a str,
}

/// What enrolling one local pod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    /// Which inbound ports refuse plaintext (PeerAuthentication).
    pub mtls: WorkloadMtls,
    /// Its labels (policy selectors).
    pub labels: BTreeMap<String, String>,
    /// What its metrics say of it.
    pub meta: Arc<WorkloadMeta>,
}

/// Any meshed workload, local or not, as a destination: its identity for HBONE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub identity: SpiffeId,
    /// For AuthorizationPolicy selectors, evaluated at the source too.
    pub labels: BTreeMap<String, String>,
    /// What metrics say of it.
    pub meta: Arc<WorkloadMeta>,
}

/// A service's endpoints for one VIP port.
#[derive(Debug)]
pub struct ServiceEntry {
    /// Its names (`namespace/name` in logs, the FQDN in metrics).
    pub service: Arc<ServiceName>,
    /// Endpoint addresses (workload IP, target port), in a stable order.
    pub endpoints: Vec<SocketAddr>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl ServiceEntry {
    /// The next endpoint, round-robin; None when the service has none.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }
}

/// Who answers on an address: meshed workloads by IP (and as whom), services by VIP:port.
#[derive(Debug, Default)]
pub struct Directory {
    pub workloads: BTreeMap<IpAddr, Peer>,
    pub services: BTreeMap<SocketAddr, ServiceEntry>,
    /// The services an endpoint (workload IP, target port) serves, in config order: what
    /// the destination's agent reports as `destination_service` (the one the client named
    /// in its CONNECT if it is among them, else the first, as ztunnel guesses it).
    pub by_endpoint: BTreeMap<SocketAddr, Vec<Arc<ServiceName>>>,
}

fn identity_of(cfg: &LocalConfig, index: usize, td: &str) -> Result<SpiffeId, ConfigError> {
    let w = &cfg.workloads[index];
    SpiffeId::new(td, &w.namespace, &w.service_account).map_err(|e| ConfigError::Workload {
        index,
        uid: w.uid.clone(),
        problem: e.to_string(),
    })
}

/// The pods this node must enroll, by uid, and those it cannot yet: on this node but with no
/// network namespace known (in a cluster: the sandbox is not created yet), by uid → name.
#[derive(Debug, Default)]
pub struct Desired {
    pub pods: BTreeMap<String, PodSpec>,
    pub waiting: BTreeMap<String, String>,
}

/// Everything a config asks of this node, worked out before anything changes.
#[derive(Debug)]
pub struct WorkedOut {
    pub desired: Desired,
    pub directory: Directory,
    pub policies: crate::policy::PolicySet,
}

/// Work out what `cfg` asks of the node `mesh.node`: its pods, the directory of meshed
/// workloads and services, the compiled AuthorizationPolicies. Pure; the agent runs it on a
/// blocking thread (thousands of workloads take milliseconds).
pub fn work_out(cfg: &LocalConfig, mesh: &Mesh<'_>) -> Result<WorkedOut, ConfigError> {
    Ok(WorkedOut {
        desired: desired(cfg, mesh)?,
        directory: directory(cfg, mesh.trust_domain)?,
        policies: crate::policy::PolicySet::new(cfg.compile_policies(mesh.root_namespace)?),
    })
}

pub fn desired(cfg: &LocalConfig, mesh: &Mesh<'_>) -> Result<Desired, ConfigError> {
    let mut out = Desired::default();
    for (index, w) in cfg.workloads.iter().enumerate().filter(|(_, w)| w.node == mesh.node) {
        let Some(netns) = w.netns.clone() else {
            out.waiting.insert(w.uid.clone(), format!("{}/{}", w.namespace, w.name));
            continue;
        };
        let spec = PodSpec {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: identity_of(cfg, index, mesh.trust_domain)?,
            ips: w.ips.clone(),
            netns,
            mtls: WorkloadMtls {
                probe_ports: w.probe_ports.iter().copied().collect(),
                ..resolve_mtls(&cfg.peer_authentications, mesh.root_namespace, &w.namespace, &w.labels)
            },
            labels: w.labels.clone(),
            meta: meta_of(w),
        };
        out.pods.insert(w.uid.clone(), spec);
    }
    Ok(out)
}

/// Every workload in the config, by each of its IPs, and every service's VIP ports.
pub fn directory(cfg: &LocalConfig, trust_domain: &str) -> Result<Directory, ConfigError> {
    let mut out = Directory::default();
    for (index, w) in cfg.workloads.iter().enumerate() {
        let peer = Peer {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            node: w.node.clone(),
            identity: identity_of(cfg, index, trust_domain)?,
            labels: w.labels.clone(),
            meta: meta_of(w),
        };
        for ip in &w.ips {
            if out.workloads.insert(ip.to_canonical(), peer.clone()).is_some() {
                return Err(ConfigError::Workload {
                    index,
                    uid: w.uid.clone(),
                    problem: format!("IP {ip} is used by another workload"),
                });
            }
        }
    }
    // Workloads by (namespace, label, value), in config order: each service looks only at
    // those carrying its rarest selector pair. (A scan of every workload per service kept
    // the runtime's thread 60 ms at 5,000 workloads and 500 services, on every change.)
    let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
    for (i, w) in cfg.workloads.iter().enumerate() {
        for (k, v) in &w.labels {
            by_label.entry((&w.namespace, k, v)).or_default().push(i);
        }
    }
    for svc in &cfg.services {
        let selects = |w: &&Workload| {
            w.namespace == svc.namespace && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        };
        let rarest = svc
            .selector
            .iter()
            .map(|(k, v)| {
                by_label.get(&(svc.namespace.as_str(), k.as_str(), v.as_str())).map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|list| list.len());
        let candidates: Vec<&Workload> = match rarest {
            Some(list) => list.iter().map(|&i| &cfg.workloads[i]).collect(),
            None => cfg.workloads.iter().collect(),
        };
        let selected: Vec<IpAddr> =
            candidates.into_iter().filter(selects).flat_map(|w| w.ips.iter().copied()).collect();
        let service = Arc::new(ServiceName::new(&svc.name, &svc.namespace));
        for p in &svc.ports {
            let target = p.target_port.unwrap_or(p.port);
            for ip in &selected {
                let served = out.by_endpoint.entry(SocketAddr::new(ip.to_canonical(), target)).or_default();
                if !served.contains(&service) {
                    served.push(service.clone());
                }
            }
        }
        for vip in &svc.vips {
            for p in &svc.ports {
                let target = p.target_port.unwrap_or(p.port);
                let entry = ServiceEntry {
                    service: service.clone(),
                    endpoints: selected.iter().map(|ip| SocketAddr::new(*ip, target)).collect(),
                    next: AtomicUsize::new(0),
                };
                out.services.insert(SocketAddr::new(vip.to_canonical(), p.port), entry);
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Unenroll(String),
    Enroll(Box<PodSpec>),
    /// Same pod, same netns: only its inbound mTLS rule changes.
    SetMtls(String, WorkloadMtls),
}

/// Steps from `current` to `desired`: every unenroll before any enroll, so a pod that moved
/// to a new netns is released first.
pub fn plan(current: &BTreeMap<String, PodSpec>, desired: &BTreeMap<String, PodSpec>) -> Vec<Change> {
    let mut unenroll = Vec::new();
    let mut rest = Vec::new();
    for (uid, cur) in current {
        match desired.get(uid) {
            None => unenroll.push(Change::Unenroll(uid.clone())),
            Some(want)
                if want.netns != cur.netns
                    || want.identity != cur.identity
                    || want.ips != cur.ips
                    || want.labels != cur.labels =>
            {
                unenroll.push(Change::Unenroll(uid.clone()));
                rest.push(Change::Enroll(Box::new(want.clone())));
            }
            Some(want) if want.mtls != cur.mtls => rest.push(Change::SetMtls(uid.clone(), want.mtls.clone())),
            Some(_) => {}
        }
    }
    for (uid, want) in desired {
        if !current.contains_key(uid) {
            rest.push(Change::Enroll(Box::new(want.clone())));
        }
    }
    unenroll.extend(rest);
    unenroll
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn pod(uid: &str, netns: &str, strict: bool) -> PodSpec {
        PodSpec {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            identity: SpiffeId::new("td", "ns", uid).unwrap(),
            ips: vec![],
            netns: netns.into(),
            mtls: WorkloadMtls { strict, ..WorkloadMtls::default() },
            labels: BTreeMap::new(),
            meta: Arc::new(WorkloadMeta::of(uid, "ns", &BTreeMap::new())),
        }
    }

    const MESH: Mesh<'static> = Mesh { node: "n1", trust_domain: "td", root_namespace: "istio-system" };

    fn map(pods: &[PodSpec]) -> BTreeMap<String, PodSpec> {
        pods.iter().map(|p| (p.uid.clone(), p.clone())).collect()
    }

    #[test]
    fn plans_enroll_unenroll_and_flag_changes() {
        let cur = map(&[pod("a", "/a", false), pod("b", "/b", false), pod("c", "/c", false)]);
        let want = map(&[pod("a", "/a", false), pod("b", "/b", true), pod("c", "/c2", false), pod("d", "/d", false)]);
        assert_eq!(
            plan(&cur, &want),
            vec![
                Change::Unenroll("c".into()),
                Change::SetMtls("b".into(), WorkloadMtls { strict: true, ..WorkloadMtls::default() }),
                Change::Enroll(Box::new(pod("c", "/c2", false))),
                Change::Enroll(Box::new(pod("d", "/d", false))),
            ]
        );
        assert!(plan(&want, &want).is_empty());
        assert_eq!(plan(&cur, &BTreeMap::new()).len(), 3);
    }

    #[test]
    fn local_workload_without_netns_waits() {
        let cfg = LocalConfig::parse(
            "workloads:\n- {uid: u, name: a, node: n1}\n- {uid: v, name: b, node: n2, netns: /v}\n",
            Path::new("x"),
        )
        .unwrap();
        let on = |node| Mesh { node, ..MESH };
        assert!(desired(&cfg, &on("n3")).unwrap().pods.is_empty(), "peers on other nodes need no netns");
        assert_eq!(desired(&cfg, &on("n2")).unwrap().pods.len(), 1);
        let d = desired(&cfg, &on("n1")).unwrap();
        assert!(d.pods.is_empty());
        assert_eq!(d.waiting.get("u").map(String::as_str), Some("default/a"));
    }

    #[test]
    fn services_resolve_round_robin_to_selected_workloads() {
        let cfg = LocalConfig::parse(
            "workloads:\n\
             - {uid: a, name: a, namespace: shop, node: n, ips: [198.18.1.10], labels: {app: db}}\n\
             - {uid: b, name: b, namespace: shop, node: n, ips: [198.18.1.11], labels: {app: db}}\n\
             - {uid: c, name: c, namespace: other, node: n, ips: [198.18.1.12], labels: {app: db}}\n\
             services:\n\
             - {name: db, namespace: shop, vips: [198.19.100.10], ports: [{port: 80, targetPort: 8080}], selector: {app: db}}\n",
            Path::new("x"),
        )
        .unwrap();
        let dir = directory(&cfg, "td").unwrap();
        let svc = &dir.services[&"198.19.100.10:80".parse().unwrap()];
        assert_eq!(svc.service.to_string(), "shop/db");
        // What the destination reports: the service its endpoints serve.
        let served = &dir.by_endpoint[&"198.18.1.11:8080".parse().unwrap()];
        assert_eq!(served[0].fqdn, "db.shop.svc.cluster.local");
        assert!(!dir.by_endpoint.contains_key(&"198.18.1.12:8080".parse().unwrap()), "not selected");
        assert_eq!(dir.workloads[&"198.18.1.10".parse().unwrap()].meta.canonical_service, "db", "from the app label");
        let picks: Vec<SocketAddr> = (0..4).map(|_| svc.pick().unwrap()).collect();
        assert_eq!(picks[0], "198.18.1.10:8080".parse().unwrap());
        assert_eq!(picks[1], "198.18.1.11:8080".parse().unwrap());
        assert_eq!(picks[2], picks[0], "round robin; the other namespace's workload is not selected");
        let bad = LocalConfig::parse(
            "services:\n- {name: x, vips: [198.19.0.1], ports: [{port: 80}], selector: {}}\n",
            Path::new("x"),
        );
        assert!(bad.unwrap_err().to_string().contains("selector"));
    }

    #[test]
    fn each_service_selects_exactly_the_workloads_its_selector_matches() {
        // Workloads over two namespaces with overlapping labels; services with one and two
        // selector pairs, some matching nothing. The directory must hold, for each service,
        // the IPs of every workload the selector matches, in config order.
        let mut text = String::from("workloads:\n");
        for i in 0..120 {
            let ns = if i % 3 == 0 { "a" } else { "b" };
            text += &format!(
                "- {{uid: w{i}, name: w{i}, namespace: {ns}, node: n, ips: [198.18.{}.{}], labels: {{app: x{}, tier: t{}}}}}\n",
                i / 100,
                i % 100 + 1,
                i % 7,
                i % 4
            );
        }
        text += "services:\n";
        let selectors = ["{app: x3}", "{tier: t1}", "{app: x2, tier: t0}", "{app: x9}", "{tier: t2, app: x5}"];
        for (j, sel) in selectors.iter().enumerate() {
            for ns in ["a", "b"] {
                text += &format!("- {{name: s{j}, namespace: {ns}, vips: [198.19.{j}.{}], ports: [{{port: 80}}], selector: {sel}}}\n", if ns == "a" { 1 } else { 2 });
            }
        }
        let cfg = LocalConfig::parse(&text, Path::new("x")).unwrap();
        let dir = directory(&cfg, "td").unwrap();
        for svc in &cfg.services {
            let want: Vec<SocketAddr> = cfg
                .workloads
                .iter()
                .filter(|w| {
                    w.namespace == svc.namespace && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .flat_map(|w| w.ips.iter().map(|ip| SocketAddr::new(*ip, 80)))
                .collect();
            let got = &dir.services[&SocketAddr::new(svc.vips[0], 80)].endpoints;
            assert_eq!(got, &want, "service {}/{}", svc.namespace, svc.name);
        }
        assert!(dir.services.values().any(|s| s.endpoints.is_empty()), "some selector matches nothing");
        assert!(dir.services.values().any(|s| s.endpoints.len() > 5));
    }

    #[test]
    fn identities_mtls_and_the_directory_come_from_the_config() {
        let cfg = LocalConfig::parse(
            "workloads:\n\
             - {uid: u, name: a, namespace: shop, serviceAccount: web, node: n1, netns: /a, ips: [198.18.1.10], labels: {app: a}}\n\
             - {uid: v, name: b, namespace: shop, serviceAccount: db, node: n2, ips: [198.18.2.10]}\n\
             peerAuthentications:\n\
             - metadata: {name: a, namespace: shop}\n  spec: {selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}\n",
            Path::new("x"),
        )
        .unwrap();
        let pods = desired(&cfg, &MESH).unwrap().pods;
        assert_eq!(pods["u"].identity.to_string(), "spiffe://td/ns/shop/sa/web");
        assert!(pods["u"].mtls.kernel_strict());
        let dir = directory(&cfg, "td").unwrap();
        assert_eq!(
            dir.workloads[&"198.18.2.10".parse::<IpAddr>().unwrap()].identity.to_string(),
            "spiffe://td/ns/shop/sa/db"
        );
        let bad = LocalConfig::parse(
            "workloads:\n- {uid: u, name: a, namespace: Shop!, node: n1, netns: /a}\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(desired(&bad, &MESH).is_err(), "a namespace that cannot be a SPIFFE ID is an error");
    }
}
