//! The cluster CA in the simulated cluster: `selvedge ca serve` beside the test API server
//! (which answers its TokenReviews and pod lists), and `--kube` agents that hold only the
//! root certificate and a token bound to their node — as the default install runs them.

use std::process::{Child, Command};

use selvedge_tests::{
    cluster::{Cluster, PodRequest},
    proc::{self, Place},
    sys::wait_for,
};

const PORT: u16 = 8080;
const CA_ADDR: &str = "198.19.0.254:15012";
const METRICS_ADDR: &str = "198.19.0.254:15014";

/// The CA process, stopped when the test ends (passing or not).
struct CaProcess(Child);

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agents_holding_only_the_root_certificate_mesh_through_the_cluster_ca() {
    let mut c = Cluster::new("cluster-ca", &["n1", "n2"]);
    c.namespace("shop", true);
    let ca_dir = c.lab.dir.join("ca");
    // The service signs with an intermediate made from the lab's root: the root key is not
    // where the service runs, and the agents still hold only the root certificate.
    let intermediate = c.lab.dir.join("ca-intermediate");
    let made = Command::new(&c.lab.env.selvedge)
        .args(["ca", "intermediate", "--days", "2", "--root-dir"])
        .arg(&ca_dir)
        .arg("--dir")
        .arg(&intermediate)
        .output()
        .expect("run selvedge ca intermediate");
    assert!(made.status.success(), "ca intermediate: {}", String::from_utf8_lossy(&made.stderr));
    assert!(!intermediate.join("root-key.pem").exists());
    let log = c.lab.dir.join("ca-service.log");
    let mut cmd = Command::new(&c.lab.env.selvedge);
    cmd.args(["ca", "serve", "--listen", CA_ADDR, "--server-name", "198.19.0.254", "--dir"])
        .arg(&intermediate)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig);
    let fabric = c.lab.fabric_netns();
    let _ca = CaProcess(proc::spawn(cmd, Place { netns: Some(&fabric), cgroup: None }, Some(&log)));
    wait_for(20, "the CA service to listen", || {
        std::fs::read_to_string(&log).ok().filter(|l| l.contains("CA service ready")).map(|_| ())
    });

    // Each agent: the root certificate, and a token bound to a pod on its own node.
    for node in ["n1", "n2"] {
        let token = format!("agent-token-{node}");
        c.api.add_token(&token, "selvedge-system", "selvedge", Some(node), "istio-ca");
        let token_file = c.lab.dir.join(format!("token-{node}"));
        std::fs::write(&token_file, &token).expect("token file");
        let root = ca_dir.join("root-cert.pem");
        let args = vec![
            "--cert-source".to_owned(),
            "istio".to_owned(),
            "--istio-ca-addr".to_owned(),
            CA_ADDR.to_owned(),
            "--istio-ca-root".to_owned(),
            root.display().to_string(),
            "--istio-ca-token".to_owned(),
            token_file.display().to_string(),
        ];
        c.start_agent_with(node, args);
    }

    let said = |log: &std::path::Path| std::fs::read_to_string(log).unwrap_or_default();
    for (pod, node) in [("db", "n2"), ("web", "n1")] {
        if let Err(e) = c.create_pod(PodRequest::new(pod, "shop", node)) {
            panic!("{pod} does not start (its agent needs its certificate): {e:?}\nthe CA said:\n{}", said(&log));
        }
    }
    c.lab.serve("db", "whoami", PORT);
    // Once n1's agent has db in its directory (the API's next snapshot), web's connections
    // to db go through HBONE with web's certificate from the CA.
    let db = c.addr("db", PORT);
    let from_web =
        |e: &serde_json::Value| e["pod"] == "db" && e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/web";
    wait_for(20, "a connection from web to db under mTLS", || {
        let r = c.lab.ask("web", db).ok()?;
        (r.server.as_ref()?.peer_in_pod && c.lab.agent_ref("n2").access_log().iter().any(from_web)).then_some(())
    });
    let said = said(&log);
    for (identity, node) in
        [("spiffe://cluster.local/ns/shop/sa/web", "n1"), ("spiffe://cluster.local/ns/shop/sa/db", "n2")]
    {
        assert!(
            said.lines().any(|l| l.contains("certificate issued") && l.contains(identity) && l.contains(node)),
            "the CA issued {identity} to {node}'s agent: {said}"
        );
    }
    // What an operator's Prometheus scrapes from the CA (from a node, as it would).
    let (status, metrics) =
        c.lab.http_on_node("n1", METRICS_ADDR.parse().expect("addr"), "GET", "/metrics").expect("CA metrics");
    assert_eq!(status, 200);
    let issued = metrics
        .lines()
        .find_map(|l| l.strip_prefix("selvedge_ca_certificates_issued_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(issued.is_some_and(|n| n >= 2), "web's and db's certificates counted: {metrics}");
}
