//! Faults and attacks that once opened the mesh or truncated a stream silently (README,
//! "Attack and fault catalogue"): each test here failed before its fix.

use std::net::SocketAddr;

use selvedge_tests::Lab;

const PORT: u16 = 8080;

fn metrics(lab: &Lab, node: &str) -> String {
    let (status, body) =
        lab.http_on_node(node, SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics").expect("metrics");
    assert_eq!(status, 200);
    body
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn an_emptied_config_file_keeps_the_config_in_force_and_says_so() {
    let mut lab = Lab::two_nodes("empty-config");
    lab.serve("d", "whoami", PORT);
    lab.set_pod("d", true, true);
    lab.write_configs();
    let d = lab.get("d").addr(PORT);
    let generation = lab.agent("n2").status().generation;
    lab.ask("c", d).expect_err("STRICT d drops plaintext");

    // What `: > file` (and `cp`, for a moment) leaves behind.
    for (i, empty) in ["", "  \n# being rewritten\n"].into_iter().enumerate() {
        lab.agent("n2").write_raw_config(empty);
        let want = i as u64 + 1;
        let s = selvedge_tests::sys::wait_for(10, "the agent to refuse the emptied file", || {
            lab.agent("n2").try_status().filter(|s| s.config_rejected_total >= want)
        });
        assert_eq!(s.generation, generation, "the config in force stays: {s:?}");
        assert!(s.enrolled.contains(&"d".to_string()), "d stays enrolled: {s:?}");
        let last = s.config_last_rejected.as_ref().expect("the refusal is in the status");
        assert!(last["reason"].as_str().is_some_and(|r| r.contains("empty")), "{last}");
        assert_eq!(last["kept_generation"], generation);
        lab.ask("c", d).expect_err("STRICT still holds: no plaintext after the file was emptied");
        let r = lab.ask("a", d).expect("meshed a still reaches d over mTLS");
        assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    }
    let m = metrics(&lab, "n2");
    assert_eq!(metric(&m, "selvedge_config_rejected_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "selvedge_config_generation"), Some(generation as f64), "{m}");
    let (ok, status) = lab.selvedge_on("n2", &["status"]);
    assert!(ok && status.contains("config_rejected_total      2"), "{status}");
    assert!(status.contains("generation") && status.contains("stays in force"), "{status}");

    // Saying "nothing" on purpose is taken.
    lab.agent("n2").write_raw_config("workloads: []\n");
    let s = selvedge_tests::sys::wait_for(10, "the explicit empty config to apply", || {
        lab.agent("n2").try_status().filter(|s| s.generation > generation)
    });
    assert!(s.enrolled.is_empty() && s.config_last_rejected.is_none(), "{s:?}");
}

#[test]
fn a_start_that_fails_leaves_the_kernel_as_it_found_it() {
    let mut lab = Lab::new("failed-start");
    lab.node("n1");
    lab.pod("n1", "a", true);
    let pins = lab.pin_dir("n1");
    let cgroup = lab.node_cgroup("n1");
    // Inside the lab's directory: removed with the lab, even when the test fails.
    let dir = lab.dir.join("failed-start");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "workloads:\n- {uid: u, name: a, node: n1, bogus: 1}\n").unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, "workloads: []\n").unwrap();
    let (bad, good, missing) =
        (bad.to_str().unwrap(), good.to_str().unwrap(), dir.join("absent.yaml").to_str().unwrap().to_owned());
    let no_cgroup = dir.join("no-such-cgroup");
    let cases: [(&[&str], &str); 5] = [
        (&["--config", bad], "bogus"),
        (&["--config", &missing], "cannot read"),
        (&["--config", good, "--admin-addr", "0.0.0.0:15000"], "loopback"),
        (&["--config", good, "--cgroup", no_cgroup.to_str().unwrap()], "not a cgroup v2 directory"),
        (&["--config", good, "--status-file", "/nonexistent-dir/status.json"], "does not exist"),
    ];
    for (args, reason) in cases {
        let (ok, log) = lab.run_agent_to_exit("n1", args);
        assert!(!ok, "{args:?} must fail");
        assert!(log.contains(reason), "{args:?}: the error names the problem ({reason}): {log}");
        assert!(!pins.exists(), "{args:?}: nothing pinned");
        assert!(lab.cgroup_programs(&cgroup).is_empty(), "{args:?}: nothing attached to {}", cgroup.display());
    }

    // Fails after attaching (the status file's path is a directory): what it attached goes.
    let (ok, log) = lab.run_agent_to_exit("n1", &["--config", good, "--status-file", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(log.contains("nothing of Selvedge's is left attached"), "{log}");
    assert!(!pins.exists(), "its pins are removed");
    assert!(lab.cgroup_programs(&cgroup).is_empty(), "its programs are detached");

    // With an earlier agent's pins there, they stay (its pods stay closed) and it says so.
    lab.start_agent("n1", selvedge_tests::AgentOptions::default());
    assert!(lab.agent("n1").stop().success());
    let (ok, log) = lab.run_agent_to_exit("n1", &["--config", good, "--status-file", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(log.contains("predate this start") && log.contains("selvedge uninstall"), "{log}");
    assert!(pins.join("maps").exists(), "the earlier agent's pins stay");
    assert!(!dir.with_extension("tmp").exists(), "the refused status write left no temporary file");
}

#[test]
fn uninstall_removes_only_selvedges_pins_and_refuses_other_filesystems() {
    let mut lab = Lab::new("uninstall");
    lab.node("n1");
    lab.pod("n1", "a", true);
    lab.start_agent("n1", selvedge_tests::AgentOptions::default());
    assert!(lab.agent("n1").stop().success());
    let pins = lab.pin_dir("n1");
    // Someone else's pin beside Selvedge's.
    let foreign = pins.join("links").join("someone_elses");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&foreign)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = lab.agent("n1").uninstall();
    assert!(said.contains("left in place") && said.contains("someone_elses"), "{said}");
    assert!(foreign.exists(), "the foreign pin stays");
    assert!(!pins.join("maps").exists(), "Selvedge's maps are gone");
    std::fs::remove_file(&foreign).unwrap();

    // A tmpfs directory: refused, nothing deleted.
    let dir = std::env::temp_dir().join(format!("svt-uninstall-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&dir).status().unwrap();
    assert!(mounted.success());
    std::fs::create_dir_all(dir.join("maps")).unwrap();
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    std::fs::write(dir.join("maps").join("SV_ENROLLED"), "not a pin").unwrap();
    let (ok, out) = lab.selvedge_on("n1", &["uninstall", "--pin-dir", dir.to_str().unwrap()]);
    let kept = dir.join("notes.txt").exists() && dir.join("maps").join("SV_ENROLLED").exists();
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok && out.contains("not on a bpf filesystem"), "{out}");
    assert!(kept, "nothing was deleted");
}

/// What a `selvedge-lab-app` report says about how its connection ended.
fn ended(report: &serde_json::Value) -> String {
    report["end"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_dying_tunnel_resets_the_app_never_ends_its_stream_cleanly() {
    let mut lab = Lab::two_nodes("dying-tunnel");
    let reports = lab.dir.join("sink.jsonl");
    lab.serve_args("d", &["sink", "7100", reports.to_str().unwrap()]);
    lab.serve_args("d", &["source", "7101"]);
    let (sink, source) = (lab.get("d").addr(7100).to_string(), lab.get("d").addr(7101).to_string());

    // The client's agent dies mid-stream: the server's side (its agent's HBONE stream
    // broke) must see a reset, not an end of stream after a prefix.
    let writer = lab.spawn_app("a", &["stream", &sink, "30"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    lab.kill_agent("n1");
    let line = selvedge_tests::sys::wait_for(15, "the sink's report", || {
        std::fs::read_to_string(&reports).ok().and_then(|t| t.lines().next().map(str::to_owned))
    });
    let at_server: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(at_server["received"].as_u64() > Some(0), "bytes flowed first: {at_server}");
    assert!(ended(&at_server).contains("ConnectionReset"), "the server's app sees a reset: {at_server}");
    let at_client: serde_json::Value =
        serde_json::from_str(&lab.child_first_line(writer, std::time::Duration::from_secs(40))).unwrap();
    assert!(ended(&at_client) != "eof" || at_client["write_error"].is_string(), "{at_client}");

    // The server's agent dies while the client reads: the client's agent must reset it.
    lab.start_agent("n1", selvedge_tests::AgentOptions::default());
    let reader = lab.spawn_app("a", &["drain", &source]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    lab.kill_agent("n2");
    let at_client: serde_json::Value =
        serde_json::from_str(&lab.child_first_line(reader, std::time::Duration::from_secs(40))).unwrap();
    assert!(at_client["received"].as_u64() > Some(0), "bytes flowed first: {at_client}");
    assert!(ended(&at_client).contains("ConnectionReset"), "the client's app sees a reset: {at_client}");
}

#[test]
fn a_pod_sandbox_recreated_at_the_same_path_is_enrolled_again() {
    let mut lab = Lab::two_nodes("recreated");
    lab.pod("n2", "e", false);
    lab.set_pod("a", true, true);
    lab.write_configs();
    lab.serve("e", "whoami", PORT);
    let (a, e) = (lab.get("a").addr(PORT), lab.get("e").addr(PORT));

    // Same path, same IP, a new namespace; the config file does not change.
    lab.recreate_pod("a");
    lab.serve("a", "whoami", PORT);
    lab.agent("n1").wait_event("the agent to notice the new namespace", |l| {
        l["message"].as_str().is_some_and(|m| m.contains("now names another namespace"))
    });
    selvedge_tests::sys::wait_for(10, "a enrolled again", || {
        let enrolled =
            lab.agent("n1").events().iter().filter(|e| e["message"] == "enrolled" && e["pod"] == "a").count();
        (enrolled >= 2).then_some(())
    });
    lab.ask("c", a).expect_err("STRICT applies in the new namespace: plaintext dropped");
    let r = lab.ask("d", a).expect("meshed d reaches the new a over mTLS");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    let r = lab.ask("a", e).expect("a's outbound works");
    assert!(r.captured(), "and is captured in the new namespace: {r:?}");
}

#[test]
fn one_pod_cannot_exhaust_the_node_its_excess_is_refused_and_counted() {
    let mut lab = Lab::new("pod-share");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "b", true);
    lab.pod("n2", "e", false);
    let opts = selvedge_tests::AgentOptions {
        extra_args: vec!["--max-conns-per-pod".into(), "20".into()],
        ..selvedge_tests::AgentOptions::default()
    };
    lab.start_agent("n1", opts);
    lab.serve("e", "whoami", PORT);
    let e = lab.get("e").addr(PORT);

    // a holds 40 connections: 20 are carried, the rest refused at once.
    let holder = lab.spawn_app("a", &["hold", &e.to_string(), "40", "30"]);
    let line = lab.child_first_line(holder, std::time::Duration::from_secs(20));
    assert!(line.contains("open"), "{line}");
    let refused = selvedge_tests::sys::wait_for(10, "20 refusals over the pod's limit", || {
        let n = lab.agent("n1").access_log().iter().filter(|l| l["reason_code"] == "over_limit").count();
        (n >= 20).then_some(n)
    });
    assert_eq!(refused, 20, "exactly the excess is refused");
    let reason = lab.agent("n1").wait_access("the reason", |l| l["reason_code"] == "over_limit");
    assert!(reason["reason"].as_str().is_some_and(|r| r.contains("--max-conns-per-pod")), "{reason}");
    let m = metrics(&lab, "n1");
    assert!(m.contains("selvedge_denials_total{reason=\"over_limit\"} 20"), "{m}");

    // Its neighbour is untouched; a itself gets no more until it lets go.
    lab.ask("b", e).expect("another pod on the node still connects");
    match lab.ask("a", e) {
        Ok(r) => assert!(r.server.is_none(), "a is at its limit: reset before reaching the server: {r:?}"),
        Err(err) => assert!(err.contains("reset"), "{err}"),
    }
    lab.stop_child(holder);
    selvedge_tests::sys::wait_for(10, "a under its limit again", || {
        lab.ask("a", e).ok().filter(|r| r.server.is_some())
    });
}

/// The capabilities the DaemonSet grants the agent (`deploy/base/selvedge.yaml`), as
/// `setpriv` names them, with the bit of each in a capability set.
const GRANTED: [(&str, u32); 3] = [("bpf", 39), ("net_admin", 12), ("sys_admin", 21)];

#[test]
fn the_agent_does_its_whole_job_with_only_the_capabilities_and_seccomp_profile_the_daemonset_grants() {
    let mut lab = Lab::new("least-privilege");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "c", false);
    lab.pod("n2", "d", true);
    let only = selvedge_tests::AgentOptions {
        capabilities: Some(GRANTED.iter().map(|(name, _)| *name).collect()),
        seccomp: true,
        ..selvedge_tests::AgentOptions::default()
    };
    lab.start_agent("n1", only.clone());
    lab.start_agent("n2", only);
    lab.serve("a", "whoami", PORT);
    lab.serve("d", "whoami", PORT);
    lab.set_pod("d", true, true);
    lab.write_configs();

    // Capture, HBONE with mTLS, inbound steering, STRICT in the kernel: all of it.
    let r = lab.ask("a", lab.get("d").addr(PORT)).expect("a reaches d over HBONE");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    let r = lab.ask("c", lab.get("a").addr(PORT)).expect("inbound to a through its agent");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    lab.ask("c", lab.get("d").addr(PORT)).expect_err("STRICT d drops plaintext");
    lab.bind_in_pod("a", 15001).expect_err("the bind guard holds");
    lab.agent("n1").wait_event("the kernel's log records reach the agent", |e| e["target"] == "selvedge::ebpf");

    // And it held nothing more than that while doing it.
    let pid = lab.agent("n1").pid().expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff");
    let want = GRANTED.iter().fold(0u64, |set, (_, bit)| set | 1 << bit);
    assert_eq!(effective, want, "effective capabilities {effective:#x}, want exactly {want:#x}");
    let filtered = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim);
    assert_eq!(filtered, Some("2"), "under a seccomp filter (deploy/seccomp/selvedge-agent.json)");
}

/// What the profile is for: with CAP_SYS_ADMIN granted (setns), it still refuses what an
/// escape from the agent's container would use, and lets programs start (the agent's own
/// threads: the test above).
#[test]
fn the_agents_seccomp_profile_refuses_what_an_escape_needs() {
    let env = selvedge_tests::sys::preflight();
    let profile = selvedge_tests::seccomp::agent_profile();
    let run = |argv: &[&str]| {
        let out = std::process::Command::new(&env.app)
            .arg("seccomp-exec")
            .arg(&profile)
            .arg("--")
            .args(argv)
            .output()
            .expect("run seccomp-exec");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(run(&["true"]).0, "a program starts under the profile");
    let (ok, err) = run(&["sh", "-c", "true & wait"]);
    assert!(ok, "processes start (clone without namespace flags is allowed): {err}");
    for argv in [&["unshare", "--mount", "true"][..], &["unshare", "--net", "true"], &["unshare", "--user", "true"]] {
        let (ok, err) = run(argv);
        assert!(!ok && err.contains("Operation not permitted"), "{argv:?} must be refused with EPERM: {err}");
    }
    // mount(2) in the agent's own mount namespace (util-linux words EPERM "permission
    // denied"); unmounted at once should the profile ever let it through.
    let dir = std::env::temp_dir().join(format!("selvedge-seccomp-mount-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mount point");
    let target = dir.display().to_string();
    let (ok, err) = run(&["mount", "-t", "tmpfs", "none", &target]);
    if ok {
        let _ = std::process::Command::new("umount").arg(&dir).status();
    }
    let _ = std::fs::remove_dir(&dir);
    assert!(!ok && err.contains("permission denied"), "mount must be refused: {err}");
}
