//! A small Kubernetes node set without Kubernetes: the test API server (in the fabric
//! netns, reachable from every node at 198.19.0.254:6443), agents in `--kube` mode, and
//! pods whose network Debian's reference CNI plugins build (`bridge` + `host-local`) with
//! `selvedge-cni` chained after them — invoked the way a container runtime does (CNI
//! environment variables, the network configuration on stdin, `prevResult` passed on, DEL
//! in reverse order when an ADD fails). The kubelet's part (the Pod object's status) is
//! played by [`Cluster::create_pod`].

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use k8s_openapi::api::core::v1::{Container, Namespace, Pod as KPod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};

use crate::{
    agent::AgentOptions,
    apiserver::ApiServer,
    lab::{Lab, Pod},
    proc::{self, Place},
    sys::run,
};

pub const MESH_LABEL: &str = "selvedge.dev/mesh";
const API_ADDR: &str = "198.19.0.254:6443";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const NETWORK: &str = "lab-net";

/// What a test asks for; the rest (uid, IP, netns, cgroup) the cluster fills in.
#[derive(Debug, Clone)]
pub struct PodRequest {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// A fixed address (host-local's `IP` argument), e.g. to reuse a deleted pod's IP.
    pub ip: Option<Ipv4Addr>,
    /// Chain `selvedge-cni` after the reference plugins (false: a pod from before Selvedge
    /// was installed).
    pub selvedge_cni: bool,
}

impl PodRequest {
    pub fn new(name: &str, namespace: &str, node: &str) -> Self {
        PodRequest {
            name: name.into(),
            namespace: namespace.into(),
            node: node.into(),
            service_account: name.into(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            ip: None,
            selvedge_cni: true,
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn without_selvedge_cni(mut self) -> Self {
        self.selvedge_cni = false;
        self
    }
}

/// A CNI ADD that failed: the plugin's exit, its stdout (the CNI error JSON) and stderr.
#[derive(Debug, Clone)]
pub struct CniFailure {
    pub plugin: String,
    pub stdout: String,
    pub stderr: String,
}

impl CniFailure {
    /// The CNI error object's `code`.
    pub fn code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.stdout).ok()?.get("code")?.as_u64()
    }
}

/// One pod's runtime facts, kept for DEL.
#[derive(Debug, Clone)]
struct Sandbox {
    request: PodRequest,
    uid: String,
    container_id: String,
    netns: PathBuf,
}

#[derive(Debug)]
pub struct Cluster {
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
    /// Declared after `api` so the lab (and its agents) go first on drop.
    pub lab: Lab,
    selvedge_cni: PathBuf,
    sandboxes: BTreeMap<String, Sandbox>,
    seq: u32,
}

impl Cluster {
    /// A lab with `nodes` and the API server; no agents yet.
    pub fn new(name: &str, nodes: &[&str]) -> Self {
        assert!(
            Path::new(REFERENCE_PLUGINS).join("bridge").exists(),
            "{REFERENCE_PLUGINS}/bridge missing: install containernetworking-plugins (`cargo xtask setup`)"
        );
        let mut lab = Lab::new(name);
        for n in nodes {
            lab.node(n);
        }
        let fabric = lab.fabric_netns();
        let fabric_name = fabric.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        run("ip", &["-n", &fabric_name, "addr", "add", "198.19.0.254/24", "dev", "br0"]);
        // Up, so what runs beside the API server in the fabric (the cluster CA) reaches it.
        run("ip", &["-n", &fabric_name, "link", "set", "lo", "up"]);
        let api = ApiServer::start_in_netns(&fabric, API_ADDR.parse().expect("API address"));
        let kubeconfig = lab.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let selvedge_cni = lab.env.selvedge.with_file_name("selvedge-cni");
        assert!(selvedge_cni.exists(), "{} missing: build with `cargo xtask build`", selvedge_cni.display());
        Cluster { api, kubeconfig, lab, selvedge_cni, sandboxes: BTreeMap::new(), seq: 0 }
    }

    /// Create or relabel a namespace; `enrolled` sets the mesh label.
    pub fn namespace(&self, name: &str, enrolled: bool) {
        let labels = enrolled.then(|| BTreeMap::from([(MESH_LABEL.to_owned(), "enabled".to_owned())]));
        self.api.apply_typed(&Namespace {
            metadata: ObjectMeta { name: Some(name.into()), labels, ..ObjectMeta::default() },
            ..Namespace::default()
        });
    }

    /// Start `node`'s agent in Kubernetes mode; returns once it is ready (first list applied).
    pub fn start_agent(&mut self, node: &str) {
        self.start_agent_with(node, Vec::new());
    }

