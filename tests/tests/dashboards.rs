//! Istio's own dashboards and Kiali's graph, evaluated by Prometheus against what the
//! agents really expose.
//!
//! A client (`web`, namespace `front`) exchanges bytes with a server (`db-6f7c9`, workload
//! `db`, namespace `lab`) on another node through a Service VIP (`postgres`). Both agents'
//! `/metrics` are scraped after the connections closed, turned into a Prometheus unit test
//! (`promtool test rules`: `input_series` and `promql_expr_test`), and each query below —
//! the TCP panels of Istio's workload, service and ztunnel dashboards and Kiali's TCP graph
//! queries, as those projects write them — must return exactly the series and values that
//! traffic implies. Prometheus's own evaluator answers; `promtool` comes from `cargo xtask
//! setup` (`/usr/local/lib/selvedge/promtool`, or `SELVEDGE_PROMTOOL`).
//!
//! The series: each counter as if the lab's exchanges repeated every minute (0 at t=0, the
//! scraped value at 1m, twice it at 2m, …), so every `rate`/`irate` at 15m is the scraped
//! value / 60 s whatever the window; gauges keep their scraped value.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::Path, process::Command};

use selvedge_tests::{sys::wait_for, AgentOptions, Lab, LabService};

/// The request: what the client sends (bytes client → server), per connection.
const UP: u64 = 1_000;
/// The response: what the server sends back (bytes server → client), per connection.
const DOWN: u64 = 50_000;
/// Connections in the scrape (one minute's worth in the series).
const CONNECTIONS: u64 = 3;
const CLUSTER: &str = "lab-cluster";
const SERVICE: &str = "postgres.lab.svc.cluster.local";
const VIP: [u8; 4] = [198, 19, 100, 10];
const SERVICE_PORT: u16 = 80;
const DB_PORT: u16 = 5432;
/// When every query is evaluated (minutes of series): inside every window used.
const EVAL_MINUTES: u32 = 15;
/// How many minutes of series there are.
const SERIES_MINUTES: u32 = 30;

/// Where `cargo xtask setup` puts promtool (xtask/src/setup.rs).
const SETUP_PROMTOOL: &str = "/usr/local/lib/selvedge/promtool";

fn promtool() -> String {
    let candidates = [std::env::var("SELVEDGE_PROMTOOL").ok(), Some(SETUP_PROMTOOL.to_string())];
    for c in candidates.into_iter().flatten() {
        if Command::new(&c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return c;
        }
    }
    panic!(
        "promtool not found at {SETUP_PROMTOOL} (nor $SELVEDGE_PROMTOOL): run `cargo xtask setup`, which \
         extracts it from Debian's prometheus package"
    );
}

/// One sample of a text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
    counter: bool,
}

/// Parse a Prometheus (or OpenMetrics) text exposition. Counters are the samples of a
/// family whose `# TYPE` is counter (OpenMetrics names them `<family>_total`).
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut counters: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(family), Some("counter")) = (parts.next(), parts.next()) {
                counters.push(family.to_string());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("bad exposition line {line:?}"),
        };
        let (labels, rest) = if let Some(body) = rest.strip_prefix('{') {
            parse_labels(body).unwrap_or_else(|| panic!("bad labels in {line:?}"))
        } else {
            (Vec::new(), rest)
        };
        let value: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        if !value.is_finite() || name.ends_with("_created") {
            continue;
        }
        let counter =
            counters.iter().any(|f| name == f || name.strip_prefix(f.as_str()).is_some_and(|s| s == "_total"));
        out.push(Sample { name: name.to_string(), labels, value, counter });
    }
    out
}

/// `a="x",b="y"}` → the pairs (escapes undone) and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        s = &s[eq + 1 + 1 + end + 1..];
        labels.push((key, value));
    }
}

