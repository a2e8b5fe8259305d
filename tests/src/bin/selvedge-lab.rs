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
            outbound["bytes_sent"].as_u64().unwrap_or_default(),
            inbound["bytes_received"].as_u64().unwrap_or_default(),
        );
        // The identities the destination's agent verified from the client's certificate.
        let security = if inbound["security"] == "mutual_tls" { "mutual TLS" } else { "PLAINTEXT" };
        all_ok &= inbound["security"] == "mutual_tls";
        println!(
            "  {:<10} {security}: {} -> {}",
            "",
            inbound["src_identity"].as_str().unwrap_or("?"),
            inbound["dst_identity"].as_str().unwrap_or("?")
        );
    }
    let n1 = lab.agent("node-1").fresh_status();
    let n2 = lab.agent("node-2").fresh_status();
    println!("\nKernel counters (connects captured / plaintext SYNs steered by sk_lookup — meshed traffic arrives on");
    println!("HBONE port 15008 instead / fast-path sends, off by default):");
    for (node, s) in [("node-1", &n1), ("node-2", &n2)] {
        println!(
            "  {node}: captured {}  plaintext steered {}  fast-path hits {}",
            s.stat("captured"),
            s.stat("inbound_assigned"),
            s.stat("fast_path_hit")
        );
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
