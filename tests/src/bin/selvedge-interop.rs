//! Selvedge against Istio's ztunnel, in the netns lab: node n1 runs a Selvedge agent (pods
//! `a` and `b`), node n2 runs ztunnel in in-pod mode (pod `z`, handed to it by ztunnel's
//! own `inpodserver` example, with ztunnel's redirect rules in the pod), one shared root
//! (ztunnel's fake CA, loaded by Selvedge's built-in CA). Prints PASS or FAIL per check and
//! exits non-zero when any failed. Run by `cargo xtask interop --ztunnel DIR`, which builds
//! ztunnel and sets the environment:
//!
//! * `ZTUNNEL_BIN`, `ZTUNNEL_INPODSERVER` — the binaries;
//! * `ZTUNNEL_SRC` — the checkout (its fake CA's root and key, its in-pod redirect script);
//! * `SELVEDGE_BIN`, `SELVEDGE_LAB_APP` — as for the lab tests.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use selvedge_tests::{proc, AgentOptions, Lab};

const ECHO: u16 = 8080;
const WHOAMI: u16 = 8081;
const DENIED: u16 = 9090;
const BYTES: usize = 256 * 1024;

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| panic!("{name} is not set: run `cargo xtask interop`"))
}

/// Processes of this run, stopped when it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `f` for up to `secs` seconds.
fn within<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ztunnel's local configuration: `z` here, `a` and `b` on Selvedge's node; a ztunnel
/// policy that denies `b`.
fn ztunnel_config(lab: &Lab) -> String {
    let workload = |pod: &str, node: &str| {
        let p = lab.get(pod);
        format!(
            "- uid: uid-{pod}\n  name: {pod}\n  namespace: {ns}\n  serviceAccount: {pod}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = p.namespace,
            ip = p.ip
        )
    };
    let b = lab.get("b").principal();
    format!(
        "workloads:\n{}{}{}policies:\n- name: deny-b\n  namespace: lab\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules:\n  - - - principals:\n        - !Exact \"{b}\"\n",
        workload("z", "n2"),
        workload("a", "n1"),
        workload("b", "n1"),
    )
}

struct Run<'a> {
    lab: &'a mut Lab,
    failed: usize,
}

impl Run<'_> {
    fn check(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("PASS  {name}: {detail}"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL  {name}: {why}");
            }
        }
    }

    fn access(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        within(5, || self.lab.agent_ref("n1").access_log().into_iter().find(|e| pred(e)))
    }

    fn metrics(&self, node: &str) -> String {
        let at: SocketAddr = "127.0.0.1:15020".parse().expect("address");
        self.lab.http_on_node(node, at, "GET", "/metrics").map(|(_, body)| body).unwrap_or_default()
    }
}

/// Lines of `text` for `metric` carrying every label of `labels`.
fn series<'t>(text: &'t str, metric: &str, labels: &[String]) -> Vec<&'t str> {
    text.lines().filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want.as_str()))).collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn main() {
    let (ztunnel, inpodserver, src) =
        (env_path("ZTUNNEL_BIN"), env_path("ZTUNNEL_INPODSERVER"), env_path("ZTUNNEL_SRC"));
    let mut lab = Lab::new("interop");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "b", true).pod("n2", "z", true);
    // One root for both: ztunnel's fake CA signs its pods' certificates with it, and
    // Selvedge's built-in CA loads the same pair.
    let ca = lab.dir.join("ca");
    for (from, to) in [("root-cert.pem", "root-cert.pem"), ("ca-key.pem", "root-key.pem")] {
        std::fs::copy(src.join("src/tls").join(from), ca.join(to)).expect("ztunnel's test CA");
    }
    // A Selvedge policy refusing z on one port of a.
    let z_principal = lab.get("z").principal();
    lab.set_policies(&[&format!(
        "{{metadata: {{name: deny-z, namespace: lab}}, spec: {{selector: {{matchLabels: {{app: a}}}}, action: DENY, rules: [{{from: [{{source: {{principals: [\"{z_principal}\"]}}}}], to: [{{operation: {{ports: [\"{DENIED}\"]}}}}]}}]}}}}"
    )]);
    lab.start_agent("n1", AgentOptions::default());

    let children = start_ztunnel(&lab, &ztunnel, &inpodserver, &src);
    let ready = within(30, || {
        let at: SocketAddr = "127.0.0.1:15021".parse().ok()?;
        lab.http_on_node("n2", at, "GET", "/healthz/ready").ok().filter(|(s, _)| *s == 200)
    });
    if ready.is_none() {
        let log = std::fs::read_to_string(lab.dir.join("ztunnel.log")).unwrap_or_default();
        eprintln!("ztunnel did not become ready; its log:\n{log}");
        // exit() runs no destructors: stop what this run started and remove the lab first.
        drop(children);
        drop(lab);
        std::process::exit(1);
    }
    for (pod, kind, port) in [
        ("z", "echo", ECHO),
        ("z", "whoami", WHOAMI),
        ("a", "echo", ECHO),
        ("a", "whoami", WHOAMI),
        ("a", "whoami", DENIED),
    ] {
        lab.serve(pod, kind, port);
    }
    let mut run = Run { lab: &mut lab, failed: 0 };
    checks(&mut run);
    let failed = run.failed;
    drop(children);
    if failed > 0 {
        let tail = |path: PathBuf, n: usize| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!("--- {} (last {n} lines)\n{}", path.display(), lines[lines.len().saturating_sub(n)..].join("\n"))
        };
        eprintln!("{}", tail(lab.dir.join("inpodserver.log"), 10));
        eprintln!("{}", tail(lab.dir.join("ztunnel.log"), 60));
        eprintln!("{}", tail(lab.agent_ref("n1").log_path(), 40));
        eprintln!("{failed} check(s) failed");
        drop(lab);
        std::process::exit(1);
    }
    println!("all checks passed");
}

