//! The inspection views that combine what the agent publishes: the mesh-wide workload
//! list, certificates with their state and the trust bundle, connections as their apps see
//! them, and eBPF links named by their pod (pure: JSON in, JSON out).

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Every workload the agent knows — the directory's peers, local and remote, one row per
/// workload with all its IPs — with this node's own marked (`here`: enrolled, or why
/// not). Local ones not in the directory yet (waiting for their netns) are listed too.
/// `node` keeps only that node's.
pub fn workloads(doc: &Value, node: Option<&str>) -> Value {
    let local = doc["workloads"].as_array().map(Vec::as_slice).unwrap_or_default();
    let here_of = |w: &Value| match w["enrolled"].as_bool() {
        Some(true) => "enrolled".to_string(),
        _ => format!("not enrolled: {}", w["reason"].as_str().unwrap_or("unknown")),
    };
    let mut rows: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    for p in doc["peers"].as_array().into_iter().flatten() {
        let key = (s(&p["namespace"]), s(&p["name"]), s(&p["node"]));
        let row = rows.entry(key).or_insert_with(|| {
            json!({
                "namespace": p["namespace"], "name": p["name"], "workload": p["workload"], "node": p["node"],
                "ips": [], "protocol": p.get("protocol").cloned().unwrap_or_else(|| "HBONE".into()),
                "identity": p["identity"],
                "canonicalService": p["canonicalService"], "canonicalRevision": p["canonicalRevision"],
                "here": null,
            })
        });
        if let Some(ips) = row["ips"].as_array_mut() {
            ips.push(p["ip"].clone());
        }
    }
    for w in local {
        let key = (s(&w["namespace"]), s(&w["name"]), s(&doc["node"]));
        let row = rows.entry(key).or_insert_with(|| {
            json!({
                "namespace": w["namespace"], "name": w.get("name").cloned().unwrap_or_else(|| w["uid"].clone()),
                "workload": null, "node": doc["node"], "ips": w.get("ips").cloned().unwrap_or_else(|| json!([])),
                "protocol": "HBONE", "identity": w["identity"], "here": null,
            })
        });
        row["here"] = here_of(w).into();
        for k in ["uid", "pod_slot", "netns_cookie"] {
            if let Some(v) = w.get(k) {
                row[k] = v.clone();
            }
        }
    }
    rows.into_values().filter(|r| node.is_none_or(|n| r["node"] == n)).collect()
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The certificates and the trust bundle's roots.
pub fn certs(doc: &Value) -> Value {
    json!({"certificates": doc["certificates"], "trust_bundle": doc["trust_bundle"]})
}

/// The open connections with their addresses as the apps see them and their age. An
/// outbound connection's app socket is the pod's (captured, its kernel-side address is
/// loopback; `getsockname` gives the app its pod's address and the same port): its source
/// is shown as the pod's IP of the same family, from the dump.
pub fn connections(conns: &Value, doc: &Value, now_ms: u64) -> Value {
    let pod_ips = |ns: &Value, pod: &Value| -> Vec<std::net::IpAddr> {
        doc["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["namespace"] == *ns && w["name"] == *pod)
            .and_then(|w| w["ips"].as_array())
            .map(|ips| ips.iter().filter_map(|ip| ip.as_str()?.parse().ok()).collect())
            .unwrap_or_default()
    };
    let list = conns.as_array().map(Vec::as_slice).unwrap_or_default();
    list.iter()
        .map(|c| {
            let mut c = c.clone();
            let src: Option<std::net::SocketAddr> = c["src"].as_str().and_then(|a| a.parse().ok());
            if let Some(src) = src.filter(|a| c["direction"] == "outbound" && a.ip().is_loopback()) {
                let ips = pod_ips(&c["namespace"], &c["pod"]);
                if let Some(ip) = ips.iter().find(|ip| ip.is_ipv4() == src.is_ipv4()) {
                    c["src"] = std::net::SocketAddr::new(*ip, src.port()).to_string().into();
                }
            }
            if let Some(opened) = c["opened_unix_ms"].as_u64() {
                c["age"] = age(now_ms.saturating_sub(opened) / 1000).into();
            }
            c
        })
        .collect()
}

/// `42s`, `3m05s`, `2h03m`, `4d02h`.
fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// The kernel view, each pinned link with the pod it serves (`pod-<netns cookie>`: a
/// pod's `sk_lookup`, named by the enrolled — or failed and kept closed — workload with
/// that netns cookie).
pub fn bpf(doc: &Value) -> Value {
    let pods: BTreeMap<String, String> = doc["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| {
            let cookie = w["netns_cookie"].as_u64()?;
            let name = w.get("name").unwrap_or(&w["uid"]);
            Some((format!("pod-{cookie}"), format!("{}/{}", s(&w["namespace"]), s(name))))
        })
        .collect();
    let mut kernel = doc["kernel"].clone();
    let program = |link: &str| {
        doc["kernel"]["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["link"] == link)
            .map(|p| p["program"].clone())
    };
    let links: Vec<Value> = doc["kernel"]["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|l| {
            let pod = match (pods.get(l), l.starts_with("pod-")) {
                (Some(p), _) => Value::from(p.as_str()),
                (None, true) => "(no workload known with this netns cookie)".into(),
                (None, false) => Value::Null,
            };
            json!({"link": l, "program": program(l), "pod": pod})
        })
        .collect();
    kernel["links"] = links.into();
    kernel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        json!({
            "node": "n1",
            "workloads": [
                {"uid": "uid-a", "name": "a", "namespace": "lab", "identity": "spiffe://td/ns/lab/sa/a", "ips": ["198.18.1.10", "2001:db8::a"], "netns_cookie": 7, "pod_slot": 0, "enrolled": true},
                {"uid": "uid-b", "name": "b", "namespace": "lab", "ips": ["198.18.1.11"], "enrolled": false, "reason": "no free pod slot", "netns_cookie": 9},
                {"uid": "uid-w", "name": "w", "enrolled": false, "reason": "waiting for its network namespace"}
            ],
            "peers": [
                {"ip": "198.18.1.10", "name": "a", "namespace": "lab", "node": "n1", "identity": "spiffe://td/ns/lab/sa/a", "workload": "a-deploy", "protocol": "HBONE"},
                {"ip": "2001:db8::a", "name": "a", "namespace": "lab", "node": "n1", "identity": "spiffe://td/ns/lab/sa/a", "workload": "a-deploy", "protocol": "HBONE"},
                {"ip": "198.18.1.11", "name": "b", "namespace": "lab", "node": "n1", "identity": "spiffe://td/ns/lab/sa/b", "workload": "b", "protocol": "HBONE"},
                {"ip": "198.18.2.10", "name": "d", "namespace": "lab", "node": "n2", "identity": "spiffe://td/ns/lab/sa/d", "workload": "d", "protocol": "HBONE"}
            ],
            "kernel": {"links": ["capture_connect4", "pod-7", "pod-9", "pod-11"], "programs": [{"link": "pod-7", "program": "steer_inbound"}]}
        })
    }

    #[test]
    fn the_mesh_wide_list_has_one_row_per_workload_with_the_local_ones_marked() {
        let w = workloads(&dump(), None);
        let rows = w.as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["w", "a", "b", "d"], "{w:#}");
        let a = &rows[1];
        assert_eq!(a["ips"], json!(["198.18.1.10", "2001:db8::a"]));
        assert_eq!((a["workload"].as_str(), a["here"].as_str()), (Some("a-deploy"), Some("enrolled")));
        assert_eq!(rows[2]["here"], "not enrolled: no free pod slot");
        assert_eq!((rows[3]["here"].is_null(), rows[3]["protocol"].as_str()), (true, Some("HBONE")));
        let n2 = workloads(&dump(), Some("n2"));
        assert_eq!(n2.as_array().map(Vec::len), Some(1), "{n2:#}");
    }

    #[test]
    fn an_outbound_source_is_the_pods_address_as_its_app_sees_it() {
        let conns = json!([
            {"direction": "outbound", "pod": "a", "namespace": "lab", "src": "127.0.0.1:51038", "dst": "198.18.2.10:7000", "opened_unix_ms": 1_000},
            {"direction": "outbound", "pod": "a", "namespace": "lab", "src": "[::1]:4000", "dst": "[2001:db8::d]:7000", "opened_unix_ms": 1_000},
            {"direction": "inbound", "pod": "a", "namespace": "lab", "src": "198.18.2.10:40000", "dst": "198.18.1.10:80", "opened_unix_ms": 1_000}
        ]);
        let c = connections(&conns, &dump(), 3_726_000);
        assert_eq!(c[0]["src"], "198.18.1.10:51038");
        assert_eq!(c[1]["src"], "[2001:db8::a]:4000");
        assert_eq!(c[2]["src"], "198.18.2.10:40000", "inbound: as delivered");
        assert_eq!((c[0]["pod"].as_str(), c[0]["age"].as_str()), (Some("a"), Some("1h02m")));
        assert_eq!((age(59), age(61), age(90_000)), ("59s".into(), "1m01s".into(), "1d01h".into()));
    }

    #[test]
    fn pod_links_are_named_by_their_pod() {
        let k = bpf(&dump());
        let links = k["links"].as_array().unwrap();
        assert_eq!(links[0], json!({"link": "capture_connect4", "program": null, "pod": null}));
        assert_eq!(links[1], json!({"link": "pod-7", "program": "steer_inbound", "pod": "lab/a"}));
        assert_eq!(links[2]["pod"], "lab/b", "a failed pod kept closed has its link too");
        assert!(links[3]["pod"].as_str().is_some_and(|p| p.contains("no workload")));
    }
}
