//! `selvedge-cni install`: what the DaemonSet's init container runs on each node.
//!
//! 1. copies this binary into the CNI bin directory (atomically);
//! 2. writes a kubeconfig for the plugin's API lookup (agent down) from the pod's
//!    ServiceAccount: the token and CA are copied to the state directory, which the agent
//!    keeps current while it runs;
//! 3. writes the agent container's seccomp profile where the kubelet finds `Localhost`
//!    profiles (when `--seccomp-dir` is given: the DaemonSet does), before the agent
//!    container is created;
//! 4. chains `selvedge-cni` at the end of the cluster CNI's configuration (the first
//!    `*.conflist`/`*.conf` by name in the conf directory), waiting for it to appear.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::{json, Value};

use super::protocol::SOCKET_NAME;

pub const PLUGIN_TYPE: &str = "selvedge-cni";
/// Where a pod's ServiceAccount is mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The plugin's kubeconfig, in the CNI conf directory.
pub const KUBECONFIG_NAME: &str = "selvedge-cni.kubeconfig";
/// Token and CA copies, in the state directory.
pub const TOKEN_NAME: &str = "cni-token";
pub const CA_NAME: &str = "cni-ca.crt";
/// The agent's seccomp profile (`deploy/seccomp/selvedge-agent.json`), and its file name in
/// `--seccomp-dir`.
pub const AGENT_SECCOMP_PROFILE: &str = include_str!("../../../deploy/seccomp/selvedge-agent.json");
pub const AGENT_SECCOMP_NAME: &str = "agent.json";

#[derive(Debug, Parser)]
#[command(name = "selvedge-cni install", about = "Install selvedge-cni and chain it into the node's CNI configuration")]
pub struct InstallArgs {
    /// The node's CNI binary directory (as mounted: the same path as on the host).
    #[arg(long, env = "SELVEDGE_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory (same path as on the host).
    #[arg(long, env = "SELVEDGE_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agent's state directory (its CNI socket lives there).
    #[arg(long, env = "SELVEDGE_STATE_DIR", default_value = "/var/run/selvedge")]
    pub state_dir: PathBuf,
    /// The enrollment label key.
    #[arg(long, env = "SELVEDGE_MESH_LABEL", default_value = crate::k8s::DEFAULT_MESH_LABEL)]
    pub mesh_label: String,
    /// Write the agent's seccomp profile here (`agent.json`): the kubelet's `Localhost`
    /// profile directory, e.g. /var/lib/kubelet/seccomp/selvedge.
    #[arg(long, env = "SELVEDGE_SECCOMP_DIR")]
    pub seccomp_dir: Option<PathBuf>,
    /// How long to wait for the cluster CNI's configuration to appear.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let a =
        InstallArgs::try_parse_from(std::iter::once("selvedge-cni install".to_owned()).chain(args.iter().cloned()))?;
    std::fs::create_dir_all(&a.state_dir).with_context(|| format!("create {}", a.state_dir.display()))?;
    let me = std::env::current_exe().context("find this binary")?;
    let dst = a.bin_dir.join(PLUGIN_TYPE);
    copy_atomically(&me, &dst, 0o755)?;
    println!("installed {}", dst.display());
    let kubeconfig = match write_kubeconfig(Path::new(SERVICE_ACCOUNT_DIR), &a.state_dir, &a.conf_dir) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("no kubeconfig for the plugin ({e:#}): with the agent down, every pod's ADD fails");
            None
        }
    };
    if let Some(dir) = &a.seccomp_dir {
        let path = install_seccomp_profile(dir)?;
        println!("wrote the agent's seccomp profile {}", path.display());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_secs);
    let file = loop {
        if let Some(f) = cluster_conf(&a.conf_dir)? {
            break f;
        }
        if Instant::now() >= deadline {
            bail!("no CNI configuration appeared in {} within {}s", a.conf_dir.display(), a.wait_secs);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let entry = plugin_entry(&a.state_dir.join(SOCKET_NAME), kubeconfig.as_deref(), &a.mesh_label);
    let out = chain_file(&file, read_conf(&file)?, entry)?;
    println!("chained {PLUGIN_TYPE} into {}", out.display());
    Ok(())
}

/// Write the agent's seccomp profile into `dir` (created if needed), atomically.
pub fn install_seccomp_profile(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(AGENT_SECCOMP_NAME);
    write_atomically(&path, AGENT_SECCOMP_PROFILE.as_bytes(), 0o644)?;
    Ok(path)
}

fn read_conf(file: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", file.display()))
}

/// Chain `entry` into `conf`, read from `file`, and write it back (a `.conf` becomes a
/// `.conflist`); returns the file written.
fn chain_file(file: &Path, conf: Value, entry: Value) -> anyhow::Result<PathBuf> {
    let chained = chain(conf, entry).with_context(|| format!("chain into {}", file.display()))?;
    let out = if file.extension().is_some_and(|x| x == "conflist") {
        file.to_owned()
    } else {
        file.with_extension("conflist")
    };
    write_atomically(&out, &serde_json::to_vec_pretty(&chained)?, 0o644)?;
    if out != file {
        std::fs::remove_file(file).with_context(|| format!("remove {} (now {})", file.display(), out.display()))?;
    }
    Ok(out)
}

/// The agent's guard: the cluster CNI may rewrite its configuration (flannel does when
/// k3s restarts), which would drop `selvedge-cni` from the chain and let pods start
/// unmeshed. Re-chains when it is missing; returns the file re-chained, if any.
pub fn ensure_chained(conf_dir: &Path, state_dir: &Path, mesh_label: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(file) = cluster_conf(conf_dir)? else { return Ok(None) };
    let conf = read_conf(&file)?;
    let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
    if conf.get("plugins").and_then(Value::as_array).is_some_and(|ps| ps.last().is_some_and(ours)) {
        return Ok(None);
    }
    let kubeconfig = conf_dir.join(KUBECONFIG_NAME);
    let entry =
        plugin_entry(&state_dir.join(SOCKET_NAME), kubeconfig.exists().then_some(kubeconfig.as_path()), mesh_label);
    chain_file(&file, conf, entry).map(Some)
}

/// Our entry in the plugin list.
pub fn plugin_entry(socket: &Path, kubeconfig: Option<&Path>, mesh_label: &str) -> Value {
    let mut e = json!({"type": PLUGIN_TYPE, "agentSocket": socket, "meshLabel": mesh_label});
    if let Some(k) = kubeconfig {
        e["kubeconfig"] = json!(k);
    }
    e
}

/// A conflist with `entry` last (replacing an older entry of ours); a single-plugin `.conf`
/// becomes a conflist.
pub fn chain(conf: Value, entry: Value) -> anyhow::Result<Value> {
    let mut list = if conf.get("plugins").is_some() {
        conf
    } else {
        let version = conf.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        let name = conf.get("name").cloned().context("a .conf without a name")?;
        json!({"cniVersion": version, "name": name, "plugins": [conf]})
    };
    let plugins = list["plugins"].as_array_mut().context("plugins is not a list")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.is_empty() {
        bail!("no plugin to chain after");
    }
    plugins.push(entry);
    Ok(list)
}

/// The cluster CNI's configuration: the first `*.conflist`/`*.conf`/`*.json` by name.
pub fn cluster_conf(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    files.retain(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"));
    files.sort();
    Ok(files.into_iter().next())
}

fn write_kubeconfig(sa_dir: &Path, state_dir: &Path, conf_dir: &Path) -> anyhow::Result<PathBuf> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").context("KUBERNETES_SERVICE_HOST not set")?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    refresh_credentials(sa_dir, state_dir)?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{host}:{port}\n    certificate-authority: {ca}\nusers:\n- name: selvedge-cni\n  user:\n    tokenFile: {token}\ncontexts:\n- name: selvedge-cni\n  context: {{cluster: local, user: selvedge-cni}}\ncurrent-context: selvedge-cni\n",
        ca = state_dir.join(CA_NAME).display(),
        token = state_dir.join(TOKEN_NAME).display(),
    );
    let path = conf_dir.join(KUBECONFIG_NAME);
    write_atomically(&path, text.as_bytes(), 0o600)?;
    Ok(path)
}

