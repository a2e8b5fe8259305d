//! `selvedge status | workloads | services | policies | certs | connections | bpf | log |
//! version`: read the running agent's admin API (127.0.0.1:15000 in the node's network
//! namespace) and show one view of it as a table, JSON or YAML.

mod views;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Status,
    Workloads,
    Services,
    Policies,
    Certs,
    Connections,
    Bpf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// What narrows a view: `--node` (workloads).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "cannot reach the admin API at {addr}: {source} (is the agent running? the admin API listens on \
         loopback only: run this on the node, in the agent's network namespace)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("the agent at {addr} refused: {detail}")]
    Refused { addr: SocketAddr, detail: String },
}

/// One request to the admin API: the status code and the body.
fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), InspectError> {
    let err = |detail: String| InspectError::Protocol { addr, detail };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| InspectError::Connect { addr, source })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| err("malformed HTTP response".into()))?;
    let status =
        head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| err(format!("bad status line: {head}")))?;
    Ok((status, body.to_string()))
}

/// GET `path` from the admin API and parse the JSON body.
pub fn fetch(addr: SocketAddr, path: &str) -> Result<Value, InspectError> {
    let err = |detail: String| InspectError::Protocol { addr, detail };
    match request(addr, "GET", path)? {
        (200, body) => serde_json::from_str(&body).map_err(|e| err(format!("bad JSON: {e}"))),
        (status, body) => Err(err(format!("GET {path}: {status} {}", body.trim()))),
    }
}

