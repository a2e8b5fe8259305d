//! The Vagrant lab (`vagrant/`), checked without booting it (CI has no nested
//! virtualisation): `vagrant validate` on the Vagrantfile, shellcheck on every script, the
//! manifests the lab applies parsed and checked (the k3s overlay applied to `deploy/`), and
//! `cargo xtask lab … --dry-run` printing every step while running none.
//! Needs `vagrant` and `shellcheck` (`cargo xtask setup` installs them); never skips.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, Pod, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::Deserialize;
use serde_json::Value;

/// Where k3s keeps CNI binaries and configuration (vagrant/overlay/k3s-paths.yaml).
const K3S_CNI_BIN: &str = "/var/lib/rancher/k3s/data/cni";
const K3S_CNI_CONF: &str = "/var/lib/rancher/k3s/agent/etc/cni/net.d";
const MESH_LABEL: &str = "selvedge.dev/mesh";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn lab() -> PathBuf {
    root().join("vagrant")
}

/// A scratch directory named after the test, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("selvedge-vagrant-lab-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` with a deadline (a tool waiting on the network must not hang CI); output
/// goes through files so a chatty child cannot block on a full pipe.
fn run(mut cmd: Command, scratch: &Scratch, timeout: Duration) -> Output {
    let (out, err) = (scratch.0.join("stdout"), scratch.0.join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"));
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}; `cargo xtask setup` installs vagrant and shellcheck"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(out).expect("read stdout"),
        stderr: std::fs::read(err).expect("read stderr"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `vagrant validate` in vagrant/, with its state and home in `scratch`, no update check.
/// `--ignore-provider`: CI has neither VirtualBox nor vagrant-libvirt, and without a usable
/// provider plain `validate` stops at "No usable default provider could be found".
fn vagrant_validate(scratch: &Scratch, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("vagrant");
    c.args(["validate", "--ignore-provider"])
        .current_dir(lab())
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_DOTFILE_PATH", scratch.0.join("dot"))
        .env("VAGRANT_HOME", scratch.0.join("home"))
        .env_remove("SELVEDGE_LAB_CONFIG")
        .env_remove("SELVEDGE_LAB_AGENTS")
        .env_remove("SELVEDGE_LAB_CPUS")
        .env_remove("SELVEDGE_LAB_MEMORY")
        .envs(env.iter().copied());
    run(c, scratch, Duration::from_secs(120))
}

#[test]
fn vagrantfile_validates_with_defaults_config_example_and_env() {
    let scratch = Scratch::new("validate");
    let example = lab().join("config.rb.example");
    let example = example.to_str().expect("utf-8 path");
    for env in [
        vec![],
        vec![("SELVEDGE_LAB_CONFIG", example)],
        vec![("SELVEDGE_LAB_AGENTS", "3"), ("SELVEDGE_LAB_MEMORY", "4096")],
    ] {
        let out = vagrant_validate(&scratch, &env);
        assert!(out.status.success(), "vagrant validate with {env:?}: {}\n{}", text(&out.stdout), text(&out.stderr));
        let machines = text(&out.stdout);
        assert!(machines.contains("validated successfully"), "{machines}");
    }
}

#[test]
fn vagrantfile_rejects_bad_settings_naming_the_variable() {
    let scratch = Scratch::new("bad-settings");
    for (var, value) in [("SELVEDGE_LAB_AGENTS", "two"), ("SELVEDGE_LAB_AGENTS", "0"), ("SELVEDGE_LAB_MEMORY", "512")] {
        let out = vagrant_validate(&scratch, &[(var, value)]);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{var}={value} was accepted: {said}");
        assert!(said.contains(var), "{var}={value}: the error does not name the variable: {said}");
    }
}

fn shell_scripts(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list vagrant/") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() && !name.starts_with('.') {
            shell_scripts(&path, found);
        } else if name.ends_with(".sh") {
            found.push(path);
        }
    }
}

