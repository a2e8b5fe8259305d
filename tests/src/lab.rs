//! Nodes, pods and the fabric between nodes; cleanup on drop (even on panic) and of
//! leftovers from runs that were killed.
//!
//! ```text
//!  fabric netns: bridge br0 ── n1 ── (node1 netns: eth0 198.19.0.1, br0 198.18.1.1) ── pods 198.18.1.10..
//!                          └── n2 ── (node2 netns: eth0 198.19.0.2, br0 198.18.2.1) ── pods 198.18.2.10..
//! ```

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, OnceLock,
    },
};

use crate::{
    agent::{Agent, AgentOptions, AgentSpec},
    proc::{self, Place},
    sys::{self, run, Env, PIN_ROOT},
};

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// One pod: a netns, a veth into its node's bridge, an address, a cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// Whether the node's agent config enrolls it.
    pub enrolled: bool,
    pub strict: bool,
    /// The `role` label (services select on it); defaults to the pod's name.
    pub role: String,
    /// With `strict`: ports left PERMISSIVE by `portLevelMtls`.
    pub permissive_ports: Vec<u16>,
    /// Ports the node's health checks probe (the workload's `probePorts`).
    pub probe_ports: Vec<u16>,
    /// Its namespace (default `lab`); its identity is spiffe://cluster.local/ns/<ns>/sa/<name>.
    pub namespace: String,
}

impl Pod {
    /// Its Istio principal (the SPIFFE ID without the scheme).
    pub fn principal(&self) -> String {
        format!("cluster.local/ns/{}/sa/{}", self.namespace, self.name)
    }
}

/// A service in the agents' config: a VIP:port standing for the pods with `role`.
#[derive(Debug, Clone)]
pub struct LabService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub role: String,
}

