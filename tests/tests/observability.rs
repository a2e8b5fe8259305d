//! What operators see: metrics with exact values after known traffic, the access log for
//! allowed and refused connections, readiness, the admin API's reach, and every inspection
//! command against a running agent.

use std::net::SocketAddr;

use selvedge_tests::{sys::wait_for, AgentOptions, Client, Lab};

const PORT: u16 = 7000;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of the one sample of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn metrics(lab: &Lab, node: &str) -> String {
    let (status, body) = lab.http_on_node(node, local(15020), "GET", "/metrics").expect("metrics endpoint");
    assert_eq!(status, 200);
    body
}

#[test]
fn metrics_count_known_traffic_exactly() {
    let mut lab = Lab::two_nodes("metrics");
    lab.serve("d", "echo", PORT);
    let d = lab.get("d").addr(PORT);
    let bytes = 100_000;
    for _ in 0..3 {
        assert!(lab.transfer("a", d, bytes).expect("a -> d").is_exact());
    }
    // The destination logs (and counts) when its side of each stream ends.
    lab.agent("n2").wait_access("third inbound leg", |_| true);
    std::thread::sleep(std::time::Duration::from_millis(500));

    let a = "spiffe://cluster.local/ns/lab/sa/a";
    let d_id = "spiffe://cluster.local/ns/lab/sa/d";
    let source = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "lab"),
        ("source_principal", a),
        ("destination_workload", "d"),
        ("destination_principal", d_id),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    let n1 = metrics(&lab, "n1");
    assert_eq!(sample(&n1, "istio_tcp_connections_opened_total", &source), Some(3.0), "{n1}");
    assert_eq!(sample(&n1, "istio_tcp_connections_closed_total", &source), Some(3.0));
    assert_eq!(sample(&n1, "istio_tcp_sent_bytes_total", &source), Some(3.0 * bytes as f64));
    assert_eq!(sample(&n1, "istio_tcp_received_bytes_total", &source), Some(3.0 * bytes as f64));
    assert_eq!(sample(&n1, "selvedge_enrolled_workloads", &[]), Some(1.0));
    // One inbound listener for the one enrolled pod (it read 4096 of 4096: a sockmap's
    // slots all iterate, set or not).
    assert_eq!(sample(&n1, "selvedge_map_entries", &[("map", "SV_INBOUND")]), Some(1.0), "{n1}");
    assert_eq!(sample(&n1, "selvedge_map_entries", &[("map", "SV_SLOTS")]), Some(1.0), "{n1}");
    // The three tunnels shared one pooled connection: one full TLS handshake, none resumed.
    let handshakes = wait_for(3, "the handshake counter", || {
        sample(&metrics(&lab, "n1"), "selvedge_hbone_handshakes_total", &[("kind", "full")])
    });
    assert_eq!(handshakes, 1.0, "one handshake for three tunnels");
    assert!(sample(&n1, "selvedge_kernel_events_total", &[("counter", "captured")]).is_some_and(|v| v >= 3.0));
    assert!(sample(&n1, "selvedge_certificate_expiry_seconds", &[("identity", a)]).is_some_and(|v| v > 0.0));

    let destination = [("reporter", "destination"), ("source_principal", a), ("destination_workload", "d")];
    let n2 = metrics(&lab, "n2");
    assert_eq!(sample(&n2, "istio_tcp_connections_closed_total", &destination), Some(3.0), "{n2}");
    assert_eq!(sample(&n2, "istio_tcp_sent_bytes_total", &destination), Some(3.0 * bytes as f64));
    let (status, body) = lab.http_on_node("n2", local(15020), "GET", "/stats/prometheus").unwrap();
    assert!(status == 200 && body.contains("istio_tcp_connections_opened_total"));
}

