//! One `selvedge run` per node, from the same binary users run, in the node's netns and a
//! cgroup of its own (outside the pods' cgroup, like a DaemonSet pod).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use serde::Deserialize;

use crate::{
    lab::{LabService, Pod, PodMeta},
    proc::{self, Place},
    sys::{wait_for, Env},
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The sockmap fast path (`--fast-path`).
    pub fast_path: bool,
    /// `--max-pods`, when set.
    pub max_pods: Option<u32>,
    /// `--cert-lifetime-secs`, when set.
    pub cert_lifetime_secs: Option<u64>,
    /// `--cert-source files --cert-dir DIR`, when set (else the lab's built-in CA).
    pub cert_dir: Option<PathBuf>,
    /// `--kube --kubeconfig FILE` (state directory `<lab dir>/state-<node>`), when set;
    /// else `--config` with the lab's generated file.
    pub kubeconfig: Option<PathBuf>,
    /// `--worker-threads`, when set.
    pub worker_threads: Option<u16>,
    /// More `selvedge run` flags, appended as they are.
    pub extra_args: Vec<String>,
    /// Run the agent with only these capabilities (`setpriv --bounding-set`, names as
    /// `setpriv` knows them, e.g. `bpf`), as a container granted exactly them would.
    pub capabilities: Option<Vec<&'static str>>,
    /// Run the agent under the DaemonSet's seccomp profile (`deploy/seccomp`), installed
    /// after the capabilities are set, as a runtime does. `SELVEDGE_LAB_SECCOMP=log` puts
    /// every lab agent under it in log mode instead (what it would refuse goes to the
    /// kernel log: how the profile is checked after the agent changes), `=enforce` under
    /// it for real.
    pub seccomp: bool,
}

impl Default for AgentOptions {
    /// The agent's own default: fast path off.
    fn default() -> Self {
        Self {
            fast_path: false,
            max_pods: None,
            cert_lifetime_secs: None,
            cert_dir: None,
            kubeconfig: None,
            worker_threads: None,
            extra_args: Vec::new(),
            capabilities: None,
            seccomp: false,
        }
    }
}

/// The agent's `--status-file`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub ready: bool,
    pub generation: u64,
    /// Config changes refused since the agent started (the config in force stayed).
    #[serde(default)]
    pub config_rejected_total: u64,
    /// The newest refused change (`reason`, `at`, `kept_generation`), until one applies.
    #[serde(default)]
    pub config_last_rejected: Option<serde_json::Value>,
    pub enrolled: Vec<String>,
    pub failed: BTreeMap<String, String>,
    pub stats: BTreeMap<String, u64>,
}

impl Status {
    pub fn stat(&self, name: &str) -> u64 {
        *self.stats.get(name).unwrap_or_else(|| panic!("no counter {name} in status"))
    }
}

/// Where an agent runs and keeps its files.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub node: String,
    /// Names this agent's status and log files: the node's name, or another one for a
    /// second agent beside it (a rolling update's new agent).
    pub instance: String,
    pub node_netns: PathBuf,
    pub pods_cgroup: PathBuf,
    pub agent_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    /// The lab's certificate authority, shared by every agent.
    pub ca_dir: PathBuf,
}

#[derive(Debug)]
pub struct Agent {
    pub spec: AgentSpec,
    pub opts: AgentOptions,
    selvedge: PathBuf,
    child: Option<Child>,
    /// More of what the config says about pods, by pod name (`Lab::set_labels`,
    /// `Lab::set_workload_name`); none by default.
    pub(crate) pod_meta: BTreeMap<String, PodMeta>,
}

impl Agent {
    pub fn config_path(&self) -> PathBuf {
        self.spec.dir.join(format!("agent-{}.yaml", self.spec.node))
    }
    pub fn status_path(&self) -> PathBuf {
        self.spec.dir.join(format!("agent-{}.status.json", self.spec.instance))
    }
    pub fn log_path(&self) -> PathBuf {
        self.spec.dir.join(format!("agent-{}.log", self.spec.instance))
    }
    /// `--state-dir` in Kubernetes mode: the CNI socket and the pod registry.
    pub fn state_dir(&self) -> PathBuf {
        self.spec.dir.join(format!("state-{}", self.spec.node))
    }

    /// `--netns-dir` in Kubernetes mode: this node's pods' netns files (links to
    /// /run/netns, which every lab on the machine shares).
    pub fn netns_dir(&self) -> PathBuf {
        self.spec.dir.join(format!("netns-{}", self.spec.node))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.spec.pin_dir
    }

    /// Write the config for `pods` and start the agent; returns once it reports ready.
    pub fn start(
        env: &Env,
        spec: AgentSpec,
        opts: AgentOptions,
        pods: &[Pod],
        services: &[LabService],
        policies: &[String],
    ) -> Self {
        Self::start_with_meta(env, spec, opts, pods, services, policies, &BTreeMap::new())
    }

