//! `selvedge-cni`, chained after the cluster's CNI plugin (CNI spec 1.0).
//!
//! * ADD: tells the agent the pod's netns and addresses and waits until the agent has
//!   captured it (or says the pod is not meshed); passes the previous result on. If the
//!   agent cannot be reached it asks the API server (kubeconfig in the plugin's config)
//!   whether the pod must be meshed: if so, or if that cannot be told, ADD fails and the
//!   pod does not start unmeshed.
//! * DEL: tells the agent (best effort: DEL must succeed, a gone agent is no reason to
//!   keep a sandbox).
//! * CHECK: asks the agent whether the pod is as it should be.
//! * VERSION: the versions understood.
//!
//! `selvedge-cni install` (the DaemonSet's init container) installs the binary and chains
//! it into the node's CNI configuration: see `install.rs`.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{PodRef, Request, Response, SOCKET_NAME};

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_STATE_DIR: &str = "/var/run/selvedge";

/// CNI error codes: 7 invalid network config, 11 try again later (spec); 100+ are ours.
const ERR_CONFIG: u32 = 7;
const ERR_TRY_LATER: u32 = 11;
const ERR_REFUSED: u32 = 100;

/// The plugin's entry in the chained network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    #[serde(default = "default_version")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The agent's socket (default `/var/run/selvedge/cni.sock`).
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// For the API lookup when the agent is unreachable.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub mesh_label: Option<String>,
    /// The previous plugin's result, passed on unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_version() -> String {
    "1.0.0".into()
}

#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }
}

/// What the runtime set in the environment.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`.
    pub pod: Option<PodRef>,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            pod: parse_cni_args(&var("CNI_ARGS")),
        }
    }
}

/// `IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=n;K8S_POD_UID=u` → the pod.
pub fn parse_cni_args(args: &str) -> Option<PodRef> {
    let mut namespace = None;
    let mut name = None;
    let mut uid = None;
    for kv in args.split(';') {
        match kv.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => namespace = Some(v.to_owned()),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => name = Some(v.to_owned()),
            Some(("K8S_POD_UID", v)) if !v.is_empty() => uid = Some(v.to_owned()),
            _ => {}
        }
    }
    Some(PodRef { namespace: namespace?, name: name?, uid })
}

/// The pod's addresses from the previous result (`ips[].address`, CIDR form).
pub fn result_ips(prev: &Value) -> Vec<IpAddr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("install") {
        return match super::install::run(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("selvedge-cni install: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let env = Env::from_process();
    let mut stdin = String::new();
    let outcome = std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| CniError::new(ERR_CONFIG, "cannot read the network configuration", e.to_string()))
        .and_then(|_| handle(&env, &stdin));
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(default_version);
    let mut out = std::io::stdout();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("selvedge-cni {}: {}: {}", env.command, e.msg, e.details);
            let _ =
                writeln!(out, "{}", json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}));
            ExitCode::FAILURE
        }
    }
}

/// One CNI invocation; returns what goes to stdout on success.
pub fn handle(env: &Env, stdin: &str) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})));
    }
    let conf: NetConf = serde_json::from_str(stdin)
        .map_err(|e| CniError::new(ERR_CONFIG, "invalid network configuration", e.to_string()))?;
    let socket = conf.agent_socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR).join(SOCKET_NAME));
    let passthrough = |conf: &NetConf| {
        let mut r = conf.prev_result.clone().unwrap_or_else(|| json!({}));
        r["cniVersion"] = json!(conf.cni_version);
        r
    };
    match env.command.as_str() {
        "ADD" => {
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                CniError::new(ERR_CONFIG, "no prevResult", "selvedge-cni is chained after the cluster's CNI plugin")
            })?;
            // Not a Kubernetes pod (no pod in CNI_ARGS): not ours to mesh.
            let Some(pod) = env.pod.clone() else { return Ok(Some(passthrough(&conf))) };
            let req = Request::Add {
                pod: pod.clone(),
                container_id: env.container_id.clone(),
                netns: PathBuf::from(&env.netns),
                ips: result_ips(prev),
            };
            match ask(&socket, &req) {
                Ok(Response::Meshed { .. } | Response::NotMeshed | Response::Done) => Ok(Some(passthrough(&conf))),
                Ok(Response::Refused { reason }) => Err(CniError::new(ERR_REFUSED, "pod not enrolled", reason)),
                Err(unreachable) => match agent_down_verdict(&conf, &pod) {
                    Ok(false) => Ok(Some(passthrough(&conf))),
                    Ok(true) => Err(CniError::new(
                        ERR_TRY_LATER,
                        "the Selvedge agent is not reachable and this pod must be meshed",
                        format!("pod {pod}: {unreachable}"),
                    )),
                    Err(why) => Err(CniError::new(
                        ERR_TRY_LATER,
                        "the Selvedge agent is not reachable and the API cannot tell whether this pod is meshed",
                        format!("pod {pod}: {unreachable}; {why}"),
                    )),
                },
            }
        }
        "DEL" => {
            if let Some(pod) = env.pod.clone() {
                let req = Request::Del { pod, container_id: env.container_id.clone() };
                if let Err(e) = ask(&socket, &req) {
                    eprintln!("selvedge-cni DEL: agent not told ({e}); it reconciles when it runs");
                }
            }
            Ok(None)
        }
        "CHECK" => {
            let Some(pod) = env.pod.clone() else { return Ok(None) };
            let req = Request::Check { pod, container_id: env.container_id.clone() };
            match ask(&socket, &req) {
                Ok(Response::Refused { reason }) => Err(CniError::new(ERR_REFUSED, "pod not enrolled", reason)),
                Ok(_) => Ok(None),
                Err(e) => Err(CniError::new(ERR_TRY_LATER, "the Selvedge agent is not reachable", e)),
            }
        }
        other => Err(CniError::new(4, "unknown CNI_COMMAND", other.to_owned())),
    }
}

