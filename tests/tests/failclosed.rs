//! Fail closed: once enrolled, a pod's traffic never goes around the agent — not while the
//! agent is down, restarting or stopped — and STRICT pods refuse plaintext in the kernel.

use selvedge_tests::{AgentOptions, Lab};

const PORT: u16 = 8080;

fn lab(name: &str) -> Lab {
    let mut lab = Lab::two_nodes(name);
    lab.serve("a", "whoami", PORT);
    lab.serve("d", "whoami", PORT);
    lab
}

#[test]
fn crashed_agent_fails_closed_and_a_restart_recovers() {
    let mut lab = lab("crash");
    let (a, d) = (lab.get("a").addr(PORT), lab.get("d").addr(PORT));
    lab.ask("a", d).expect("works with the agent up");

    lab.agent("n1").kill();
    let err = lab.ask("a", d).expect_err("with the agent down, a's connect must fail, not go direct");
    assert!(err.contains("refused"), "{err}");
    lab.ask("c", a).expect_err("inbound to an enrolled pod is dropped while its agent is down");

    // Same pods, same namespaces: only the agent comes back.
    lab.start_agent("n1", AgentOptions::default());
    let r = lab.ask("a", d).expect("outbound works again after the restart");
    assert!(r.captured(), "and is captured: {r:?}");
    let r = lab.ask("c", a).expect("inbound works again");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}

#[test]
fn stopped_agent_keeps_pods_closed_until_uninstall() {
    let mut lab = lab("stop");
    let d = lab.get("d").addr(PORT);
    let a_ip = lab.get("a").ip;
    let status = lab.agent("n1").stop();
    assert!(status.success(), "SIGTERM drains and exits cleanly: {status}");
    assert!(lab.agent("n1").pin_dir().join("maps").exists(), "pins outlive the agent");
    lab.ask("a", d).expect_err("still fail-closed after a clean stop");

    let out = lab.agent("n1").uninstall();
    assert!(out.contains("removed"), "{out}");
    assert!(!lab.agent("n1").pin_dir().exists(), "every pin is gone");
    // The kernel detaches a link whose last pin is gone from a work queue, a moment after
    // the unlink returns (under load, some milliseconds): poll for it.
    let r = selvedge_tests::sys::wait_for(5, "after uninstall a is plain networking again", || lab.ask("a", d).ok());
    assert_eq!(r.local.unwrap().ip(), a_ip, "no capture left: {r:?}");
    assert!(!r.captured(), "{r:?}");
}

#[test]
fn strict_pods_drop_plaintext_in_the_kernel() {
    let mut lab = lab("strict");
    let d = lab.get("d").addr(PORT);
    lab.set_pod("d", true, true);
    lab.write_configs();
    let before = lab.agent("n2").fresh_status().stat("inbound_strict_drop");

    lab.ask("c", d).expect_err("plaintext from an unmeshed pod is dropped");
    // A meshed pod reaches it over an mTLS tunnel, which STRICT admits.
    let r = lab.ask("a", d).expect("meshed a reaches STRICT d over HBONE");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    let after = lab.agent("n2").fresh_status().stat("inbound_strict_drop");
    assert!(after > before, "the kernel counted the drops");

    lab.set_pod("d", true, false);
    lab.write_configs();
    let r = lab.ask("c", d).expect("PERMISSIVE accepts plaintext again");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}

#[test]
fn a_full_map_is_reported_and_the_pod_stays_closed() {
    let mut lab = Lab::new("full");
    lab.node("n1");
    lab.pod("n1", "a", true).pod("n1", "b", true).pod("n1", "c", false);
    lab.start_agent("n1", AgentOptions { max_pods: Some(1), ..AgentOptions::default() });
    lab.serve("b", "whoami", PORT);
    let b = lab.get("b").addr(PORT);

    // One slot: a (first by uid) gets it; b is reported, with the reason, and kept closed.
    let s = lab.agent("n1").status();
    assert_eq!(s.enrolled, vec!["a".to_string()]);
    let reason = s.failed.get("uid-b").unwrap_or_else(|| panic!("b reported as failed: {s:?}"));
    assert!(reason.contains("slot"), "{reason}");
    lab.ask("c", b).expect_err("b's inbound is dropped, not delivered unmeshed");

    // Free the slot: b is enrolled in the same config change and works through its agent.
    lab.set_pod("a", false, false);
    lab.write_configs();
    let s = lab.agent("n1").status();
    assert_eq!(s.enrolled, vec!["b".to_string()], "{s:?}");
    let r = lab.ask("c", b).expect("b is reachable once enrolled");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}