/// A label value as PromQL writes it.
fn quote(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// The labels Prometheus attaches to what it scrapes from one agent, as Istio's
/// `kubernetes-pods` job does (pod labels mapped over, plus `namespace` and `pod`). Istio's
/// ztunnel dashboard finds node proxies by these target labels (`pod=~"ztunnel-.*"`,
/// `app="ztunnel"`), not by anything the proxy exposes: the series are labelled as
/// ztunnel's DaemonSet pods would be.
fn target_labels(node: &str, node_index: u8) -> Vec<(String, String)> {
    [
        ("job", "kubernetes-pods".to_string()),
        ("instance", format!("198.19.0.{node_index}:15020")),
        ("namespace", "istio-system".to_string()),
        ("pod", format!("ztunnel-{node}")),
        ("app", "ztunnel".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// promtool `input_series` for one scrape: target labels added (an exposed label of the same
/// name becomes `exported_<name>`, Prometheus's default), counters ramping by their scraped
/// value every minute, gauges constant.
fn input_series(samples: &[Sample], target: &[(String, String)]) -> Vec<serde_json::Value> {
    samples
        .iter()
        .map(|s| {
            let mut labels: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in &s.labels {
                let k = if target.iter().any(|(t, _)| t == k) { format!("exported_{k}") } else { k.clone() };
                labels.insert(k, v.clone());
            }
            labels.extend(target.iter().cloned());
            let body: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
            let values = if s.counter {
                format!("0+{}x{SERIES_MINUTES}", s.value)
            } else {
                format!("{}+0x{SERIES_MINUTES}", s.value)
            };
            serde_json::json!({"series": format!("{}{{{}}}", s.name, body.join(",")), "values": values})
        })
        .collect()
}

/// One query and what it must return.
struct Check {
    /// Where the query comes from: dashboard and panel, or Kiali's code.
    from: &'static str,
    expr: String,
    /// Each expected series (labels in PromQL form) and value; empty: no series at all.
    expect: Vec<(String, f64)>,
}

/// Put Grafana's template variables into a dashboard's query text (longest names first, so
/// `$__rate_interval` is not taken for `$__interval`…).
fn grafana(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut vars = vars.to_vec();
    vars.push(("__rate_interval", "5m"));
    vars.push(("__interval", "1m"));
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = expr.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${k}"), v);
    }
    assert!(!out.contains('$'), "a template variable was left in {out}");
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
    format!("{{{}}}", body.join(", "))
}

/// Run one check through promtool; Err(promtool's report) when it fails.
fn evaluate(promtool: &str, dir: &Path, n: usize, series: &[serde_json::Value], check: &Check) -> Result<(), String> {
    let samples: Vec<serde_json::Value> =
        check.expect.iter().map(|(l, v)| serde_json::json!({"labels": l, "value": v})).collect();
    // JSON is YAML: promtool reads it as its unit-test file.
    let test = serde_json::json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [{"expr": check.expr, "eval_time": format!("{EVAL_MINUTES}m"), "exp_samples": samples}],
        }],
    });
    let file = dir.join(format!("promql-{n:02}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(&test).expect("serialize")).expect("write the promtool test");
    let out = Command::new(promtool).args(["test", "rules"]).arg(&file).output().expect("run promtool");
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn metrics(lab: &Lab, node: &str) -> String {
    let (status, body) =
        lab.http_on_node(node, SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics").expect("metrics endpoint");
    assert_eq!(status, 200, "{node} /metrics: {body}");
    body
}

#[test]
fn istio_dashboards_and_kiali_show_the_lab_traffic() {
    let promtool = promtool();
    let mut lab = Lab::new("dashboards");
    lab.node("n1").node("n2");
    // The client: a bare pod (its workload is itself), canonical service from `app`,
    // revision from `version`.
    lab.pod("n1", "web", true);
    lab.set_namespace("web", "front");
    lab.set_labels("web", &[("version", "v1")]);
    // The server: a Deployment's pod; `app.kubernetes.io/*` outrank `app` (the lab's, the
    // pod's name) and `version`.
    lab.pod("n2", "db-6f7c9", true);
    lab.set_role("db-6f7c9", "db");
    lab.set_workload_name("db-6f7c9", "db");
    lab.set_labels(
        "db-6f7c9",
        &[("app.kubernetes.io/name", "database"), ("app.kubernetes.io/version", "v2"), ("version", "v0")],
    );
    lab.services.push(LabService {
        name: "postgres".into(),
        vip: VIP.into(),
        port: SERVICE_PORT,
        target_port: DB_PORT,
        role: "db".into(),
    });
    let opts = AgentOptions { extra_args: vec!["--cluster-id".into(), CLUSTER.into()], ..AgentOptions::default() };
    lab.start_agent("n1", opts.clone());
    lab.start_agent("n2", opts);
    lab.serve_args("db-6f7c9", &["respond", &DB_PORT.to_string()]);

    let service = SocketAddr::from((VIP, SERVICE_PORT));
    for i in 0..CONNECTIONS {
        let mut app = Command::new(&lab.env.app);
        app.args(["exchange", &service.to_string(), &UP.to_string(), &DOWN.to_string()]);
        let out = lab.run_in_pod("web", app);
        let report: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("exchange {i}: bad report {out:?}: {e}"));
        assert!(
            report["sent"] == UP && report["received"] == DOWN && report["end"] == "eof",
            "exchange {i} through {service}: {report}"
        );
    }
    // Both legs of every connection closed (the destination logs when its side ends).
    for (node, direction) in [("n1", "outbound"), ("n2", "inbound")] {
        wait_for(10, &format!("{CONNECTIONS} closed {direction} connections on {node}"), || {
            let closed = lab
                .agent_ref(node)
                .access_log()
                .into_iter()
                .filter(|e| e["direction"] == direction && e["message"] == "connection closed")
                .count();
            (closed as u64 >= CONNECTIONS).then_some(())
        });
    }
    std::thread::sleep(std::time::Duration::from_millis(500));

    let scrapes = [("n1", metrics(&lab, "n1")), ("n2", metrics(&lab, "n2"))];
    let mut series = Vec::new();
    for (node, text) in &scrapes {
        series.extend(input_series(&parse_exposition(text), &target_labels(node, lab.node_index(node))));
    }
    let version = Command::new(&lab.env.selvedge).arg("--version").output().expect("selvedge --version");
    let version = String::from_utf8_lossy(&version.stdout).split_whitespace().last().unwrap_or_default().to_string();

    let checks = checks(&version);
    let mut failures = String::new();
    for (n, check) in checks.iter().enumerate() {
        if let Err(report) = evaluate(&promtool, &lab.dir, n, &series, check) {
            let _ = writeln!(failures, "\n[{}]\n{}", check.from, report.trim_end());
        }
    }
    if !failures.is_empty() {
        let mut exposed = String::new();
        for (node, text) in &scrapes {
            for line in text.lines().filter(|l| l.starts_with("istio_")) {
                let _ = writeln!(exposed, "  {node}: {line}");
            }
        }
        panic!(
            "{} of {} dashboard and Kiali queries are wrong (evaluated at {EVAL_MINUTES}m; counters ramp by the \
             scraped value each minute, so a rate is the scrape / 60 s: {CONNECTIONS} connections each sending \
             {UP} B and receiving {DOWN} B make istio_tcp_received_bytes_total {} B/s and istio_tcp_sent_bytes_total \
             {} B/s on each reporter):{failures}\n\nWhat the agents expose (istio_*):\n{exposed}",
            failures.matches("\n[").count(),
            checks.len(),
            rate(UP),
            rate(DOWN),
        );
    }
}

/// Bytes (or connections) per connection, as a per-second rate over the series.
fn rate(per_connection: u64) -> f64 {
    (CONNECTIONS * per_connection) as f64 / 60.0
}

/// A counter's value at the evaluation time, summed over `reporters` agents.
fn total(per_connection: u64, reporters: u64) -> f64 {
    (CONNECTIONS * per_connection * u64::from(EVAL_MINUTES) * reporters) as f64
}

fn checks(version: &str) -> Vec<Check> {
    let (sent, received, conns) = (rate(DOWN), rate(UP), rate(1));
    let client = [("source_workload", "web"), ("source_workload_namespace", "front")];
    let server = [("destination_workload", "db"), ("destination_workload_namespace", "lab")];
    let svc = [("destination_service", SERVICE)];
    let per_pod = |v: f64| vec![(labels(&[("pod", "ztunnel-n1")]), v), (labels(&[("pod", "ztunnel-n2")]), v)];

    // Istio's dashboards: manifests/addons/dashboards/ in istio/istio (istio-workload-dashboard.json,
    // istio-service-dashboard.json, ztunnel-dashboard.gen.json), the TCP panels' `expr` as written
    // there, and the `query_result(...)` inside some template variables. The variables are set
    // as a user picking the workload or service would (each dashboard's default `qrep`,
    // destination; "All" for the multi-value filters is the one value there is).
    let db_page = [
        ("namespace", "lab"),
        ("workload", "db"),
        ("qrep", "destination"),
        ("srcns", "front"),
        ("srcwl", "web"),
        ("dstsvc", SERVICE),
    ];
    let web_page = [("namespace", "front"), ("workload", "web"), ("qrep", "destination"), ("dstsvc", SERVICE)];
    let service_page = [
        ("service", SERVICE),
        ("qrep", "destination"),
        ("srcns", "front"),
        ("srcwl", "web"),
        ("dstns", "lab"),
        ("dstwl", "db"),
        ("dstcluster", CLUSTER),
    ];
    let mut checks = vec![
        Check {
            from: "Istio Workload Dashboard: variable `workload` (namespace lab)",
            expr: grafana(
                r#"(sum(istio_requests_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_requests_total{source_workload_namespace=~"$namespace"}) by (source_workload)) or (sum(istio_tcp_sent_bytes_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{source_workload_namespace=~"$namespace"}) by (source_workload))"#,
                &db_page,
            ),
            expect: vec![(labels(&[("destination_workload", "db")]), total(DOWN, 2))],
        },
        Check {
            from: "Istio Workload Dashboard (db): TCP Server Traffic",
            expr: grafana(
                r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval]))"#,
                &db_page,
            ),
            expect: vec![(labels(&[]), sent + received)],
        },
        Check {
            from: "Istio Workload Dashboard (db): Bytes Received from Incoming TCP Connection (mTLS)",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
                &db_page,
            ),
            expect: vec![(labels(&client), received)],
        },
        Check {
            from: "Istio Workload Dashboard (db): Bytes Received from Incoming TCP Connection (plaintext: none)",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy!="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
                &db_page,
            ),
            expect: vec![],
        },
        Check {
            from: "Istio Workload Dashboard (db): Bytes Sent to Incoming TCP Connection (mTLS)",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
                &db_page,
            ),
            expect: vec![(labels(&client), sent)],
        },
        Check {
            from: "Istio Workload Dashboard (web): TCP Client Traffic",
            expr: grafana(
                r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval]))"#,
                &web_page,
            ),
            expect: vec![(labels(&[]), sent + received)],
        },
        Check {
            from: "Istio Workload Dashboard (web): variable `dstsvc`",
            expr: grafana(
                r#"sum(istio_requests_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service) or sum(istio_tcp_sent_bytes_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service)"#,
                &web_page,
            ),
            expect: vec![(labels(&svc), total(DOWN, 1))],
        },
        Check {
            from: "Istio Workload Dashboard (web): Bytes Sent on Outgoing TCP Connection (mTLS)",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_received_bytes_total{connection_security_policy="mutual_tls", reporter="source", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)"#,
                &web_page,
            ),
            expect: vec![(labels(&svc), received)],
        },
        Check {
            from: "Istio Workload Dashboard (web): Bytes Received from Outgoing TCP Connection (mTLS)",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_sent_bytes_total{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)"#,
                &web_page,
            ),
            expect: vec![(labels(&svc), sent)],
        },
        Check {
            from: "Istio Service Dashboard: variable `service`",
            expr: grafana(
                r#"sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service)"#,
                &service_page,
            ),
            expect: vec![(labels(&svc), total(DOWN, 2))],
        },
        Check {
            from: "Istio Service Dashboard: TCP Received Bytes",
            expr: grafana(
                r#"sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))"#,
                &service_page,
            ),
            expect: vec![(labels(&[]), received)],
        },
        Check {
            from: "Istio Service Dashboard: TCP Sent Bytes (reporter source: the client's agent must agree)",
            expr: grafana(
                r#"sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))"#,
                &[("service", SERVICE), ("qrep", "source")],
            ),
            expect: vec![(labels(&[]), sent)],
        },
        Check {
            from: "Istio Service Dashboard: Bytes Sent to Incoming TCP Connection (mTLS), client workloads",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)"#,
                &service_page,
            ),
            expect: vec![(labels(&client), sent)],
        },
        Check {
            from: "Istio Service Dashboard: Bytes Received from Incoming TCP Connection (mTLS), service workloads",
            expr: grafana(
                r#"round(sum(irate(istio_tcp_received_bytes_total{reporter="destination", connection_security_policy="mutual_tls", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)"#,
                &service_page,
            ),
            expect: vec![(labels(&server), received)],
        },
        Check {
            from: "Istio Service Dashboard: variable `dstwl` (the cluster matters: destination_cluster=~\"$dstcluster\")",
            expr: grafana(
                r#"sum(istio_requests_total{reporter="destination", destination_service="$service", destination_cluster=~"$dstcluster", destination_workload_namespace=~"$dstns"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{reporter="destination", destination_service="$service", destination_cluster=~"$dstcluster", destination_workload_namespace=~"$dstns"}) by (destination_workload)"#,
                &service_page,
            ),
            expect: vec![(labels(&[("destination_workload", "db")]), total(DOWN, 1))],
        },
        Check {
            from: "Istio Service Dashboard: variable `srccluster`",
            expr: grafana(
                r#"sum(istio_requests_total{reporter=~"$qrep", destination_service="$service"}) by (source_cluster) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service"}) by (source_cluster)"#,
                &service_page,
            ),
            expect: vec![(labels(&[("source_cluster", CLUSTER)]), total(DOWN, 1))],
        },
        // Istio's ztunnel dashboard (ztunnel-dashboard.gen.json).
        Check {
            from: "Istio Ztunnel Dashboard: Ztunnel Versions",
            expr: r#"sum by (tag) (istio_build{component="ztunnel"})"#.into(),
            expect: vec![(labels(&[("tag", version)]), 2.0)],
        },
        Check {
            from: "Istio Ztunnel Dashboard: Connections (Opened)",
            expr: grafana(r#"sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#, &[]),
            expect: per_pod(conns),
        },
        Check {
            from: "Istio Ztunnel Dashboard: Connections (Closed)",
            expr: grafana(
                r#"-sum by (pod) (rate(istio_tcp_connections_closed_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
                &[],
            ),
            expect: per_pod(-conns),
        },
        Check {
            from: "Istio Ztunnel Dashboard: Bytes Transmitted (Sent)",
            expr: grafana(r#"sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#, &[]),
            expect: per_pod(sent),
        },
        Check {
            from: "Istio Ztunnel Dashboard: Bytes Transmitted (Received)",
            expr: grafana(
                r#"sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))"#,
                &[],
            ),
            expect: per_pod(received),
        },
        Check {
            from: "Istio Ztunnel Dashboard: Resource Usage (TCP Connections: none left open)",
            expr: r#"sum by (pod) (istio_tcp_connections_opened_total{app="ztunnel"}) - sum by (pod) (istio_tcp_connections_closed_total{app="ztunnel"})"#.into(),
            expect: per_pod(0.0),
        },
    ];
    checks.extend(kiali_checks(sent, received));
    checks
}