/// One request, one answer; a little longer than the agent's own deadline.
fn ask(socket: &std::path::Path, req: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("agent socket {}: {e}", socket.display()))?;
    let deadline = super::server::ANSWER_TIMEOUT + Duration::from_secs(5);
    s.set_read_timeout(Some(deadline)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| format!("agent socket: {e}"))?;
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer).map_err(|e| format!("agent answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("agent answer {answer:?}: {e}"))
}

/// With the agent down: must this pod be meshed? Asks the API server.
fn agent_down_verdict(conf: &NetConf, pod: &PodRef) -> Result<bool, String> {
    let kubeconfig = conf.kubeconfig.clone().ok_or("no kubeconfig in the plugin configuration")?;
    let key = conf.mesh_label.clone().unwrap_or_else(|| crate::k8s::DEFAULT_MESH_LABEL.into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let lookup = async {
            let client = crate::k8s::client(Some(&kubeconfig)).await?;
            crate::k8s::pod_is_meshed(client, &pod.namespace, &pod.name, &key).await
        };
        match tokio::time::timeout(Duration::from_secs(10), lookup).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the API server did not answer within 10s".into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_and_result_ips() {
        let pod = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=x",
        );
        assert_eq!(pod, Some(PodRef { namespace: "shop".into(), name: "web-0".into(), uid: Some("u-1".into()) }));
        assert_eq!(parse_cni_args("IgnoreUnknown=1"), None);
        let prev = json!({"ips": [{"address": "198.18.1.5/24", "gateway": "198.18.1.1"}, {"address": "fd00::5/64"}]});
        assert_eq!(result_ips(&prev), vec!["198.18.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
    }

    #[test]
    fn version_and_bad_config() {
        let env = Env { command: "VERSION".into(), ..Env::default() };
        let v = handle(&env, "{}").unwrap().unwrap();
        assert!(v["supportedVersions"].as_array().unwrap().iter().any(|x| x == "1.0.0"));
        let add = Env { command: "ADD".into(), ..Env::default() };
        assert_eq!(handle(&add, "not json").unwrap_err().code, ERR_CONFIG);
        let e = handle(&add, r#"{"cniVersion":"1.0.0","name":"n","type":"selvedge-cni"}"#).unwrap_err();
        assert!(e.details.contains("chained"), "{e:?}");
    }

    #[test]
    fn agent_down_without_kubeconfig_fails_closed() {
        let env = Env {
            command: "ADD".into(),
            container_id: "c".into(),
            netns: "/nonexistent".into(),
            pod: Some(PodRef { namespace: "ns".into(), name: "p".into(), uid: None }),
        };
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"selvedge-cni","agentSocket":"/nonexistent/cni.sock","prevResult":{"ips":[]}}"#;
        let e = handle(&env, conf).unwrap_err();
        assert_eq!(e.code, ERR_TRY_LATER, "{e:?}");
        // Not a pod (no CNI_ARGS pod): passed through untouched.
        let other = Env { pod: None, ..env };
        assert!(handle(&other, conf).unwrap().is_some());
    }
}