/// A connection is counted and listed on both sides while it is open, its bytes show in
/// the metrics before it ends, and one that ends in a reset keeps its bytes and duration
/// in the access log.
#[test]
fn open_connections_are_visible_on_both_sides_and_a_reset_keeps_their_bytes() {
    let mut lab = Lab::two_nodes("live");
    lab.serve("d", "echo", PORT);
    let d = lab.get("d").addr(PORT);
    let bytes = 50_000;
    let mut app = std::process::Command::new(&lab.env.app);
    app.args(["reset-after", &d.to_string(), &bytes.to_string(), "3000"]);
    let pid = lab.spawn_in_pod("a", app);
    let line = lab.child_first_line(pid, std::time::Duration::from_secs(5));
    assert!(line.contains("\"exact\":true"), "echoed: {line} {}", lab.child_stderr(pid));

    // Open (the app holds it for 3 s): listed by the destination's agent too, and counted.
    let (ok, out) = lab.selvedge_on("n2", &["connections", "-o", "json"]);
    assert!(ok, "{out}");
    let a = "spiffe://cluster.local/ns/lab/sa/a";
    let conns: serde_json::Value = serde_json::from_str(&out).expect("json");
    let inbound = |x: &serde_json::Value| x["direction"] == "inbound" && x["pod"] == "d" && x["src_identity"] == a;
    assert!(conns.as_array().is_some_and(|c| c.iter().any(inbound)), "{out}");
    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let m = metrics(&lab, node);
        let l = [("reporter", reporter), ("source_principal", a), ("destination_workload", "d")];
        assert_eq!(sample(&m, "istio_tcp_connections_opened_total", &l), Some(1.0), "{node} while open: {m}");
        assert_eq!(sample(&m, "istio_tcp_connections_closed_total", &l), Some(0.0), "{node} while open");
        assert_eq!(sample(&m, "istio_tcp_sent_bytes_total", &l), Some(bytes as f64), "{node} while open");
        assert_eq!(sample(&m, "istio_tcp_received_bytes_total", &l), Some(bytes as f64), "{node} while open");
    }

    // The app resets it: both records end in an error and keep the bytes and the time.
    for (node, direction) in [("n1", "outbound"), ("n2", "inbound")] {
        let e = lab
            .agent(node)
            .wait_access(direction, |e| e["direction"] == direction && e["message"] == "connection closed");
        assert_eq!(e["result"], "error", "{node}: {e}");
        assert_eq!((e["bytes_sent"].as_u64(), e["bytes_received"].as_u64()), (Some(bytes), Some(bytes)), "{node}: {e}");
        assert!(e["duration_ms"].as_u64().is_some_and(|ms| ms >= 3000), "{node}: open for the app's 3 s: {e}");
    }
}

#[test]
fn refusals_are_logged_and_counted_with_their_reason() {
    let mut lab = Lab::two_nodes("refusals");
    lab.serve("d", "whoami", 8080);
    let d = lab.get("d").clone();
    // Plaintext to the agent's own inbound port: refused, not looped.
    let _ = lab.ask("c", d.addr(15006));
    let event = lab.agent("n2").wait_access("the refusal", |e| e["result"] == "refused");
    assert_eq!(event["reason_code"], "reserved_port");
    assert_eq!(event["security"], "none");
    let n2 = metrics(&lab, "n2");
    assert_eq!(sample(&n2, "selvedge_denials_total", &[("reason", "reserved_port")]), Some(1.0), "{n2}");
    assert_eq!(
        sample(&n2, "istio_tcp_connections_opened_total", &[("reporter", "destination"), ("response_flags", "DENY")]),
        Some(1.0)
    );
    // And an allowed one, for contrast.
    lab.ask("c", d.addr(8080)).expect("allowed");
    let ok = lab
        .agent("n2")
        .wait_access("the allowed connection", |e| e["result"] == "ok" && e["dst"] == d.addr(8080).to_string());
    assert_eq!(ok["direction"], "inbound");
}

#[test]
fn readiness_follows_enrollment() {
    let mut lab = Lab::new("ready");
    lab.node("n1");
    lab.pod("n1", "a", true).pod("n1", "b", true);
    lab.start_agent("n1", AgentOptions { max_pods: Some(1), ..AgentOptions::default() });
    let (status, body) = lab.http_on_node("n1", local(15021), "GET", "/healthz/ready").unwrap();
    assert_eq!(status, 503, "b could not be enrolled: not ready ({body})");
    assert!(body.contains("uid-b"), "{body}");
    lab.set_pod("a", false, false);
    lab.write_configs();
    let (status, _) = lab.http_on_node("n1", local(15021), "GET", "/healthz/ready").unwrap();
    assert_eq!(status, 200, "every configured workload enrolled with its certificate");
}

