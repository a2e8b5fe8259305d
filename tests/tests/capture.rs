//! Outbound and inbound capture, on one node and across two, and what must stay untouched.
//!
//! Proof of capture, per testing.md: the app dialled a remote address but the kernel's
//! table shows its socket connected to the agent's 127.0.0.1:15001, while `getpeername`
//! still shows what it dialled and `getsockname` its pod's own address; the server sees
//! the client's own address and port, from a socket inside its pod (the agent's
//! delivery); and the agents' counters and access logs record it. Between
//! meshed pods the legs are joined by an mTLS (HBONE) tunnel, and the destination's agent
//! logs the client's verified SPIFFE ID.

use selvedge_tests::{AgentOptions, Lab};

const PORT: u16 = 8080;

fn two_nodes(name: &str) -> Lab {
    let mut lab = Lab::new(name);
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "b", true).pod("n1", "c", false);
    lab.pod("n2", "d", true).pod("n2", "e", false);
    lab.start_agent("n1", AgentOptions::default());
    lab.start_agent("n2", AgentOptions::default());
    lab
}

#[test]
fn outbound_and_inbound_capture_on_one_node() {
    let mut lab = two_nodes("same-node");
    lab.serve("b", "whoami", PORT);
    let b = lab.get("b").addr(PORT);
    let before = lab.agent("n1").status();

    let r = lab.ask("a", b).expect("a reaches b through the agent");
    assert!(r.captured(), "a's socket is connected to the agent: {r:?}");
    // And a cannot tell: its own address is its pod's, and b sees that exact address.
    assert_eq!(r.local.unwrap().ip(), lab.get("a").ip, "getsockname gives a its pod's address");
    assert_eq!(Some(r.server().peer), r.local, "b sees a's own address and port, not the agent's");
    assert_eq!(r.peer, Some(b), "getpeername gives a back the address it dialled");
    assert_eq!(r.server().local, b, "the server sees the original destination as its local address");
    assert!(r.server().peer_in_pod, "inbound went through b's agent");

    let after = lab.agent("n1").fresh_status();
    assert!(after.stat("captured") > before.stat("captured"), "connect4 counted the capture");
    let n1 = lab.agent("n1");
    // Both pods are this agent's: handed over on the node, no HBONE to itself.
    n1.wait_access("a's outbound leg, handed over on the node", |e| {
        e["direction"] == "outbound" && e["pod"] == "a" && e["dst"] == b.to_string() && e["security"] == "same_node"
    });
    n1.wait_access("b's inbound leg, from a's identity", |e| {
        e["direction"] == "inbound"
            && e["pod"] == "b"
            && e["dst"] == b.to_string()
            && e["security"] == "same_node"
            && e["src_identity"] == "spiffe://cluster.local/ns/lab/sa/a"
    });
}

#[test]
fn capture_across_two_nodes() {
    let mut lab = two_nodes("cross-node");
    lab.serve("d", "whoami", PORT);
    let d = lab.get("d").addr(PORT);
    let a = lab.get("a").ip;

    let r = lab.ask("a", d).expect("a reaches d on the other node");
    assert!(r.captured(), "{r:?}");
    assert_eq!(r.peer, Some(d));
    assert_eq!(Some(r.server().peer), r.local, "d sees a's own address and port across nodes (HBONE's forwarded)");
    assert!(r.server().peer_in_pod, "d's agent delivered it");

    lab.agent("n1").wait_access("outbound leg to d", |e| e["direction"] == "outbound" && e["dst"] == d.to_string());
    // Its source is a's app's own address (from the CONNECT's `forwarded`), not the tunnel's.
    let from_a = r.local.expect("a's address").to_string();
    assert!(from_a.starts_with(&format!("{a}:")), "{from_a}");
    lab.agent("n2").wait_access("inbound leg from a's app, over mTLS, with a's identity", |e| {
        e["direction"] == "inbound"
            && e["src"] == from_a.as_str()
            && e["security"] == "mutual_tls"
            && e["src_identity"] == "spiffe://cluster.local/ns/lab/sa/a"
            && e["dst_identity"] == "spiffe://cluster.local/ns/lab/sa/d"
    });
}

#[test]
fn unenrolled_pods_and_host_processes_are_untouched() {
    let mut lab = two_nodes("untouched");
    lab.serve("e", "whoami", PORT);
    let e = lab.get("e").addr(PORT);
    let c = lab.get("c").ip;
    let a = lab.get("a").ip;

    // An unenrolled pod talking to an unenrolled pod: plain networking end to end.
    let r = lab.ask("c", e).expect("c reaches e");
    assert_eq!(r.local.unwrap().ip(), c, "c's connect was not redirected");
    assert!(!r.captured(), "{r:?}");
    assert_eq!(r.server().peer.ip(), c, "e saw c itself");

    // A host process that enters an enrolled pod's netns is not the pod: not captured.
    let r = lab.ask_as_host("a", e).expect("host process in a's netns reaches e");
    assert_eq!(r.local.unwrap().ip(), a, "not redirected to the agent");
    assert_eq!(r.server().peer.ip(), a);
}

#[test]
fn enrollment_follows_config_changes_live() {
    let mut lab = two_nodes("live");
    lab.serve("e", "whoami", PORT);
    let e = lab.get("e").addr(PORT);
    let c = lab.get("c").ip;

    lab.set_pod("c", true, false);
    lab.write_configs();
    let r = lab.ask("c", e).expect("c reaches e once enrolled");
    assert!(r.captured(), "c is captured after the config change: {r:?}");
    assert!(lab.agent("n1").status().enrolled.contains(&"c".to_string()));

    lab.set_pod("c", false, false);
    lab.write_configs();
    let r = lab.ask("c", e).expect("c reaches e once unenrolled");
    assert_eq!(r.local.unwrap().ip(), c, "c is no longer captured: {r:?}");
    assert!(!r.captured(), "{r:?}");
    assert_eq!(r.server().peer.ip(), c);
}
