//! Byte-exact transfers through the agents: 1 B to 16 MiB, both directions at once (the
//! client writes while the echo comes back), half-close (the client shuts down its write
//! side and still reads everything), same node and across nodes.
//!
//! The sockmap fast path is tested with event-loop clients only: with a socket in a
//! sockmap, the kernel's `tcp_bpf_recvmsg` returns EAGAIN to a *blocking* read after any
//! spurious wakeup (e.g. its own FIN being acknowledged), which event loops absorb and
//! blocking programs do not — which is why the fast path is off by default.

use selvedge_tests::{sys::wait_for, AgentOptions, Client, Lab};

const PORT: u16 = 7000;
const SIZES: [usize; 6] = [1, 1000, 65_536, 1 << 20, 4 << 20, 16 << 20];

fn run(name: &str, fast_path: bool, clients: &[Client]) -> Lab {
    let mut lab = Lab::new(name);
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "b", true).pod("n1", "c", false);
    lab.pod("n2", "d", true);
    lab.start_agent("n1", AgentOptions { fast_path, ..AgentOptions::default() });
    lab.start_agent("n2", AgentOptions { fast_path, ..AgentOptions::default() });
    lab.serve("b", "echo", PORT);
    lab.serve("d", "echo", PORT);
    for &client in clients {
        for (from, to) in [("a", "b"), ("a", "d"), ("c", "b")] {
            let dst = lab.get(to).addr(PORT);
            for size in SIZES {
                let t = lab
                    .transfer_with(client, from, dst, size)
                    .unwrap_or_else(|e| panic!("{client:?} {from}->{to} {size} B: {e}"));
                assert!(t.is_exact(), "{client:?} {from}->{to} {size} B not byte-exact (fast path {fast_path}): {t:?}");
                if from == "a" {
                    assert!(t.captured(), "went through the agent: {t:?}");
                }
            }
        }
    }
    lab
}

#[test]
fn byte_exact_without_fast_path() {
    let mut lab = run("bytes-plain", false, &[Client::Blocking, Client::EventLoop]);
    let s = lab.agent("n1").fresh_status();
    assert_eq!(s.stat("fast_path_hit"), 0, "the switch keeps the fast path off: {:?}", s.stats);
}

#[test]
fn byte_exact_with_fast_path() {
    let mut lab = run("bytes-fast", true, &[Client::EventLoop]);
    let s = lab.agent("n1").fresh_status();
    assert!(s.stat("fast_path_hit") > 0, "the sockmap fast path carried data: {:?}", s.stats);
}

/// The fast path must never reorder bytes. The dangerous case: the app writes before the
/// agent has put its socket in the sockhash (that data goes over TCP and waits, unread, in
/// the agent's socket), then writes again once the agent's socket is in it. The kernel
/// serves redirected data before queued TCP data, so the second write would overtake the
/// first unless the app's socket stays on TCP after its first miss.
///
/// Made deterministic: the agent is frozen (SIGSTOP) while the app connects and writes its
/// first half, so that write surely misses; once thawed, the agent joins the sockhash and
/// then waits about a second in its upstream connect (the destination address does not
/// exist yet and is added while ARP retries) while the app's second half arrives.
#[test]
fn fast_path_never_reorders_when_the_app_writes_first() {
    let mut lab = Lab::new("bytes-order");
    lab.node("n1");
    lab.pod("n1", "a", true).pod("n1", "e", false);
    lab.start_agent("n1", AgentOptions { fast_path: true, ..AgentOptions::default() });
    lab.serve("e", "echo", PORT);
    let misses_before = lab.agent("n1").fresh_status().stat("fast_path_miss");
    let late: std::net::Ipv4Addr = "198.18.1.99".parse().unwrap();
    let dst = std::net::SocketAddr::from((late, PORT));
    lab.agent("n1").pause();
    let t = std::thread::scope(|s| {
        let lab = &lab;
        let client = s.spawn(move || lab.transfer_with(Client::EventLoopSplit(400), "a", dst, 8 * 1024));
        // Thaw only once the first half waits, unread, in the agent's accepted socket (a
        // fixed sleep lost the race when the client process started slowly).
        wait_for(10, "the app's first half queued at the frozen agent", || {
            let mut ss = std::process::Command::new("ss");
            ss.args(["-Htn", "state", "established", "( sport = :15001 )"]);
            let out = lab.run_in_pod("a", ss);
            out.lines().any(|l| l.split_whitespace().next().and_then(|q| q.parse::<u64>().ok()) > Some(0)).then_some(())
        });
        lab.agents_resume("n1");
        std::thread::sleep(std::time::Duration::from_millis(50));
        lab.add_address("e", late);
        client.join().expect("client thread")
    })
    .expect("transfer completes once the address exists");
    assert!(t.is_exact(), "bytes reordered or lost through the fast path: {t:?}");
    let s = lab.agent("n1").fresh_status();
    assert!(s.stat("fast_path_miss") > misses_before, "the first write went over TCP: {:?}", s.stats);
    assert!(s.stat("fast_path_hit") > 0, "and later sends used the fast path: {:?}", s.stats);
}

/// Short connections to an app whose pod has four ephemeral ports: the agent's deliveries
/// (from the client's address; each ends in TIME_WAIT on the agent's side, since it passes the
/// client's half-close on first) take a source port unique per destination at connect. A
/// bind to port 0 needed a port no socket held, so once the four were in TIME_WAIT every
/// further delivery failed and its connection was refused.
#[test]
fn deliveries_reuse_source_ports_across_destinations() {
    let mut lab = Lab::two_nodes("ports");
    let ports = [PORT, PORT + 1, PORT + 2, PORT + 3];
    for port in ports {
        lab.serve("d", "echo", port);
    }
    let mut sysctl = std::process::Command::new("sysctl");
    sysctl.args(["-qw", "net.ipv4.ip_local_port_range=40000 40003"]);
    lab.run_in_pod_netns_as_host("d", sysctl);
    for port in ports {
        for round in 0..4 {
            let dst = lab.get("d").addr(port);
            let t = lab.transfer("a", dst, 1000).unwrap_or_else(|e| panic!("port {port}, round {round}: {e}"));
            assert!(t.is_exact(), "port {port}, round {round}: {t:?}");
        }
    }
}