#[test]
fn every_provisioning_and_scenario_script_passes_shellcheck() {
    let scratch = Scratch::new("shellcheck");
    let mut scripts = Vec::new();
    shell_scripts(&lab(), &mut scripts);
    for want in ["scripts/base.sh", "scripts/k3s.sh", "scripts/image.sh", "scripts/deploy.sh", "e2e/run.sh"] {
        assert!(scripts.contains(&lab().join(want)), "vagrant/{want} not found among {scripts:?}");
    }
    for s in &scripts {
        let body = std::fs::read_to_string(s).expect("read script");
        assert!(body.starts_with("#!/usr/bin/env bash\n"), "{}: not a bash script", s.display());
        assert!(body.contains("set -euo pipefail") || body.contains("set -uo pipefail"), "{}: no set -u", s.display());
    }
    let mut c = Command::new("shellcheck");
    c.args(["--shell=bash", "--severity=style"]).args(&scripts);
    let out = run(c, &scratch, Duration::from_secs(120));
    assert!(out.status.success(), "shellcheck:\n{}{}", text(&out.stdout), text(&out.stderr));
}

/// Every non-empty document of a YAML file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let body = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&body)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|d| !d.is_null())
        .collect()
}

fn one_document(path: &Path) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// The resources of a kustomization directory, following `resources:` into directories.
/// Only `resources` is understood: anything else in a base would change the output.
fn kustomize_resources(dir: &Path) -> Vec<Value> {
    let k = one_document(&dir.join("kustomization.yaml"));
    for key in k.as_object().expect("kustomization is a map").keys() {
        assert!(
            ["apiVersion", "kind", "resources"].contains(&key.as_str()),
            "{}: `{key}` is not understood by this test's kustomize subset; teach it",
            dir.display()
        );
    }
    let mut out = Vec::new();
    for r in k["resources"].as_array().expect("resources is a list") {
        let path = dir.join(r.as_str().expect("resource is a path"));
        if path.is_dir() {
            out.extend(kustomize_resources(&path));
        } else {
            out.extend(documents(&path));
        }
    }
    out
}

/// RFC 6902 on `doc`, the operations the overlay uses (test, replace, add).
fn json_patch(doc: &mut Value, ops: &[Value]) {
    for op in ops {
        let path = op["path"].as_str().expect("op has a path");
        let value = op["value"].clone();
        let (parent, last) = path.rsplit_once('/').expect("path starts with /");
        match op["op"].as_str().expect("op has an op") {
            "test" => {
                let got = doc.pointer(path).unwrap_or_else(|| panic!("test {path}: nothing there"));
                assert_eq!(got, &value, "test {path} failed: deploy/ moved what the overlay patches");
            }
            "replace" => {
                *doc.pointer_mut(path).unwrap_or_else(|| panic!("replace {path}: nothing there")) = value;
            }
            "add" => match doc.pointer_mut(parent).unwrap_or_else(|| panic!("add {path}: no parent")) {
                Value::Array(list) if last == "-" => list.push(value),
                Value::Object(map) => {
                    map.insert(last.to_string(), value);
                }
                other => panic!("add {path}: unsupported target {other}"),
            },
            other => panic!("op {other} is not used by the overlay; teach this test"),
        }
    }
}

fn is_selvedge_daemonset(doc: &Value) -> bool {
    doc["kind"] == "DaemonSet" && doc["metadata"]["name"] == "selvedge"
}

/// deploy/ through vagrant/overlay, as `kubectl apply -k` would render it.
fn rendered_overlay() -> Vec<Value> {
    let overlay = lab().join("overlay");
    let k = one_document(&overlay.join("kustomization.yaml"));
    assert_eq!(k["resources"], serde_json::json!(["../../deploy"]), "the overlay builds on deploy/");
    let patches = k["patches"].as_array().expect("patches is a list");
    assert_eq!(patches.len(), 1, "one patch: k3s-paths.yaml");
    let target = &patches[0]["target"];
    assert_eq!((&target["kind"], &target["name"]), (&"DaemonSet".into(), &"selvedge".into()));
    assert_eq!(target["namespace"], "selvedge-system");
    let ops = documents(&overlay.join(patches[0]["path"].as_str().expect("patch path")));
    let ops = ops.first().and_then(Value::as_array).expect("the patch is a list of operations");

    let mut docs = kustomize_resources(&overlay.join("../../deploy"));
    let ds = docs.iter_mut().find(|d| is_selvedge_daemonset(d)).expect("deploy/ has the DaemonSet");
    json_patch(ds, ops);
    docs
}

