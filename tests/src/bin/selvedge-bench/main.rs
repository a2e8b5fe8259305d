//! `selvedge-bench [--quick | --idle-only] [--rounds N] [--agent-threads N] [--out FILE]`
//! (through `cargo xtask bench`): the same pods, in one run, unmeshed (the baseline: the
//! physical limit of this topology), meshed, and meshed with the sockmap fast path, each
//! measured once per round in mirrored order (`rounds.rs`). Prints a table of the medians;
//! writes every number as JSON.
//!
//! Tools: iperf3 for throughput (a real, standard client); the lab app for what iperf3 does
//! not measure (ping-pong latency percentiles, connection rate and time to first byte, idle
//! connections held open). CPU and memory of the agents come from `/proc`.

use std::{net::SocketAddr, process::Command, time::Duration};

use selvedge_tests::{AgentOptions, Lab};
use serde_json::{json, Value};

mod rounds;

struct Plan {
    seconds: u32,
    pings: usize,
    connrate_ms: usize,
    idle: usize,
    /// How long the idle-memory rows let the agents settle (after the warm-up, after each
    /// half opens) and let the held connections close before the next mode.
    settle_ms: u64,
    /// How long a burst's freed memory takes to leave the agents' RSS (mimalloc's 1 s purge
    /// delay and the agent's 1 s housekeeping tick) before the idle rows read it; 0 reads
    /// at once.
    purge_ms: u64,
}

const FULL: Plan = Plan { seconds: 10, pings: 5000, connrate_ms: 3000, idle: 10_000, settle_ms: 1500, purge_ms: 2500 };
/// Under a minute in all, lab set-up included: one second per tool, and shorter settles.
/// It opens 1,000 idle connections but reports only the raw RSS readings: without the
/// purge wait, a per-connection figure from so few is noise (it read −38 to +17 KB).
const QUICK: Plan = Plan { seconds: 1, pings: 500, connrate_ms: 1000, idle: 1000, settle_ms: 500, purge_ms: 0 };

const USAGE: &str = "usage: selvedge-bench [--quick | --idle-only] [--rounds N] [--agent-threads N] [--out FILE]
  --quick            a smoke run, under a minute (one round)
  --idle-only        only the idle-connection memory rows (10,000 connections, one round)
  --rounds N         measure every mode N times, in mirrored order, and report medians
                     (default 2: baseline, Selvedge, fast path, then the reverse)
  --agent-threads N  the agents' --worker-threads (0: the agent's default)
  --out FILE         also write every number there as JSON (cargo xtask bench: target/bench/<time>.json)
Runs as root: it builds network namespaces and loads eBPF.";