    /// [`Self::start_agent`] with more `selvedge run` flags.
    pub fn start_agent_with(&mut self, node: &str, extra_args: Vec<String>) {
        let opts = AgentOptions { kubeconfig: Some(self.kubeconfig.clone()), extra_args, ..AgentOptions::default() };
        self.lab.start_agent(node, opts);
    }

    /// The uid of a pod created here.
    pub fn uid(&self, pod: &str) -> String {
        self.sandboxes.get(pod).unwrap_or_else(|| panic!("no pod {pod}")).uid.clone()
    }

    /// Do what the API server, the scheduler and the kubelet do for a new pod: store the
    /// Pod, build its sandbox (netns, cgroup `pod<uid>`), run the CNI chain, report its IP.
    /// On a failed ADD the sandbox is torn down (DEL in reverse order) and the Pod stays
    /// Pending, as a runtime would.
    pub fn create_pod(&mut self, req: PodRequest) -> Result<Pod, CniFailure> {
        self.seq += 1;
        let uid = format!("{:08x}-5e1f-4ed9-8000-{:012x}", std::process::id(), self.seq);
        let container_id = format!("sandbox-{}-{}", req.name, self.seq);
        self.api.apply_typed(&pod_object(&req, &uid, None));
        let ns_name = format!("{}-pod-{}", self.lab.prefix, req.name);
        run("ip", &["netns", "add", &ns_name]);
        run("ip", &["-n", &ns_name, "link", "set", "lo", "up"]);
        let netns = PathBuf::from("/run/netns").join(&ns_name);
        // The node's runtime netns directory, as the agent's --netns-dir sees it.
        let node_dir = self.lab.dir.join(format!("netns-{}", req.node));
        std::fs::create_dir_all(&node_dir).expect("node netns dir");
        std::os::unix::fs::symlink(&netns, node_dir.join(&ns_name)).expect("netns link");
        let cgroup = self.lab.node_cgroup(&req.node).join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        let sandbox = Sandbox { request: req.clone(), uid: uid.clone(), container_id, netns: netns.clone() };
        let result = self.add(&sandbox);
        let ip = match result {
            Ok(ip) => ip,
            Err(failure) => {
                self.del(&sandbox);
                remove_sandbox(&ns_name, &cgroup);
                let _ = std::fs::remove_file(node_dir.join(&ns_name));
                return Err(failure);
            }
        };
        self.api.apply_typed(&pod_object(&req, &uid, Some(ip)));
        let pod = Pod {
            name: req.name.clone(),
            node: req.node.clone(),
            ip,
            netns,
            cgroup,
            enrolled: true,
            strict: false,
            role: req.name.clone(),
            permissive_ports: Vec::new(),
            probe_ports: Vec::new(),
            namespace: req.namespace.clone(),
        };
        self.lab.insert_pod(pod.clone());
        self.sandboxes.insert(req.name.clone(), sandbox);
        Ok(pod)
    }

    /// Change a pod's labels in the API (the pod keeps running).
    pub fn relabel(&self, pod: &str, labels: &[(&str, Option<&str>)]) {
        let s = self.sandboxes.get(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        let mut obj = self
            .api
            .get("v1", "Pod", Some(&s.request.namespace), pod)
            .unwrap_or_else(|| panic!("pod {pod} not in the API"));
        for (k, v) in labels {
            match v {
                Some(v) => obj["metadata"]["labels"][*k] = json!(v),
                None => {
                    if let Some(m) = obj["metadata"]["labels"].as_object_mut() {
                        m.remove(*k);
                    }
                }
            }
        }
        self.api.apply(obj);
    }

    /// Delete a pod the way the kubelet does: CNI DEL, sandbox gone, then the API object.
    pub fn delete_pod(&mut self, pod: &str) {
        let s = self.sandboxes.remove(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        self.del(&s);
        let p = self.lab.remove_pod(pod);
        let _ = std::fs::write(p.cgroup.join("cgroup.kill"), "1");
        let ns_name = s.netns.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        remove_sandbox(&ns_name, &p.cgroup);
        let _ = std::fs::remove_file(self.lab.dir.join(format!("netns-{}", p.node)).join(&ns_name));
        self.api.delete_typed::<KPod>(Some(&s.request.namespace), pod);
    }

    /// A pod in graceful termination: its sandbox is gone (CNI DEL; its IP can be handed
    /// out again) while the API still holds it, marked with a deletionTimestamp.
    pub fn terminate_pod(&mut self, pod: &str) {
        let ns = self.sandboxes.get(pod).unwrap_or_else(|| panic!("no pod {pod}")).request.namespace.clone();
        let mut obj = self.api.get("v1", "Pod", Some(&ns), pod).unwrap_or_else(|| panic!("pod {pod} not in the API"));
        self.delete_pod(pod);
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.api.apply(obj);
    }

    /// Run one CNI command of `plugin` for `s` on its node, as a runtime does.
    pub fn invoke(&self, s_pod: &str, plugin: &str, command: &str, conf: &Value) -> Result<Value, CniFailure> {
        let s = self.sandboxes.get(s_pod).unwrap_or_else(|| panic!("no pod {s_pod}"));
        self.invoke_for(s, plugin, command, conf)
    }

    fn invoke_for(&self, s: &Sandbox, plugin: &str, command: &str, conf: &Value) -> Result<Value, CniFailure> {
        let exe = if plugin == "selvedge-cni" {
            self.selvedge_cni.clone()
        } else {
            Path::new(REFERENCE_PLUGINS).join(plugin)
        };
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            s.request.namespace, s.request.name, s.container_id, s.uid
        );
        if let Some(ip) = s.request.ip {
            args.push_str(&format!(";IP={ip}"));
        }
        let mut cmd = Command::new(&exe);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &s.container_id)
            .env("CNI_NETNS", &s.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REFERENCE_PLUGINS)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let node_ns = self.lab.node_netns(&s.request.node);
        let mut child = proc::command_in(cmd, Place { netns: Some(&node_ns), cgroup: None })
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(conf.to_string().as_bytes()).expect("write the network configuration");
        }
        let out = child.wait_with_output().expect("wait for the plugin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(CniFailure { plugin: plugin.into(), stdout, stderr });
        }
        Ok(serde_json::from_str(&stdout).unwrap_or(Value::Null))
    }