fn daemonset(docs: &[Value]) -> DaemonSet {
    let ds = docs.iter().find(|d| is_selvedge_daemonset(d)).expect("the DaemonSet");
    serde_json::from_value(ds.clone()).expect("the patched DaemonSet is a valid DaemonSet")
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

#[test]
fn overlay_puts_cni_directories_where_k3s_has_them_on_both_sides() {
    let ds = daemonset(&rendered_overlay());
    let spec = ds.spec.and_then(|s| s.template.spec).expect("pod spec");
    let host_path = |name: &str| {
        let v = spec.volumes.iter().flatten().find(|v| v.name == name).unwrap_or_else(|| panic!("volume {name}"));
        v.host_path.as_ref().map(|h| h.path.clone()).unwrap_or_else(|| panic!("{name} is not a hostPath"))
    };
    assert_eq!(host_path("cni-bin"), K3S_CNI_BIN);
    assert_eq!(host_path("cni-conf"), K3S_CNI_CONF);

    let init = spec.init_containers.iter().flatten().find(|c| c.name == "install-cni").expect("install-cni");
    let containers: Vec<&Container> = spec.init_containers.iter().flatten().chain(&spec.containers).collect();
    let mut mounts = 0;
    for c in &containers {
        // The installer writes container paths into the chained conf; the host reads them.
        for m in c.volume_mounts.iter().flatten().filter(|m| m.name.starts_with("cni-")) {
            assert_eq!(m.mount_path, host_path(&m.name), "{}: {} is not mounted at its host path", c.name, m.name);
            mounts += 1;
        }
        let mut names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "{}: an env var is set twice", c.name);
        // No registry in the lab: every node imports selvedge:dev itself.
        assert_eq!(c.image.as_deref(), Some("selvedge:dev"), "{}", c.name);
        assert_ne!(c.image_pull_policy.as_deref(), Some("Always"), "{}: the lab has no registry", c.name);
    }
    assert_eq!(mounts, 4, "install-cni and the agent each mount cni-bin and cni-conf");
    assert_eq!(env(init, "SELVEDGE_CNI_BIN_DIR"), Some(K3S_CNI_BIN));
    assert_eq!(env(init, "SELVEDGE_CNI_CONF_DIR"), Some(K3S_CNI_CONF));
}

#[test]
fn overlay_changes_nothing_but_the_daemonset() {
    let deploy = kustomize_resources(&root().join("deploy"));
    let lab = rendered_overlay();
    assert_eq!(deploy.len(), lab.len());
    for (d, l) in deploy.iter().zip(&lab) {
        if !is_selvedge_daemonset(d) {
            assert_eq!(d, l);
        }
    }
}

/// kubectl's own kustomize, where the machine has kubectl (the lab's nodes use k3s's): it
/// must accept the overlay and render the same DaemonSet as the applier above.
#[test]
fn kubectl_kustomize_agrees_when_kubectl_is_installed() {
    let scratch = Scratch::new("kustomize");
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        eprintln!("kubectl is not installed: the overlay was checked by this test's JSON patch applier only");
        return;
    }
    let mut c = Command::new("kubectl");
    c.arg("kustomize").arg(lab().join("overlay"));
    let out = run(c, &scratch, Duration::from_secs(60));
    assert!(out.status.success(), "kubectl kustomize vagrant/overlay: {}", text(&out.stderr));
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_slice(&out.stdout)
        .map(|d| Value::deserialize(d).expect("kustomize output is YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let theirs = docs.iter().find(|d| is_selvedge_daemonset(d)).expect("kustomize renders the DaemonSet");
    let ours = rendered_overlay().into_iter().find(is_selvedge_daemonset).expect("DaemonSet");
    assert_eq!(theirs, &ours, "kubectl kustomize and the test's patch applier disagree");
}

#[test]
fn istio_crds_define_the_kinds_the_agent_watches() {
    let docs = documents(&lab().join("manifests/istio-security-crds.yaml"));
    let mut kinds = Vec::new();
    for d in &docs {
        let crd: CustomResourceDefinition = serde_json::from_value(d.clone()).expect("a CustomResourceDefinition");
        assert_eq!(crd.spec.group, "security.istio.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.security.istio.io", crd.spec.names.plural).as_str()));
        let v1 = crd.spec.versions.iter().find(|v| v.name == "v1").expect("v1");
        assert!(v1.served && v1.storage, "{}: v1 is served and stored", crd.spec.names.kind);
        kinds.push(crd.spec.names.kind);
    }
    assert_eq!(kinds, ["AuthorizationPolicy", "PeerAuthentication"]);
}

