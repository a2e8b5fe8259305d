//! The local configuration file (`selvedge run --config FILE`) and the agent's resolved
//! settings. Parsing and validation are pure; reading the file is the caller's job.
//!
//! ```yaml
//! workloads:
//!   - uid: 6c1f…            # stable identity of the pod (Kubernetes UID)
//!     name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     node: node-1          # workloads on other nodes are peers, not enrolled here
//!     ips: [198.18.1.10]
//!     netns: /run/netns/web-0   # for workloads on this node (without it: reported as waiting)
//!     labels: {app: web}
//! services:                 # virtual IPs resolved by the agent to workloads
//!   - name: db
//!     namespace: shop
//!     vips: [198.19.100.10]
//!     ports: [{port: 5432, targetPort: 5432}]
//!     selector: {app: db}     # workloads in the service's namespace with these labels
//! authorizationPolicies:    # Istio security.istio.io/v1 AuthorizationPolicy documents
//!   - metadata: {name: db, namespace: shop}
//!     spec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]}
//! peerAuthentications:      # Istio security.istio.io/v1 PeerAuthentication documents
//!   - metadata: {name: default, namespace: shop}
//!     spec: {mtls: {mode: STRICT}}
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use serde::Deserialize;

/// Environment variables that mirror the `run` flags (clap reads them).
pub const ENV_CONFIG: &str = "SELVEDGE_CONFIG";
pub const ENV_NODE: &str = "SELVEDGE_NODE";
pub const ENV_PIN_DIR: &str = "SELVEDGE_PIN_DIR";
pub const ENV_CGROUP: &str = "SELVEDGE_CGROUP";
pub const ENV_FAST_PATH: &str = "SELVEDGE_FAST_PATH";
pub const ENV_WORKER_THREADS: &str = "SELVEDGE_WORKER_THREADS";
pub const ENV_LOG_FORMAT: &str = "SELVEDGE_LOG_FORMAT";
pub const ENV_MAX_PODS: &str = "SELVEDGE_MAX_PODS";
pub const ENV_STATUS_FILE: &str = "SELVEDGE_STATUS_FILE";
pub const ENV_TRUST_DOMAIN: &str = "SELVEDGE_TRUST_DOMAIN";
pub const ENV_ROOT_NAMESPACE: &str = "SELVEDGE_ROOT_NAMESPACE";
pub const ENV_CA_DIR: &str = "SELVEDGE_CA_DIR";
pub const ENV_CERT_LIFETIME: &str = "SELVEDGE_CERT_LIFETIME";

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_CA_DIR: &str = "/var/lib/selvedge/ca";
pub const ENV_CERT_SOURCE: &str = "SELVEDGE_CERT_SOURCE";
pub const ENV_CERT_DIR: &str = "SELVEDGE_CERT_DIR";
pub const ENV_ISTIO_CA_ADDR: &str = "SELVEDGE_ISTIO_CA_ADDR";
pub const ENV_ISTIO_CA_SERVER_NAME: &str = "SELVEDGE_ISTIO_CA_SERVER_NAME";
pub const ENV_ISTIO_CA_ROOT: &str = "SELVEDGE_ISTIO_CA_ROOT";
pub const ENV_ISTIO_CA_TOKEN: &str = "SELVEDGE_ISTIO_CA_TOKEN";

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSourceConfig {
    /// The built-in CA in this directory signs certificates of this lifetime.
    Builtin { ca_dir: PathBuf, lifetime: std::time::Duration },
    /// Watched files (SPIRE, cert-manager): see `identity::FilesSource` for the layout.
    Files { dir: PathBuf },
    /// The Istio CA API (istiod, istio-csr).
    Istio(crate::identity::IstioCaConfig),
}

/// Where pins live unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/selvedge";
/// How often the config file is checked for changes.
pub const RELOAD_INTERVAL_MS: u64 = 500;
/// How long SIGTERM waits for open connections before exiting.
pub const DRAIN_TIMEOUT_SECS: u64 = 10;
/// Upstream connect timeout for proxied connections.
pub const CONNECT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config {path}: the file is empty (or holds only comments); keeping the config in force. \
         Write `workloads: []` to mean \"no workloads\""
    )]
    Empty { path: PathBuf },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("config: workload #{index} ({uid}): {problem}")]
    Workload { index: usize, uid: String, problem: String },
    #[error("config: {0}")]
    PeerAuth(#[from] crate::policy::PeerAuthError),
    #[error("config: {0}")]
    Authz(#[from] crate::policy::AuthzError),
    #[error("config: service {namespace}/{name}: {problem}")]
    Service { namespace: String, name: String, problem: String },
}

/// One workload (pod) as the file describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub node: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Network namespace file of a local workload (e.g. `/run/netns/NAME`, `/proc/PID/ns/net`).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The workload that owns the pod (a Deployment's, StatefulSet's, Job's… name), as
    /// Istio's `*_workload` metric labels name it; the pod's name when not given (a bare
    /// pod). In a cluster, from the pod's owner references.
    #[serde(default)]
    pub workload_name: Option<String>,
    /// Ports the node's health checks (the kubelet's probes) connect to in plaintext: from
    /// an address of the agent's own network namespace (the node's), a connection to one of
    /// them is exempt from STRICT and from AuthorizationPolicy, as Istio's ambient mode
    /// exempts kubelet probes. In a cluster, read from the pod's probes.
    #[serde(default)]
    pub probe_ports: Vec<u16>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_service_account() -> String {
    "default".into()
}

/// One port of a service: what clients dial on the VIP, and where endpoints listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// A service: virtual IPs that stand for the workloads its selector picks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub peer_authentications: Vec<crate::policy::PeerAuthentication>,
    #[serde(default)]
    pub authorization_policies: Vec<crate::policy::AuthorizationPolicy>,
}