#[test]
fn the_admin_api_is_only_on_the_nodes_loopback() {
    let lab = Lab::two_nodes("admin-reach");
    let (status, _) = lab.http_on_node("n1", local(15000), "GET", "/config_dump").unwrap();
    assert_eq!(status, 200);
    for addr in ["198.18.1.1:15000", "198.19.0.1:15000"] {
        let a: SocketAddr = addr.parse().unwrap();
        assert!(lab.http_from_pod("c", a, "GET", "/config_dump").is_err(), "a pod cannot reach {addr}");
        assert!(lab.http_on_node("n1", a, "GET", "/config_dump").is_err(), "nor a non-loopback address: {addr}");
    }
}

#[test]
fn every_inspection_command_works_against_a_running_agent() {
    let mut lab = Lab::two_nodes("cli");
    lab.serve("d", "echo", PORT);
    let d = lab.get("d").addr(PORT);
    // Keep a connection open while `connections` looks.
    let listed = std::thread::scope(|s| {
        let lab = &lab;
        let slow = s.spawn(move || lab.transfer_with(Client::EventLoopSplit(3000), "a", d, 64 * 1024));
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let (ok, table) = lab.selvedge_on("n1", &["connections"]);
        assert!(ok && table.contains("AGE") && table.contains("lab/a"), "{table}");
        let (ok, out) = lab.selvedge_on("n1", &["connections", "-o", "json"]);
        assert!(ok, "{out}");
        let conns: serde_json::Value = serde_json::from_str(&out).expect("json");
        let transfer = slow.join().unwrap().expect("slow transfer");
        assert!(transfer.is_exact());
        (conns, transfer.local.expect("the app's own address"))
    });
    // The outbound connection's source is what the app's socket says it is (its pod's
    // address and port), not the loopback address capture gave it.
    let (conns, app_local) = listed;
    let ours = conns.as_array().and_then(|c| c.iter().find(|x| x["direction"] == "outbound")).cloned();
    let ours = ours.unwrap_or_else(|| panic!("no outbound connection listed: {conns}"));
    assert_eq!((ours["namespace"].as_str(), ours["pod"].as_str()), (Some("lab"), Some("a")), "{ours}");
    assert_eq!(ours["security"], "mutual_tls", "{ours}");
    assert_eq!(ours["src"], app_local.to_string(), "{ours}");
    assert_eq!(ours["dst"], d.to_string(), "{ours}");
    assert!(ours["age"].as_str().is_some_and(|a| a.ends_with('s')), "{ours}");
    for (cmd, needle) in [
        ("status", "enrolled_workloads"),
        ("workloads", "spiffe://cluster.local/ns/lab/sa/a"),
        ("services", "VIP"),
        ("policies", "KIND"),
        ("certs", "spiffe://cluster.local/ns/lab/sa/a"),
        ("connections", "DIRECTION"),
        ("bpf", "capture_connect4"),
        ("log", "log level: "),
        ("version", "agent"),
    ] {
        let (ok, table) = lab.selvedge_on("n1", &[cmd]);
        assert!(ok && table.contains(needle), "selvedge {cmd}:\n{table}");
        for format in ["json", "yaml"] {
            let (ok, out) = lab.selvedge_on("n1", &[cmd, "-o", format]);
            assert!(ok, "selvedge {cmd} -o {format}: {out}");
            let parsed: Result<serde_json::Value, String> = match format {
                "json" => serde_json::from_str(&out).map_err(|e| e.to_string()),
                _ => serde_yaml_ng::from_str(&out).map_err(|e| e.to_string()),
            };
            assert!(parsed.is_ok(), "selvedge {cmd} -o {format} is not {format}: {out}");
        }
    }
    let json = |node: &str, args: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        let (ok, out) = lab.selvedge_on(node, &args);
        assert!(ok, "selvedge {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("selvedge {args:?}: {e}: {out}"))
    };

    // Workloads: the whole directory, this node's marked; --node narrows it.
    let all = json("n1", &["workloads"]);
    let row = |name: &str| all.as_array().and_then(|w| w.iter().find(|x| x["name"] == name)).cloned();
    let (a, d_row) = (row("a").expect("a listed"), row("d").expect("d (on n2) listed on n1"));
    assert_eq!(
        (a["node"].as_str(), a["here"].as_str(), a["protocol"].as_str()),
        (Some("n1"), Some("enrolled"), Some("HBONE"))
    );
    assert_eq!((d_row["node"].as_str(), d_row["here"].is_null()), (Some("n2"), true), "{d_row}");
    assert_eq!(d_row["ips"], serde_json::json!([lab.get("d").ip.to_string()]), "{d_row}");
    assert_eq!(
        (a["workload"].as_str(), a["identity"].as_str()),
        (Some("a"), Some("spiffe://cluster.local/ns/lab/sa/a"))
    );
    let n2 = json("n1", &["workloads", "--node", "n2"]);
    assert!(n2.as_array().is_some_and(|w| !w.is_empty() && w.iter().all(|x| x["node"] == "n2")), "{n2}");

    // Certificates: serial, RFC 3339 dates, state; the root of the trust bundle.
    let certs = json("n1", &["certs"]);
    let cert = &certs["certificates"][0];
    assert_eq!(
        (cert["identity"].as_str(), cert["state"].as_str()),
        (Some("spiffe://cluster.local/ns/lab/sa/a"), Some("valid"))
    );
    assert!(cert["serial"].as_str().is_some_and(|s| s.len() >= 2), "{cert}");
    for k in ["not_before_utc", "not_after_utc"] {
        assert!(
            cert[k].as_str().is_some_and(|t| t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T'),
            "{k}: {cert}"
        );
    }
    let root = &certs["trust_bundle"]["roots"][0];
    assert!(root["subject"].as_str().is_some_and(|s| !s.is_empty()) && root["serial"].is_string(), "{certs}");

    // bpf: the pod's sk_lookup link is named by its pod.
    let bpf = json("n1", &["bpf"]);
    assert!(bpf["maps"].as_array().is_some_and(|m| m.iter().any(|x| x["name"] == "SV_ENROLLED" && x["entries"] == 1)));
    let pod_link = bpf["links"].as_array().and_then(|l| l.iter().find(|x| x["pod"] == "lab/a")).cloned();
    assert!(pod_link.is_some_and(|l| l["link"].as_str().is_some_and(|n| n.starts_with("pod-"))), "{bpf}");
    let (_, table) = lab.selvedge_on("n1", &["bpf"]);
    assert!(table.lines().any(|l| l.starts_with("pod-") && l.contains("lab/a")), "{table}");

    // Runtime log level: set, read back, a bad one refused with the reason.
    let (ok, out) = lab.selvedge_on("n1", &["log", "warn,selvedge=debug"]);
    // The filter as the agent holds it (its directives, most specific first).
    let set = |l: &serde_json::Value| l.as_str().is_some_and(|l| l.contains("selvedge=debug") && l.contains("warn"));
    assert!(ok && out.starts_with("log level: ") && set(&out.trim().into()), "{out}");
    let now = json("n1", &["log"]);
    assert!(set(&now["level"]), "{now}");
    let (ok, out) = lab.selvedge_on("n1", &["log", "verbose"]);
    assert!(!ok && out.contains("refused") && out.contains("names no level"), "{out}");
    assert_eq!(json("n1", &["log"]), now, "a refused filter changes nothing");
    let (status, _) = lab.http_on_node("n1", local(15000), "POST", "/logging?level=%5Bbad").unwrap();
    assert_eq!(status, 400);
    let (ok, _) = lab.selvedge_on("n1", &["log", "info"]);
    assert!(ok);

    // Version: this binary's and the agent's, the same build here.
    let v = json("n1", &["version"]);
    assert_eq!(v["client"], v["agent"], "{v}");
    assert!(v["client"]["commit"].as_str().is_some_and(|c| !c.is_empty()), "{v}");

    // With no agent, the CLI says what is wrong.
    let (ok, out) = lab.selvedge_on("n1", &["status", "--admin", "127.0.0.1:15999"]);
    assert!(!ok && out.contains("cannot reach the admin API"), "{out}");
    let (ok, out) = lab.selvedge_on("n1", &["version", "--admin", "127.0.0.1:15999"]);
    assert!(!ok && out.contains("client ") && out.contains("no agent answers at 127.0.0.1:15999"), "{out}");
}

#[test]
fn quitquitquit_stops_the_agent_cleanly_and_leaves_pods_closed() {
    let mut lab = Lab::two_nodes("quit");
    lab.serve("d", "whoami", 8080);
    let d = lab.get("d").addr(8080);
    let (status, _) = lab.http_on_node("n1", local(15000), "POST", "/quitquitquit").unwrap();
    assert_eq!(status, 200);
    let exit = lab.agent("n1").wait_exit(std::time::Duration::from_secs(15));
    assert!(exit.success(), "drained and exited cleanly: {exit}");
    lab.ask("a", d).expect_err("pins stay: a's connects are refused while the agent is away");
}