#[test]
fn scenario_workloads_are_valid_and_spread_as_run_sh_expects() {
    let mut pods = BTreeMap::new();
    let mut namespaces = BTreeMap::new();
    let mut accounts = Vec::new();
    for d in documents(&lab().join("e2e/workloads.yaml")) {
        match d["kind"].as_str() {
            Some("Namespace") => {
                let ns: Namespace = serde_json::from_value(d).expect("Namespace");
                namespaces.insert(ns.metadata.name.clone().expect("name"), ns);
            }
            Some("ServiceAccount") => {
                let sa: ServiceAccount = serde_json::from_value(d).expect("ServiceAccount");
                accounts.push((sa.metadata.namespace.expect("namespace"), sa.metadata.name.expect("name")));
            }
            Some("Pod") => {
                let pod: Pod = serde_json::from_value(d).expect("Pod");
                pods.insert(pod.metadata.name.clone().expect("name"), pod);
            }
            other => panic!("e2e/workloads.yaml: unexpected kind {other:?}"),
        }
    }
    let label = |ns: &str| namespaces[ns].metadata.labels.as_ref().and_then(|l| l.get(MESH_LABEL)).cloned();
    assert_eq!(label("lab-mesh").as_deref(), Some("enabled"), "lab-mesh is enrolled");
    assert_eq!(label("lab-plain"), None, "lab-plain is not");

    let names: Vec<&str> = pods.keys().map(String::as_str).collect();
    assert_eq!(names, ["client-a", "client-b", "plain-client", "server"], "the pods run.sh uses");
    for (name, pod) in &pods {
        let ns = pod.metadata.namespace.clone().expect("namespace");
        assert!(namespaces.contains_key(&ns), "{name}: namespace {ns} is not in the file");
        let spec = pod.spec.as_ref().expect("spec");
        let role = spec.node_selector.as_ref().and_then(|s| s.get("lab.selvedge.dev/e2e-role")).map(String::as_str);
        assert_eq!(role, Some(if name == "server" { "server" } else { "client" }), "{name}: node role");
        if let Some(sa) = &spec.service_account_name {
            assert!(accounts.contains(&(ns.clone(), sa.clone())), "{name}: no ServiceAccount {ns}/{sa}");
        }
        for c in &spec.containers {
            let image = c.image.as_deref().expect("image");
            let tag = image.rsplit_once(':').map(|(_, t)| t);
            assert!(tag.is_some_and(|t| t != "latest" && !t.contains('/')), "{name}: image {image} is not pinned");
            // A kubelet probe is plaintext from the node: STRICT would make the pod unready.
            assert!(c.readiness_probe.is_none() && c.liveness_probe.is_none(), "{name}: no probes");
        }
    }
    assert_eq!(pods["server"].metadata.labels.as_ref().and_then(|l| l.get("app")).map(String::as_str), Some("server"));
}

