//! The Kubernetes manifests in `deploy/`: every object parses into its k8s-openapi type
//! without losing a field, and the RBAC, the DaemonSet and the privileged overlay keep the
//! contract the agent and `selvedge-cni` rely on. Needs neither root nor a cluster.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "selvedge-system";
const NAME: &str = "selvedge";
const AGENT: &str = "selvedge";
const INIT: &str = "install-cni";
const IMAGE: &str = "selvedge:dev";
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "SYS_ADMIN"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every non-empty document of a (multi-document) YAML file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The first place where `got` (re-serialized) differs from `want` (the file), as a path.
fn first_difference(want: &Value, got: &Value, at: &str) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w.keys().chain(g.keys()).find_map(|k| match (w.get(k), g.get(k)) {
            (Some(wv), Some(gv)) => first_difference(wv, gv, &format!("{at}.{k}")),
            (Some(_), None) => Some(format!("{at}.{k} is in the file but not in the type (misspelt?)")),
            (None, _) => Some(format!("{at}.{k} appeared on re-serialization")),
        }),
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            w.iter().zip(g).enumerate().find_map(|(i, (wv, gv))| first_difference(wv, gv, &format!("{at}[{i}]")))
        }
        _ if want == got => None,
        _ => Some(format!("{at}: file has {want}, the type gives back {got}")),
    }
}

/// Deserializes `doc` into `T` and fails if re-serializing it loses or changes anything:
/// serde silently drops unknown (e.g. misspelt) fields, the API server would too.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> T {
    let value: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&value).expect("k8s-openapi types serialize");
    if let Some(diff) = first_difference(doc, &back, "") {
        panic!("{what}: {diff}");
    }
    value
}

#[derive(Debug, Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
}

fn parse(docs: &[Value], file: &str) -> Manifests {
    let mut m = Manifests::default();
    for (i, doc) in docs.iter().enumerate() {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_else(|| panic!("{file} #{i}: no kind"));
        let what = format!("{file} #{i} ({kind})");
        match kind {
            "Namespace" => m.namespaces.push(typed(doc, &what)),
            "ServiceAccount" => m.service_accounts.push(typed(doc, &what)),
            "ClusterRole" => m.cluster_roles.push(typed(doc, &what)),
            "ClusterRoleBinding" => m.bindings.push(typed(doc, &what)),
            "DaemonSet" => m.daemonsets.push(typed(doc, &what)),
            "Deployment" => m.deployments.push(typed(doc, &what)),
            "Service" => m.services.push(typed(doc, &what)),
            other => panic!("{what}: unexpected kind {other:?}; teach this test about it"),
        }
    }
    m
}

fn base_path() -> PathBuf {
    deploy_dir().join("base").join("selvedge.yaml")
}

fn manifests() -> Manifests {
    parse(&documents(&base_path()), "base/selvedge.yaml")
}

fn one<'a, T>(items: &'a [T], kind: &str) -> &'a T {
    assert_eq!(items.len(), 1, "exactly one {kind} expected");
    &items[0]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("DaemonSet has a pod spec")
}

fn container<'a>(list: Option<&'a Vec<Container>>, name: &str) -> &'a Container {
    list.into_iter().flatten().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

fn agent(spec: &PodSpec) -> &Container {
    container(Some(&spec.containers), AGENT)
}

fn init(spec: &PodSpec) -> &Container {
    container(spec.init_containers.as_ref(), INIT)
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes.iter().flatten().find(|v| v.name == name).unwrap_or_else(|| panic!("no volume {name}"))
}

fn strings(v: Option<&Vec<String>>) -> BTreeSet<&str> {
    v.into_iter().flatten().map(String::as_str).collect()
}

#[test]
fn every_document_is_a_known_kind_and_loses_no_field() {
    let m = manifests();
    assert_eq!(one(&m.namespaces, "Namespace").metadata.name.as_deref(), Some(NAMESPACE));
    one(&m.service_accounts, "ServiceAccount");
    one(&m.cluster_roles, "ClusterRole");
    one(&m.bindings, "ClusterRoleBinding");
    one(&m.daemonsets, "DaemonSet");
}