/// What the agents' config says about a pod beyond its [`Pod`] record: labels over the
/// lab's own (`app: <pod name>`, `role: <role>`; one of these names replaces the lab's
/// value), and the name of the workload that owns it (`workloadName`, else the pod's name).
#[derive(Debug, Clone, Default)]
pub struct PodMeta {
    pub labels: BTreeMap<String, String>,
    pub workload_name: Option<String>,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

#[derive(Debug)]
struct Node {
    index: u8,
    netns: String,
    /// Capture programs attach here; the node's pods are its children.
    cgroup: PathBuf,
    pods: u8,
}

/// A lab. Dropping it kills every process it started and removes every namespace,
/// cgroup and pin it made.
#[derive(Debug)]
pub struct Lab {
    pub env: Env,
    pub prefix: String,
    /// `<cgroup2>/<prefix>`.
    root_cgroup: PathBuf,
    /// Scratch directory for configs, logs, status files.
    pub dir: PathBuf,
    fabric: String,
    nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<String, Pod>,
    pub services: Vec<LabService>,
    /// AuthorizationPolicy documents (YAML flow mappings) for the agents' config.
    pub policies: Vec<String>,
    agents: BTreeMap<String, Agent>,
    /// More labels and workload names for some pods, by pod name (`set_labels`,
    /// `set_workload_name`).
    pub pod_meta: BTreeMap<String, PodMeta>,
    /// Processes started in pods, with their stderr files.
    children: Vec<(Child, PathBuf)>,
    /// The first stdout line of each process started in a pod, by pid, once written (see
    /// `spawn_in_pod`).
    first_lines: BTreeMap<u32, Arc<OnceLock<String>>>,
}

impl Lab {
    /// A new empty lab for the test `name` (used only in the scratch directory's name).
    pub fn new(name: &str) -> Self {
        let env = sys::preflight();
        clean_stale(&env);
        let prefix = format!("svt-{}-{}", std::process::id(), LAB_SEQ.fetch_add(1, Ordering::SeqCst));
        let root_cgroup = env.cgroup2.join(&prefix);
        std::fs::create_dir_all(&root_cgroup).unwrap_or_else(|e| panic!("create {}: {e}", root_cgroup.display()));
        let dir = std::env::temp_dir().join(format!("{prefix}-{name}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let ca = Command::new(&env.selvedge)
            .args(["ca", "init", "--dir"])
            .arg(dir.join("ca"))
            .output()
            .expect("run selvedge ca init");
        assert!(ca.status.success(), "selvedge ca init: {}", String::from_utf8_lossy(&ca.stderr));
        let fabric = format!("{prefix}-fab");
        run("ip", &["netns", "add", &fabric]);
        run("ip", &["-n", &fabric, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &fabric, "link", "set", "br0", "up"]);
        Lab {
            env,
            prefix,
            root_cgroup,
            dir,
            fabric,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: Vec::new(),
            policies: Vec::new(),
            agents: BTreeMap::new(),
            pod_meta: BTreeMap::new(),
            children: Vec::new(),
            first_lines: BTreeMap::new(),
        }
    }

    /// The common fixture: node n1 with a meshed pod `a` and an unmeshed pod `c`, node n2
    /// with a meshed pod `d`, agents running on both with default options.
    pub fn two_nodes(name: &str) -> Self {
        let mut lab = Lab::new(name);
        lab.node("n1").node("n2");
        lab.pod("n1", "a", true).pod("n1", "c", false);
        lab.pod("n2", "d", true);
        lab.start_agent("n1", AgentOptions::default());
        lab.start_agent("n2", AgentOptions::default());
        lab
    }

    /// Add a node: a netns routing between its pods' bridge and the fabric.
    pub fn node(&mut self, name: &str) -> &mut Self {
        let index = u8::try_from(self.nodes.len() + 1).expect("few nodes");
        let ns = format!("{}-node-{name}", self.prefix);
        run("ip", &["netns", "add", &ns]);
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        // New namespaces start with forwarding off (toolchain.md); never touch the host's.
        self.sysctl(&ns, "net.ipv4.ip_forward", "1");
        self.sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0");
        self.sysctl(&ns, "net.ipv4.conf.default.rp_filter", "0");
        run("ip", &["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &ns, "addr", "add", &format!("198.18.{index}.1/24"), "dev", "br0"]);
        run("ip", &["-n", &ns, "link", "set", "br0", "up"]);
        let fab_port = format!("n{index}");
        run(
            "ip",
            &["-n", &self.fabric, "link", "add", &fab_port, "type", "veth", "peer", "name", "eth0", "netns", &ns],
        );
        run("ip", &["-n", &self.fabric, "link", "set", &fab_port, "master", "br0", "up"]);
        run("ip", &["-n", &ns, "addr", "add", &format!("198.19.0.{index}/24"), "dev", "eth0"]);
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        for other in self.nodes.values() {
            let (i, j) = (index, other.index);
            run("ip", &["-n", &ns, "route", "add", &format!("198.18.{j}.0/24"), "via", &format!("198.19.0.{j}")]);
            run(
                "ip",
                &["-n", &other.netns, "route", "add", &format!("198.18.{i}.0/24"), "via", &format!("198.19.0.{i}")],
            );
        }
        let cgroup = self.root_cgroup.join(name);
        std::fs::create_dir_all(&cgroup).expect("node cgroup");
        self.nodes.insert(name.into(), Node { index, netns: ns, cgroup, pods: 0 });
        self
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) {
        run("ip", &["netns", "exec", ns, "sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Add a pod on `node`; `enrolled` decides whether the node's agent meshes it.
    pub fn pod(&mut self, node: &str, name: &str, enrolled: bool) -> &mut Self {
        self.pod_at(node, name, enrolled, None)
    }

    /// Delete `old` (its processes, netns and cgroup) and start `new` on the same node with
    /// the same address: a new workload on a reused IP. Agents see it at `write_configs`.
    pub fn replace_pod(&mut self, old: &str, new: &str) {
        let o = self.delete_pod_sandbox(old);
        self.pod_at(&o.node, new, o.enrolled, Some(o.ip));
        if let Some(p) = self.pods.get_mut(new) {
            p.namespace = o.namespace;
        }
    }

    /// Delete `name`'s processes and network namespace and make them again at the same
    /// netns path, with the same address and settings: a restarted pod sandbox. The agents'
    /// configs do not change.
    pub fn recreate_pod(&mut self, name: &str) {
        let o = self.delete_pod_sandbox(name);
        self.pod_at(&o.node, name, o.enrolled, Some(o.ip));
        let p = self.pods.get_mut(name).expect("just made");
        assert_eq!(p.netns, o.netns, "same netns path");
        *p = o;
    }

    /// Forget `name` and kill its processes, delete its netns and its cgroup; returns it.
    fn delete_pod_sandbox(&mut self, name: &str) -> Pod {
        let o = self.pods.remove(name).unwrap_or_else(|| panic!("no pod {name}"));
        let _ = std::fs::write(o.cgroup.join("cgroup.kill"), "1");
        if let Some(ns) = o.netns.file_name() {
            let _ = Command::new("ip").args(["netns", "del"]).arg(ns).output();
        }
        remove_cgroup_tree(&o.cgroup);
        o
    }

    fn pod_at(&mut self, node: &str, name: &str, enrolled: bool, ip: Option<Ipv4Addr>) -> &mut Self {
        let n = self.nodes.get_mut(node).unwrap_or_else(|| panic!("no node {node}"));
        n.pods += 1;
        let ip = ip.unwrap_or(Ipv4Addr::new(198, 18, n.index, 9 + n.pods));
        let ns = format!("{}-pod-{name}", self.prefix);
        run("ip", &["netns", "add", &ns]);
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        let host_end = format!("v{}", n.pods);
        run("ip", &["-n", &n.netns, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        run("ip", &["-n", &n.netns, "link", "set", &host_end, "master", "br0", "up"]);
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &ns, "route", "add", "default", "via", &format!("198.18.{}.1", n.index)]);
        let cgroup = n.cgroup.join(name);
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        let pod = Pod {
            name: name.into(),
            node: node.into(),
            ip,
            netns: PathBuf::from("/run/netns").join(&ns),
            cgroup,
            enrolled,
            strict: false,
            role: name.into(),
            permissive_ports: Vec::new(),
            probe_ports: Vec::new(),
            namespace: "lab".into(),
        };
        self.pods.insert(name.into(), pod);
        self
    }

    pub fn get(&self, pod: &str) -> &Pod {
        self.pods.get(pod).unwrap_or_else(|| panic!("no pod {pod}"))
    }

    /// Make `pod` STRICT except on `ports` (PeerAuthentication `portLevelMtls`).
    pub fn set_strict_except(&mut self, pod: &str, ports: &[u16]) {
        let p = self.pods.get_mut(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        p.strict = true;
        p.permissive_ports = ports.to_vec();
    }

    /// Declare the ports the node probes on `pod` (takes effect at the next `write_configs`).
    pub fn set_probe_ports(&mut self, pod: &str, ports: &[u16]) {
        self.pods.get_mut(pod).unwrap_or_else(|| panic!("no pod {pod}")).probe_ports = ports.to_vec();
    }

    /// Move `pod` to `namespace` (before its agent starts, or then `write_configs`).
    pub fn set_namespace(&mut self, pod: &str, namespace: &str) {
        self.pods.get_mut(pod).unwrap_or_else(|| panic!("no pod {pod}")).namespace = namespace.into();
    }

    /// Replace the AuthorizationPolicies and wait until every agent has applied them.
    pub fn set_policies(&mut self, policies: &[&str]) {
        self.policies = policies.iter().map(|p| p.to_string()).collect();
        self.write_configs();
    }

    /// Set a pod's `role` label (takes effect at the next agent start or `write_configs`).
    pub fn set_role(&mut self, pod: &str, role: &str) {
        self.pods.get_mut(pod).unwrap_or_else(|| panic!("no pod {pod}")).role = role.into();
    }

    /// Give `pod` more labels (or other values of `app`/`role`); takes effect at the next
    /// agent start or `write_configs`.
    pub fn set_labels(&mut self, pod: &str, labels: &[(&str, &str)]) {
        assert!(self.pods.contains_key(pod), "no pod {pod}");
        let meta = self.pod_meta.entry(pod.into()).or_default();
        meta.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    }

    /// Name the workload that owns `pod` (a Deployment's name, say); takes effect at the
    /// next agent start or `write_configs`.
    pub fn set_workload_name(&mut self, pod: &str, workload: &str) {
        assert!(self.pods.contains_key(pod), "no pod {pod}");
        self.pod_meta.entry(pod.into()).or_default().workload_name = Some(workload.into());
    }

    /// Change a pod's enrollment or STRICT flag; takes effect at the next `write_config`.
    pub fn set_pod(&mut self, pod: &str, enrolled: bool, strict: bool) {
        let p = self.pods.get_mut(pod).unwrap_or_else(|| panic!("no pod {pod}"));
        p.enrolled = enrolled;
        p.strict = strict;
    }

    /// Start (or restart) the agent of `node`; returns once it reports ready.
    pub fn start_agent(&mut self, node: &str, opts: AgentOptions) {
        let spec = self.agent_spec(node, node);
        if let Some(mut old) = self.agents.remove(node) {
            old.kill();
        }
        let pods: Vec<Pod> = self.pods.values().cloned().collect();
        let agent =
            Agent::start_with_meta(&self.env, spec, opts, &pods, &self.services, &self.policies, &self.pod_meta);
        self.agents.insert(node.into(), agent);
    }

    /// A rolling update's surge: start a second agent on `node` beside the running one
    /// (same pins, config and cgroup; its own status and log files) and return once it
    /// reports ready. The new agent becomes the node's; the old one is handed back, still
    /// running, for the test to stop.
    pub fn surge_agent(&mut self, node: &str, opts: AgentOptions) -> Agent {
        let old = self.agents.remove(node).unwrap_or_else(|| panic!("no agent on {node} to replace"));
        let spec = self.agent_spec(node, &format!("{node}-surge"));
        let pods: Vec<Pod> = self.pods.values().cloned().collect();
        let agent =
            Agent::start_with_meta(&self.env, spec, opts, &pods, &self.services, &self.policies, &self.pod_meta);
        self.agents.insert(node.into(), agent);
        old
    }

    fn agent_spec(&self, node: &str, instance: &str) -> AgentSpec {
        let n = self.nodes.get(node).unwrap_or_else(|| panic!("no node {node}"));
        let spec = AgentSpec {
            node: node.into(),
            instance: instance.into(),
            node_netns: PathBuf::from("/run/netns").join(&n.netns),
            pods_cgroup: n.cgroup.clone(),
            agent_cgroup: self.root_cgroup.join(format!("agent-{node}")),
            pin_dir: Path::new(PIN_ROOT).join(format!("{}-{node}", self.prefix)),
            dir: self.dir.clone(),
            ca_dir: self.dir.join("ca"),
        };
        std::fs::create_dir_all(&spec.agent_cgroup).expect("agent cgroup");
        spec
    }

    /// Thaw a paused agent (usable while other threads hold `&Lab`).
    pub fn agents_resume(&self, node: &str) {
        self.agents.get(node).unwrap_or_else(|| panic!("no agent on {node}")).resume();
    }

    pub fn agent(&mut self, node: &str) -> &mut Agent {
        self.agents.get_mut(node).unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// Rewrite every running agent's config from the pods' current flags and wait until
    /// each has applied it.
    pub fn write_configs(&mut self) {
        let pods: Vec<Pod> = self.pods.values().cloned().collect();
        for agent in self.agents.values_mut() {
            agent.pod_meta = self.pod_meta.clone();
            agent.reconfigure(&pods, &self.services, &self.policies);
        }
    }

    /// Capture every packet crossing the fabric (the links between nodes) while `f` runs;
    /// returns the raw capture file's bytes.
    pub fn capture_fabric<T>(&mut self, f: impl FnOnce(&Lab) -> T) -> (T, Vec<u8>) {
        let file = self.dir.join(format!("fabric-{}.pcap", self.children.len()));
        let ns = PathBuf::from("/run/netns").join(&self.fabric);
        let mut cmd = Command::new("tcpdump");
        // -U: write each packet as it arrives, so nothing is lost in a buffer on SIGINT.
        cmd.args(["-i", "br0", "-U", "-s", "0", "-w"]).arg(&file);
        let child = proc::spawn(cmd, Place { netns: Some(&ns), cgroup: None }, Some(&self.dir.join("tcpdump.err")));
        // tcpdump says "listening on" once the capture is live.
        crate::sys::wait_for(10, "tcpdump to start", || {
            std::fs::read_to_string(self.dir.join("tcpdump.err")).ok().filter(|t| t.contains("listening on"))
        });
        let out = f(self);
        std::thread::sleep(std::time::Duration::from_millis(300));
        proc::signal(&child, libc::SIGINT);
        let mut child = child;
        let _ = child.wait();
        (out, std::fs::read(&file).unwrap_or_default())
    }

    /// Write certificate files for `pods` the way an external issuer (SPIRE, cert-manager)
    /// would, signed by the lab's CA; returns the directory (`--cert-source files`).
    pub fn write_cert_files(&self, pods: &[&str], lifetime: std::time::Duration) -> PathBuf {
        let dir = self.dir.join("certs");
        std::fs::create_dir_all(&dir).expect("cert dir");
        std::fs::copy(self.dir.join("ca/root-cert.pem"), dir.join("root-cert.pem")).expect("bundle");
        self.issue_cert_files(&self.dir.join("ca"), pods, lifetime)
    }

    /// (Re-)issue `pods`' certificate files under `<lab>/certs` from the CA in `ca_dir`,
    /// leaving the bundle as it is; returns the directory.
    pub fn issue_cert_files(&self, ca_dir: &Path, pods: &[&str], lifetime: std::time::Duration) -> PathBuf {
        use selvedge::identity::{new_key, BuiltinCa, SpiffeId};
        let ca = BuiltinCa::load(ca_dir).expect("CA");
        let dir = self.dir.join("certs");
        for pod in pods {
            let id = SpiffeId::new("cluster.local", "lab", pod).expect("identity");
            let d = dir.join("lab").join(pod);
            std::fs::create_dir_all(&d).expect("identity dir");
            let key = new_key().expect("key");
            std::fs::write(d.join("cert-chain.pem"), ca.issue_pem(&id, &key, lifetime).expect("sign")).expect("chain");
            std::fs::write(d.join("key.pem"), key.serialize_pem()).expect("key file");
        }
        dir
    }

    /// Tune `pod` as a load generator: reuse TIME_WAIT ports for new connections and use a
    /// wide ephemeral range (its netns only; the host is never touched).
    pub fn tune_for_load(&self, pod: &str) {
        let ns = self.get(pod).netns.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1");
        // Wide, but above the agent's ports (15001/15006/15008): an app connection holding
        // one of them would stop the agent listening there when the pod is enrolled.
        self.sysctl(&ns, "net.ipv4.ip_local_port_range", "15100 65000");
    }

    /// Give `pod` one more address (like a pod IP that appears late).
    pub fn add_address(&self, pod: &str, ip: Ipv4Addr) {
        let ns = self.get(pod).netns.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }

    /// Start a long-running process in `pod` (netns + cgroup), e.g. a server.
    pub fn spawn_in_pod(&mut self, pod: &str, cmd: Command) -> u32 {
        let p = self.get(pod).clone();
        let stderr = self.dir.join(format!("{pod}-{}.err", self.children.len()));
        let mut child = proc::spawn(cmd, Place { netns: Some(&p.netns), cgroup: Some(&p.cgroup) }, Some(&stderr));
        let pid = child.id();
        // Its stdout is read from the start, whether anyone asks for it or not: a server
        // that reports on stdout (iperf3, sockperf) would otherwise fill the pipe after
        // enough runs and stop in `write` mid-measurement.
        if let Some(out) = child.stdout.take() {
            let first = Arc::new(OnceLock::new());
            let set = Arc::clone(&first);
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(out);
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut reader, &mut line);
                let _ = set.set(line);
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            });
            self.first_lines.insert(pid, first);
        }
        self.children.push((child, stderr));
        pid
    }

    /// The first line a process started by `spawn_in_pod` writes to stdout ("" if it exits
    /// or stays silent for `limit`, or if it was asked for before).
    pub fn child_first_line(&mut self, pid: u32, limit: std::time::Duration) -> String {
        let Some(first) = self.first_lines.remove(&pid) else { return String::new() };
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(line) = first.get() {
                return line.clone();
            }
            if std::time::Instant::now() >= deadline {
                return String::new();
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Stop a process started by `spawn_in_pod` (SIGKILL) and reap it.
    pub fn stop_child(&mut self, pid: u32) {
        if let Some((c, _)) = self.children.iter_mut().find(|(c, _)| c.id() == pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What a process started by `spawn_in_pod` wrote to stderr.
    pub fn child_stderr(&self, pid: u32) -> String {
        self.children
            .iter()
            .find(|(c, _)| c.id() == pid)
            .and_then(|(_, p)| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Run a command in `pod` to completion and return its stdout.
    pub fn run_in_pod(&self, pod: &str, cmd: Command) -> String {
        let p = self.get(pod);
        self.run_in(Place { netns: Some(&p.netns), cgroup: Some(&p.cgroup) }, cmd)
    }

    /// The fabric's network namespace file (the links between nodes).
    pub fn fabric_netns(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.fabric)
    }

    /// `node`'s number: its pods are in 198.18.<index>.0/24.
    pub fn node_index(&self, node: &str) -> u8 {
        self.nodes.get(node).unwrap_or_else(|| panic!("no node {node}")).index
    }

    /// The cgroup the node's agent captures (its pods' cgroups are children).
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.nodes.get(node).unwrap_or_else(|| panic!("no node {node}")).cgroup.clone()
    }

    /// Track a pod built elsewhere (e.g. by CNI plugins), so apps can run in it.
    pub fn insert_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.name.clone(), pod);
    }

    /// Stop tracking a pod; returns it.
    pub fn remove_pod(&mut self, name: &str) -> Pod {
        self.pods.remove(name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The agent of `node`, if one was started.
    pub fn agent_ref(&self, node: &str) -> &Agent {
        self.agents.get(node).unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// Kill `node`'s agent (SIGKILL: a crash) and forget it.
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut a) = self.agents.remove(node) {
            a.kill();
        }
    }

    /// The network namespace file of `node`.
    pub fn node_netns(&self, node: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.nodes.get(node).unwrap_or_else(|| panic!("no node {node}")).netns)
    }

    /// `selvedge run` as `node`'s agent would be started (its netns, pin directory, pods'
    /// cgroup unless `args` name one, and the lab's CA) with `args` after those, for a
    /// start that should fail: returns (exited successfully, stderr). A process still
    /// running after 20 s is killed and the test fails.
    pub fn run_agent_to_exit(&self, node: &str, args: &[&str]) -> (bool, String) {
        let spec = self.agent_spec(node, &format!("{node}-once"));
        let log = self.dir.join(format!("once-{node}-{}.log", LAB_SEQ.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = Command::new(&self.env.selvedge);
        cmd.args(["run", "--node", node, "--log-format", "json"])
            .arg("--pin-dir")
            .arg(&spec.pin_dir)
            .arg("--ca-dir")
            .arg(&spec.ca_dir);
        if !args.contains(&"--cgroup") {
            cmd.arg("--cgroup").arg(&spec.pods_cgroup);
        }
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let place = Place { netns: Some(&spec.node_netns), cgroup: Some(&spec.agent_cgroup) };
        let mut child = proc::command_in(cmd, place).spawn().expect("spawn selvedge run");
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for selvedge run") {
                break st;
            }
            if start.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("selvedge run {args:?} did not exit: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        (status.success(), std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// The pin directory `node`'s agent uses.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.agent_spec(node, node).pin_dir
    }

    /// The programs attached to `cgroup` itself (not inherited), as `bpftool` lists them.
    pub fn cgroup_programs(&self, cgroup: &Path) -> Vec<serde_json::Value> {
        let out = Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup).output().expect("run bpftool");
        assert!(out.status.success(), "bpftool cgroup show: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Run `selvedge ARGS` on `node` (in its netns, like an operator on the node).
    pub fn selvedge_on(&self, node: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(&self.env.selvedge);
        cmd.args(args);
        let ns = self.node_netns(node);
        let out = proc::command_in(cmd, Place { netns: Some(&ns), cgroup: None }).output().expect("run selvedge");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// One HTTP request from inside `node`'s netns: Ok((status, body)) or Err(connect error).
    pub fn http_on_node(&self, node: &str, to: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
        let ns = self.node_netns(node);
        let mut cmd = Command::new(&self.env.app);
        cmd.args(["http", &to.to_string(), method, path]);
        Self::http_report(&self.run_in(Place { netns: Some(&ns), cgroup: None }, cmd))
    }

    /// The same, from inside `pod`.
    pub fn http_from_pod(&self, pod: &str, to: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
        let mut cmd = Command::new(&self.env.app);
        cmd.args(["http", &to.to_string(), method, path]);
        Self::http_report(&self.run_in_pod(pod, cmd))
    }

    fn http_report(out: &str) -> Result<(u16, String), String> {
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad report {out:?}: {e}"));
        match v.get("status").and_then(serde_json::Value::as_u64) {
            Some(s) => Ok((u16::try_from(s).unwrap_or(0), v["body"].as_str().unwrap_or_default().to_string())),
            None => Err(v["error"].as_str().unwrap_or_default().to_string()),
        }
    }

    /// Run a command in `pod`'s netns but outside its cgroup: a host process entering the
    /// pod's network (like `nsenter --net`), which Selvedge must leave alone.
    pub fn run_in_pod_netns_as_host(&self, pod: &str, cmd: Command) -> String {
        self.run_in(Place { netns: Some(&self.get(pod).netns), cgroup: None }, cmd)
    }

    /// Run a command in the network namespace `netns` (no cgroup of the lab's).
    pub fn run_in_netns(&self, netns: &std::path::Path, cmd: Command) -> String {
        self.run_in(Place { netns: Some(netns), cgroup: None }, cmd)
    }

    fn run_in(&self, place: Place<'_>, cmd: Command) -> String {
        let out = proc::command_in(cmd, place).output().expect("run command");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            agent.kill();
        }
        for (c, _) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        teardown(&self.env, &self.prefix);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Remove everything named with `prefix`: processes (via cgroup.kill), cgroups, pins, netns.
fn teardown(env: &Env, prefix: &str) {
    let root = env.cgroup2.join(prefix);
    if root.exists() {
        let _ = std::fs::write(root.join("cgroup.kill"), "1");
        remove_cgroup_tree(&root);
    }
    if let Ok(entries) = std::fs::read_dir(PIN_ROOT) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{prefix}-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
}

/// cgroup directories are removed bottom-up, once empty of processes.
pub(crate) fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Leftovers of labs whose process is gone (a killed test run).
fn clean_stale(env: &Env) {
    let mut prefixes = std::collections::BTreeSet::new();
    let mut scan = |dir: &Path| {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let mut parts = name.splitn(4, '-');
                if let (Some("svt"), Some(pid), Some(seq)) = (parts.next(), parts.next(), parts.next()) {
                    if let Ok(pid) = pid.parse::<u32>() {
                        if !sys::alive(pid) {
                            prefixes.insert(format!("svt-{pid}-{seq}"));
                        }
                    }
                }
            }
        }
    };
    scan(&env.cgroup2);
    scan(Path::new(PIN_ROOT));
    scan(Path::new("/run/netns"));
    for p in prefixes {
        teardown(env, &p);
    }
}