/// ztunnel in n2's namespace, its `inpodserver` handing it pod z, and its redirect rules
/// in z's namespace.
fn start_ztunnel(lab: &Lab, ztunnel: &Path, inpodserver: &Path, src: &Path) -> Children {
    let dir = &lab.dir;
    let config = dir.join("ztunnel.yaml");
    std::fs::write(&config, ztunnel_config(lab)).expect("ztunnel config");
    let uds = dir.join("ztunnel.sock");
    let n2 = lab.node_netns("n2");
    let z = lab.get("z").clone();
    let script = src.join("scripts/ztunnel-redirect-inpod.sh");
    let mut rules = Command::new("bash");
    rules.arg(&script);
    lab.run_in_netns(&z.netns, rules);
    let netns_name = z.netns.file_name().map(|n| n.to_string_lossy().into_owned()).expect("netns name");
    let mut server = Command::new(inpodserver);
    // The pod as istio-cni would describe it: uid, and namespace/name/service account.
    server
        .arg(netns_name)
        .env("INPOD_UDS", &uds)
        .env("POD_UID", "uid-z")
        .env("PROXY_WORKLOAD_INFO", format!("{}/z/z", z.namespace));
    let server = spawn_logged(server, None, &dir.join("inpodserver.log"));
    let mut zt = Command::new(ztunnel);
    zt.arg("proxy")
        .arg("ztunnel")
        .env("LOCAL_XDS_PATH", &config)
        .env("FAKE_CA", "true")
        .env("NODE_NAME", "n2")
        .env("INPOD_UDS", &uds)
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .env("RUST_LOG", "info");
    let zt = spawn_logged(zt, Some(&n2), &dir.join("ztunnel.log"));
    Children(vec![zt, server])
}

