//! The Kubernetes path end to end, without a cluster: agents in `--kube` mode fed by the
//! test API server (real list/watch), pods networked by the reference CNI plugins with
//! `selvedge-cni` chained after them. See `tests/src/cluster.rs` for what stands in for what.

use selvedge_tests::{
    cluster::{Cluster, PodRequest, MESH_LABEL},
    sys::wait_for,
};

const PORT: u16 = 8080;

/// Two nodes; `shop` enrolled, `plain` not; agents running; a whoami server `db` in `shop`
/// on n2.
fn cluster(name: &str) -> Cluster {
    let mut c = Cluster::new(name, &["n1", "n2"]);
    c.namespace("shop", true);
    c.namespace("plain", false);
    c.start_agent("n1");
    c.start_agent("n2");
    c.create_pod(PodRequest::new("db", "shop", "n2")).expect("db starts");
    c.lab.serve("db", "whoami", PORT);
    c
}

fn enrolled(c: &Cluster, node: &str, pod: &str) -> bool {
    c.lab.agent_ref(node).try_status().is_some_and(|s| s.enrolled.iter().any(|p| p == pod))
}

fn wait_enrolled(c: &Cluster, node: &str, pod: &str, want: bool) {
    wait_for(15, &format!("{pod} enrolled={want} on {node}"), || (enrolled(c, node, pod) == want).then_some(()));
}

/// The destination agent logged a connection to `pod` from `identity`.
fn seen_from(c: &Cluster, node: &str, pod: &str, identity: &str) -> bool {
    c.lab.agent_ref(node).access_log().iter().any(|e| e["pod"] == pod && e["src_identity"] == identity)
}

#[test]
fn a_new_pod_is_captured_from_its_first_connect() {
    let mut c = cluster("k8s-first");
    // The moment ADD returns, the pod runs: its very first connection is already meshed.
    c.create_pod(PodRequest::new("web", "shop", "n1")).expect("web starts");
    assert!(enrolled(&c, "n1", "web"), "ADD returned only once web was enrolled");
    let r = c.lab.ask("web", c.addr("db", PORT)).expect("web reaches db");
    assert!(r.server().peer_in_pod, "db's agent delivered it (from its inbound address)");
    wait_for(10, "db's agent to log web's verified identity", || {
        seen_from(&c, "n2", "db", "spiffe://cluster.local/ns/shop/sa/web").then_some(())
    });
    assert_eq!(c.lab.agent_ref("n1").access_log().len(), 1, "exactly the one connection, through n1's agent");
    c.check("web").expect("CNI CHECK: web is as it should be");
    // A pod in an unenrolled namespace starts too, unmeshed.
    c.create_pod(PodRequest::new("other", "plain", "n1")).expect("an unmeshed pod starts");
    assert!(!enrolled(&c, "n1", "other"));
    // The watch of Pods is cluster-wide (peers need every meshed pod's identity).
    assert!(
        c.api.requests().iter().any(|r| r.contains("/api/v1/pods") && r.contains("watch=")),
        "{:?}",
        c.api.requests()
    );
}

#[test]
fn labels_enroll_and_unenroll_a_running_pod() {
    let mut c = cluster("k8s-label");
    c.create_pod(PodRequest::new("solo", "plain", "n1")).expect("solo starts unmeshed");
    assert!(!enrolled(&c, "n1", "solo"));
    c.relabel("solo", &[(MESH_LABEL, Some("enabled"))]);
    wait_enrolled(&c, "n1", "solo", true);
    c.lab.ask("solo", c.addr("db", PORT)).expect("solo reaches db");
    wait_for(10, "solo's identity at db", || {
        seen_from(&c, "n2", "db", "spiffe://cluster.local/ns/plain/sa/solo").then_some(())
    });
    // A pod label `disabled` opts out even in an enrolled namespace.
    c.create_pod(PodRequest::new("optout", "shop", "n1").label(MESH_LABEL, "disabled")).expect("optout starts");
    assert!(!enrolled(&c, "n1", "optout"));
    c.relabel("solo", &[(MESH_LABEL, None)]);
    wait_enrolled(&c, "n1", "solo", false);
    // Unenrolled: solo's connections no longer go through its agent.
    let before = c.lab.agent_ref("n1").access_log().len();
    let _ = c.lab.ask("solo", c.addr("db", PORT));
    assert_eq!(c.lab.agent_ref("n1").access_log().len(), before, "no longer proxied by n1's agent");
}

/// A policy denial of `identity` was logged (at the source agent, which refuses at connect
/// time when it knows the destination's policies, or at the destination).
fn denied(c: &Cluster, identity: &str) -> bool {
    ["n1", "n2"].iter().any(|n| {
        c.lab.agent_ref(n).access_log().iter().any(|e| e["reason_code"] == "policy" && e["src_identity"] == identity)
    })
}