#[test]
fn scenario_policies_parse_as_the_agent_reads_them() {
    let strict = one_document(&lab().join("e2e/strict.yaml"));
    assert_eq!(strict["apiVersion"], "security.istio.io/v1");
    assert_eq!(strict["kind"], "PeerAuthentication");
    let pa: selvedge::policy::PeerAuthentication = serde_json::from_value(strict).expect("PeerAuthentication");
    pa.validate().expect("valid PeerAuthentication");
    assert_eq!(pa.metadata.namespace, "lab-mesh");
    assert!(pa.spec.selector.is_none(), "namespace-wide");
    assert_eq!(pa.spec.mtls.map(|m| m.mode), Some(selvedge::policy::MtlsMode::Strict));

    let authz = one_document(&lab().join("e2e/authz.yaml"));
    assert_eq!(authz["apiVersion"], "security.istio.io/v1");
    assert_eq!(authz["kind"], "AuthorizationPolicy");
    let principals = &authz["spec"]["rules"][0]["from"][0]["source"]["principals"];
    assert_eq!(principals, &serde_json::json!(["cluster.local/ns/lab-mesh/sa/client-a"]));
    let ap: selvedge::policy::AuthorizationPolicy = serde_json::from_value(authz).expect("AuthorizationPolicy");
    assert_eq!(ap.metadata.namespace, "lab-mesh");
    ap.compile("istio-system").expect("the agent compiles the scenario's policy");
}

/// Paths, sizes and modification times of everything under `dir`.
fn snapshot(dir: &Path, into: &mut BTreeMap<PathBuf, (u64, Option<SystemTime>)>) {
    for entry in std::fs::read_dir(dir).expect("list") {
        let entry = entry.expect("entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            snapshot(&entry.path(), into);
        }
        into.insert(entry.path(), (meta.len(), meta.modified().ok()));
    }
}

#[test]
fn lab_dry_runs_print_every_step_and_touch_nothing() {
    let scratch = Scratch::new("dry-run");
    // A `vagrant` first on PATH that records being called: a dry run must never call it.
    let fake = scratch.0.join("bin");
    let called = scratch.0.join("vagrant-was-called");
    std::fs::create_dir_all(&fake).expect("fake bin dir");
    let script = format!("#!/bin/sh\necho \"$@\" >> {}\n", called.display());
    std::fs::write(fake.join("vagrant"), script).expect("fake vagrant");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(fake.join("vagrant"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = std::env::join_paths(
        std::iter::once(fake.clone()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");

    let expected: [(&str, &[&str]); 3] = [
        (
            "up",
            &[
                "cargo xtask setup",
                "cargo xtask build --release",
                "vagrant/.lab/bin",
                "selvedge ca init --dir vagrant/.lab/ca --trust-domain cluster.local",
                "vagrant up",
                "vagrant rsync",
                "vagrant provision --provision-with image",
                "vagrant provision server --provision-with deploy",
            ],
        ),
        ("test", &["vagrant rsync server", "vagrant ssh server -c 'sudo bash /selvedge/vagrant/e2e/run.sh'"]),
        ("down", &["vagrant destroy -f", "rm -rf vagrant/.lab"]),
    ];
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for (task, wants) in expected {
        let mut before = BTreeMap::new();
        snapshot(&lab(), &mut before);
        let mut c = Command::new(&cargo);
        c.current_dir(root()).env("PATH", &path).args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "lab",
            task,
            "--dry-run",
        ]);
        let out = run(c, &scratch, Duration::from_secs(900));
        let printed = text(&out.stdout);
        assert!(out.status.success(), "lab {task} --dry-run: {printed}{}", text(&out.stderr));

        let mut after = BTreeMap::new();
        snapshot(&lab(), &mut after);
        assert!(before == after, "lab {task} --dry-run changed vagrant/");
        assert!(!called.exists(), "lab {task} --dry-run called vagrant");

        for want in wants {
            assert!(printed.contains(want), "lab {task} --dry-run does not show `{want}`:\n{printed}");
        }
        let steps: Vec<&str> = printed.lines().filter(|l| l.starts_with("step ")).collect();
        let total = steps.len();
        for (i, s) in steps.iter().enumerate() {
            assert!(s.starts_with(&format!("step {}/{total}: ", i + 1)), "{s}");
        }
        assert!(printed.trim_end().ends_with("dry run: nothing was run"), "{printed}");
        // What the VMs run must exist in the repository (the dry run names each).
        for line in printed.lines().filter_map(|l| l.trim().strip_prefix("in the VMs: ")) {
            for p in line.split(", ") {
                assert!(root().join(p).exists(), "lab {task}: {p} does not exist");
            }
        }
    }
}
