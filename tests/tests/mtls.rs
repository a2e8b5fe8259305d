//! Mutual TLS between meshed pods, observed from outside: what crosses the link between
//! nodes, who the destination agent says connected, and what survives certificate rotation.

use selvedge_tests::{app::payload, AgentOptions, Client, Lab, LabService};

const PORT: u16 = 7000;
/// TLS 1.3 application data travels in records whose header starts 0x17 0x03 0x03.
const TLS_APP_DATA: [u8; 3] = [0x17, 0x03, 0x03];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_link_between_nodes_carries_tls_and_no_plaintext() {
    let mut lab = Lab::new("wire");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "c", false);
    lab.pod("n2", "d", true).pod("n2", "e", false);
    lab.start_agent("n1", AgentOptions::default());
    lab.start_agent("n2", AgentOptions::default());
    lab.serve("d", "echo", PORT);
    lab.serve("e", "echo", PORT);
    let size = 256 * 1024;
    // A slice from the middle of the payload: if any of it crossed in the clear, this does.
    let marker = payload(size)[100_000..100_048].to_vec();

    // Control: unmeshed pods across the same link; the capture must see their bytes.
    let e = lab.get("e").addr(PORT);
    let (t, pcap) = lab.capture_fabric(|lab| lab.transfer("c", e, size));
    assert!(t.expect("c -> e").is_exact());
    assert!(contains(&pcap, &marker), "the capture sees plaintext when there is plaintext");

    // Meshed: the same bytes, a -> d through the agents.
    let d = lab.get("d").addr(PORT);
    let (t, pcap) = lab.capture_fabric(|lab| lab.transfer("a", d, size));
    assert!(t.expect("a -> d").is_exact());
    assert!(!contains(&pcap, &marker), "no byte of the payload crossed the link in the clear");
    assert!(contains(&pcap, &TLS_APP_DATA), "the link carried TLS records");
}

#[test]
fn rotating_certificates_does_not_break_a_long_transfer() {
    let mut lab = Lab::new("rotate");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true);
    lab.pod("n2", "d", true);
    // 10 s certificates, renewed every 5 s.
    let opts = AgentOptions { cert_lifetime_secs: Some(10), ..AgentOptions::default() };
    lab.start_agent("n1", opts.clone());
    lab.start_agent("n2", opts);
    lab.serve("d", "echo", PORT);
    let d = lab.get("d").addr(PORT);
    // Half the bytes, a pause longer than a certificate's whole life, the other half.
    let t = lab.transfer_with(Client::EventLoopSplit(12_000), "a", d, 1 << 20).expect("long transfer");
    assert!(t.is_exact(), "bytes survived the rotation: {t:?}");
    let issued = lab
        .agent("n1")
        .events()
        .iter()
        .filter(|e| e["message"] == "certificate issued" && e["identity"] == "spiffe://cluster.local/ns/lab/sa/a")
        .count();
    assert!(issued >= 3, "a's certificate was renewed during the transfer ({issued} issued)");
    // New connections after the rotations use the new certificates.
    let t = lab.transfer("a", d, 4096).expect("a fresh connection after rotation");
    assert!(t.is_exact());
}

#[test]
fn a_service_vip_is_resolved_by_the_agent_to_meshed_endpoints() {
    let mut lab = Lab::new("service");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n1", "c", false);
    lab.pod("n2", "d1", true).pod("n2", "d2", true);
    lab.set_role("d1", "db");
    lab.set_role("d2", "db");
    // The VIP is on no interface and no route: only a captured connection can reach it.
    let vip: std::net::Ipv4Addr = "198.19.100.10".parse().unwrap();
    lab.services.push(LabService { name: "db".into(), vip, port: 80, target_port: 8080, role: "db".into() });
    lab.start_agent("n1", AgentOptions::default());
    lab.start_agent("n2", AgentOptions::default());
    lab.serve("d1", "whoami", 8080);
    lab.serve("d2", "whoami", 8080);
    let service = std::net::SocketAddr::from((vip, 80));

    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let r = lab.ask("a", service).expect("a reaches the service");
        assert_eq!(r.peer, Some(service), "the app still sees the VIP it dialled");
        assert!(r.server().peer_in_pod, "delivered by the endpoint's agent");
        reached.insert(r.server().local);
    }
    let expected = [lab.get("d1").addr(8080), lab.get("d2").addr(8080)].into_iter().collect();
    assert_eq!(reached, expected, "round robin over both endpoints, on the target port");
    lab.agent("n2").wait_access("an inbound leg over mTLS from a", |e| {
        e["security"] == "mutual_tls" && e["src_identity"] == "spiffe://cluster.local/ns/lab/sa/a"
    });

    lab.ask("c", service).expect_err("an unmeshed pod cannot reach a VIP that exists only in the mesh");
}

