//! AuthorizationPolicy enforced by real destination agents: an allow/deny matrix over
//! principals, namespaces, service accounts, ports and ipBlocks (and their `not` forms),
//! DENY over ALLOW, L7 fields failing closed, namespace isolation and dry-run.

use selvedge_tests::Lab;

/// n1: a (namespace shop), o (namespace other), c (unmeshed); n2: d (shop), e (other).
fn lab(name: &str) -> Lab {
    let mut lab = Lab::new(name);
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "o", true).pod("n1", "c", false);
    lab.pod("n2", "d", true).pod("n2", "e", true);
    for p in ["a", "d"] {
        lab.set_namespace(p, "shop");
    }
    for p in ["o", "e"] {
        lab.set_namespace(p, "other");
    }
    lab.start_agent("n1", Default::default());
    lab.start_agent("n2", Default::default());
    for (pod, port) in [("d", 8080), ("d", 9090), ("e", 8080)] {
        lab.serve(pod, "whoami", port);
    }
    lab
}

/// Did `from`'s connection to `to:port` reach the app? (A denial resets it before any byte.)
fn reaches(lab: &Lab, from: &str, to: &str, port: u16) -> bool {
    match lab.ask(from, lab.get(to).addr(port)) {
        Ok(r) => r.server.is_some(),
        Err(_) => false,
    }
}

/// Policies, then (from, to, port, reaches?) checks under them.
type Case = (Vec<String>, Vec<(&'static str, &'static str, u16, bool)>);

fn on_d(spec: &str) -> String {
    format!("{{metadata: {{name: p, namespace: shop}}, spec: {{selector: {{matchLabels: {{app: d}}}}, {spec}}}}}")
}

#[test]
fn allow_deny_matrix_at_the_destination() {
    let mut lab = lab("authz-matrix");
    let a_ip = lab.get("a").ip;
    let c_ip = lab.get("c").ip;
    let a = lab.get("a").principal();
    let cases: Vec<Case> = vec![
        (vec![], vec![("a", "d", 8080, true), ("o", "d", 8080, true), ("c", "d", 8080, true)]),
        (
            vec![on_d(&format!("rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]"))],
            vec![("a", "d", 8080, true), ("o", "d", 8080, false), ("c", "d", 8080, false)],
        ),
        (
            vec![on_d(&format!("rules: [{{from: [{{source: {{notPrincipals: [\"{a}\"]}}}}]}}]"))],
            vec![("a", "d", 8080, false), ("o", "d", 8080, true), ("c", "d", 8080, true)],
        ),
        (vec![on_d("rules: [{from: [{source: {namespaces: [shop]}}]}]")], vec![("a", "d", 8080, true), ("o", "d", 8080, false)]),
        (vec![on_d("rules: [{from: [{source: {notNamespaces: [shop]}}]}]")], vec![("a", "d", 8080, false), ("o", "d", 8080, true)]),
        (vec![on_d("rules: [{from: [{source: {serviceAccounts: [o]}}]}]")], vec![("a", "d", 8080, false), ("o", "d", 8080, true)]),
        (vec![on_d("rules: [{to: [{operation: {ports: [\"9090\"]}}]}]")], vec![("a", "d", 9090, true), ("a", "d", 8080, false)]),
        (vec![on_d("rules: [{to: [{operation: {notPorts: [\"9090\"]}}]}]")], vec![("a", "d", 9090, false), ("a", "d", 8080, true)]),
        (
            vec![on_d(&format!("rules: [{{from: [{{source: {{ipBlocks: [\"{a_ip}/32\"]}}}}]}}]"))],
            vec![("a", "d", 8080, true), ("o", "d", 8080, false), ("c", "d", 8080, false)],
        ),
        (
            vec![on_d(&format!("rules: [{{from: [{{source: {{notIpBlocks: [\"{c_ip}\"]}}}}]}}]"))],
            vec![("a", "d", 8080, true), ("c", "d", 8080, false)],
        ),
        // DENY beats ALLOW.
        (
            vec![on_d("rules: [{}]"), on_d(&format!("action: DENY, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]")).replace("name: p", "name: deny-a")],
            vec![("a", "d", 8080, false), ("o", "d", 8080, true)],
        ),
        // An ALLOW rule with an L7 field never matches: it denies.
        (vec![on_d("rules: [{to: [{operation: {methods: [GET]}}]}]")], vec![("a", "d", 8080, false)]),
        // A policy in one namespace never affects another.
        (
            vec!["{metadata: {name: lockdown, namespace: other}, spec: {action: DENY, rules: [{}]}}".to_string()],
            vec![("a", "d", 8080, true), ("a", "e", 8080, false)],
        ),
        // Dry-run never enforces.
        (
            vec!["{metadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}, spec: {action: DENY, rules: [{}]}}".to_string()],
            vec![("a", "d", 8080, true), ("o", "d", 8080, true)],
        ),
    ];
    for (policies, checks) in cases {
        let refs: Vec<&str> = policies.iter().map(String::as_str).collect();
        lab.set_policies(&refs);
        for (from, to, port, expect) in checks {
            assert_eq!(reaches(&lab, from, to, port), expect, "{from} -> {to}:{port} with {policies:?}");
        }
    }
}

