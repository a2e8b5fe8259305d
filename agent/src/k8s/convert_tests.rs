use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::ApiResource;

use super::*;

const KEY: &str = "selvedge.dev/mesh";

fn labels(kv: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn ns(name: &str, enrolled: bool) -> Arc<Namespace> {
    Arc::new(Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: if enrolled { labels(&[(KEY, ENABLED)]) } else { None },
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    })
}

fn pod(uid: &str, namespace: &str, node: &str, ip: &str, created: i64) -> Pod {
    Pod {
        metadata: ObjectMeta {
            uid: Some(uid.into()),
            name: Some(format!("pod-{uid}")),
            namespace: Some(namespace.into()),
            labels: labels(&[("app", uid)]),
            creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap())),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(format!("sa-{uid}")),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            phase: Some("Running".into()),
            ..PodStatus::default()
        }),
    }
}

fn snap(pods: Vec<Pod>, namespaces: Vec<Arc<Namespace>>) -> Snapshot {
    Snapshot { pods: pods.into_iter().map(Arc::new).collect(), namespaces, ..Snapshot::default() }
}

fn net(path: &str) -> PodNetwork {
    PodNetwork { netns: path.into(), ips: vec![] }
}

#[test]
fn enrollment_follows_labels_and_never_host_network() {
    let on = labels(&[(KEY, ENABLED)]);
    let off = labels(&[(KEY, DISABLED)]);
    assert!(meshed(None, on.as_ref(), false, KEY), "namespace label enrolls");
    assert!(!meshed(off.as_ref(), on.as_ref(), false, KEY), "pod label opts out");
    assert!(meshed(on.as_ref(), None, false, KEY), "pod label enrolls on its own");
    assert!(!meshed(on.as_ref(), on.as_ref(), true, KEY), "hostNetwork never");
    assert!(!meshed(None, labels(&[(KEY, "yes")]).as_ref(), false, KEY), "only `enabled` enrolls");
    assert!(!meshed(None, on.as_ref(), false, "other.key"), "the key is configurable");
}

#[test]
fn meshed_pods_become_workloads_local_ones_with_their_netns() {
    let mut host = pod("h", "shop", "n1", "198.18.1.3", 1);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let s = snap(
        vec![
            pod("a", "shop", "n1", "198.18.1.10", 1),
            pod("b", "shop", "n2", "198.18.2.10", 1),
            pod("c", "other", "n1", "198.18.1.11", 1),
            host,
        ],
        vec![ns("shop", true), ns("other", false)],
    );
    let networks = BTreeMap::from([("a".to_owned(), net("/run/netns/a")), ("c".to_owned(), net("/run/netns/c"))]);
    let out = to_config(&s, "n1", KEY, &networks);
    let uids: Vec<&str> = out.config.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(uids, ["a", "b"], "unlabelled namespace and hostNetwork are not meshed");
    let a = &out.config.workloads[0];
    assert_eq!(a.netns.as_deref(), Some(std::path::Path::new("/run/netns/a")));
    assert_eq!(a.service_account, "sa-a");
    assert_eq!(out.config.workloads[1].netns, None, "a peer on another node has no netns here");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

#[test]
fn probed_ports_are_read_from_every_containers_probes() {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, GRPCAction, HTTPGetAction, Probe, TCPSocketAction};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let http = |port: IntOrString| Probe {
        http_get: Some(HTTPGetAction { port, ..Default::default() }),
        ..Default::default()
    };
    let app = Container {
        name: "app".into(),
        ports: Some(vec![ContainerPort { name: Some("health".into()), container_port: 8081, ..Default::default() }]),
        liveness_probe: Some(http(IntOrString::String("health".into()))),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(8080), ..Default::default() }),
            ..Default::default()
        }),
        startup_probe: Some(http(IntOrString::String("nowhere".into()))),
        ..Default::default()
    };
    let sidecar = Container {
        name: "sidecar".into(),
        startup_probe: Some(Probe { grpc: Some(GRPCAction { port: 9090, service: None }), ..Default::default() }),
        ..Default::default()
    };
    let mut probed = pod("p", "shop", "n1", "198.18.1.12", 1);
    let spec = probed.spec.as_mut().unwrap();
    spec.containers = vec![app];
    spec.init_containers = Some(vec![sidecar]);
    let s = snap(vec![probed, pod("q", "shop", "n1", "198.18.1.13", 1)], vec![ns("shop", true)]);
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    let ports: Vec<&[u16]> = out.config.workloads.iter().map(|w| w.probe_ports.as_slice()).collect();
    // The named port resolves through the container's ports; one that names none is skipped.
    assert_eq!(ports, [&[8080, 8081, 9090][..], &[][..]]);
}