impl LocalConfig {
    /// Parse and validate. `path` is only used in messages.
    ///
    /// An empty document (nothing, whitespace, comments only, or a bare `null`) is an
    /// error, not a config with no workloads: `: > FILE`, and `cp` or an editor for the
    /// moment between truncating and writing, leave exactly that, and taking it would
    /// unenroll every pod (plaintext, no STRICT, no AuthorizationPolicy). `workloads: []`
    /// says "nothing" on purpose.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        let typed = serde_yaml_ng::from_str::<LocalConfig>(text);
        // Only a result with nothing in it can have come from an empty document: the
        // (cheap, small) untyped parse runs just then.
        if typed.as_ref().map_or(true, |c| *c == LocalConfig::default()) && is_empty_document(text) {
            return Err(ConfigError::Empty { path: path.to_owned() });
        }
        let cfg = typed.map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut uids = BTreeSet::new();
        let mut netns = BTreeSet::new();
        for (index, w) in self.workloads.iter().enumerate() {
            let bad = |problem: String| ConfigError::Workload { index, uid: w.uid.clone(), problem };
            if w.uid.is_empty() {
                return Err(bad("uid is empty".into()));
            }
            if !uids.insert(&w.uid) {
                return Err(bad("uid appears twice".into()));
            }
            if w.name.is_empty() || w.node.is_empty() {
                return Err(bad("name and node must not be empty".into()));
            }
            if w.probe_ports.contains(&0) {
                return Err(bad("probePorts: 0 is not a port".into()));
            }
            if let Some(ns) = &w.netns {
                if !ns.is_absolute() {
                    return Err(bad(format!("netns {} is not an absolute path", ns.display())));
                }
                if !netns.insert(ns) {
                    return Err(bad(format!("netns {} is used by another workload", ns.display())));
                }
            }
        }
        for p in &self.peer_authentications {
            p.validate()?;
        }
        for p in &self.authorization_policies {
            // Validation does not depend on the root namespace; `compile_policies` redoes it.
            p.compile(DEFAULT_ROOT_NAMESPACE)?;
        }
        let mut vips = BTreeSet::new();
        for svc in &self.services {
            let bad = |problem: String| ConfigError::Service {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                problem,
            };
            if svc.vips.is_empty() || svc.ports.is_empty() {
                return Err(bad("needs at least one VIP and one port".into()));
            }
            if svc.selector.is_empty() {
                return Err(bad("needs a selector (an empty one would select every workload)".into()));
            }
            for vip in &svc.vips {
                for p in &svc.ports {
                    if p.port == 0 || p.target_port == Some(0) {
                        return Err(bad("port 0 is not a port".into()));
                    }
                    if !vips.insert((*vip, p.port)) {
                        return Err(bad(format!("{vip}:{} is used by another service", p.port)));
                    }
                }
            }
        }
        Ok(())
    }

    /// The AuthorizationPolicies, compiled for `root_namespace`.
    pub fn compile_policies(&self, root_namespace: &str) -> Result<Vec<crate::policy::CompiledPolicy>, ConfigError> {
        Ok(self.authorization_policies.iter().map(|p| p.compile(root_namespace)).collect::<Result<_, _>>()?)
    }

    /// The workloads this node must enroll: on `node` and with a netns.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }
}

/// Nothing but whitespace, comments and document markers, or a document that is `null`.
fn is_empty_document(text: &str) -> bool {
    let blank = text.lines().map(str::trim).all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...");
    blank || serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text).is_ok_and(|v| v.is_null())
}

/// Where the agent's state comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--config FILE`: re-read on change.
    File(PathBuf),
    /// `--kube`: the Kubernetes API, plus the CNI plugin for local pods' netns.
    Kube(KubeSettings),
}

#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// None: the in-cluster ServiceAccount.
    pub kubeconfig: Option<PathBuf>,
    /// Label key that enrolls a namespace or pod (`enabled`) or opts a pod out (`disabled`).
    pub mesh_label: String,
    /// The CNI socket and the pod registry.
    pub state_dir: PathBuf,
    /// The host's /proc, to find the netns of pods that started before the agent.
    pub proc_dir: PathBuf,
    /// Where the container runtime keeps pods' netns files (searched by pod IP likewise).
    pub netns_dir: PathBuf,
    /// The node's CNI configuration directory, when the agent should keep `selvedge-cni`
    /// chained in it.
    pub cni_conf_dir: Option<PathBuf>,
}