#[test]
fn denials_are_logged_with_the_policy_and_counted() {
    let mut lab = lab("authz-log");
    let a = lab.get("a").principal();
    lab.set_policies(&[&on_d(&format!("action: DENY, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]"))]);
    // a's own agent knows d's policies: it refuses at the source, naming the policy.
    assert!(!reaches(&lab, "a", "d", 8080));
    let event = lab.agent("n1").wait_access("the denial at the source", |e| e["reason_code"] == "policy");
    let reason = event["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("shop/p") && reason.contains("decided at the source"), "{event}");
    // The destination enforces by itself too: a client that skips its agent and presents
    // a's (valid) certificate directly to d's HBONE listener gets 401 (ztunnel's answer).
    let hbone = lab.get("d").addr(15008);
    let status = lab.hbone_probe("c", hbone, &format!("spiffe://{a}"), "good", "CONNECT", lab.get("d").addr(8080));
    assert_eq!(status, Ok(401));
    let event = lab.agent("n2").wait_access("the denial at the destination", |e| e["reason_code"] == "policy");
    assert!(event["reason"].as_str().is_some_and(|r| r.contains("shop/p")), "{event}");
    assert_eq!(event["src_identity"], "spiffe://cluster.local/ns/shop/sa/a");
    // Plaintext, no ALLOW matching: denied at the destination, with that reason.
    lab.set_policies(&[&on_d("rules: [{from: [{source: {namespaces: [nobody]}}]}]")]);
    assert!(!reaches(&lab, "c", "d", 8080));
    lab.agent("n2").wait_access("no ALLOW matched", |e| {
        e["reason_code"] == "policy" && e["reason"].as_str().is_some_and(|r| r.contains("no ALLOW policy matched"))
    });
    let (_, metrics) = lab.http_on_node("n2", "127.0.0.1:15020".parse().unwrap(), "GET", "/metrics").unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("selvedge_denials_total{reason=\"policy\"} 2")), "{metrics}");
    // Policies that report without deciding: each match is logged at the destination, with
    // the policy, the pod and the source (by the agent's log thread, shortly after).
    lab.set_policies(&[
        "{metadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}, spec: {action: DENY, rules: [{}]}}",
        "{metadata: {name: watch, namespace: shop}, spec: {action: AUDIT, rules: [{}]}}",
    ]);
    assert!(reaches(&lab, "a", "d", 8080), "neither policy decides");
    let src = lab.get("a").ip.to_string();
    let dry =
        lab.agent("n2").wait_event("the dry-run match", |e| e["message"] == "dry-run policy matched (not enforced)");
    assert_eq!(
        (&dry["policy"], &dry["action"], &dry["pod"], &dry["src"]),
        (&"shop/dry".into(), &"DENY".into(), &"d".into(), &src.clone().into()),
        "{dry}"
    );
    let audit = lab.agent("n2").wait_event("the AUDIT match", |e| e["message"] == "AUDIT policy matched");
    assert_eq!(
        (&audit["policy"], &audit["pod"], &audit["src"]),
        (&"shop/watch".into(), &"d".into(), &src.into()),
        "{audit}"
    );
}