fn allow_only(c: &Cluster, principal: &str) {
    c.api.apply(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "db-clients", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "db"}},
                 "rules": [{"from": [{"source": {"principals": [principal]}}]}]},
    }));
}

/// Did `from`'s connection reach `to`'s whoami server (which answers with a report)? A
/// refusal is a reset or a refused connect.
fn reaches(c: &Cluster, from: &str, to: &str) -> bool {
    c.lab.ask(from, c.addr(to, PORT)).is_ok_and(|r| r.server.is_some())
}

/// Wait until `from` reaches `to` (or is refused, with `want` false).
fn wait_reach(c: &Cluster, from: &str, to: &str, want: bool) {
    wait_for(15, &format!("{from} -> {to} reachable={want}"), || (reaches(c, from, to) == want).then_some(()));
}

#[test]
fn policy_changes_in_the_api_apply_to_traffic() {
    let mut c = cluster("k8s-policy");
    c.create_pod(PodRequest::new("web", "shop", "n1")).expect("web");
    c.create_pod(PodRequest::new("batch", "shop", "n1")).expect("batch");
    wait_reach(&c, "web", "db", true);
    allow_only(&c, "cluster.local/ns/shop/sa/batch");
    wait_reach(&c, "web", "db", false);
    assert!(reaches(&c, "batch", "db"), "batch is still allowed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The refusal `wait_reach` saw may have been a connection open across the change and
    // closed by it ("denied after a policy change"): each round makes a fresh attempt, which
    // the policy itself must refuse and log.
    while !denied(&c, "spiffe://cluster.local/ns/shop/sa/web") {
        assert!(!reaches(&c, "web", "db"), "web stays refused");
        assert!(
            std::time::Instant::now() < deadline,
            "web's denial, with its reason: n1 {:#?} n2 {:#?}",
            c.lab.agent_ref("n1").access_log(),
            c.lab.agent_ref("n2").access_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A policy the agent cannot read fails closed: an unknown field makes this DENY-all.
    c.api.apply(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "future", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "db"}}, "rules": [{}], "someFutureField": {}},
    }));
    wait_reach(&c, "batch", "db", false);
    c.api.delete("security.istio.io/v1", "AuthorizationPolicy", Some("shop"), "future");
    c.api.delete("security.istio.io/v1", "AuthorizationPolicy", Some("shop"), "db-clients");
    wait_reach(&c, "web", "db", true);
}