/// Fetch and render one view.
pub fn show(addr: SocketAddr, view: View, output: Output, filter: &Filter) -> Result<String, InspectError> {
    let doc = fetch(addr, "/config_dump")?;
    let v = match view {
        View::Connections => {
            let conns = fetch(addr, "/connections")?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            views::connections(&conns, &doc, u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
        }
        View::Workloads => views::workloads(&doc, filter.node.as_deref()),
        _ => select(view, &doc),
    };
    Ok(format_view(view, &v, output))
}

/// `selvedge log [LEVEL]`: set the running agent's log filter (when `level` is given), and
/// show the one in force.
pub fn log_level(addr: SocketAddr, level: Option<&str>, output: Output) -> Result<String, InspectError> {
    if let Some(level) = level {
        let path = format!("/logging?level={}", percent_encode(level));
        match request(addr, "POST", &path)? {
            (200, _) => {}
            (404, _) => {
                return Err(InspectError::Protocol {
                    addr,
                    detail: "no /logging endpoint (not a Selvedge agent?)".into(),
                })
            }
            (_, body) => return Err(InspectError::Refused { addr, detail: body.trim().to_string() }),
        }
    }
    let now = fetch(addr, "/logging")?;
    Ok(match output {
        Output::Table => format!("log level: {}\n", cell(&now["level"])),
        _ => plain(&now, output),
    })
}

/// Every byte but the unreserved ones (RFC 3986) as `%XX`.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `selvedge version`: this binary's version and commit, and the running agent's. The
/// text, and whether an agent answered (the command fails when none did).
pub fn version(addr: SocketAddr, output: Output) -> (String, bool) {
    let client = super::admin::version();
    let agent = fetch(addr, "/version").map_err(|e| match e {
        InspectError::Protocol { detail, .. } if detail.contains(" 404 ") => {
            format!("the agent at {addr} does not serve /version (it is older than this command)")
        }
        InspectError::Connect { source, .. } => format!("no agent answers at {addr}: {source}"),
        other => other.to_string(),
    });
    let answered = agent.is_ok();
    let text = match output {
        Output::Table => {
            let line =
                |who: &str, v: &Value| format!("{who:<7} {} (commit {})\n", cell(&v["version"]), cell(&v["commit"]));
            line("client", &client)
                + &match &agent {
                    Ok(a) => line("agent", a),
                    Err(e) => format!("agent   {e}\n"),
                }
        }
        _ => {
            let mut doc = serde_json::json!({"client": client, "agent": agent.as_ref().ok()});
            if let Err(e) = &agent {
                doc["agent_error"] = e.clone().into();
            }
            plain(&doc, output)
        }
    };
    (text, answered)
}

/// The part of the document a view shows.
fn select(view: View, doc: &Value) -> Value {
    match view {
        View::Status => {
            let mut s = serde_json::Map::new();
            for k in [
                "node",
                "ready",
                "not_ready",
                "generation",
                "config_rejected_total",
                "config_last_rejected",
                "trust_domain",
                "pooled_hbone_connections",
            ] {
                s.insert(k.into(), doc[k].clone());
            }
            let enrolled = doc["workloads"].as_array().map(|w| w.iter().filter(|x| x["enrolled"] == true).count());
            s.insert("enrolled_workloads".into(), enrolled.into());
            s.insert(
                "failed_workloads".into(),
                doc["workloads"].as_array().map(|w| w.len()).zip(enrolled).map(|(a, b)| a - b).into(),
            );
            s.insert("counters".into(), doc["kernel"]["counters"].clone());
            Value::Object(s)
        }
        View::Workloads => views::workloads(doc, None),
        View::Services => doc["services"].clone(),
        View::Policies => doc["policies"].clone(),
        View::Certs => views::certs(doc),
        View::Connections => doc.clone(),
        View::Bpf => views::bpf(doc),
    }
}

/// Render one view of a `/config_dump` document (`connections` takes the `/connections`
/// list as it comes).
pub fn render(view: View, doc: &Value, output: Output) -> String {
    format_view(view, &select(view, doc), output)
}

fn format_view(view: View, v: &Value, output: Output) -> String {
    match output {
        Output::Table => table_for(view, v),
        _ => plain(v, output),
    }
}

/// JSON or YAML.
fn plain(v: &Value, output: Output) -> String {
    match output {
        Output::Yaml => serde_yaml_ng::to_string(v).unwrap_or_default(),
        _ => serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn rows(v: &Value, cols: &[&str]) -> Vec<Vec<String>> {
    v.as_array().map(|a| a.iter().map(|r| cols.iter().map(|c| cell(&r[*c])).collect()).collect()).unwrap_or_default()
}

/// Left-aligned columns, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

fn table_for(view: View, v: &Value) -> String {
    let t = |headers: &[&str], cols: &[&str]| table(headers, &rows(v, cols));
    match view {
        View::Status => {
            let mut out = String::new();
            if let Some(o) = v.as_object() {
                for (k, val) in o {
                    match (k.as_str(), val) {
                        ("counters", _) => {}
                        ("config_last_rejected", Value::Object(r)) => {
                            out += &format!(
                                "{k:<26} {} (at unix {}; generation {} stays in force)\n",
                                cell(&r["reason"]),
                                cell(&r["at"]),
                                cell(&r["kept_generation"])
                            );
                        }
                        _ => out += &format!("{k:<26} {}\n", cell(val)),
                    }
                }
                if let Some(c) = o.get("counters").and_then(Value::as_object) {
                    for (k, val) in c {
                        out += &format!("kernel.{k:<19} {}\n", cell(val));
                    }
                }
            }
            out
        }
        View::Workloads => t(
            &["NAMESPACE", "NAME", "WORKLOAD", "NODE", "IPS", "PROTOCOL", "IDENTITY", "HERE"],
            &["namespace", "name", "workload", "node", "ips", "protocol", "identity", "here"],
        ),
        View::Services => t(&["VIP", "NAME", "HOSTNAME", "ENDPOINTS"], &["vip", "name", "hostname", "endpoints"]),
        View::Policies => t(
            &["KIND", "NAMESPACE", "NAME", "MODE", "SELECTS", "APPLIES"],
            &["kind", "namespace", "name", "mode", "selects", "applies"],
        ),
        View::Certs => {
            let mut out = table(
                &["IDENTITY", "SERIAL", "NOT_BEFORE", "NOT_AFTER", "STATE", "LAST_ERROR"],
                &rows(
                    &v["certificates"],
                    &["identity", "serial", "not_before_utc", "not_after_utc", "state", "last_error"],
                ),
            );
            let bundle = &v["trust_bundle"];
            out += &format!("\nTRUST BUNDLE ({})\n", cell(&bundle["file"]));
            if let Some(e) = bundle["error"].as_str() {
                out += &format!("  cannot read it: {e}\n");
            }
            out += &table(
                &["ROOT", "SERIAL", "NOT_AFTER"],
                &rows(&bundle["roots"], &["subject", "serial", "not_after_utc"]),
            );
            out
        }
        View::Connections => {
            let mut rows = rows(
                v,
                &["direction", "namespace", "pod", "src", "dst", "security", "src_identity", "dst_identity", "age"],
            );
            for r in &mut rows {
                let pod = r.remove(2);
                r[1] = format!("{}/{pod}", r[1]);
            }
            table(&["DIRECTION", "POD", "SRC", "DST", "SECURITY", "SRC_IDENTITY", "DST_IDENTITY", "AGE"], &rows)
        }
        View::Bpf => {
            let mut out = format!(
                "pin dir: {}\ncgroup:  {}\nfast path: {}\n\n",
                cell(&v["pin_dir"]),
                cell(&v["cgroup"]),
                cell(&v["fast_path"])
            );
            out += &table(&["LINK", "PROGRAM", "POD"], &rows(&v["links"], &["link", "program", "pod"]));
            out += "\n";
            out += &table(&["MAP", "ENTRIES", "CAPACITY"], &rows(&v["maps"], &["name", "entries", "capacity"]));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        serde_json::json!({
            "node": "n1", "ready": true, "generation": 2, "trust_domain": "td", "pooled_hbone_connections": 1,
            "workloads": [
                {"name": "a", "namespace": "shop", "identity": "spiffe://td/ns/shop/sa/a", "ips": ["198.18.1.10"], "pod_slot": 0, "enrolled": true},
                {"uid": "b", "enrolled": false, "reason": "no free pod slot"}
            ],
            "services": [], "policies": [], "certificates": [{"identity": "spiffe://td/ns/shop/sa/a", "not_after": 1, "state": "expired", "last_error": null}],
            "trust_bundle": {"file": "/ca/root-cert.pem", "roots": [{"subject": "CN=root", "serial": "01", "not_after_utc": "2036-01-01T00:00:00Z"}]},
            "kernel": {"pin_dir": "/sys/fs/bpf/selvedge", "links": ["capture_connect4"], "programs": [{"link": "capture_connect4", "program_id": 7, "program": "capture_connect", "type": "BPF_PROG_TYPE_CGROUP_SOCK_ADDR"}], "maps": [{"name": "SV_ENROLLED", "entries": 1, "capacity": 4}], "counters": {"captured": 3}}
        })
    }

    #[test]
    fn status_shows_a_refused_config_with_its_reason_and_the_generation_in_force() {
        let mut d = dump();
        d["config_rejected_total"] = 3.into();
        d["config_last_rejected"] =
            serde_json::json!({"reason": "config /x: the file is empty", "at": 17, "kept_generation": 2});
        let status = render(View::Status, &d, Output::Table);
        assert!(status.contains("config_rejected_total      3"), "{status}");
        assert!(status.contains("the file is empty (at unix 17; generation 2 stays in force)"), "{status}");
        let j: Value = serde_json::from_str(&render(View::Status, &d, Output::Json)).unwrap();
        assert_eq!(j["config_last_rejected"]["kept_generation"], 2);
    }

    #[test]
    fn renders_each_view_in_each_format() {
        let d = dump();
        let status = render(View::Status, &d, Output::Table);
        assert!(status.contains("enrolled_workloads") && status.contains("kernel.captured"), "{status}");
        let w = render(View::Workloads, &d, Output::Table);
        assert!(
            w.starts_with("NAME") && w.contains("spiffe://td/ns/shop/sa/a") && w.contains("no free pod slot"),
            "{w}"
        );
        let bpf = render(View::Bpf, &d, Output::Table);
        assert!(bpf.contains("capture_connect4") && bpf.contains("SV_ENROLLED"), "{bpf}");
        let j: Value = serde_json::from_str(&render(View::Certs, &d, Output::Json)).unwrap();
        assert_eq!(j["certificates"][0]["identity"], "spiffe://td/ns/shop/sa/a");
        let y: Value = serde_yaml_ng::from_str(&render(View::Workloads, &d, Output::Yaml)).unwrap();
        assert_eq!((&y[1]["name"], &y[1]["here"]), (&"a".into(), &"enrolled".into()), "{y:?}");
        let certs = render(View::Certs, &d, Output::Table);
        assert!(certs.contains("STATE") && certs.contains("expired") && certs.contains("CN=root"), "{certs}");
    }

    #[test]
    fn log_filters_are_sent_encoded() {
        assert_eq!(percent_encode("selvedge=trace,info"), "selvedge%3Dtrace%2Cinfo");
        assert_eq!(percent_encode("debug"), "debug");
    }

    #[test]
    fn version_says_when_no_agent_answers() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (text, answered) = version(free, Output::Table);
        assert!(!answered);
        assert!(text.starts_with("client  ") && text.contains("no agent answers at"), "{text}");
        let (json, _) = version(free, Output::Json);
        let j: Value = serde_json::from_str(&json).unwrap();
        assert_eq!((j["client"]["version"].as_str(), j["agent"].is_null()), (Some(env!("CARGO_PKG_VERSION")), true));
    }
}