#[test]
fn a_reused_ip_belongs_to_the_newer_live_pod_only() {
    let mut old = pod("old", "shop", "n1", "198.18.1.10", 100);
    let new = pod("new", "shop", "n1", "198.18.1.10", 200);
    let s = snap(vec![old.clone(), new.clone()], vec![ns("shop", true)]);
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    let owner: Vec<&str> = out.config.workloads.iter().filter(|w| !w.ips.is_empty()).map(|w| w.uid.as_str()).collect();
    assert_eq!(owner, ["new"]);
    assert_eq!(out.problems.len(), 1);
    // A terminating pod loses even when it is newer.
    old.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(300).unwrap()));
    old.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(400).unwrap()));
    let s = snap(vec![old, new], vec![ns("shop", true)]);
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    let owner: Vec<&str> = out.config.workloads.iter().filter(|w| !w.ips.is_empty()).map(|w| w.uid.as_str()).collect();
    assert_eq!(owner, ["new"]);
    // And the result is a valid config: the directory has one owner per IP.
    crate::state::directory(&out.config, "cluster.local").unwrap();
}

#[test]
fn finished_pods_are_not_workloads_and_cni_ips_fill_in() {
    let mut done = pod("done", "shop", "n1", "198.18.1.10", 1);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let mut fresh = pod("fresh", "shop", "n1", "198.18.1.11", 1);
    fresh.status = None;
    let networks = BTreeMap::from([(
        "fresh".to_owned(),
        PodNetwork { netns: "/run/netns/f".into(), ips: vec!["198.18.1.11".parse().unwrap()] },
    )]);
    let out = to_config(&snap(vec![done, fresh], vec![ns("shop", true)]), "n1", KEY, &networks);
    assert_eq!(out.config.workloads.len(), 1);
    assert_eq!(out.config.workloads[0].ips, vec!["198.18.1.11".parse::<IpAddr>().unwrap()]);
}

fn dynamic(kind: &str, plural: &str, name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&kube::api::GroupVersionKind::gvk("security.istio.io", "v1", kind), plural);
    let mut o = DynamicObject::new(name, &ar).within("shop");
    o.data = json!({ "spec": spec });
    Arc::new(o)
}

#[test]
fn a_dry_run_policy_from_the_api_stays_dry_run_and_an_unreadable_one_is_enforced() {
    let annotated = |name: &str, spec: serde_json::Value| {
        let mut o = (*dynamic("AuthorizationPolicy", "authorizationpolicies", name, spec)).clone();
        o.metadata.annotations = Some(BTreeMap::from([("istio.io/dry-run".to_string(), "true".to_string())]));
        Arc::new(o)
    };
    let s = Snapshot {
        authorization_policies: vec![
            annotated("dry", json!({"action": "DENY", "rules": [{}]})),
            annotated("dry-bad", json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["99999"]}}]}]})),
            dynamic("AuthorizationPolicy", "authorizationpolicies", "odd-action", json!({"action": 7, "rules": [{}]})),
        ],
        ..snap(vec![], vec![ns("shop", true)])
    };
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    let compiled = out.config.compile_policies("istio-system").unwrap();
    let by_name = |n: &str| compiled.iter().find(|p| p.name == n).unwrap_or_else(|| panic!("{n}"));
    assert!(by_name("dry").dry_run, "the annotation survives the conversion");
    assert!(!by_name("dry-bad").dry_run, "an unreadable dry-run policy is enforced as its fail-closed form");
    assert_eq!(by_name("odd-action").action, crate::policy::Action::Deny, "a non-string action is a DENY");
}