fn main() {
    // One pass over the arguments; anything else (a mistyped flag, --help) prints the
    // usage rather than starting a run that takes minutes.
    let (mut quick, mut idle_only, mut out, mut rounds) = (false, false, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next().unwrap_or_else(|| {
                eprintln!("selvedge-bench: {a} takes a value\n{USAGE}");
                std::process::exit(2);
            })
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--idle-only" => idle_only = true,
            "--out" => out = Some(value()),
            "--rounds" => match value().parse::<usize>() {
                Ok(n) if n > 0 => rounds = Some(n),
                _ => {
                    eprintln!("selvedge-bench: --rounds takes a number of at least 1\n{USAGE}");
                    std::process::exit(2);
                }
            },
            // The agents' own default unless `--agent-threads N` (0: the default) says otherwise.
            "--agent-threads" => {
                let n = value().parse::<u16>().expect("--agent-threads takes a number");
                AGENT_THREADS.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => {
                eprintln!("selvedge-bench: unknown argument {a:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let plan = if quick { QUICK } else { FULL };
    // `--idle-only` iterates on memory: its rows at full size.
    let idle_plan = if idle_only { &FULL } else { &plan };

    let mut lab = Lab::new("bench");
    lab.node("n1").node("n2");
    lab.pod("n1", "client", false).pod("n1", "near", false);
    lab.pod("n2", "far", false);
    lab.start_agent("n1", agent(false));
    lab.start_agent("n2", agent(false));
    for pod in ["near", "far"] {
        lab.serve(pod, "echo", 7000);
        // Its reports go to a file in the lab's directory, to be read after a run.
        let mut iperf = Command::new("iperf3");
        iperf.args(["-s", "-p", "5201", "--logfile"]).arg(lab.dir.join(format!("iperf3-{pod}.log")));
        lab.spawn_in_pod(pod, iperf);
    }
    start_nginx(&mut lab, "far");
    lab.tune_for_load("client");
    std::thread::sleep(Duration::from_millis(300));

    // Idle-connection memory has no baseline (no agent to measure without the mesh).
    let modes: &[&str] =
        if idle_only { &["selvedge", "selvedge+fastpath"] } else { &["baseline", "selvedge", "selvedge+fastpath"] };
    let rounds = rounds.unwrap_or(if quick || idle_only { 1 } else { 2 });
    let mut measured: Vec<rounds::Round> = Vec::new();
    for round in 0..rounds {
        let mut results = rounds::Round::new();
        for mode in rounds::order(modes, round) {
            // `--idle-only` measures nothing here: its agents are started for the idle rows.
            let rows = if idle_only {
                serde_json::Map::new()
            } else {
                switch(&mut lab, mode);
                eprintln!("bench: round {} of {rounds}: {mode} ...", round + 1);
                run(&mut lab, &plan)
            };
            results.insert(mode.into(), Value::Object(rows));
        }
        measured.push(results);
    }
    // Memory per idle connection is the agents' alone (no baseline row) and slow to
    // measure: once per meshed mode, after the rounds, filed with the first round's rows.
    for &mode in modes.iter().filter(|m| **m != "baseline") {
        switch(&mut lab, mode);
        eprintln!("bench: idle connections: {mode} ...");
        if let Some(Value::Object(rows)) = measured[0].remove(mode) {
            let rows = idle_memory(&mut lab, idle_plan, rows);
            measured[0].insert(mode.into(), Value::Object(rows));
        }
    }
    let results = rounds::medians(&measured);
    let added = added_latency(&results);
    let report = json!({
        "date": time_now(),
        "machine": machine(),
        "quick": quick,
        "rounds": rounds,
        "results": results,
        "added_latency_us": added,
        "ratio_by_round": rounds::ratios_by_round(&measured),
        "by_round": measured,
    });
    print_table(&report);
    if let Some(path) = out {
        if let Some(dir) = std::path::Path::new(&path).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default()).expect("write bench JSON");
        println!("\nJSON: {path}");
    }
}

/// Enroll the pods (or not) and restart both agents with the mode's fast-path setting.
fn switch(lab: &mut Lab, mode: &str) {
    let meshed = mode != "baseline";
    for pod in ["client", "near", "far"] {
        lab.set_pod(pod, meshed, false);
    }
    for n in ["n1", "n2"] {
        lab.start_agent(n, agent(mode == "selvedge+fastpath"));
    }
    assert_meshed(lab, meshed);
}

fn run(lab: &mut Lab, plan: &Plan) -> serde_json::Map<String, Value> {
    let (near, far) = (lab.get("near").ip, lab.get("far").ip);
    let mut r = serde_json::Map::new();
    let echo = SocketAddr::from((far, 7000));
    for (place, ip) in [("cross_node", far), ("same_node", near)] {
        for streams in [1, 8] {
            let cpu0 = agents_cpu(lab);
            let out = lab.run_in_pod("client", iperf_client(&ip.to_string(), plan.seconds, streams));
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
            let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
            let cpu = agents_cpu(lab) - cpu0;
            // iperf3 failing leaves the row empty rather than claiming 0 Gb/s.
            if bps > 0.0 {
                r.insert(format!("throughput_{place}_{streams}_gbps"), json!(bps / 1e9));
            }
            if bytes > 0.0 {
                r.insert(format!("agent_cpu_s_per_gb_{place}_{streams}"), json!(cpu / (bytes / 1e9)));
            }
        }
    }
    for size in [1usize, 1024] {
        let out = lab.run_in_pod(
            "client",
            app(lab, &["pingpong", &echo.to_string(), &size.to_string(), &plan.pings.to_string()]),
        );
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let mut us: Vec<f64> =
            v["micros"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
        us.sort_by(f64::total_cmp);
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            r.insert(format!("latency_{size}b_{name}_us"), json!(percentile(&us, q)));
        }
    }
    let cpu0 = agents_cpu(lab);
    let out = lab.run_in_pod("client", app(lab, &["connrate", &echo.to_string(), &plan.connrate_ms.to_string()]));
    let cpu = agents_cpu(lab) - cpu0;
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let n = v["connections"].as_f64().unwrap_or(0.0);
    let mut ttfb: Vec<f64> =
        v["ttfb_micros"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    ttfb.sort_by(f64::total_cmp);
    r.insert("new_connections_per_s".into(), json!(n / (plan.connrate_ms as f64 / 1000.0)));
    r.insert("time_to_first_byte_p50_us".into(), json!(percentile(&ttfb, 0.5)));
    if n > 0.0 {
        r.insert("agent_cpu_s_per_1000_connections".into(), json!(cpu / n * 1000.0));
    }
    tool_rows(lab, plan, &mut r);
    r
}

/// `--worker-threads` of the agents; 0 leaves the agent's default (half the cores).
static AGENT_THREADS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn agent(fast_path: bool) -> AgentOptions {
    let threads = AGENT_THREADS.load(std::sync::atomic::Ordering::Relaxed);
    // The idle rows hold 10,000 connections from one pod: over the default per-pod and
    // per-node shares on a 20,000-descriptor limit (`selvedge run --help`), so raised here.
    let limits = ["--max-conns-per-pod", "100000", "--max-conns", "100000"].map(String::from).to_vec();
    AgentOptions {
        fast_path,
        worker_threads: (threads > 0).then_some(threads),
        extra_args: limits,
        ..AgentOptions::default()
    }
}

/// Agent memory per idle meshed connection, per side, added to `r`.
fn idle_memory(lab: &mut Lab, plan: &Plan, mut r: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    let echo = SocketAddr::from((lab.get("far").ip, 7000));
    // On agents `switch` has just started: bulk transfers would leave the allocator
    // holding buffers that idle connections reuse.
    // Warm up first (certificates issued, pooled HBONE connections, worker threads and
    // their stacks): what is left to measure is what each idle connection holds.
    let warm = lab.spawn_in_pod("client", app(lab, &["hold", &echo.to_string(), "200", "1"]));
    let _ = lab.child_first_line(warm, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(plan.settle_ms));
    let rss0 = settled_rss(lab, plan);
    // Idle connections held open, in two equal steps. The figure is what all of them add
    // to the warmed agent, per connection; what the second step alone adds is kept beside
    // it (the marginal cost at this scale: tables that double as they fill double there).
    let half = plan.idle / 2;
    // Each half holds its connections until both are measured (however long the second
    // takes to open), then is stopped.
    let hold = |lab: &mut Lab| {
        let pid = lab.spawn_in_pod("client", app(lab, &["hold", &echo.to_string(), &half.to_string(), "600"]));
        let opened = lab.child_first_line(pid, Duration::from_secs(120)).contains("open");
        std::thread::sleep(Duration::from_millis(plan.settle_ms));
        (pid, opened)
    };
    let (first_pid, first) = hold(lab);
    let rss_half = settled_rss(lab, plan);
    let (second_pid, second) = hold(lab);
    let rss1 = settled_rss(lab, plan);
    lab.stop_child(first_pid);
    lab.stop_child(second_pid);
    if first && second {
        for (i, side) in ["client_side", "server_side"].iter().enumerate() {
            if plan.purge_ms > 0 {
                let all = (rss1[i] - rss0[i]) / (2 * half) as f64;
                r.insert(format!("agent_rss_kb_per_idle_connection_{side}"), json!(all));
                let second = (rss1[i] - rss_half[i]) / half as f64;
                r.insert(format!("agent_rss_kb_per_idle_connection_second_half_{side}"), json!(second));
            }
            // The readings behind them, to tell a noisy run from a change.
            r.insert(format!("agent_rss_kb_warm_{side}"), json!(rss0[i]));
            r.insert(format!("agent_rss_kb_half_{side}"), json!(rss_half[i]));
            r.insert(format!("agent_rss_kb_all_{side}"), json!(rss1[i]));
        }
    }
    std::thread::sleep(Duration::from_millis(2 * plan.settle_ms));
    r
}

/// A meshed row measured on a pod the agent failed to enroll would be an unmeshed number
/// under the wrong heading: stop instead.
fn assert_meshed(lab: &mut Lab, meshed: bool) {
    for n in ["n1", "n2"] {
        let status = lab.agent(n).status();
        let want: &[&str] = match (meshed, n) {
            (false, _) => &[],
            (true, "n1") => &["client", "near"],
            (true, _) => &["far"],
        };
        assert!(
            status.failed.is_empty() && want.iter().all(|p| status.enrolled.iter().any(|e| e == p)),
            "bench: agent {n} has not enrolled {want:?}: {status:?}"
        );
    }
}

fn iperf_client(ip: &str, seconds: u32, streams: u32) -> Command {
    let mut c = Command::new("iperf3");
    c.args(["-c", ip, "-p", "5201", "-J", "-t", &seconds.to_string(), "-P", &streams.to_string()]);
    c
}

fn app(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(&lab.env.app);
    c.args(args);
    c
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// User + system CPU seconds of both agents so far.
fn agents_cpu(lab: &mut Lab) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ["n1", "n2"]
        .iter()
        .filter_map(|n| lab.agent(n).pid())
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of /proc/PID/stat (11 and 12 after comm).
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / tick
        })
        .sum()
}

/// The agents' resident memory once a burst's freed memory has left it (`Plan::purge_ms`)
/// and it has stopped moving: two readings half a second apart within 1 % of each other
/// (at most 10 s more).
fn settled_rss(lab: &mut Lab, plan: &Plan) -> [f64; 2] {
    if plan.purge_ms == 0 {
        return agents_rss(lab);
    }
    std::thread::sleep(Duration::from_millis(plan.purge_ms));
    let mut last = agents_rss(lab);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = agents_rss(lab);
        if now.iter().zip(last).all(|(n, l)| (n - l).abs() <= 0.01 * l) {
            return now;
        }
        last = now;
    }
    last
}

/// Resident memory of the n1 and n2 agents, KiB.
fn agents_rss(lab: &mut Lab) -> [f64; 2] {
    let mut out = [0.0; 2];
    for (i, n) in ["n1", "n2"].iter().enumerate() {
        if let Some(pid) = lab.agent(n).pid() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            out[i] = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0);
        }
    }
    out
}