/// Start `cmd` (in `netns` when given) with its stdout and stderr both in `log`.
fn spawn_logged(cmd: Command, netns: Option<&Path>, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let mut cmd = proc::command_in(cmd, proc::Place { netns, cgroup: None });
    cmd.stdin(std::process::Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"))
}

fn checks(run: &mut Run<'_>) {
    let (a, b, z) = (run.lab.get("a").clone(), run.lab.get("b").clone(), run.lab.get("z").clone());
    let z_id = format!("spiffe://{}", z.principal());
    let a_id = format!("spiffe://{}", a.principal());

    // Traffic both ways, byte-exact, under mTLS with each side's identity verified.
    let exact_and_verified = |run: &mut Run<'_>, from: &str, to: SocketAddr, direction: &str, side: &str| {
        let t = run.lab.transfer(from, to, BYTES).map_err(|e| format!("{e:?}"));
        t.and_then(|t| if t.is_exact() { Ok(t) } else { Err(format!("{t:?}")) }).and_then(|_| {
            run.access(|e| e["direction"] == direction && e[side] == z_id.as_str() && e["security"] == "mutual_tls")
                .map(|_| format!("{BYTES} bytes each way, byte-exact; Selvedge verified {z_id}"))
                .ok_or_else(|| format!("no {direction} mTLS record naming z's identity"))
        })
    };
    let r = exact_and_verified(run, "a", z.addr(ECHO), "outbound", "dst_identity");
    run.check("Selvedge client -> ztunnel server", r);
    let r = exact_and_verified(run, "z", a.addr(ECHO), "inbound", "src_identity");
    run.check("ztunnel client -> Selvedge server", r);

    // What the apps see as their client's address.
    let r = run.lab.ask("a", z.addr(WHOAMI));
    run.check(
        "client address at ztunnel's app",
        r.map_err(|e| e.to_string()).and_then(|r| {
            let seen = r.server.as_ref().ok_or_else(|| format!("z's app sent no report: {r:?}"))?.peer;
            if seen.ip() == std::net::IpAddr::V4(a.ip) {
                Ok(format!("z's app sees {seen} (a's app has {:?})", r.local))
            } else {
                Err(format!("z's app sees {seen}, not a's address {}", a.ip))
            }
        }),
    );
    let r = run.lab.ask("z", a.addr(WHOAMI));
    run.check(
        "client address at Selvedge's app",
        r.map_err(|e| e.to_string()).and_then(|r| {
            let seen = r.server.as_ref().ok_or_else(|| format!("a's app sent no report: {r:?}"))?.peer;
            if seen.ip() != std::net::IpAddr::V4(z.ip) {
                return Err(format!("a's app sees {seen}, not z's address {}", z.ip));
            }
            let port = if Some(seen) == r.local { "its port too" } else { "another port" };
            Ok(format!("a's app sees {seen}; z's app has {:?} ({port})", r.local))
        }),
    );

    // Policy both ways.
    let r = run.lab.ask("z", a.addr(DENIED));
    let refused = match r {
        Ok(r) if r.server.is_some() => Err(format!("z reached a:{DENIED}: {r:?}")),
        _ => run
            .access(|e| e["reason_code"] == "policy" && e["src_identity"] == z_id.as_str())
            .map(|e| format!("refused, logged: {}", e["reason"]))
            .ok_or_else(|| "not logged as a policy refusal naming z".to_string()),
    };
    run.check("Selvedge's AuthorizationPolicy refuses ztunnel's client", refused);
    let r = run.lab.ask("b", z.addr(WHOAMI));
    let refused = match r {
        Ok(r) if r.server.is_some() => Err(format!("b reached z despite ztunnel's policy: {r:?}")),
        _ => run
            .access(|e| e["direction"] == "outbound" && e["reason_code"] == "policy")
            .map(|e| format!("ztunnel answered 401; Selvedge logged a policy denial: {}", e["reason"]))
            .ok_or_else(|| "b's refusal was not counted as a policy denial (401 -> policy)".to_string()),
    };
    run.check("ztunnel's policy refuses Selvedge's client", refused);

    // Metrics, both sides.
    let ours = run.metrics("n1");
    let want_src = [
        "reporter=\"source\"".to_string(),
        format!("destination_principal=\"{z_id}\""),
        "destination_workload=\"z\"".to_string(),
        "connection_security_policy=\"mutual_tls\"".to_string(),
    ];
    let sent = series(&ours, "istio_tcp_sent_bytes_total{", &want_src);
    run.check(
        "Selvedge's metrics of its client to ztunnel",
        match sent.iter().map(|l| value(l)).sum::<f64>() {
            v if v >= BYTES as f64 => Ok(format!("istio_tcp_sent_bytes_total (the response) {v}")),
            v => Err(format!("sent bytes {v}: {sent:?}")),
        },
    );
    let denied = series(
        &ours,
        "istio_tcp_connections_opened_total{",
        &["response_flags=\"DENY\"".to_string(), "reporter=\"source\"".to_string()],
    );
    run.check(
        "Selvedge counts ztunnel's 401 as DENY",
        if denied.is_empty() { Err("no reporter=source DENY series".into()) } else { Ok(denied[0].to_string()) },
    );
    let theirs = run.metrics("n2");
    let from_a = series(&theirs, "istio_tcp_connections_opened_total{", &[format!("source_principal=\"{a_id}\"")]);
    run.check(
        "ztunnel's metrics name Selvedge's client",
        if from_a.is_empty() {
            Err(format!("no series with source_principal {a_id} in ztunnel's /metrics"))
        } else {
            Ok(from_a[0].chars().take(300).collect())
        },
    );
    let _ = b;
}