#[test]
fn a_reused_ip_never_carries_the_old_pods_identity() {
    let mut c = cluster("k8s-reuse");
    let old = c.create_pod(PodRequest::new("old", "shop", "n1")).expect("old");
    c.create_pod(PodRequest::new("other", "shop", "n1")).expect("other");
    allow_only(&c, "cluster.local/ns/shop/sa/old");
    wait_reach(&c, "other", "db", false); // the policy is in force
    wait_reach(&c, "old", "db", true);
    // Terminating: the sandbox (and its IP) is gone, the API still shows the pod.
    c.terminate_pod("old");
    // Another workload, another service account, the same address.
    let new = c.create_pod(PodRequest::new("new", "shop", "n1").ip(old.ip)).expect("new");
    assert_eq!(new.ip, old.ip);
    wait_enrolled(&c, "n1", "new", true);
    assert!(!reaches(&c, "new", "db"), "new is not allowed as old was");
    wait_for(10, "new refused under its own identity", || {
        denied(&c, "spiffe://cluster.local/ns/shop/sa/new").then_some(())
    });
    assert!(!seen_from(&c, "n2", "db", "spiffe://cluster.local/ns/shop/sa/new"), "never admitted");
    // The peer directory maps the address to the new pod: connections *to* it are as `new`.
    c.lab.serve("new", "whoami", PORT);
    c.create_pod(PodRequest::new("probe", "shop", "n2")).expect("probe");
    c.lab.ask("probe", c.addr("new", PORT)).expect("probe reaches new");
    c.lab.agent_ref("n2").wait_access("probe's connection tunnelled to new's identity", |e| {
        e["pod"] == "probe" && e["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/new"
    });
}

#[test]
fn an_api_outage_keeps_enforcing_then_converges() {
    let mut c = cluster("k8s-outage");
    c.create_pod(PodRequest::new("web", "shop", "n1")).expect("web");
    c.create_pod(PodRequest::new("gone", "shop", "n1")).expect("gone");
    allow_only(&c, "cluster.local/ns/shop/sa/gone");
    wait_reach(&c, "web", "db", false);
    c.api.set_reachable(false);
    // Changes made while the agents cannot see them.
    c.api.delete("security.istio.io/v1", "AuthorizationPolicy", Some("shop"), "db-clients");
    c.api.delete_typed::<k8s_openapi::api::core::v1::Pod>(Some("shop"), "gone");
    c.api.compact(); // the agents' resource versions are too old: they must relist
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(!reaches(&c, "web", "db"), "the last-known policy keeps enforcing");
    assert!(enrolled(&c, "n1", "gone"), "nothing is torn down for an unreachable API");
    assert!(c.lab.agent_ref("n1").try_status().is_some_and(|s| s.ready), "still serving");
    c.api.set_reachable(true);
    // Relisted: the deletion missed during the outage is reconciled, the policy is gone.
    wait_enrolled(&c, "n1", "gone", false);
    wait_reach(&c, "web", "db", true);
}

#[test]
fn with_the_agent_down_an_enrolled_pod_does_not_start_an_unenrolled_one_does() {
    let mut c = cluster("k8s-down");
    c.lab.kill_agent("n1");
    let refused = c.create_pod(PodRequest::new("web", "shop", "n1")).expect_err("a meshed pod must not start");
    assert_eq!(refused.plugin, "selvedge-cni");
    assert_eq!(refused.code(), Some(11), "try again later: {refused:?}");
    assert!(refused.stdout.contains("must be meshed"), "{refused:?}");
    c.create_pod(PodRequest::new("other", "plain", "n1")).expect("an unmeshed pod starts (the API says so)");
    // Back up: the runtime's retry succeeds.
    c.start_agent("n1");
    c.create_pod(PodRequest::new("web", "shop", "n1")).expect("web starts once the agent is back");
    assert!(enrolled(&c, "n1", "web"));
}

#[test]
fn pods_from_before_the_agent_and_across_restarts_are_enrolled() {
    let mut c = Cluster::new("k8s-before", &["n1"]);
    c.namespace("shop", true);
    // Selvedge not installed yet: the chain has no selvedge-cni; the pod runs a process.
    c.create_pod(PodRequest::new("early", "shop", "n1").without_selvedge_cni()).expect("early");
    c.lab.serve("early", "whoami", PORT);
    c.start_agent("n1");
    // Found through /proc (its process's cgroup names the pod's uid), enrolled.
    wait_enrolled(&c, "n1", "early", true);
    // A pod registered by CNI ADD survives an agent restart (the registry is on disk).
    c.create_pod(PodRequest::new("late", "shop", "n1")).expect("late");
    c.lab.kill_agent("n1");
    c.start_agent("n1");
    wait_enrolled(&c, "n1", "late", true);
    wait_enrolled(&c, "n1", "early", true);
    c.lab.ask("late", c.addr("early", PORT)).expect("late reaches early, both meshed");
    c.lab.agent_ref("n1").wait_access("early saw late's identity", |e| {
        e["pod"] == "early" && e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/late"
    });
}

#[test]
fn drift_in_the_kernel_is_detected_repaired_and_counted() {
    let mut c = cluster("k8s-drift");
    c.create_pod(PodRequest::new("web", "shop", "n1")).expect("web");
    wait_reach(&c, "web", "db", true);
    wait_for(10, "web's first connection in n1's access log", || {
        (!c.lab.agent_ref("n1").access_log().is_empty()).then_some(())
    });
    let (_, dump) = c.lab.http_on_node("n1", "127.0.0.1:15000".parse().unwrap(), "GET", "/config_dump").expect("dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config dump JSON");
    let cookie = dump["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "web"))
        .and_then(|w| w["netns_cookie"].as_u64())
        .unwrap_or_else(|| panic!("web's netns cookie in {dump}"));
    // Someone removes web's enrollment from the kernel behind the agent's back.
    let map = c.lab.agent_ref("n1").pin_dir().join("maps/SV_ENROLLED");
    let key: Vec<String> = cookie.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let mut args = vec!["map", "delete", "pinned", map.to_str().expect("path")];
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    let out = std::process::Command::new("bpftool").args(&args).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    // Rewritten in place, not un-enrolled and enrolled again (which leaves a gap).
    wait_for(20, "the drift reported (checked every 10 s)", || {
        c.lab.agent_ref("n1").events().into_iter().find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("drift") && m.contains("missing") && m.contains("rewritten"))
        })
    });
    wait_for(15, "the drift counted", || {
        let (_, m) = c.lab.http_on_node("n1", "127.0.0.1:15020".parse().unwrap(), "GET", "/metrics").ok()?;
        m.lines().any(|l| l.starts_with("selvedge_reconcile_drift_total") && !l.ends_with(" 0")).then_some(())
    });
    // Repaired: web's connections go through its agent again (a connect made while the
    // entry was missing went direct, which is the drift this guards against).
    let before = c.lab.agent_ref("n1").access_log().len();
    wait_for(15, "web's connections captured again", || {
        let _ = reaches(&c, "web", "db");
        (c.lab.agent_ref("n1").access_log().len() > before).then_some(())
    });
}
