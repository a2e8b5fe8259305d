//! No way around the agent: direct connects to a meshed pod are steered to its agent,
//! the agent's ports cannot be taken, IPv4-mapped IPv6 is captured like IPv4, and dialling
//! the agent's own listener does not loop.

use selvedge_tests::Lab;

const PORT: u16 = 8080;
/// EPERM, what the bind guard's refusal looks like to the app.
const EPERM: &str = "os error 1";

fn lab(name: &str) -> Lab {
    let mut lab = Lab::two_nodes(name);
    lab.serve("d", "whoami", PORT);
    lab
}

#[test]
fn direct_connects_to_a_meshed_pod_go_through_its_agent() {
    let mut lab = lab("direct");
    let d = lab.get("d").addr(PORT);
    let c = lab.get("c").ip;
    let a = lab.get("a").ip;
    let steered = lab.agent("n2").fresh_status().stat("inbound_assigned");

    // From a pod that is not meshed at all.
    let r = lab.ask("c", d).expect("c reaches d");
    assert_eq!(r.local.unwrap().ip(), c, "c itself is not captured");
    assert!(!r.captured(), "{r:?}");
    assert!(r.server().peer_in_pod, "d's agent took it: {r:?}");
    // From c's own address (another port: c's connection itself ends at d's agent).
    assert_eq!(r.server().peer.ip(), c, "and delivered it from c's address: {r:?}");

    // From a host process inside a meshed pod's netns (skipping that pod's capture).
    let r = lab.ask_as_host("a", d).expect("host process reaches d");
    assert_eq!(r.local.unwrap().ip(), a);
    assert!(!r.captured(), "{r:?}");
    assert!(r.server().peer_in_pod, "d's agent took it: {r:?}");
    let now = lab.agent("n2").fresh_status().stat("inbound_assigned");
    assert!(now >= steered + 2, "sk_lookup steered both plaintext SYNs to the agent ({steered} -> {now})");
}

#[test]
fn pods_cannot_bind_the_agent_ports() {
    let mut lab = lab("bind");
    for port in [15001, 15006, 15008] {
        let err = lab.bind_in_pod("a", port).expect_err("an enrolled pod must not bind the agent's port");
        assert!(err.contains(EPERM), "port {port}: {err}");
    }
    lab.bind_in_pod("a", 15002).expect("other ports stay free");
    lab.bind_in_pod("c", 15001).expect("an unenrolled pod is untouched");
    let s = lab.agent("n1").fresh_status();
    assert!(s.stat("bind_refused") >= 3, "refusals counted: {:?}", s.stats);
    // The kernel's own record of it reaches the agent's log (aya-log -> tracing).
    lab.agent("n1").wait_event("a kernel-side log record", |e| e["target"] == "selvedge::ebpf");
}

#[test]
fn ipv4_mapped_ipv6_connects_are_captured() {
    let lab = lab("mapped");
    let d = lab.get("d");
    let mapped: std::net::SocketAddr = format!("[::ffff:{}]:{PORT}", d.ip).parse().unwrap();

    let r = lab.ask("a", mapped).expect("a reaches d over an IPv6 socket");
    assert!(r.captured(), "redirected to the agent: {r:?}");
    assert_eq!(r.peer, Some(mapped), "getpeername6 gives back the mapped address dialled");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
}

#[test]
fn dialling_the_agent_listener_directly_does_not_loop() {
    let mut lab = lab("loop");
    let d = lab.get("d").addr(PORT);
    let a15006 = lab.get("a").addr(15006);
    let before = lab.agent("n1").fresh_status().stat("captured");

    // 127.0.0.1:15001 is loopback: not captured, it reaches the agent's listener itself,
    // which finds no original destination and resets instead of guessing. (The reset may
    // even beat connect() returning.)
    match lab.ask("a", "127.0.0.1:15001".parse().unwrap()) {
        Ok(r) => assert!(r.server.is_none(), "nothing answers behind it: {r:?}"),
        Err(e) => assert!(e.contains("reset"), "{e}"),
    }
    // The inbound listener, dialled from outside the pod: steered to itself; the agent
    // must refuse rather than deliver to its own port (which would come straight back).
    match lab.ask("c", a15006) {
        Ok(r) => assert!(r.server.is_none(), "{r:?}"),
        Err(e) => assert!(e.contains("reset"), "{e}"),
    }
    let agent = lab.agent("n1");
    agent.wait_access("outbound refusal", |e| e["result"] == "refused" && e["direction"] == "outbound");
    agent.wait_access("inbound refusal", |e| e["result"] == "refused" && e["dst"] == a15006.to_string());
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Each was handled exactly once: no connection chasing its own tail.
    let log = agent.access_log();
    let to_15006 = log.iter().filter(|e| e["dst"] == a15006.to_string()).count();
    let outbound_refused = log.iter().filter(|e| e["direction"] == "outbound" && e["result"] == "refused").count();
    assert_eq!((to_15006, outbound_refused), (1, 1), "{log:#?}");

    // The agent is healthy and counted exactly one capture for the next real connection.
    let r = lab.ask("a", d).expect("a still reaches d");
    assert!(r.server().peer_in_pod, "delivered by the agent inside the pod: {r:?}");
    let after = lab.agent("n1").fresh_status().stat("captured");
    assert_eq!(after - before, 1, "only the real connection was captured");
}