#[test]
fn the_differ_catches_a_misspelt_field() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x"}, "automountServiceAcountToken": false,
    });
    let typed = std::panic::catch_unwind(|| typed::<ServiceAccount>(&doc, "misspelt"));
    assert!(typed.is_err(), "a misspelt field must fail the round trip");
}

#[test]
fn rbac_is_read_only_and_exactly_what_the_agent_watches() {
    let m = manifests();
    let role = one(&m.cluster_roles, "ClusterRole");
    assert_eq!(role.metadata.name.as_deref(), Some(NAME));
    assert!(role.aggregation_rule.is_none(), "an aggregated role could grow beyond read-only");
    let read_only = BTreeSet::from(["get", "list", "watch"]);
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert!(verbs.is_subset(&read_only), "verbs {verbs:?} go beyond get/list/watch");
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none(), "{rule:?}");
        for group in strings(rule.api_groups.as_ref()) {
            for resource in strings(rule.resources.as_ref()) {
                granted.insert((group, resource));
            }
        }
    }
    let want = BTreeSet::from([
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
    ]);
    assert_eq!(granted, want);
}

#[test]
fn binding_gives_the_role_to_the_agents_service_account() {
    let m = manifests();
    let sa = one(&m.service_accounts, "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some(NAME));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_ne!(sa.automount_service_account_token, Some(false), "install-cni reads the mounted token");

    let binding = one(&m.bindings, "ClusterRoleBinding");
    assert_eq!(binding.metadata.name.as_deref(), Some(NAME));
    assert_eq!(
        (binding.role_ref.api_group.as_str(), binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
        ("rbac.authorization.k8s.io", "ClusterRole", NAME)
    );
    let subjects: Vec<_> =
        binding.subjects.iter().flatten().map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref())).collect();
    assert_eq!(subjects, [("ServiceAccount", NAME, Some(NAMESPACE))]);

    let ds = one(&m.daemonsets, "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = pod_spec(ds);
    assert_eq!(spec.service_account_name.as_deref(), Some(NAME));
    assert_ne!(spec.automount_service_account_token, Some(false), "install-cni reads the mounted token");
}

#[test]
fn daemonset_runs_on_every_node_and_hands_over_without_a_gap() {
    let m = manifests();
    let ds = one(&m.daemonsets, "DaemonSet");
    let ds_spec = ds.spec.as_ref().expect("DaemonSet spec");
    let labels = ds_spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("template labels");
    for (k, v) in ds_spec.selector.match_labels.iter().flatten() {
        assert_eq!(labels.get(k), Some(v), "selector {k}={v} must match the pod template");
    }
    assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some(NAME));

    let spec = pod_spec(ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.host_pid, Some(true), "the agent finds pre-existing pods' netns through the host's /proc");
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    let tolerates_all =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none() && t.value.is_none()
        });
    assert!(tolerates_all, "a bare `operator: Exists` toleration runs the agent on tainted nodes too");

    let strategy = ds_spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    // With hostNetwork every declared port becomes a hostPort, and the scheduler will not put
    // the surge pod next to the old one: the rollout would hang (kubernetes#106417).
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        assert!(c.ports.as_ref().is_none_or(Vec::is_empty), "{}: declared ports block maxSurge", c.name);
    }
}