    /// [`start`](Self::start), with more labels and workload names for some pods.
    pub fn start_with_meta(
        env: &Env,
        spec: AgentSpec,
        opts: AgentOptions,
        pods: &[Pod],
        services: &[LabService],
        policies: &[String],
        pod_meta: &BTreeMap<String, PodMeta>,
    ) -> Self {
        let mut a =
            Agent { spec, opts: opts.clone(), selvedge: env.selvedge.clone(), child: None, pod_meta: pod_meta.clone() };
        let _ = a.write_config(pods, services, policies);
        let _ = std::fs::remove_file(a.status_path());
        // setpriv (capabilities), then the seccomp filter, then the agent.
        let mut argv: Vec<std::ffi::OsString> = vec![a.selvedge.clone().into()];
        let mode = std::env::var("SELVEDGE_LAB_SECCOMP").ok();
        if opts.seccomp || mode.is_some() {
            let mut wrap: Vec<std::ffi::OsString> =
                vec![env.app.clone().into(), "seccomp-exec".into(), crate::seccomp::agent_profile().into()];
            if mode.as_deref() == Some("log") && !opts.seccomp {
                wrap.push("--log".into());
            }
            wrap.push("--".into());
            argv.splice(0..0, wrap);
        }
        if let Some(caps) = &opts.capabilities {
            let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
            argv.splice(0..0, ["setpriv".into(), "--bounding-set".into(), format!("-all,{}", set.join(",")).into()]);
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.arg("run");
        match &opts.kubeconfig {
            Some(kc) => cmd
                .arg("--kube")
                .arg("--kubeconfig")
                .arg(kc)
                .arg("--state-dir")
                .arg(a.state_dir())
                .arg("--netns-dir")
                .arg(a.netns_dir()),
            None => cmd.arg("--config").arg(a.config_path()),
        };
        cmd.args(["--node", &a.spec.node])
            .arg("--pin-dir")
            .arg(&a.spec.pin_dir)
            .arg("--cgroup")
            .arg(&a.spec.pods_cgroup)
            .arg("--status-file")
            .arg(a.status_path())
            .args(["--log-format", "json", "--fast-path", if opts.fast_path { "true" } else { "false" }]);
        if let Some(n) = opts.worker_threads {
            cmd.args(["--worker-threads", &n.to_string()]);
        }
        cmd.args(&opts.extra_args);
        if let Some(n) = opts.max_pods {
            cmd.args(["--max-pods", &n.to_string()]);
        }
        if let Some(n) = opts.cert_lifetime_secs {
            cmd.args(["--cert-lifetime-secs", &n.to_string()]);
        }
        match &opts.cert_dir {
            Some(dir) => {
                cmd.args(["--cert-source", "files", "--cert-dir"]).arg(dir);
            }
            None => {
                cmd.arg("--ca-dir").arg(&a.spec.ca_dir);
            }
        }
        // Logs of successive runs of this node's agent go to one file.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(a.log_path()).expect("agent log");
        cmd.stderr(log);
        let place = Place { netns: Some(&a.spec.node_netns), cgroup: Some(&a.spec.agent_cgroup) };
        let mut cmd = proc::command_in(cmd, place);
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        a.child = Some(cmd.spawn().expect("spawn selvedge"));
        let log_path = a.log_path();
        wait_for(20, &format!("agent on {} to be ready (log: {})", a.spec.node, log_path.display()), || {
            if let Some(c) = a.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent on {} exited with {st}:\n{}", a.spec.node, tail(&log_path));
                }
            }
            a.try_status().filter(|s| s.ready)
        });
        a
    }

    /// Returns whether the file changed (an unchanged config is not a new generation).
    fn write_config(&self, pods: &[Pod], services: &[LabService], policies: &[String]) -> bool {
        let mut y = String::from("workloads:\n");
        for p in pods.iter().filter(|p| p.enrolled) {
            let meta = self.pod_meta.get(&p.name);
            let labels = match meta.filter(|m| !m.labels.is_empty()) {
                None => format!("{{app: {}, role: {}}}", p.name, p.role),
                Some(m) => {
                    let mut all =
                        BTreeMap::from([("app".to_string(), p.name.clone()), ("role".to_string(), p.role.clone())]);
                    all.extend(m.labels.clone());
                    // JSON strings are YAML strings: keys like `app.kubernetes.io/name` and values
                    // like `1.0` stay strings.
                    let pairs: Vec<String> = all
                        .iter()
                        .map(|(k, v)| format!("{}: {}", serde_json::json!(k), serde_json::json!(v)))
                        .collect();
                    format!("{{{}}}", pairs.join(", "))
                }
            };
            let _ = writeln!(
                y,
                "- uid: uid-{name}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {name}\n  node: {node}\n  ips: [{ip}]\n  netns: {ns}\n  labels: {labels}\n  probePorts: {probes:?}",
                probes = p.probe_ports,
                name = p.name,
                node = p.node,
                ip = p.ip,
                ns = p.netns.display(),
                namespace = p.namespace,
            );
            if let Some(w) = meta.and_then(|m| m.workload_name.as_ref()) {
                let _ = writeln!(y, "  workloadName: {}", serde_json::json!(w));
            }
        }
        y.push_str("services:\n");
        for svc in services {
            let _ = writeln!(
                y,
                "- {{name: {}, namespace: lab, vips: [{}], ports: [{{port: {}, targetPort: {}}}], selector: {{role: {}}}}}",
                svc.name, svc.vip, svc.port, svc.target_port, svc.role
            );
        }
        y.push_str("authorizationPolicies:\n");
        for p in policies {
            let _ = writeln!(y, "- {p}");
        }
        y.push_str("peerAuthentications:\n");
        for p in pods.iter().filter(|p| p.strict) {
            let _ = writeln!(
                y,
                "- metadata: {{name: strict-{name}, namespace: {ns}}}\n  spec: {{selector: {{matchLabels: {{app: {name}}}}}, mtls: {{mode: STRICT}}, portLevelMtls: {{{ports}}}}}",
                name = p.name,
                ns = p.namespace,
                ports = p.permissive_ports.iter().map(|port| format!("\"{port}\": {{mode: PERMISSIVE}}")).collect::<Vec<_>>().join(", "),
            );
        }
        if std::fs::read_to_string(self.config_path()).is_ok_and(|old| old == y) {
            return false;
        }
        let tmp = self.config_path().with_extension("tmp");
        std::fs::write(&tmp, y).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("install config");
        true
    }

    /// Write a new config and wait until the agent has applied it.
    pub fn reconfigure(&mut self, pods: &[Pod], services: &[LabService], policies: &[String]) {
        let before = self.status().generation;
        if !self.write_config(pods, services, policies) {
            return;
        }
        wait_for(10, "agent to apply the new config", || self.try_status().filter(|s| s.generation > before));
    }

    /// Write `text` as the config file as it is (no generation is awaited: the agent may
    /// refuse it).
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write the agent's config");
    }

    pub fn try_status(&self) -> Option<Status> {
        serde_json::from_str(&std::fs::read_to_string(self.status_path()).ok()?).ok()
    }

    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|| panic!("agent on {} has no status", self.spec.node))
    }

    /// Wait until the status file has been refreshed (counters are re-read every tick).
    pub fn fresh_status(&self) -> Status {
        std::thread::sleep(std::time::Duration::from_millis(1200));
        self.status()
    }

    /// Every structured log event so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
    }

    /// Access-log events (`target == selvedge::access`) so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.events().into_iter().filter(|v| v["target"] == "selvedge::access").collect()
    }

    /// Wait (briefly) for any log event matching `pred`.
    pub fn wait_event(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(5, &format!("log event on {}: {what}", self.spec.node), || self.events().into_iter().find(|e| pred(e)))
    }

    /// Wait (briefly) for an access-log event matching `pred`: the event is written when
    /// the relay finishes, which may be just after the client has its answer.
    pub fn wait_access(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(5, &format!("access log on {}: {what}", self.spec.node), || {
            self.access_log().into_iter().find(|e| pred(e))
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freeze the agent (SIGSTOP): the kernel keeps completing handshakes on its listeners,
    /// but it accepts and reads nothing until [`resume`](Self::resume).
    pub fn pause(&self) {
        proc::signal(self.child.as_ref().expect("agent running"), libc::SIGSTOP);
    }

    pub fn resume(&self) {
        proc::signal(self.child.as_ref().expect("agent running"), libc::SIGCONT);
    }

    /// SIGTERM and wait: the graceful path.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        proc::signal(&c, libc::SIGTERM);
        c.wait().expect("wait for agent")
    }

    /// Freeze the agent for `stall`, then SIGTERM it as it resumes and wait: it is asked to
    /// stop with whatever the kernel queued at its listeners meanwhile still queued.
    pub fn stop_after_stall(&mut self, stall: std::time::Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        proc::signal(&c, libc::SIGSTOP);
        std::thread::sleep(stall);
        proc::signal(&c, libc::SIGTERM);
        proc::signal(&c, libc::SIGCONT);
        c.wait().expect("wait for agent")
    }

    /// Wait for the agent to exit by itself (e.g. after /quitquitquit).
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "agent on {} did not exit", self.spec.node);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGKILL and wait: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `selvedge uninstall` for this agent's pin directory.
    pub fn uninstall(&self) -> String {
        let out = Command::new(&self.selvedge)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.spec.pin_dir)
            .output()
            .expect("run selvedge uninstall");
        assert!(out.status.success(), "uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log_path())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The end of an agent's log: its last 30 lines, or from its last `Error:` line on (with
/// `RUST_BACKTRACE` set, the error's backtrace alone is longer than 30 lines).
fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.iter().rposition(|l| l.starts_with("Error: ")).unwrap_or(lines.len().saturating_sub(30));
    lines[from..].iter().take(30).copied().collect::<Vec<_>>().join("\n")
}