#[test]
fn an_agent_fed_from_certificate_files_meshes_with_a_ca_fed_one() {
    let mut lab = Lab::new("files");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true);
    lab.pod("n2", "d", true);
    let certs = lab.write_cert_files(&["a"], std::time::Duration::from_secs(3600));
    lab.start_agent("n1", AgentOptions { cert_dir: Some(certs), ..AgentOptions::default() });
    lab.start_agent("n2", AgentOptions::default());
    lab.serve("d", "echo", PORT);
    let d = lab.get("d").addr(PORT);
    let t = lab.transfer("a", d, 100_000).expect("a -> d");
    assert!(t.is_exact());
    lab.agent("n2").wait_access("a's identity from its file certificate", |e| {
        e["security"] == "mutual_tls" && e["src_identity"] == "spiffe://cluster.local/ns/lab/sa/a"
    });
}

#[test]
fn a_real_agent_refuses_bad_certificates_spoofed_targets_and_other_methods() {
    let mut lab = Lab::new("hostile");
    lab.node("n1").node("n2");
    lab.pod("n1", "c", false);
    lab.pod("n2", "d", true).pod("n2", "e", true);
    lab.start_agent("n2", AgentOptions::default());
    lab.serve("d", "whoami", 8080);
    let hbone = lab.get("d").addr(15008);
    let app = lab.get("d").addr(8080);
    let as_c = "spiffe://cluster.local/ns/lab/sa/c";
    let probe = |cert: &str, method: &str, target| lab.hbone_probe("c", hbone, as_c, cert, method, target);

    assert_eq!(probe("good", "CONNECT", app), Ok(200), "a good certificate for d's own address is served");
    for bad in ["expired", "unknown-root", "two-sans", "no-san", "other-td"] {
        let r = probe(bad, "CONNECT", app);
        assert!(r.is_err(), "{bad}: the connection must not be served: {r:?}");
    }
    // A valid certificate cannot turn d's listener into a tunnel to e (or anywhere else).
    assert_eq!(probe("good", "CONNECT", lab.get("e").addr(8080)), Ok(400), "tunnel-target spoofing");
    assert_eq!(probe("good", "GET", app), Ok(405), "only CONNECT");

    let refusals = lab.agent("n2").access_log().into_iter().filter(|e| e["result"] == "refused").count();
    assert!(refusals >= 7, "each refusal is logged with its reason ({refusals})");
    lab.agent("n2").wait_access("the spoofed target, named", |e| {
        e["result"] == "refused" && e["reason"].as_str().is_some_and(|r| r.contains("not the workload behind"))
    });
}

#[test]
fn a_root_rotation_with_traffic_running_keeps_old_and_new_connections_working() {
    use std::time::Duration;
    let mut lab = Lab::new("rotation");
    lab.node("n1").node("n2");
    lab.pod("n1", "a", true).pod("n2", "d", true);
    let day = Duration::from_secs(24 * 3600);
    let certs = lab.write_cert_files(&["a", "d"], day);
    let (old_root, new_ca) = (lab.dir.join("ca").join("root-cert.pem"), lab.dir.join("ca-new"));
    let made = std::process::Command::new(&lab.env.selvedge).args(["ca", "init", "--dir"]).arg(&new_ca).output();
    assert!(made.is_ok_and(|o| o.status.success()), "a second root");
    let new_root = new_ca.join("root-cert.pem");
    for node in ["n1", "n2"] {
        lab.start_agent(node, AgentOptions { cert_dir: Some(certs.clone()), ..AgentOptions::default() });
    }
    lab.serve("d", "echo", 7000);
    let d = lab.get("d").addr(7000);
    // A connection writes for 40 s, through the whole rotation (each step below waits at
    // most 10 s), into a sink that reports how it ended.
    let reports = lab.dir.join("sink.jsonl");
    lab.serve_args("d", &["sink", "7001", reports.to_str().expect("utf-8")]);
    let long = lab.spawn_app("a", &["stream", &lab.get("d").addr(7001).to_string(), "40"]);
    let bundle = |roots: &[&std::path::Path]| {
        let pem: String = roots.iter().map(|r| std::fs::read_to_string(r).expect("root")).collect();
        std::fs::write(certs.join("root-cert.pem"), pem).expect("bundle");
    };
    let works = |lab: &Lab, step: &str| {
        // Files are re-read every second: allow a couple.
        selvedge_tests::sys::wait_for(10, step, || {
            let t = lab.transfer("a", d, 65_536).ok()?;
            t.is_exact().then_some(())
        })
    };
    bundle(&[&old_root, &new_root]);
    works(&lab, "new connections with both roots trusted");
    lab.issue_cert_files(&new_ca, &["a", "d"], day);
    works(&lab, "new connections with the leaves from the new root");
    bundle(&[&new_root]);
    works(&lab, "new connections with the old root removed");
    let line = lab.child_first_line(long, Duration::from_secs(90));
    let client: serde_json::Value = serde_json::from_str(&line).expect("the long connection's report");
    assert!(client["write_error"].is_null() && client["end"] == "eof", "it ended cleanly: {client}");
    let sink = selvedge_tests::sys::wait_for(10, "the sink's report", || {
        std::fs::read_to_string(&reports).ok().and_then(|t| t.lines().next().map(str::to_owned))
    });
    let sink: serde_json::Value = serde_json::from_str(&sink).expect("the sink's report");
    assert_eq!(sink["end"], "eof", "{sink}");
    assert_eq!(sink["received"], client["sent"], "every byte written during the rotation arrived: {sink} {client}");
}
