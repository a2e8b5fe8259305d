//! Same-node handoff: a meshed pod's connection to another meshed pod on the same node is
//! carried by the one agent without HBONE to itself — and identity and policy still apply:
//! the destination's AuthorizationPolicy sees the source's principal, a denial is logged
//! with both principals and its reason, a policy change closes open connections it
//! now denies, bytes arrive exactly, both legs are counted as `same_node`, and STRICT still
//! drops plaintext from unmeshed neighbours.

use std::net::SocketAddr;

use selvedge_tests::{Client, Lab};

const ECHO: u16 = 7000;
const WHOAMI: u16 = 8080;

/// n1: a (namespace shop), o (namespace other), b (shop, the server), all meshed; c not.
fn lab(name: &str) -> Lab {
    let mut lab = Lab::new(name);
    lab.node("n1");
    lab.pod("n1", "a", true).pod("n1", "o", true).pod("n1", "b", true).pod("n1", "c", false);
    for (p, ns) in [("a", "shop"), ("o", "other"), ("b", "shop")] {
        lab.set_namespace(p, ns);
    }
    lab.start_agent("n1", Default::default());
    lab.serve("b", "echo", ECHO);
    lab.serve("b", "whoami", WHOAMI);
    lab
}

fn on_b(spec: &str) -> String {
    format!("{{metadata: {{name: p, namespace: shop}}, spec: {{selector: {{matchLabels: {{app: b}}}}, {spec}}}}}")
}

fn reaches(lab: &Lab, from: &str, to: SocketAddr) -> bool {
    lab.ask(from, to).is_ok_and(|r| r.server.is_some())
}

/// The value of the one sample of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn policy_applies_with_the_sources_identity_and_bytes_arrive_exactly() {
    let mut lab = lab("same-node-policy");
    let b_echo = lab.get("b").addr(ECHO);
    let b_whoami = lab.get("b").addr(WHOAMI);
    let a = lab.get("a").principal();
    let spiffe = |pod: &str| format!("spiffe://{}", lab.get(pod).principal());
    let (a_id, o_id, b_id) = (spiffe("a"), spiffe("o"), spiffe("b"));
    lab.set_policies(&[&on_b(&format!("rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]"))]);

    assert!(reaches(&lab, "a", b_whoami), "a is allowed by principal");
    assert!(!reaches(&lab, "o", b_whoami), "o is not");
    let n1 = lab.agent("n1");
    // Decided at the source (every fact is known there), with both identities named.
    n1.wait_access("o's refusal, with both principals and the policy's reason", |e| {
        e["direction"] == "outbound"
            && e["pod"] == "o"
            && e["result"] == "refused"
            && e["reason_code"] == "policy"
            && e["src_identity"] == o_id.as_str()
            && e["dst_identity"] == b_id.as_str()
    });

    let bytes = 4 << 20;
    for client in [Client::Blocking, Client::EventLoop] {
        let t = lab.transfer_with(client, "a", b_echo, bytes).expect("a -> b echo");
        assert!(t.is_exact(), "{client:?}: {t:?}");
        assert!(t.captured(), "captured by the agent: {t:?}");
    }
    // Both legs logged and counted, as same_node, each with both identities.
    let n1 = lab.agent("n1");
    n1.wait_access("b's inbound leg of the transfers", |e| {
        e["direction"] == "inbound" && e["pod"] == "b" && e["dst"] == b_echo.to_string() && e["result"] == "ok"
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, text) =
        lab.http_on_node("n1", SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics").expect("metrics");
    assert_eq!(status, 200);
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("source_principal", a_id.as_str()),
            ("destination_workload", "b"),
            ("connection_security_policy", "same_node"),
            ("response_flags", "-"),
        ];
        let sent = sample(&text, "istio_tcp_sent_bytes_total", &labels);
        assert!(sent.is_some_and(|v| v >= 2.0 * bytes as f64), "{reporter}: {sent:?}\n{text}");
    }
    assert!(
        !lab.agent("n1").access_log().iter().any(|e| e["pod"] == "b" && e["security"] == "mutual_tls"),
        "no HBONE tunnel from the agent to itself"
    );
}

#[test]
fn a_policy_change_closes_open_same_node_connections_it_now_denies() {
    let mut lab = lab("same-node-live");
    let b = lab.get("b").addr(ECHO);
    let a = lab.get("a").principal();
    // Writes half, waits 3 s, writes the rest: completing needs the connection to stay open.
    let running = lab.start_transfer("a", b, 64 * 1024, 3000);
    std::thread::sleep(std::time::Duration::from_millis(700));
    lab.set_policies(&[&on_b(&format!("action: DENY, rules: [{{from: [{{source: {{principals: [\"{a}\"]}}}}]}}]"))]);
    let t = lab.finish_transfer(running);
    assert!(t.as_ref().map_or(true, |t| !t.is_exact()), "closed, not completed: {t:?}");
    lab.agent("n1").wait_access("the closing, with its reason", |e| {
        e["pod"] == "b" && e["reason"].as_str().is_some_and(|r| r.contains("denied after a policy change"))
    });
    assert!(!reaches(&lab, "a", lab.get("b").addr(WHOAMI)), "and new ones are refused");
    assert!(reaches(&lab, "o", lab.get("b").addr(WHOAMI)), "others still pass");
}

#[test]
fn strict_admits_the_handoff_and_still_drops_plaintext_from_the_same_node() {
    let mut lab = lab("same-node-strict");
    let b = lab.get("b").addr(WHOAMI);
    lab.set_pod("b", true, true);
    lab.write_configs();
    // Not a plaintext hole: the unmeshed neighbour's SYN is dropped by b's sk_lookup.
    lab.ask("c", b).expect_err("plaintext from an unmeshed pod on the same node is dropped");
    let r = lab.ask("a", b).expect("a meshed neighbour is handed over");
    assert!(r.server().peer_in_pod, "delivered by the agent inside b");
    lab.agent("n1").wait_access("the handoff, as same_node", |e| {
        e["direction"] == "inbound" && e["pod"] == "b" && e["security"] == "same_node" && e["result"] == "ok"
    });
}
