//! The cluster CA (`selvedge ca serve`) with its Kubernetes side real: TokenReview and the
//! pod list answered by the test API server, read through the agent's own kube client;
//! the agent's own Istio CA client asks for certificates. Needs no root: 127.0.0.1 only.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use selvedge::{
    ca_service::{Authority, CaService, CaSettings},
    identity::{BuiltinCa, CertSource, IstioCaConfig, IstioCaSource, SpiffeId},
    k8s::authority::KubeAuthority,
};
use selvedge_tests::apiserver::ApiServer;
use serde_json::json;

const AUDIENCE: &str = "istio-ca";
const AGENTS: (&str, &str) = ("selvedge-system", "selvedge");

fn pod(namespace: &str, name: &str, account: &str, node: &str, phase: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "app", "image": "example/app"}]},
        "status": {"phase": phase},
    })
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("a valid identity")
}

#[test]
fn the_cluster_ca_gives_a_node_agent_only_its_own_nodes_pods_identities() {
    let server = ApiServer::start(SocketAddr::from(([127, 0, 0, 1], 0)));
    server.add_token("agent-n1", AGENTS.0, AGENTS.1, Some("n1"), AUDIENCE);
    server.add_token("agent-n2", AGENTS.0, AGENTS.1, Some("n2"), AUDIENCE);
    server.add_token("agent-other-audience", AGENTS.0, AGENTS.1, Some("n1"), "kubernetes");
    server.add_token("agent-not-bound", AGENTS.0, AGENTS.1, None, AUDIENCE);
    server.apply(pod("shop", "web-1", "web", "n1", "Running"));
    server.apply(pod("shop", "db-1", "db", "n2", "Running"));
    server.apply(pod("shop", "batch-1", "batch", "n1", "Succeeded"));
    server.apply(pod("shop", "new-1", "new", "n1", "Pending"));
    let dir = std::env::temp_dir().join(format!("selvedge-ca-service-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig);
        let client = selvedge::k8s::client(Some(&kubeconfig)).await.unwrap();
        let authority = KubeAuthority::new(client, vec![AUDIENCE.into()]);

        // The Kubernetes side, as the CA sees it.
        let agent = authority.authenticate("agent-n1").await.unwrap();
        assert_eq!((agent.namespace.as_str(), agent.service_account.as_str()), AGENTS);
        assert_eq!(agent.node.as_deref(), Some("n1"), "the node of the pod the token is bound to");
        let e = authority.authenticate("agent-other-audience").await.unwrap_err();
        assert!(e.contains("audiences"), "a token for another audience is not accepted: {e}");
        assert!(authority.authenticate("made-up").await.is_err());
        let on_n1 = authority.accounts_on("n1").await.unwrap();
        let want = BTreeSet::from([("shop".into(), "new".into()), ("shop".into(), "web".into())]);
        assert_eq!(on_n1, want, "running and starting pods, not finished ones");

        // The service, asked by the agent's own client.
        BuiltinCa::init(&dir.join("ca"), "cluster.local").unwrap();
        let settings = CaSettings {
            trust_domain: "cluster.local".into(),
            node_agents: BTreeSet::from([(AGENTS.0.into(), AGENTS.1.into())]),
            max_lifetime: Duration::from_secs(3600),
        };
        let service = CaService::new(BuiltinCa::load(&dir.join("ca")).unwrap(), authority, settings);
        let tls = service.tls("selvedge-ca.test").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(service.clone().serve(listener, tls));
        let provider = Arc::new(selvedge::tls::crypto_provider());
        let ask = |token: &str| {
            let token_file = dir.join(format!("token-{token}"));
            std::fs::write(&token_file, token).unwrap();
            let cfg = IstioCaConfig {
                addr,
                server_name: "selvedge-ca.test".into(),
                root_file: dir.join("ca").join("root-cert.pem"),
                token_file,
                lifetime: Duration::from_secs(3600),
            };
            IstioCaSource::new(cfg, provider.clone()).unwrap()
        };
        let (n1, n2) = (ask("agent-n1"), ask("agent-n2"));
        n1.issue(&id("shop", "web")).await.expect("web runs on n1");
        n1.issue(&id("shop", "new")).await.expect("a pod still starting on n1 (its CNI ADD waits for it)");
        n2.issue(&id("shop", "db")).await.expect("db runs on n2");
        let e = n1.issue(&id("shop", "db")).await.expect_err("a stolen n1 token cannot get n2's pods");
        assert!(e.contains("no pod of"), "{e}");
        assert!(n1.issue(&id("shop", "batch")).await.is_err(), "a finished pod's identity is not given");
        assert!(n1.issue(&id("shop", "nobody")).await.is_err(), "nor one with no pod");
        let e = ask("agent-not-bound").issue(&id("shop", "web")).await.expect_err("a token bound to no pod");
        assert!(e.contains("not bound to a pod"), "{e}");
        assert_eq!(service.counts(), (3, 4), "every answer counted");
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