/// Copy the ServiceAccount token and CA to the state directory (the agent calls this
/// periodically: projected tokens rotate).
pub fn refresh_credentials(sa_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
    copy_atomically(&sa_dir.join("token"), &state_dir.join(TOKEN_NAME), 0o600)?;
    copy_atomically(&sa_dir.join("ca.crt"), &state_dir.join(CA_NAME), 0o644)
}

fn copy_atomically(src: &Path, dst: &Path, mode: u32) -> anyhow::Result<()> {
    let body = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
    write_atomically(dst, &body, mode)
}

fn write_atomically(dst: &Path, body: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = dst.with_extension("selvedge-tmp");
    std::fs::write(&tmp, body).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("install {}", dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_last_once_and_converts_a_single_conf() {
        let flannel = json!({"name": "cbr0", "cniVersion": "1.0.0", "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true}}, {"type": "portmap", "capabilities": {"portMappings": true}}]});
        let entry = plugin_entry(Path::new("/var/run/selvedge/cni.sock"), None, "selvedge.dev/mesh");
        let once = chain(flannel, entry.clone()).unwrap();
        let twice = chain(once.clone(), entry.clone()).unwrap();
        assert_eq!(once, twice, "re-running the installer does not chain twice");
        let types: Vec<&str> =
            once["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["flannel", "portmap", PLUGIN_TYPE]);
        let single = json!({"cniVersion": "0.4.0", "name": "br", "type": "bridge", "ipam": {"type": "host-local"}});
        let list = chain(single, entry.clone()).unwrap();
        assert_eq!(list["name"], "br");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert!(chain(json!({"name": "x", "cniVersion": "1.0.0", "plugins": []}), entry).is_err());
    }

    #[test]
    fn the_guard_rechains_a_rewritten_conf_once() {
        let dir = std::env::temp_dir().join(format!("selvedge-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flannel = json!({"name": "cbr0", "cniVersion": "1.0.0", "plugins": [{"type": "flannel"}]});
        let file = dir.join("10-flannel.conflist");
        std::fs::write(&file, flannel.to_string()).unwrap();
        let state = Path::new("/var/run/selvedge");
        assert_eq!(ensure_chained(&dir, state, "m").unwrap(), Some(file.clone()), "missing: re-chained");
        assert_eq!(ensure_chained(&dir, state, "m").unwrap(), None, "present: left alone");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(v["plugins"][1]["agentSocket"], "/var/run/selvedge/cni.sock");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_the_agents_seccomp_profile_for_the_kubelet() {
        let dir = std::env::temp_dir().join(format!("selvedge-seccomp-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = install_seccomp_profile(&dir.join("selvedge")).unwrap();
        assert_eq!(path, dir.join("selvedge").join(AGENT_SECCOMP_NAME));
        let written: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written["defaultAction"], "SCMP_ACT_ERRNO", "deny by default");
        // Again (a restarted init container): replaced, not refused.
        install_seccomp_profile(&dir.join("selvedge")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