fn time_now() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let threads = match AGENT_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => "default".to_string(),
        n => n.to_string(),
    };
    format!("{cores} cores, kernel {}, agent worker threads: {threads}", kernel.trim())
}

/// A latency row: microseconds that a mesh adds to the baseline (the agents' own CPU
/// rows, also in µs, are not latencies).
fn is_latency(key: &str) -> bool {
    key.ends_with("_us") && !key.starts_with("agent_")
}

/// Per meshed mode, what it adds to each latency row of the baseline, µs.
fn added_latency(results: &serde_json::Map<String, Value>) -> Value {
    let base = &results.get("baseline").cloned().unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (mode, rows) in results.iter().filter(|(m, _)| *m != "baseline") {
        let rows = rows.as_object().into_iter().flatten().filter(|(k, _)| is_latency(k));
        let added = rows.filter_map(|(k, v)| Some((k.clone(), json!(v.as_f64()? - base[k].as_f64()?))));
        out.insert(mode.clone(), Value::Object(added.collect()));
    }
    Value::Object(out)
}

fn print_table(report: &Value) {
    let r = &report["results"];
    let modes = ["baseline", "selvedge", "selvedge+fastpath"];
    println!(
        "\nSelvedge bench — {} — {}{}\n",
        report["date"].as_str().unwrap_or(""),
        report["machine"].as_str().unwrap_or(""),
        if report["quick"] == true { " (quick)" } else { "" }
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>9} {:>11} {:>9}",
        "measure", modes[0], modes[1], "+fast path", "vs base", "by round", "added"
    );
    let mut keys: Vec<&String> = r["selvedge"].as_object().map(|o| o.keys().collect()).unwrap_or_default();
    keys.sort();
    for k in keys {
        let v = |m: &str| r[m][k].as_f64();
        let cell = |x: Option<f64>| x.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        let ratio = match (v("baseline"), v("selvedge")) {
            // The agents' own CPU and memory: the baseline's figure is idle agents, no ratio.
            _ if k.starts_with("agent_") => "-".into(),
            (Some(b), Some(s)) if b > 0.0 => format!("{:.2}x", s / b),
            _ => "-".into(),
        };
        // The lowest and highest of the per-round ratios: how far one reading can be trusted.
        let spread = match report["ratio_by_round"]["selvedge"][k].as_array() {
            Some(r) if r.len() > 1 && !k.starts_with("agent_") => {
                let r: Vec<f64> = r.iter().filter_map(Value::as_f64).collect();
                let (lo, hi) = r.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                format!("{lo:.2}-{hi:.2}")
            }
            _ => "-".into(),
        };
        let added = match report["added_latency_us"]["selvedge"][k].as_f64() {
            Some(a) => format!("{a:+.1}"),
            None => "-".into(),
        };
        println!(
            "{k:<44} {:>12} {:>12} {:>12} {:>9} {:>11} {:>9}",
            cell(v(modes[0])),
            cell(v(modes[1])),
            cell(v(modes[2])),
            ratio,
            spread,
            added
        );
    }
}