pub const ENV_KUBE: &str = "SELVEDGE_KUBE";
pub const ENV_MESH_LABEL: &str = "SELVEDGE_MESH_LABEL";
pub const ENV_STATE_DIR: &str = "SELVEDGE_STATE_DIR";
pub const ENV_PROC_DIR: &str = "SELVEDGE_PROC_DIR";
pub const ENV_NETNS_DIR: &str = "SELVEDGE_NETNS_DIR";
pub const ENV_CNI_CONF_DIR: &str = "SELVEDGE_CNI_CONF_DIR";
pub const DEFAULT_STATE_DIR: &str = "/var/run/selvedge";

/// Everything `selvedge run` resolved from flags, env and defaults; logged once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where workloads, services and policies come from.
    pub source: Source,
    pub node: String,
    pub pin_dir: PathBuf,
    /// The cgroup (v2) whose processes are captured: the one holding the pods.
    pub cgroup: PathBuf,
    pub fast_path: bool,
    pub bpf_object: Option<PathBuf>,
    /// Per-pod map capacity when the maps are first created.
    pub max_pods: u32,
    pub trust_domain: String,
    /// Where mesh-wide `PeerAuthentication`s live.
    pub root_namespace: String,
    /// `source_cluster`/`destination_cluster` in metrics.
    pub cluster_id: String,
    pub certs: CertSourceConfig,
    /// Connection and handshake limits (`--max-conns-per-pod`, `--max-conns`, `--max-handshakes`).
    pub limits: crate::limits::Limits,
    /// Admin API (loopback only), metrics and readiness listeners.
    pub admin_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub readiness_addr: std::net::SocketAddr,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(s: &str) -> Result<LocalConfig, ConfigError> {
        LocalConfig::parse(s, Path::new("t.yaml"))
    }

    #[test]
    fn parses_a_full_workload() {
        let c = parse(
            "workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  serviceAccount: sa\n  node: n1\n  ips: [198.18.1.10]\n  netns: /run/netns/a\n  labels: {app: a}\n  probePorts: [8080, 15021]\npeerAuthentications:\n- metadata: {name: d, namespace: ns}\n  spec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        let w = &c.workloads[0];
        assert_eq!(c.peer_authentications.len(), 1);
        assert_eq!(w.service_account, "sa");
        assert_eq!(w.ips, vec!["198.18.1.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.probe_ports, [8080, 15021]);
        assert_eq!(c.local_workloads("n1").count(), 1);
        assert_eq!(c.local_workloads("n2").count(), 0);
    }

    #[test]
    fn an_empty_file_is_rejected_and_an_explicit_empty_list_is_not() {
        for empty in ["", "   \n\t\n", "# nothing yet\n", "---\n", "~\n", "null"] {
            let e = parse(empty).expect_err(empty);
            assert!(matches!(e, ConfigError::Empty { .. }), "{empty:?}: {e}");
            assert!(e.to_string().contains("workloads: []"), "the message says how to mean nothing: {e}");
        }
        assert_eq!(parse("workloads: []\n").unwrap(), LocalConfig::default());
        assert_eq!(parse("{}").unwrap(), LocalConfig::default());
    }

    #[test]
    fn defaults() {
        let c = parse("workloads:\n- {uid: u, name: a, node: n}\n").unwrap();
        assert_eq!(c.workloads[0].namespace, "default");
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        let dup = parse("workloads:\n- {uid: u, name: a, node: n}\n- {uid: u, name: b, node: n}\n").unwrap_err();
        assert!(dup.to_string().contains("uid appears twice"), "{dup}");
        let rel = parse("workloads:\n- {uid: u, name: a, node: n, netns: rel/path}\n").unwrap_err();
        assert!(rel.to_string().contains("absolute"), "{rel}");
        let unknown = parse("workloads:\n- {uid: u, name: a, node: n, bogus: 1}\n").unwrap_err();
        assert!(unknown.to_string().contains("bogus"), "{unknown}");
        let pa = parse("peerAuthentications:\n- metadata: {name: x, namespace: n}\n  spec: {portLevelMtls: {\"80\": {mode: STRICT}}}\n")
            .unwrap_err();
        assert!(pa.to_string().contains("portLevelMtls needs spec.selector"), "{pa}");
        let zero = parse("workloads:\n- {uid: u, name: a, node: n, probePorts: [0]}\n").unwrap_err();
        assert!(zero.to_string().contains("probePorts"), "{zero}");
        let ip = parse("workloads:\n- {uid: u, name: a, node: n, ips: [not-an-ip]}\n").unwrap_err();
        assert!(matches!(ip, ConfigError::Parse { .. }));
    }

    #[test]
    fn shared_netns_is_rejected() {
        let e = parse("workloads:\n- {uid: u, name: a, node: n, netns: /x}\n- {uid: v, name: b, node: n, netns: /x}\n")
            .unwrap_err();
        assert!(e.to_string().contains("used by another workload"), "{e}");
    }
}