    /// The chain's configurations: the reference bridge first, then ours.
    fn bridge_conf(&self, node: &str) -> Value {
        let i = self.lab.node_index(node);
        json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": "br0",
            "isGateway": false, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("198.18.{i}.0/24"), "rangeStart": format!("198.18.{i}.100"),
                             "rangeEnd": format!("198.18.{i}.199"), "gateway": format!("198.18.{i}.1")}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.lab.dir.join(format!("ipam-{node}")),
            }
        })
    }

    /// `selvedge-cni`'s entry, with the previous plugin's result.
    pub fn selvedge_conf(&self, node: &str, prev: Option<&Value>) -> Value {
        let socket = self.lab.dir.join(format!("state-{node}")).join("cni.sock");
        let mut c = json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "selvedge-cni",
            "agentSocket": socket, "kubeconfig": self.kubeconfig, "meshLabel": MESH_LABEL,
        });
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn add(&self, s: &Sandbox) -> Result<Ipv4Addr, CniFailure> {
        let node = &s.request.node;
        let bridge = self.invoke_for(s, "bridge", "ADD", &self.bridge_conf(node))?;
        let ip = bridge["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bridge result without an IPv4 address: {bridge}"));
        if s.request.selvedge_cni {
            let ours = self.invoke_for(s, "selvedge-cni", "ADD", &self.selvedge_conf(node, Some(&bridge)))?;
            assert_eq!(ours["ips"], bridge["ips"], "selvedge-cni passes the previous result on");
        }
        Ok(ip)
    }

    /// DEL in reverse order; errors are ignored, as runtimes retry DEL until it succeeds
    /// and both plugins treat a missing sandbox as done.
    fn del(&self, s: &Sandbox) {
        let node = &s.request.node;
        if s.request.selvedge_cni {
            let _ = self.invoke_for(s, "selvedge-cni", "DEL", &self.selvedge_conf(node, None));
        }
        let _ = self.invoke_for(s, "bridge", "DEL", &self.bridge_conf(node));
    }

    /// CNI CHECK of our plugin for a running pod.
    pub fn check(&self, pod: &str) -> Result<(), CniFailure> {
        let s = self.sandboxes.get(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        let bridge = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", self.lab.get(pod).ip)}]});
        self.invoke_for(s, "selvedge-cni", "CHECK", &self.selvedge_conf(&s.request.node, Some(&bridge))).map(|_| ())
    }

    /// Where a pod's app listens.
    pub fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        self.lab.get(pod).addr(port)
    }
}

fn remove_sandbox(ns_name: &str, cgroup: &Path) {
    let _ = Command::new("ip").args(["netns", "del", ns_name]).output();
    crate::lab::remove_cgroup_tree(cgroup);
}

/// The Pod as the API holds it: scheduled on its node; `ip` set once the network is up.
fn pod_object(req: &PodRequest, uid: &str, ip: Option<Ipv4Addr>) -> KPod {
    KPod {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: Some(req.namespace.clone()),
            uid: Some(uid.into()),
            labels: Some(req.labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(req.node.clone()),
            service_account_name: Some(req.service_account.clone()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("selvedge-lab-app".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(if ip.is_some() { "Running" } else { "Pending" }.into()),
            pod_ip: ip.map(|i| i.to_string()),
            pod_ips: ip.map(|i| vec![PodIP { ip: i.to_string() }]),
            ..PodStatus::default()
        }),
    }
}
