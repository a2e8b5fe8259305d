//! `selvedge-lab demo [--keep]`: the README's first command (through `cargo xtask demo`).
//!
//! Two nodes, three meshed pods, one agent per node; a few real connections; then a report
//! built from what the agents logged: for each connection, who dialled whom, which agent
//! took the outbound leg and which the inbound leg, and the bytes each way.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use selvedge_tests::{AgentOptions, Lab};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("demo") {
        eprintln!("usage: selvedge-lab demo [--keep]");
        std::process::exit(2);
    }
    let keep = args.iter().any(|a| a == "--keep");
    demo(keep);
}

struct Flow {
    from: &'static str,
    to: &'static str,
    port: u16,
    bytes: usize,
}

const FLOWS: [Flow; 3] = [
    Flow { from: "frontend", to: "api", port: 8080, bytes: 64 * 1024 },
    Flow { from: "frontend", to: "db", port: 5432, bytes: 1024 * 1024 },
    Flow { from: "api", to: "db", port: 5432, bytes: 4096 },
];

fn demo(keep: bool) {
    println!("Selvedge demo: two nodes, three meshed pods, one agent per node, mutual TLS between them\n");
    let mut lab = Lab::new("demo");
    lab.node("node-1").node("node-2");
    lab.pod("node-1", "frontend", true).pod("node-1", "api", true).pod("node-2", "db", true);
    for (name, p) in &lab.pods {
        println!("  pod {name:<9} {:<14} on {}", p.ip.to_string(), p.node);
    }
    lab.start_agent("node-1", AgentOptions::default());
    lab.start_agent("node-2", AgentOptions::default());
    println!("\n  agents running on node-1 and node-2 (eBPF attached, pods enrolled)\n");
    lab.serve("api", "echo", 8080);
    lab.serve("db", "echo", 5432);

    println!("Connections (each app sends N bytes and reads them back through the echo server;");
    println!("the second line is what the destination's agent verified from the client's certificate):\n");
    println!(
        "  {:<10} {:<26} {:<34} {:>9} {:>9}  result",
        "from", "to", "handled by (outbound -> inbound)", "sent", "received"
    );
    let mut all_ok = true;
    for f in &FLOWS {
        let dst = lab.get(f.to).addr(f.port);
        let result = lab.transfer(f.from, dst, f.bytes);
        let (out_node, in_node) = (lab.get(f.from).node.clone(), lab.get(f.to).node.clone());
        let src_ip = lab.get(f.from).ip;
        let outbound = lab.agent(&out_node).wait_access("outbound leg", |e| {
            e["direction"] == "outbound" && e["pod"] == f.from && e["dst"] == dst.to_string()
        });
        let inbound = lab.agent(&in_node).wait_access("inbound leg", |e| {
            e["direction"] == "inbound" && e["dst"] == dst.to_string() && src_is(e, src_ip)
        });
        let handled = format!("{out_node} agent -> {in_node} agent");
        let (ok, detail) = match &result {
            Ok(t) if t.is_exact() => (true, "byte-exact".to_string()),
            Ok(t) => (false, format!("MISMATCH {t:?}")),
            Err(e) => (false, format!("FAILED {e}")),
        };
        all_ok &= ok;
        println!(
            "  {:<10} {:<26} {:<34} {:>9} {:>9}  {detail}",
            f.from,
            format!("{} {dst}", f.to),
            handled,
            // Istio's words: the request is "received" by the mesh, the response "sent".
            outbound["bytes_received"].as_u64().unwrap_or_default(),
            inbound["bytes_sent"].as_u64().unwrap_or_default(),
        );
        // The identities the destination's agent verified: from the client's certificate
        // (another node), or from the source pod's own identity (same node: one agent
        // carries both legs and the bytes never leave the node).
        let security = match inbound["security"].as_str() {
            Some("mutual_tls") => "mutual TLS",
            Some("same_node") => "same node, never on the wire",
            _ => "PLAINTEXT",
        };
        all_ok &= security != "PLAINTEXT";
        println!(
            "  {:<10} {security}: {} -> {}",
            "",
            inbound["src_identity"].as_str().unwrap_or("?"),
            inbound["dst_identity"].as_str().unwrap_or("?")
        );
    }
    authorization(&mut lab);

    // The agent refreshes what its admin API shows every half second.
    let _ = lab.agent("node-1").fresh_status();
    println!("\n`selvedge status` on node-1 (the CLI reads the agent's admin API on 127.0.0.1:15000):\n");
    let (_, status) = lab.selvedge_on("node-1", &["status"]);
    for line in status.lines() {
        println!("  {line}");
    }
    println!("\nnode-2's Prometheus metrics (:15020/metrics), the connections it served:\n");
    let metrics = lab
        .http_on_node("node-2", SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    for line in metrics.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")) {
        println!("  {}", shorten(line));
    }
    if keep {
        look_around(&mut lab);
    }
    drop(lab);
    println!("\nlab torn down: namespaces, cgroups, pins and processes removed");
    if !all_ok {
        eprintln!("demo: some connections failed");
        std::process::exit(1);
    }
}