#[test]
fn agent_container_has_the_least_privilege_that_works() {
    let m = manifests();
    let spec = pod_spec(one(&m.daemonsets, "DaemonSet"));
    let agent = agent(spec);
    assert_eq!(agent.image.as_deref(), Some(IMAGE));
    assert_eq!(agent.image.as_deref(), init(spec).image.as_deref(), "both containers run the same image");
    assert_eq!(agent.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(agent.command.as_deref(), Some(&["/usr/local/bin/selvedge", "run", "--kube"].map(String::from)[..]));

    let probe = agent.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("HTTP readiness probe");
    assert_eq!((probe.path.as_deref(), &probe.port), (Some("/healthz/ready"), &IntOrString::Int(15021)));
    assert!(agent.liveness_probe.is_none(), "no liveness probe: a restart loop under load is worse");

    let sc = agent.security_context.as_ref().expect("agent securityContext");
    assert_ne!(sc.privileged, Some(true), "privileged is the overlay's switch, not the default");
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(strings(caps.drop.as_ref()), BTreeSet::from(["ALL"]));
    assert_eq!(strings(caps.add.as_ref()), BTreeSet::from(CAPABILITIES));
    // The profile the init container writes (and the lab runs the agent under): the
    // kubelet resolves it under its seccomp directory, the init container's mount.
    let seccomp = sc.seccomp_profile.as_ref().expect("a seccomp profile");
    assert_eq!(
        (seccomp.type_.as_str(), seccomp.localhost_profile.as_deref()),
        ("Localhost", Some("selvedge/agent.json"))
    );
    assert_eq!(sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()), Some("Unconfined"));

    // Metrics and readiness on the node's address, not every address of the node.
    let host_ip = agent.env.iter().flatten().find(|e| e.name == "SELVEDGE_HOST_IP").expect("SELVEDGE_HOST_IP");
    let field = host_ip.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("from a fieldRef");
    assert_eq!(field.field_path, "status.hostIP");
    assert_eq!(env(agent, "SELVEDGE_METRICS_ADDR"), Some("$(SELVEDGE_HOST_IP):15020"));
    assert_eq!(env(agent, "SELVEDGE_READINESS_ADDR"), Some("$(SELVEDGE_HOST_IP):15021"));
    let position = |name: &str| agent.env.iter().flatten().position(|e| e.name == name);
    assert!(position("SELVEDGE_HOST_IP") < position("SELVEDGE_METRICS_ADDR"), "defined before it is used");

    let node = agent.env.iter().flatten().find(|e| e.name == "SELVEDGE_NODE").expect("SELVEDGE_NODE");
    let field = node.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("SELVEDGE_NODE from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    for (name, value) in [
        ("SELVEDGE_MESH_LABEL", "selvedge.dev/mesh"),
        ("SELVEDGE_STATE_DIR", "/var/run/selvedge"),
        ("SELVEDGE_PROC_DIR", "/proc"),
        ("SELVEDGE_LOG_FORMAT", "json"),
        ("SELVEDGE_CNI_CONF_DIR", "/etc/cni/net.d"),
    ] {
        assert_eq!(env(agent, name), Some(value), "agent env {name}");
    }

    let resources = agent.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("100m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
    assert!(resources.limits.as_ref().is_none_or(|l| !l.contains_key("cpu")), "no CPU limit on the data plane");
}

#[test]
fn init_container_installs_the_cni_plugin_without_capabilities() {
    let m = manifests();
    let spec = pod_spec(one(&m.daemonsets, "DaemonSet"));
    let init = init(spec);
    assert_eq!(init.image.as_deref(), Some(IMAGE));
    assert_eq!(init.command.as_deref(), Some(&["/usr/local/bin/selvedge-cni", "install"].map(String::from)[..]));
    for (name, value) in [
        ("SELVEDGE_CNI_BIN_DIR", "/opt/cni/bin"),
        ("SELVEDGE_CNI_CONF_DIR", "/etc/cni/net.d"),
        ("SELVEDGE_STATE_DIR", "/var/run/selvedge"),
        ("SELVEDGE_MESH_LABEL", "selvedge.dev/mesh"),
        ("SELVEDGE_SECCOMP_DIR", "/var/lib/kubelet/seccomp/selvedge"),
    ] {
        assert_eq!(env(init, name), Some(value), "install-cni env {name}");
    }
    let sc = init.security_context.as_ref().expect("install-cni securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_user, Some(0));
    let added = sc.capabilities.as_ref().and_then(|c| c.add.as_ref());
    assert!(added.is_none_or(Vec::is_empty), "install-cni only writes root-owned directories");
    for (path, host) in [
        ("/opt/cni/bin", "/opt/cni/bin"),
        ("/etc/cni/net.d", "/etc/cni/net.d"),
        ("/var/run/selvedge", "/var/run/selvedge"),
        ("/var/lib/kubelet/seccomp/selvedge", "/var/lib/kubelet/seccomp/selvedge"),
    ] {
        check_mount(spec, init, &Want { path, source: Source::Host(host, None), read_only: false, propagation: None });
    }
}

#[derive(Debug)]
enum Source {
    /// Host path and, when the contract fixes it, the hostPath type.
    Host(&'static str, Option<&'static str>),
}

#[derive(Debug)]
struct Want {
    path: &'static str,
    source: Source,
    read_only: bool,
    propagation: Option<&'static str>,
}

fn check_mount(spec: &PodSpec, c: &Container, want: &Want) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == want.path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", c.name, want.path));
    let at = format!("{} {}", c.name, want.path);
    assert_eq!(mount.read_only.unwrap_or(false), want.read_only, "{at}: readOnly");
    assert_eq!(mount.mount_propagation.as_deref(), want.propagation, "{at}: mountPropagation");
    let volume = volume(spec, &mount.name);
    match want.source {
        Source::Host(path, kind) => {
            let host = volume.host_path.as_ref().unwrap_or_else(|| panic!("{at}: not a hostPath"));
            assert_eq!(host.path, path, "{at}: host path");
            if kind.is_some() {
                assert_eq!(host.type_.as_deref(), kind, "{at}: hostPath type");
            }
        }
    }
}

#[test]
fn agent_mounts_what_it_needs_from_the_host() {
    let m = manifests();
    let spec = pod_spec(one(&m.daemonsets, "DaemonSet"));
    let agent = agent(spec);
    let host = |path| Source::Host(path, None);
    let wants = [
        Want {
            path: "/sys/fs/bpf",
            source: Source::Host("/sys/fs/bpf", Some("Directory")),
            read_only: false,
            propagation: Some("HostToContainer"),
        },
        Want { path: "/sys/fs/cgroup", source: host("/sys/fs/cgroup"), read_only: true, propagation: None },
        Want {
            path: "/var/run/netns",
            source: host("/var/run/netns"),
            read_only: true,
            propagation: Some("HostToContainer"),
        },
        Want {
            path: "/var/run/selvedge",
            source: Source::Host("/var/run/selvedge", Some("DirectoryOrCreate")),
            read_only: false,
            propagation: None,
        },
        Want { path: "/opt/cni/bin", source: host("/opt/cni/bin"), read_only: false, propagation: None },
        Want { path: "/etc/cni/net.d", source: host("/etc/cni/net.d"), read_only: false, propagation: None },
    ];
    for want in &wants {
        check_mount(spec, agent, want);
    }
}

#[test]
fn agents_hold_no_key_of_the_mesh_only_the_root_certificate_and_a_token_for_the_ca() {
    let m = manifests();
    let spec = pod_spec(one(&m.daemonsets, "DaemonSet"));
    let agent = agent(spec);
    assert!(spec.volumes.iter().flatten().all(|v| v.secret.is_none()), "no Secret reaches a node agent");
    let root = volume(spec, "ca-root").config_map.as_ref().expect("ca-root is a ConfigMap volume");
    assert_eq!(root.name, "selvedge-ca-root");
    let keys: Vec<&str> = root.items.iter().flatten().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["root-cert.pem"], "the root certificate and nothing else");
    let projected = volume(spec, "ca-token").projected.as_ref().expect("ca-token is a projected volume");
    let token = projected.sources.iter().flatten().find_map(|s| s.service_account_token.as_ref()).expect("a token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"), "bound to the CA's audience");
    assert_eq!(token.path, "istio-token");
    assert_eq!(env(agent, "SELVEDGE_CERT_SOURCE"), Some("istio"));
    assert_eq!(env(agent, "SELVEDGE_ISTIO_CA_ADDR"), Some("selvedge-ca.selvedge-system.svc:15012"));
    assert_eq!(env(agent, "SELVEDGE_ISTIO_CA_ROOT"), Some("/var/run/secrets/selvedge/root-cert.pem"));
    assert_eq!(env(agent, "SELVEDGE_ISTIO_CA_TOKEN"), Some("/var/run/secrets/tokens/istio-token"));
    for (path, volume) in [("/var/run/secrets/selvedge", "ca-root"), ("/var/run/secrets/tokens", "ca-token")] {
        let mount = agent.volume_mounts.iter().flatten().find(|m| m.mount_path == path).expect(path);
        assert_eq!((mount.name.as_str(), mount.read_only), (volume, Some(true)), "{path}");
    }
}