#[test]
fn strict_ports_are_refused_by_the_agent_when_the_kernel_must_pass_plaintext() {
    let mut lab = lab("strict-ports");
    lab.serve("d", "whoami", 9090);
    // STRICT, but port 9090 PERMISSIVE: the kernel cannot drop per port, so it passes
    // plaintext to the agent, which must refuse it on every port but 9090.
    lab.set_strict_except("d", &[9090]);
    lab.write_configs();
    let (d8080, d9090) = (lab.get("d").addr(PORT), lab.get("d").addr(9090));

    match lab.ask("c", d8080) {
        Ok(r) => assert!(r.server.is_none(), "plaintext to a STRICT port never reaches the app: {r:?}"),
        Err(e) => assert!(e.contains("reset"), "{e}"),
    }
    lab.agent("n2").wait_access("the refusal, with its reason", |e| {
        e["result"] == "refused" && e["reason"].as_str().is_some_and(|r| r.contains("STRICT"))
    });
    let r = lab.ask("c", d9090).expect("the PERMISSIVE port takes plaintext");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    let r = lab.ask("a", d8080).expect("mTLS reaches the STRICT port");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}

/// Plaintext that must not reach the app: refused by the agent (a reset, or an accepted
/// connection closed before any server answers) or dropped by the kernel.
fn never_reaches_the_app(r: Result<selvedge_tests::Ask, String>, what: &str) {
    if let Ok(r) = r {
        assert!(r.server.is_none(), "{what}: {r:?}");
    }
}

#[test]
fn the_nodes_probes_reach_strict_pods_on_their_probe_ports_only() {
    const PROBE: u16 = 9090;
    let mut lab = lab("probes");
    lab.serve("d", "whoami", PROBE);
    lab.set_pod("d", true, true);
    lab.set_probe_ports("d", &[PROBE]);
    // d admits only a's identity: the kubelet has none, and its probes are not governed.
    let a = lab.get("a").principal();
    lab.set_policies(&[&format!(
        "{{metadata: {{name: only-a, namespace: lab}}, spec: {{selector: {{matchLabels: {{app: d}}}}, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]}}}}"
    )]);
    let (d8080, probe) = (lab.get("d").addr(PORT), lab.get("d").addr(PROBE));

    let r = lab.ask_on_node("n2", probe).expect("d's own node reaches its probe port in plaintext");
    assert!(r.server().peer_in_pod, "through the agent: {r:?}");
    lab.agent("n2").wait_access("the probe, marked as one", |e| {
        e["security"] == "node_probe" && e["dst"].as_str().is_some_and(|d| d.ends_with(&format!(":{PROBE}")))
    });
    never_reaches_the_app(lab.ask_on_node("n2", d8080), "the node to a port no probe uses");
    lab.agent("n2").wait_access("that refusal, as STRICT", |e| {
        e["result"] == "refused" && e["reason"].as_str().is_some_and(|r| r.contains("STRICT"))
    });
    never_reaches_the_app(lab.ask_on_node("n1", probe), "another node is not d's node");
    never_reaches_the_app(lab.ask("c", probe), "an unmeshed pod is not the node");
    let r = lab.ask("a", probe).expect("a reaches the probe port over mTLS, as allowed");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");

    // No probe port left: d is all STRICT again and the kernel drops the node's plaintext too.
    let before = lab.agent("n2").fresh_status().stat("inbound_strict_drop");
    lab.set_probe_ports("d", &[]);
    lab.write_configs();
    never_reaches_the_app(lab.ask_on_node("n2", probe), "no probe port declared");
    assert!(lab.agent("n2").fresh_status().stat("inbound_strict_drop") > before, "dropped in the kernel");
}