/// One allowed and one denied flow under an AuthorizationPolicy, and how fast a denied
/// connect is refused with and without the kernel's verdict cache.
fn authorization(lab: &mut Lab) {
    println!("\nAuthorization: an AuthorizationPolicy lets only frontend reach db:\n");
    println!("  {{metadata: {{name: db, namespace: lab}}, spec: {{selector: {{matchLabels: {{app: db}}}},");
    println!("   rules: [{{from: [{{source: {{principals: [cluster.local/ns/lab/sa/frontend]}}}}]}}]}}}}\n");
    lab.set_policies(&[
        "{metadata: {name: db, namespace: lab}, spec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principals: [cluster.local/ns/lab/sa/frontend]}}]}]}}",
    ]);
    let db = lab.get("db").addr(5432);
    for from in ["frontend", "api"] {
        let ok = lab.transfer(from, db, 1000).map(|t| t.is_exact()).unwrap_or(false);
        let verdict = if ok {
            "allowed".to_string()
        } else {
            let node = lab.get(from).node.clone();
            let e = lab.agent(&node).wait_access("the denial", |e| e["reason_code"] == "policy");
            format!("DENIED — {}", e["reason"].as_str().unwrap_or_default())
        };
        println!("  {from:<9} -> db {db}: {verdict}");
    }
    // Measure from a clean slate: any config change clears the cached verdicts (here, adding
    // an AUDIT policy that decides nothing). Attempt 1 then finds the verdict the slow way (a
    // handshake with the local agent, then a reset); the kernel caches it, so the later
    // attempts fail inside connect().
    lab.set_policies(&[
        "{metadata: {name: db, namespace: lab}, spec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principals: [cluster.local/ns/lab/sa/frontend]}}]}]}}",
        "{metadata: {name: touch, namespace: lab}, spec: {action: AUDIT}}",
    ]);
    let times = lab.refusal_times("api", db, 21);
    if let Some(((first, how1), rest)) = times.split_first() {
        let mut cached: Vec<u64> = rest.iter().filter(|(_, h)| h == "connect").map(|(t, _)| *t).collect();
        cached.sort_unstable();
        let median = cached.get(cached.len() / 2).copied().unwrap_or(0);
        println!("\n  time until api learns it is refused (one run, this machine):");
        println!("    first attempt, no cached verdict (refused after {how1}): {first} us");
        println!("    later attempts, refused by the kernel in connect() (median of {}): {median} us", cached.len());
    }
}

/// A metric line without the labels that say "unknown", to fit a terminal.
fn shorten(line: &str) -> String {
    let Some((name, rest)) = line.split_once('{') else { return line.to_string() };
    let Some((labels, value)) = rest.rsplit_once('}') else { return line.to_string() };
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|l| {
            !l.ends_with("\"unknown\"") && !l.starts_with("request_protocol") && !l.starts_with("response_flags")
        })
        .collect();
    format!("{name}{{{}}}{value}", kept.join(","))
}

fn src_is(e: &serde_json::Value, ip: std::net::Ipv4Addr) -> bool {
    e["src"].as_str().and_then(|s| s.parse::<SocketAddr>().ok()).is_some_and(|a| a.ip() == ip)
}

fn look_around(lab: &mut Lab) {
    let a1 = lab.agent("node-1");
    let (pins, log1, cfg1) = (a1.pin_dir().display().to_string(), a1.log_path(), a1.config_path());
    let log2 = lab.agent("node-2").log_path();
    let fe = lab.get("frontend").clone();
    let db = lab.get("db").addr(5432);
    println!("\nThe lab stays up until Ctrl-C. To look around:");
    println!("  agent logs:        {}  {}", log1.display(), log2.display());
    println!("  node-1 config:     {} (edit it: the agent applies changes live)", cfg1.display());
    println!("  pinned eBPF state: ls {pins}/links {pins}/maps; bpftool map dump pinned {pins}/maps/SV_ENROLLED");
    println!("  programs:          bpftool prog show | grep -E 'capture|restore|guard|track|redirect|steer'");
    let n1 = lab.node_netns("node-1");
    let n1 = n1.file_name().unwrap_or_default().to_string_lossy();
    println!(
        "  the agent's view:  ip netns exec {n1} {} status   (also workloads, certs, connections, bpf; -o json|yaml)",
        lab.env.selvedge.display()
    );
    println!("  metrics:           ip netns exec {n1} python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:15020/metrics').read().decode())\"");
    println!(
        "  a pod's view:      ip netns exec {} ss -tlnp   (the agent's 15001/15006 listeners)",
        fe.netns.file_name().unwrap_or_default().to_string_lossy()
    );
    // A throwaway shell joins the pod's cgroup (never the user's own: teardown kills it).
    println!(
        "  talk as frontend:  sh -c 'echo $$ > {}/cgroup.procs; exec ip netns exec {} python3 -c \"import socket; print(socket.create_connection((\\\"{}\\\", {})).getpeername())\"'",
        fe.cgroup.display(),
        fe.netns.file_name().unwrap_or_default().to_string_lossy(),
        db.ip(),
        db.port()
    );
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