fn ca_manifests() -> Manifests {
    parse(&documents(&deploy_dir().join("base").join("ca.yaml")), "base/ca.yaml")
}

#[test]
fn the_root_key_is_mounted_only_in_the_cluster_ca_which_reviews_tokens_and_lists_pods() {
    let m = ca_manifests();
    let ca = one(&m.deployments, "Deployment");
    assert_eq!(ca.metadata.namespace.as_deref(), Some(NAMESPACE));
    let ca_spec = ca.spec.as_ref().expect("a spec");
    assert_eq!(ca_spec.replicas, Some(2), "one CA answers while the other moves");
    let pod = ca_spec.template.spec.as_ref().expect("a pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("selvedge-ca"));
    let container = one(&pod.containers, "container");
    assert_eq!(
        container.command.as_deref(),
        Some(&["/usr/local/bin/selvedge".to_string(), "ca".into(), "serve".into()][..])
    );
    let security = pod.security_context.as_ref().expect("a pod security context");
    assert_eq!(security.run_as_non_root, Some(true));
    let dropped =
        container.security_context.as_ref().and_then(|s| s.capabilities.as_ref()).and_then(|c| c.drop.as_ref());
    assert_eq!(strings(dropped), BTreeSet::from(["ALL"]), "no capability at all");
    let key = volume(pod, "ca").secret.as_ref().expect("the CA's Secret");
    assert_eq!(key.secret_name.as_deref(), Some("selvedge-ca"));
    assert_eq!(key.default_mode, Some(0o440), "the key readable by the CA's group (fsGroup) only");
    assert!(key.items.is_none(), "every key of the Secret: a root, or an intermediate (Istio's plug-in layout)");
    let probe = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("HTTP readiness probe");
    assert_eq!((probe.path.as_deref(), &probe.port), (Some("/healthz/ready"), &IntOrString::Int(15014)));
    let annotations = ca_spec.template.metadata.as_ref().and_then(|m| m.annotations.as_ref()).expect("annotations");
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15014"), "its metrics are scraped");

    let role = one(&m.cluster_roles, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in strings(rule.api_groups.as_ref()) {
            for resource in strings(rule.resources.as_ref()) {
                for verb in &rule.verbs {
                    granted.insert((group, resource, verb.as_str()));
                }
            }
        }
    }
    let want = BTreeSet::from([
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
        ("", "pods", "list"),
    ]);
    assert_eq!(granted, want, "exactly what the CA asks the API");
    let binding = one(&m.bindings, "ClusterRoleBinding");
    let subjects: Vec<_> =
        binding.subjects.iter().flatten().map(|s| (s.name.as_str(), s.namespace.as_deref())).collect();
    assert_eq!(subjects, [("selvedge-ca", Some(NAMESPACE))]);

    let service = one(&m.services, "Service");
    let port = service.spec.as_ref().and_then(|s| s.ports.as_ref()).map(|p| p[0].port);
    assert_eq!(port, Some(15012), "the port the agents dial");
    assert_eq!(service.metadata.name.as_deref(), Some("selvedge-ca"), "the name in the agents' --istio-ca-addr");
}

#[test]
fn every_mount_refers_to_a_defined_volume() {
    let m = manifests();
    let spec = pod_spec(one(&m.daemonsets, "DaemonSet"));
    let defined: BTreeSet<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(defined.len(), spec.volumes.as_ref().map_or(0, Vec::len), "volume names are unique");
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        for mount in c.volume_mounts.iter().flatten() {
            assert!(defined.contains(mount.name.as_str()), "{}: mount {} has no volume", c.name, mount.name);
        }
    }
}