/// Real tools beside the purpose-built client (the rows ztunnel's table uses): sockperf
/// TCP ping-pong, wrk against nginx with kept-alive connections and with a new connection
/// per request. A tool that is missing or fails leaves its rows out.
fn tool_rows(lab: &mut Lab, plan: &Plan, r: &mut serde_json::Map<String, Value>) {
    let far = lab.get("far").ip.to_string();
    let out = lab.run_in_pod(
        "client",
        command("sockperf", &["pp", "--tcp", "-i", &far, "-p", "11111", "-m", "64", "-t", &plan.seconds.to_string()]),
    );
    // The tail rows show stalls of the agent's thread (each one delays the message in flight).
    for (name, pct) in [("p50", "50.000"), ("p99", "99.000"), ("p99_9", "99.900"), ("p99_99", "99.990")] {
        if let Some(v) = sockperf_percentile(&out, pct) {
            r.insert(format!("sockperf_64b_{name}_us"), json!(v));
        }
    }
    let url = format!("http://{far}:8081/1k");
    let secs = format!("{}s", plan.seconds);
    for (row, extra) in [("wrk_keepalive_16c_1k_rps", None), ("wrk_new_conn_16c_1k_rps", Some("Connection: close"))] {
        let mut args = vec!["-t1", "-c16", "-d", &secs];
        if let Some(h) = extra {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let cpu0 = agents_cpu(lab);
        let out = lab.run_in_pod("client", command("wrk", &args));
        let cpu = agents_cpu(lab) - cpu0;
        if let Some(rps) = wrk_rps(&out) {
            r.insert(row.into(), json!(rps));
            // What each kept-alive request costs the two agents (µs): request/response
            // work, without connection setup.
            if extra.is_none() && rps > 0.0 {
                r.insert("agent_cpu_us_per_keepalive_request".into(), json!(cpu / (rps * plan.seconds as f64) * 1e6));
            }
        }
    }
}

fn command(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

/// `sockperf: ---> percentile 50.000 =    6.890` (one-way latency: half the round trip).
fn sockperf_percentile(out: &str, pct: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.contains(&format!("percentile {pct} =")))
        .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
}

/// `Requests/sec:  25812.34`
fn wrk_rps(out: &str) -> Option<f64> {
    out.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())
}

/// nginx serving a 1 KiB file on :8081 from the lab's scratch directory (root's nginx
/// defaults are never touched: prefix, pid and logs are all in `dir`).
fn start_nginx(lab: &mut Lab, pod: &str) {
    let dir = lab.dir.join(format!("nginx-{pod}"));
    std::fs::create_dir_all(dir.join("www")).expect("nginx dir");
    std::fs::write(dir.join("www/1k"), vec![b'x'; 1024]).expect("nginx file");
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; user root; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;\n\
           fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
           server {{ listen 8081; root {d}/www; }} }}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx conf");
    lab.spawn_in_pod(
        pod,
        command("nginx", &["-p", &dir.display().to_string(), "-c", &dir.join("nginx.conf").display().to_string()]),
    );
    let mut sockperf = Command::new("sockperf");
    sockperf.args(["sr", "--tcp", "-p", "11111"]);
    lab.spawn_in_pod(pod, sockperf);
}
