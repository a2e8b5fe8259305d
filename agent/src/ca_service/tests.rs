//! The CA service against the agent's own Istio CA client, over real TLS and HTTP/2 on
//! loopback, with tokens and pods from a table (the Kubernetes side: `k8s::authority`).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use super::*;
use crate::identity::{CertSource, IstioCaConfig, IstioCaSource};

/// Tokens → callers, and nodes → the service accounts running there.
struct Table {
    tokens: BTreeMap<&'static str, Caller>,
    nodes: BTreeMap<&'static str, BTreeSet<Account>>,
}

impl Authority for Table {
    async fn authenticate(&self, token: &str) -> Result<Caller, String> {
        self.tokens.get(token).cloned().ok_or_else(|| "token not valid".to_string())
    }

    async fn accounts_on(&self, node: &str) -> Result<BTreeSet<Account>, String> {
        Ok(self.nodes.get(node).cloned().unwrap_or_default())
    }
}

fn caller(ns: &str, sa: &str, node: &str) -> Caller {
    Caller { namespace: ns.into(), service_account: sa.into(), node: Some(node.into()) }
}

fn account(ns: &str, sa: &str) -> Account {
    (ns.into(), sa.into())
}

struct Fixture {
    dir: std::path::PathBuf,
    addr: SocketAddr,
    service: Arc<CaService<Table>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start() -> Fixture {
    start_with(false).await
}

/// The service signing with the root, or with an intermediate made from it (the root key
/// then is not in the service's directory at all).
async fn start_with(intermediate: bool) -> Fixture {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "selvedge-ca-service-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if intermediate {
        BuiltinCa::init(&dir.join("root"), "cluster.local").unwrap();
        let root = BuiltinCa::load(&dir.join("root")).unwrap();
        root.init_intermediate(&dir.join("ca"), "cluster.local", Duration::from_secs(3600)).unwrap();
    } else {
        BuiltinCa::init(&dir.join("ca"), "cluster.local").unwrap();
    }
    let table = Table {
        tokens: BTreeMap::from([
            ("agent-n1", caller("selvedge", "selvedge", "n1")),
            ("agent-n2", caller("selvedge", "selvedge", "n2")),
            ("web-pod", caller("shop", "web", "n1")),
        ]),
        nodes: BTreeMap::from([
            ("n1", BTreeSet::from([account("shop", "web")])),
            ("n2", BTreeSet::from([account("shop", "db")])),
        ]),
    };
    let settings = CaSettings {
        trust_domain: "cluster.local".into(),
        node_agents: BTreeSet::from([account("selvedge", "selvedge")]),
        max_lifetime: Duration::from_secs(24 * 3600),
    };
    let service = CaService::new(BuiltinCa::load(&dir.join("ca")).unwrap(), table, settings);
    let tls = service.tls("selvedge-ca.test").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(service.clone().serve(listener, tls));
    Fixture { dir, addr, service }
}

/// The agent's own client, presenting `token`.
fn client(f: &Fixture, token: &str) -> IstioCaSource {
    let token_file = f.dir.join(format!("token-{token}"));
    std::fs::write(&token_file, token).unwrap();
    let cfg = IstioCaConfig {
        addr: f.addr,
        server_name: "selvedge-ca.test".into(),
        root_file: f.dir.join("ca").join("root-cert.pem"),
        token_file,
        lifetime: Duration::from_secs(7 * 24 * 3600),
    };
    IstioCaSource::new(cfg, Arc::new(crate::tls::crypto_provider())).unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

#[tokio::test]
async fn a_node_agent_gets_certificates_only_for_pods_on_its_node() {
    let f = start().await;
    let n1 = client(&f, "agent-n1");
    let issued = n1.issue(&id("shop", "web")).await.expect("web runs on n1");
    let leaf = crate::identity::identity_of(&issued.chain[0]).unwrap();
    assert_eq!(leaf, id("shop", "web"), "the certificate names exactly the identity asked for");
    let cert = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap().1;
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(lifetime <= 24 * 3600 + 600, "a week was asked for, the CA's maximum is a day: {lifetime} s");

    let e = n1.issue(&id("shop", "db")).await.expect_err("db runs on n2 only");
    assert!(e.contains("grpc-status 7") && e.contains("no pod of"), "{e}");
    let e = n1.issue(&id("shop", "ghost")).await.expect_err("no pod has that identity");
    assert!(e.contains("grpc-status 7"), "{e}");
    // The other node's agent gets db, and not web.
    let n2 = client(&f, "agent-n2");
    n2.issue(&id("shop", "db")).await.expect("db runs on n2");
    assert!(n2.issue(&id("shop", "web")).await.is_err());
    let (issued, refused) = f.service.counts();
    assert_eq!((issued, refused), (2, 3), "every answer counted");
    let text = f.service.metrics().encode();
    assert!(text.contains("selvedge_ca_certificates_issued_total 2"), "{text}");
    assert!(text.contains(r#"selvedge_ca_requests_refused_total{reason="permission_denied"} 3"#), "{text}");
}

#[tokio::test]
async fn a_stolen_workload_token_or_a_bad_one_gets_nothing_but_its_own_identity() {
    let f = start().await;
    let web = client(&f, "web-pod");
    web.issue(&id("shop", "web")).await.expect("a workload may ask for itself");
    let e = web.issue(&id("shop", "db")).await.expect_err("but for nobody else, even on its node");
    assert!(e.contains("only its own identity"), "{e}");
    let e = client(&f, "forged").issue(&id("shop", "web")).await.expect_err("an unknown token");
    assert!(e.contains("grpc-status 16"), "{e}");
}

#[tokio::test]
async fn with_an_intermediate_every_answer_chains_to_the_root_alone() {
    let f = start_with(true).await;
    assert!(!f.dir.join("ca").join("root-key.pem").exists(), "the service never saw the root key");
    // The client verifies the service's own TLS with the root only: the serving chain
    // carries the intermediate.
    let issued = client(&f, "agent-n1").issue(&id("shop", "web")).await.expect("web runs on n1");
    assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
    let root = BuiltinCa::load(&f.dir.join("root")).unwrap().root();
    assert_eq!(issued.chain[2], root);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(crate::tls::crypto_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&issued.chain[0], &issued.chain[1..2], rustls_pki_types::UnixTime::now())
        .expect("leaf + intermediate verify against the root");
    assert!(
        verifier.verify_client_cert(&issued.chain[0], &[], rustls_pki_types::UnixTime::now()).is_err(),
        "and the leaf alone does not: the intermediate is what links them"
    );
}