/// Kiali's namespace graph (kiali/kiali graph/telemetry/istio/istio.go,
/// buildNamespaceTrafficMap, "TCP Byte traffic") and its security-policy appender
/// (graph/telemetry/istio/appender/security_policy.go), with Kiali's defaults: TCP rate
/// "sent" (which reads istio_tcp_received_bytes_total: Kiali notes L4 telemetry is named
/// backwards, istio/istio#32399), ambient traffic "total" (util.GetReporter gives
/// `reporter=~"waypoint|…"`, util.GetApp nothing), a 10-minute graph (`[600s]`), idle edges
/// hidden (`> 0`). The queries are Kiali's `fmt.Sprintf` formats filled in as Kiali fills
/// them.
fn kiali_checks(sent: f64, received: f64) -> Vec<Check> {
    const TCP_GROUP_BY: &str = "app,source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,response_flags";
    const SECURITY_GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,source_principal,destination_cluster,destination_service_namespace,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,destination_principal,connection_security_policy";
    // The edge web -> db as Kiali needs it: canonical service and revision on both ends,
    // the cluster, the service's name and namespace.
    let edge = [
        ("app", "ztunnel"),
        ("source_cluster", CLUSTER),
        ("source_workload_namespace", "front"),
        ("source_workload", "web"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v1"),
        ("destination_cluster", CLUSTER),
        ("destination_service_namespace", "lab"),
        ("destination_service", SERVICE),
        ("destination_service_name", "postgres"),
        ("destination_workload_namespace", "lab"),
        ("destination_workload", "db"),
        ("destination_canonical_service", "database"),
        ("destination_canonical_revision", "v2"),
        ("response_flags", "-"),
    ];
    let secure = [
        ("source_cluster", CLUSTER),
        ("source_workload_namespace", "front"),
        ("source_workload", "web"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v1"),
        ("source_principal", "spiffe://cluster.local/ns/front/sa/web"),
        ("destination_cluster", CLUSTER),
        ("destination_service_namespace", "lab"),
        ("destination_service_name", "postgres"),
        ("destination_workload_namespace", "lab"),
        ("destination_workload", "db"),
        ("destination_canonical_service", "database"),
        ("destination_canonical_revision", "v2"),
        ("destination_principal", "spiffe://cluster.local/ns/lab/sa/db-6f7c9"),
        ("connection_security_policy", "mutual_tls"),
    ];
    vec![
        Check {
            from: "Kiali graph, namespace lab, TCP query 0 (source telemetry of unserviced destinations: none here)",
            expr: format!(
                r#"sum(rate(istio_tcp_received_bytes_total{{reporter=~"waypoint|source",source_workload_namespace!="lab",destination_workload_namespace="unknown",destination_workload="unknown",destination_service=~"^.+\\.lab\\..+$"}} [600s])) by ({TCP_GROUP_BY}) > 0"#
            ),
            expect: vec![],
        },
        Check {
            from: "Kiali graph, namespace lab, TCP query 1 (incoming, destination telemetry)",
            expr: format!(
                r#"sum(rate(istio_tcp_received_bytes_total{{reporter=~"waypoint|destination",destination_workload_namespace="lab"}} [600s])) by ({TCP_GROUP_BY}) > 0"#
            ),
            expect: vec![(labels(&edge), received)],
        },
        Check {
            from: "Kiali graph, namespace front, TCP query 2 (outgoing, source telemetry)",
            expr: format!(
                r#"sum(rate(istio_tcp_received_bytes_total{{reporter=~"waypoint|source",source_workload_namespace="front"}} [600s])) by ({TCP_GROUP_BY}) > 0"#
            ),
            expect: vec![(labels(&edge), received)],
        },
        Check {
            from: "Kiali graph, namespace lab, TCP rate \"received\", query 1 (the response bytes)",
            expr: format!(
                r#"sum(rate(istio_tcp_sent_bytes_total{{reporter=~"waypoint|destination",destination_workload_namespace="lab"}} [600s])) by ({TCP_GROUP_BY}) > 0"#
            ),
            expect: vec![(labels(&edge), sent)],
        },
        Check {
            from: "Kiali security-policy appender, namespace lab, query 1 (TCP rate \"sent\")",
            expr: format!(
                r#"(sum(rate(istio_tcp_sent_bytes_total{{reporter=~"waypoint|destination",source_workload_namespace!="lab",destination_service_namespace="lab"}}[600s])) by ({SECURITY_GROUP_BY}) > 0)"#
            ),
            expect: vec![(labels(&secure), sent)],
        },
    ]
}