#[test]
fn a_policy_change_closes_running_connections_it_now_denies() {
    let mut lab = lab("authz-live");
    lab.serve("d", "echo", 7000);
    let d = lab.get("d").addr(7000);
    let (a, c) = (lab.get("a").principal(), lab.get("c").ip);
    // Two running connections, over HBONE (a) and plaintext (c); each writes half its bytes,
    // then waits 3 s before the rest: completing would take a connection that stayed open.
    let over_mtls = lab.start_transfer("a", d, 64 * 1024, 3000);
    let plaintext = lab.start_transfer("c", d, 64 * 1024, 3000);
    std::thread::sleep(std::time::Duration::from_millis(700));
    lab.set_policies(&[
        &on_d(&format!("action: DENY, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]")),
        &on_d(&format!("action: DENY, rules: [{{from: [{{source: {{ipBlocks: [\"{c}\"]}}}}]}}]"))
            .replace("name: p", "name: q"),
    ]);
    for (who, pid) in [("a (mTLS)", over_mtls), ("c (plaintext)", plaintext)] {
        let t = lab.finish_transfer(pid);
        assert!(t.as_ref().map_or(true, |t| !t.is_exact()), "{who}'s connection was closed, not completed: {t:?}");
    }
    let closed = lab
        .agent("n2")
        .access_log()
        .into_iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains("denied after a policy change")))
        .count();
    assert_eq!(closed, 2, "both closings logged with the reason");
    // New connections are refused too; others stay allowed.
    assert!(!reaches(&lab, "a", "d", 8080));
    assert!(reaches(&lab, "o", "d", 8080));
}

#[test]
fn denied_connects_are_refused_in_the_kernel_once_the_source_knows() {
    let mut lab = lab("authz-kernel");
    let a = lab.get("a").principal();
    lab.set_policies(&[&on_d(&format!("action: DENY, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]"))]);
    let d = lab.get("d").addr(8080);
    // First attempt: accepted by a's agent (connect succeeds locally), then reset.
    match lab.ask("a", d) {
        Ok(r) => assert!(r.server.is_none(), "denied: {r:?}"),
        Err(e) => assert!(e.contains("reset"), "{e}"),
    }
    // Now the kernel knows: connect() itself fails, no handshake at all.
    let err = lab.ask("a", d).expect_err("refused at connect time");
    assert!(err.contains("os error 1"), "EPERM from the connect hook: {err}");
    let s = lab.agent("n1").fresh_status();
    assert!(s.stat("policy_refused") >= 1, "{:?}", s.stats);
    // Other destinations and other sources are unaffected; a policy change forgets it.
    assert!(reaches(&lab, "o", "d", 8080));
    lab.set_policies(&[]);
    assert!(reaches(&lab, "a", "d", 8080), "the cached verdict went with the policy");
}

#[test]
fn a_new_workload_on_a_reused_ip_does_not_inherit_decisions() {
    let mut lab = lab("authz-reuse");
    lab.set_policies(&[&on_d("action: DENY, rules: [{}]")]);
    let ip = lab.get("d").ip;
    assert!(!reaches(&lab, "a", "d", 8080));
    let _ = lab.ask("a", lab.get("d").addr(8080)); // now cached in a's kernel too
                                                   // d goes away; d2 (another workload, not selected by the policy) gets its address.
    lab.replace_pod("d", "d2");
    assert_eq!(lab.get("d2").ip, ip);
    lab.write_configs();
    lab.serve("d2", "whoami", 8080);
    let r = lab.ask("a", lab.get("d2").addr(8080)).expect("a reaches d2 at d's old address");
    assert_eq!(r.server().local.ip(), ip);
    lab.agent("n2").wait_access("d2 saw a's verified identity", |e| {
        e["pod"] == "d2" && e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/a"
    });
}