/// The subset of a kustomization.yaml these manifests use; anything else is a mistake.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
}

fn kustomization(dir: &Path) -> Kustomization {
    let path = dir.join("kustomization.yaml");
    let k: Kustomization = serde_yaml_ng::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((k.api_version.as_str(), k.kind.as_str()), ("kustomize.config.k8s.io/v1beta1", "Kustomization"));
    k
}

/// Lexically resolves `rel` against `dir` (no symlinks involved in deploy/).
fn resolve(dir: &Path, rel: &str) -> PathBuf {
    let mut out = dir.to_path_buf();
    for part in Path::new(rel).components() {
        match part {
            std::path::Component::ParentDir => assert!(out.pop(), "{rel} leaves the filesystem"),
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn kustomizations_build_on_the_base() {
    let deploy = std::fs::canonicalize(deploy_dir()).expect("deploy/ exists");
    let base = deploy.join("base");
    assert_eq!(kustomization(&deploy).resources, ["base"]);
    assert_eq!(kustomization(&base).resources, ["selvedge.yaml", "ca.yaml"]);
    let overlay = deploy.join("privileged");
    let k = kustomization(&overlay);
    assert_eq!(k.resources.len(), 1);
    let target = resolve(&overlay, &k.resources[0]);
    assert_eq!(target, base);
    // kustomize refuses a base that contains its overlay ("cycle detected").
    assert!(!overlay.starts_with(&target), "the privileged overlay must not live inside its base");
}

/// Strategic merge as the API server does it for the fields a patch here may touch: maps
/// merge, `null` deletes, lists of containers/volumes/env merge by `name` and volume mounts by
/// `mountPath`; any other list is replaced.
fn strategic_merge(target: &mut Value, patch: &Value, field: &str) {
    let merge_key = match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        _ => None,
    };
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                assert!(!k.starts_with('$'), "patch directive {k} is not supported by this test");
                if v.is_null() {
                    t.remove(k);
                } else if let Some(existing) = t.get_mut(k) {
                    strategic_merge(existing, v, k);
                } else {
                    t.insert(k.clone(), without_nulls(v));
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if merge_key.is_some() => {
            let key = merge_key.expect("checked above");
            for item in p {
                let id = item.get(key).unwrap_or_else(|| panic!("{field} patch item without {key}"));
                match t.iter_mut().find(|e| e.get(key) == Some(id)) {
                    Some(existing) => strategic_merge(existing, item, field),
                    None => t.push(without_nulls(item)),
                }
            }
        }
        (t, p) => *t = without_nulls(p),
    }
}

/// What a new value of a patch adds: a `null` in it has nothing to delete.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

#[test]
fn privileged_overlay_makes_only_the_agent_privileged() {
    let overlay = deploy_dir().join("privileged");
    let k = kustomization(&overlay);
    assert_eq!(k.patches.len(), 1, "one patch: the privileged switch");
    let patch_path = overlay.join(&k.patches[0].path);
    let patches = documents(&patch_path);
    let [patch] = &patches[..] else { panic!("{}: one document expected", patch_path.display()) };

    let docs = documents(&base_path());
    let meta = |d: &Value, f: &str| d.pointer(&format!("/metadata/{f}")).cloned();
    let mut target = docs
        .iter()
        .find(|d| {
            ["apiVersion", "kind"].iter().all(|f| d.get(f) == patch.get(f))
                && ["name", "namespace"].iter().all(|f| meta(d, f) == meta(patch, f))
        })
        .cloned()
        .expect("the patch names an object of the base (apiVersion, kind, name, namespace)");
    strategic_merge(&mut target, patch, "");
    let before: DaemonSet = typed(docs.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet"), "base");
    let after: DaemonSet = typed(&target, "patched DaemonSet");

    let (spec_before, spec) = (pod_spec(&before), pod_spec(&after));
    let names = |s: &PodSpec| -> Vec<String> { s.containers.iter().map(|c| c.name.clone()).collect() };
    assert_eq!(names(spec), names(spec_before), "the patch must name an existing container (the agent)");
    let sc = agent(spec).security_context.as_ref().expect("agent securityContext");
    assert_eq!(sc.privileged, Some(true));
    assert_ne!(sc.allow_privilege_escalation, Some(false), "the API server rejects it with privileged");
    // A privileged container has every capability; the list goes so that no runtime can apply
    // its `drop: [ALL]` on top. Everything else (user, seccomp, AppArmor, ...) stays.
    let mut want = agent(spec_before).security_context.clone().expect("base agent securityContext");
    (want.privileged, want.allow_privilege_escalation, want.capabilities) =
        (Some(true), sc.allow_privilege_escalation, None);
    assert_eq!(sc, &want, "the overlay changes privileged, allowPrivilegeEscalation and capabilities only");
    assert_eq!(init(spec), init(spec_before), "install-cni needs no privilege");
    let mut unpatched = agent(spec).clone();
    unpatched.security_context = agent(spec_before).security_context.clone();
    assert_eq!(&unpatched, agent(spec_before), "the patch changes only the agent's securityContext");
}