#[test]
fn unreadable_policies_fail_closed() {
    let s = Snapshot {
        authorization_policies: vec![
            dynamic(
                "AuthorizationPolicy",
                "authorizationpolicies",
                "ok",
                json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
            ),
            dynamic(
                "AuthorizationPolicy",
                "authorizationpolicies",
                "bad-deny",
                json!({"action": "DENY", "selector": {"matchLabels": {"app": "db"}}, "rules": [{"from": [{"source": {"principals": ["a*b*c"]}}]}]}),
            ),
            dynamic(
                "AuthorizationPolicy",
                "authorizationpolicies",
                "bad-allow",
                json!({"rules": [{"to": [{"operation": {"ports": ["99999"]}}]}]}),
            ),
            dynamic(
                "AuthorizationPolicy",
                "authorizationpolicies",
                "future-field",
                json!({"rules": [{}], "someFutureField": true}),
            ),
        ],
        peer_authentications: vec![
            dynamic(
                "PeerAuthentication",
                "peerauthentications",
                "bad",
                json!({"portLevelMtls": {"80": {"mode": "PERMISSIVE"}}}),
            ),
            dynamic(
                "PeerAuthentication",
                "peerauthentications",
                "tolerant",
                json!({"mtls": {"mode": "PERMISSIVE"}, "unknownField": 1}),
            ),
        ],
        ..Snapshot::default()
    };
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    assert_eq!(out.problems.len(), 4, "{:#?}", out.problems);
    let compiled = crate::policy::PolicySet::new(out.config.compile_policies("istio-system").unwrap());
    let facts = crate::policy::ConnFacts {
        principal: Some("cluster.local/ns/shop/sa/web".into()),
        src_ip: "198.18.1.10".parse().unwrap(),
        dst_ip: "198.18.1.11".parse().unwrap(),
        dst_port: 80,
    };
    let db = labels(&[("app", "db")]).unwrap();
    let v = compiled.decide("shop", &db, &facts);
    assert!(
        !matches!(v.decision, crate::policy::Decision::Allow),
        "an unreadable DENY denies everything it selects: {v:?}"
    );
    let web = labels(&[("app", "web")]).unwrap();
    let v = compiled.decide("shop", &web, &facts);
    assert!(matches!(v.decision, crate::policy::Decision::Allow), "the readable ALLOW still allows its sources: {v:?}");
    let pa: Vec<&str> = out.config.peer_authentications.iter().map(|p| p.metadata.name.as_str()).collect();
    assert_eq!(pa, ["bad", "tolerant"]);
}

#[test]
fn services_with_selectors_and_numeric_target_ports() {
    let svc = |name: &str, ip: &str, target: Option<IntOrString>, selector: bool| {
        Arc::new(Service {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("shop".into()), ..ObjectMeta::default() },
            spec: Some(ServiceSpec {
                cluster_ips: Some(vec![ip.into()]),
                selector: if selector { labels(&[("app", "db")]) } else { None },
                ports: Some(vec![ServicePort { port: 80, target_port: target, ..ServicePort::default() }]),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    };
    let s = Snapshot {
        services: vec![
            svc("db", "198.19.100.10", Some(IntOrString::Int(8080)), true),
            svc("named", "198.19.100.11", Some(IntOrString::String("http".into())), true),
            svc("manual", "198.19.100.12", None, false),
            svc("dup", "198.19.100.10", None, true),
        ],
        ..Snapshot::default()
    };
    let mut db = pod("db1", "shop", "n2", "198.18.2.10", 1);
    db.metadata.labels = labels(&[("app", "db")]);
    let s = Snapshot { pods: vec![Arc::new(db.clone())], namespaces: vec![ns("shop", true)], ..s };
    let out = to_config(&s, "n1", KEY, &BTreeMap::new());
    let names: Vec<&str> = out.config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db"]);
    // One unmeshed pod behind it (or none at all): left to the cluster's service routing.
    let mut plain = pod("db2", "shop", "n2", "198.18.2.11", 1);
    plain.metadata.labels = labels(&[("app", "db"), (KEY, DISABLED)]);
    let mixed = Snapshot { pods: vec![Arc::new(db), Arc::new(plain)], ..s.clone() };
    assert!(to_config(&mixed, "n1", KEY, &BTreeMap::new()).config.services.is_empty());
    let empty = Snapshot { pods: vec![], ..s.clone() };
    assert!(to_config(&empty, "n1", KEY, &BTreeMap::new()).config.services.is_empty());
    assert_eq!(out.config.services[0].ports[0].target_port, Some(8080));
    assert_eq!(out.problems.len(), 1, "the named port is reported: {:?}", out.problems);
}

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[test]
fn a_pods_workload_is_its_owner_as_istio_names_it() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    let owned = |kind: &str, name: &str, hash: Option<&str>| {
        let mut p = pod("u1", "shop", "n1", "198.18.1.10", 0);
        p.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "owner".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        if let Some(h) = hash {
            p.metadata.labels.get_or_insert_with(Default::default).insert("pod-template-hash".into(), h.into());
        }
        owner_workload(&p)
    };
    assert_eq!(owned("ReplicaSet", "reviews-v2-5d8f7c9b6", Some("5d8f7c9b6")).as_deref(), Some("reviews-v2"));
    assert_eq!(owned("ReplicaSet", "standalone", None).as_deref(), Some("standalone"), "a bare ReplicaSet");
    assert_eq!(owned("StatefulSet", "db", None).as_deref(), Some("db"));
    assert_eq!(owned("DaemonSet", "agent", None).as_deref(), Some("agent"));
    assert_eq!(owned("Job", "backup-29412360", None).as_deref(), Some("backup"), "a CronJob's Job");
    assert_eq!(owned("Job", "migrate", None).as_deref(), Some("migrate"));
    assert_eq!(owner_workload(&pod("u2", "shop", "n1", "198.18.1.11", 0)), None, "a bare pod");
}