/// The pid of the process listening on TCP `port` in `node`'s network namespace.
fn holder(lab: &Lab, node: &str, port: u16) -> Option<u32> {
    let mut ss = std::process::Command::new("ss");
    ss.args(["-Hltnp", &format!("sport = :{port}")]);
    let out = lab.run_in_netns(&lab.node_netns(node), ss);
    let at = out.find("pid=")? + 4;
    out[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn wait_for_holder(lab: &Lab, node: &str, port: u16, pid: u32, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while holder(lab, node, port) != Some(pid) {
        assert!(std::time::Instant::now() < deadline, "{what}: port {port} held by {:?}", holder(lab, node, port));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_rolling_update_hands_the_node_over_without_refusing_a_connection() {
    let mut lab = lab("rollout");
    let (a, d) = (lab.get("a").addr(PORT), lab.get("d").addr(PORT));
    lab.ask("a", d).expect("works with the old agent");
    let mut old = lab.surge_agent("n1", AgentOptions::default());
    let (old_pid, new_pid) = (old.pid().unwrap(), lab.agent("n1").pid().unwrap());

    let mut sysctl = std::process::Command::new("cat");
    sysctl.arg("/proc/sys/net/ipv4/tcp_migrate_req");
    assert_eq!(lab.run_in_pod("a", sysctl).trim(), "1", "a stopping agent's queued connections move to the new one");

    // The kubelet probes the new pod at the node's readiness port: the new agent answers.
    wait_for_holder(&lab, "n1", 15021, new_pid, "the readiness port handed over");
    let (status, _) = lab.http_on_node("n1", "127.0.0.1:15021".parse().unwrap(), "GET", "/healthz/ready").unwrap();
    assert_eq!(status, 200);
    assert_eq!(holder(&lab, "n1", 15000), Some(old_pid), "the admin API stays with the old agent meanwhile");

    // Both agents serve, past a kernel-state check (every 10 s) of each, while connections
    // keep opening both ways; then the old agent stops (SIGTERM, as the kubelet does) under
    // the same load. No connection is refused, and every one is carried by an agent.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (failures, asked) = std::thread::scope(|s| {
        // Two clients each way.
        let load: Vec<_> = [("a", d), ("c", a), ("a", d), ("c", a)]
            .into_iter()
            .map(|(from, to)| {
                let (lab, stop) = (&lab, &stop);
                s.spawn(move || {
                    let (mut failures, mut asked) = (Vec::new(), 0);
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        asked += 1;
                        match lab.ask(from, to) {
                            Ok(r) if r.server.as_ref().is_some_and(|v| v.peer_in_pod) => {}
                            other => failures.push(format!("{from} -> {to}: {other:?}")),
                        }
                    }
                    (failures, asked)
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs(12));
        // Frozen for a moment first, so its listeners hold connections the kernel accepted
        // when it stops: without listener migration in the pods those were reset (4 of 4
        // runs; 0 of 6 with it).
        let status = old.stop_after_stall(std::time::Duration::from_millis(300));
        assert!(status.success(), "the old agent drains and exits cleanly: {status}");
        std::thread::sleep(std::time::Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.into_iter().map(|t| t.join().unwrap()).fold((Vec::new(), 0), |(mut f, n), (f1, n1)| {
            f.extend(f1);
            (f, n + n1)
        })
    });
    assert!(failures.is_empty(), "{} of {asked} connections failed during the rollout: {failures:#?}", failures.len());
    assert!(asked > 20, "the load ran ({asked} connections)");
    let drift = |events: Vec<serde_json::Value>| {
        events.into_iter().filter(|e| e["message"].as_str().is_some_and(|m| m.contains("drift"))).count()
    };
    assert_eq!(drift(old.events()), 0, "the old agent never fought the new one over the kernel's state");
    assert_eq!(drift(lab.agent("n1").events()), 0, "nor the new one the old");

    // The new agent takes the admin port once the old one has freed it, and carries on alone.
    wait_for_holder(&lab, "n1", 15000, new_pid, "the admin API taken over");
    lab.ask("a", d).expect("outbound after the rollout");
    let r = lab.ask("c", a).expect("inbound after the rollout");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}
