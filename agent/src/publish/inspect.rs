//! `selvedge status | workloads | services | policies | certs | connections | bpf`: read the
//! running agent's admin API (127.0.0.1:15000 in the node's network namespace) and show one
//! view of it as a table, JSON or YAML.

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
}

/// GET `path` from the admin API and parse the JSON body.
pub fn fetch(addr: SocketAddr, path: &str) -> Result<Value, InspectError> {
    let err = |detail: String| InspectError::Protocol { addr, detail };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| InspectError::Connect { addr, source })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| err("malformed HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(err(head.lines().next().unwrap_or_default().to_string()));
    }
    serde_json::from_str(body).map_err(|e| err(format!("bad JSON: {e}")))
}

/// Fetch and render one view.
pub fn show(addr: SocketAddr, view: View, output: Output) -> Result<String, InspectError> {
    let doc = match view {
        View::Connections => fetch(addr, "/connections")?,
        _ => fetch(addr, "/config_dump")?,
    };
    Ok(render(view, &doc, output))
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
        View::Workloads => doc["workloads"].clone(),
        View::Services => doc["services"].clone(),
        View::Policies => doc["policies"].clone(),
        View::Certs => doc["certificates"].clone(),
        View::Connections => doc.clone(),
        View::Bpf => doc["kernel"].clone(),
    }
}

pub fn render(view: View, doc: &Value, output: Output) -> String {
    let v = select(view, doc);
    match output {
        Output::Json => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        Output::Yaml => serde_yaml_ng::to_string(&v).unwrap_or_default(),
        Output::Table => table_for(view, &v),
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
            &["NAME", "NAMESPACE", "IDENTITY", "IPS", "SLOT", "ENROLLED", "REASON"],
            &["name", "namespace", "identity", "ips", "pod_slot", "enrolled", "reason"],
        ),
        View::Services => t(&["VIP", "NAME", "HOSTNAME", "ENDPOINTS"], &["vip", "name", "hostname", "endpoints"]),
        View::Policies => t(
            &["KIND", "NAMESPACE", "NAME", "MODE", "SELECTS", "APPLIES"],
            &["kind", "namespace", "name", "mode", "selects", "applies"],
        ),
        View::Certs => t(&["IDENTITY", "NOT_AFTER", "LAST_ERROR"], &["identity", "not_after", "last_error"]),
        View::Connections => t(
            &["ID", "DIRECTION", "POD", "SRC", "DST", "SECURITY", "SRC_IDENTITY", "DST_IDENTITY"],
            &["id", "direction", "pod", "src", "dst", "security", "src_identity", "dst_identity"],
        ),
        View::Bpf => {
            let mut out = format!(
                "pin dir: {}\ncgroup:  {}\nfast path: {}\n\nLINKS\n",
                cell(&v["pin_dir"]),
                cell(&v["cgroup"]),
                cell(&v["fast_path"])
            );
            for l in v["links"].as_array().into_iter().flatten() {
                out += &format!("  {}\n", cell(l));
            }
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
            "services": [], "policies": [], "certificates": [{"identity": "spiffe://td/ns/shop/sa/a", "not_after": 1, "last_error": null}],
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
        assert_eq!(j[0]["identity"], "spiffe://td/ns/shop/sa/a");
        let y: Value = serde_yaml_ng::from_str(&render(View::Workloads, &d, Output::Yaml)).unwrap();
        assert_eq!(y[0]["name"], "a");
    }
}
