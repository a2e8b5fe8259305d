//! Selvedge node agent: the library behind `selvedge` and `selvedge-cni`.
//!
//! # Module map
//!
//! Every source file of the workspace, one line each (test-only files — `tests.rs`,
//! `*_tests.rs` — aside); `every_source_file_has_a_line_in_the_module_map` below fails
//! when a file is added or removed without this list changing with it. ARCHITECTURE.md
//! draws the layout; this is the index.
//!
//! **The node agent** (`agent/`, the `selvedge` binary and library):
//!
//! * `agent/src/main.rs` — the `selvedge` command line: flags, logging, the runtime, `uninstall`, `ca init`, inspection
//! * `agent/src/lib.rs` — the crate root and its module list
//! * `agent/src/app.rs` — the wiring: checks before the kernel is touched, builds each part, the one loop over config changes, stop and drain
//! * `agent/src/source.rs` — config sources yield events (a new config, a refused change); the loop applies them
//! * `agent/src/source/file.rs` — the local config file, re-read every 500 ms
//! * `agent/src/source/kube.rs` — the cluster: API snapshots, the CNI plugin's requests and their answers
//! * `agent/src/source/discover.rs` — finding a running pod's netns by IP or by cgroup in /proc
//! * `agent/src/pods.rs` — the pod lifecycle: enroll, keep closed, change mTLS, converge, unenroll, sweep; owns the datapath handle
//! * `agent/src/pods/drift.rs` — kernel drift and a netns recreated at the same path: found and repaired
//! * `agent/src/publish.rs` — what the agent publishes: the status file, config generation and refusals, the `Publisher`
//! * `agent/src/publish/dump.rs` — `/config_dump`, readiness, state-derived metrics, the kernel view
//! * `agent/src/publish/admin.rs` — the admin, metrics and readiness HTTP endpoints
//! * `agent/src/publish/metrics.rs` — Prometheus metrics (Istio's names and labels, `selvedge_*`)
//! * `agent/src/publish/metrics/live.rs` — the open connections for `/connections`
//! * `agent/src/publish/inspect.rs` — the inspection CLI (`selvedge status`, `workloads`, …)
//! * `agent/src/publish/inspect/views.rs` — the views that combine what the agent publishes: mesh-wide workloads, certificate states, connections as apps see them, links by pod (pure)
//! * `agent/src/ca_service.rs` — `selvedge ca serve`: the cluster CA (the Istio CA API), authenticating callers by token
//! * `agent/src/ca_service/authorize.rs` — who may obtain which certificate: a node agent only its node's pods' identities (pure)
//! * `agent/src/ca_service/metrics.rs` — the CA service's counters (issued, refusals by status) on `/metrics`, and `/healthz/ready`
//! * `agent/src/config.rs` — the config file's format and validation, the resolved settings (pure)
//! * `agent/src/state.rs` — desired enrollment, the peer directory and the plan towards them (pure)
//! * `agent/src/state/meta.rs` — Istio's names for a workload (owning workload, canonical service and revision) and a service (pure)
//! * `agent/src/policy.rs` — the policy core (pure)
//! * `agent/src/policy/set.rs` — `PolicySet::decide`: the one entry point of every authorization decision
//! * `agent/src/policy/authz.rs` — AuthorizationPolicy compiled, and evaluated at L4
//! * `agent/src/policy/authz/doc.rs` — the AuthorizationPolicy document as written
//! * `agent/src/policy/peer_auth.rs` — PeerAuthentication resolved per workload and port
//! * `agent/src/proxy.rs` — proxying: pod context, the accept loop, relays
//! * `agent/src/proxy/outbound.rs` — outbound 15001: original destination, source-side policy, HBONE or plain
//! * `agent/src/proxy/inbound.rs` — inbound 15006 plaintext and the HBONE server's upstream
//! * `agent/src/proxy/same_node.rs` — the same-node handoff (no HBONE)
//! * `agent/src/proxy/watch.rs` — open inbound connections, rechecked when policies change
//! * `agent/src/proxy/zerocopy.rs` — plaintext relays by `splice(2)`, or by copy
//! * `agent/src/proxy/flow.rs` — one connection's record: access log, metrics, refusal reasons
//! * `agent/src/proxy/accesslog.rs` — the access log's writer thread
//! * `agent/src/hbone.rs` — HBONE: constants and the splice entry point
//! * `agent/src/hbone/server.rs` — the HBONE server (port 15008 in each pod)
//! * `agent/src/hbone/client.rs` — the HBONE client and its connection pool
//! * `agent/src/hbone/pump.rs` — bytes between a socket and an HTTP/2 stream
//! * `agent/src/hbone/flood.rs` — the bound on a peer's PING/SETTINGS frames
//! * `agent/src/hbone/coalesce.rs` — TLS records written once per turn
//! * `agent/src/hbone/headers.rs` — what a CONNECT carries besides its target (forwarded, baggage, traceparent), as ztunnel (pure)
//! * `agent/src/hbone/keepalive.rs` — HTTP/2 PINGs: a connection whose peer stops answering is dropped
//! * `agent/src/hbone/batch.rs` — an HTTP/2 connection's task and its turns
//! * `agent/src/hbone/readahead.rs` — an HBONE socket read in large pieces
//! * `agent/src/tls.rs` — rustls configurations and SPIFFE peer checks
//! * `agent/src/tls/provider.rs` — the crypto provider, chosen by CPU
//! * `agent/src/identity.rs` — workload identity: SPIFFE IDs, certificate sources
//! * `agent/src/identity/manager.rs` — one SVID per service account on the node, renewed
//! * `agent/src/identity/ca.rs` — the built-in CA
//! * `agent/src/identity/files.rs` — certificates from watched files
//! * `agent/src/identity/istio_ca.rs` — certificates from the Istio CA API
//! * `agent/src/identity/spiffe.rs` — SPIFFE IDs
//! * `agent/src/identity/svid.rs` — an X.509-SVID as held by the agent
//! * `agent/src/datapath.rs` — the kernel side: load, attach, pin, maps (the only module that imports aya)
//! * `agent/src/datapath/pins.rs` — the pin directory, link replacement, `uninstall`
//! * `agent/src/datapath/walk.rs` — reading what the kernel holds, off the runtime's thread
//! * `agent/src/datapath/batch.rs` — batched map lookups and deletes
//! * `agent/src/datapath/logs.rs` — kernel log records into the agent's logs
//! * `agent/src/inpod.rs` — one thread per pod netns that makes the agent's sockets there
//! * `agent/src/inpod/route.rs` — transparent delivery inside a pod: the fwmark rule, its local table, tcp_fwmark_accept (netlink, no iptables)
//! * `agent/src/limits.rs` — connection and handshake shares of the descriptors
//! * `agent/src/accept.rs` — the one accept step every listener uses
//! * `agent/src/cancel.rs` — a connection's one-shot "stop now"
//! * `agent/src/addr.rs` — std addresses and the kernel ABI's form
//! * `agent/src/sys.rs` — cgroup v2, netns cookies, statfs, `setns`, reset-on-close (`SO_LINGER` 0) arming
//! * `agent/src/tuning.rs` — the one restart that sets glibc's copy tunable
//! * `agent/src/k8s.rs` — Kubernetes (the only module that imports kube)
//! * `agent/src/k8s/authority.rs` — the CA service's view of the cluster: TokenReview and the pods on a node
//! * `agent/src/k8s/convert.rs` — cluster objects into the agent's config (pure)
//! * `agent/src/k8s/watch.rs` — reflectors and consistent snapshots
//! * `agent/src/cni.rs` — race-free enrollment with the chained CNI plugin
//! * `agent/src/cni/plugin.rs` — `selvedge-cni` itself
//! * `agent/src/cni/install.rs` — `selvedge-cni install` (the DaemonSet's init container)
//! * `agent/src/cni/protocol.rs` — what the plugin and the agent say
//! * `agent/src/cni/registry.rs` — pod uid → netns, persisted
//! * `agent/src/cni/server.rs` — the agent's end of the CNI socket
//! * `agent/src/bin/selvedge-cni.rs` — the `selvedge-cni` binary
//!
//! **The kernel programs** (`ebpf/`, aya-ebpf) and **their ABI** (`common/`):
//!
//! * `ebpf/src/main.rs` — the eBPF object's root
//! * `ebpf/src/connect.rs` — `cgroup/connect4/6`: capture, cached denials, original destination; `getpeername` restore
//! * `ebpf/src/lookup.rs` — `sk_lookup` per pod: inbound steering to 15006, STRICT drop, fail closed
//! * `ebpf/src/sockops.rs` — `sockops`: original destination under the agent's key, the fast path's sockhash
//! * `ebpf/src/skmsg.rs` — `sk_msg`: the loopback fast path
//! * `ebpf/src/bind.rs` — the bind guard for the agent's ports
//! * `ebpf/src/maps.rs` — the pinned maps and helpers
//! * `common/src/lib.rs` — what kernel and agent share: ports, map names, keys, counters, ABI version
//!
//! **Tooling** (`xtask/`) and **tests** (`tests/`):
//!
//! * `xtask/src/main.rs` — `cargo xtask` commands
//! * `xtask/src/setup.rs` — `cargo xtask setup`: packages, `bpf-linker`, bpffs, checks
//! * `xtask/src/tasks.rs` — build, test, demo, bench, load
//! * `xtask/src/ebpf.rs` — building the eBPF object
//! * `xtask/src/lab.rs` — the Vagrant lab's commands
//! * `xtask/src/interop.rs` — `cargo xtask interop`: build Istio's ztunnel from a checkout, run the interop checks
//! * `xtask/src/cmd.rs` — running commands
//! * `tests/src/lib.rs` — the netns lab harness
//! * `tests/src/lab.rs` — nodes, pods, fabric, cleanup
//! * `tests/src/agent.rs` — one `selvedge run` per node
//! * `tests/src/app.rs` — running the lab app in pods
//! * `tests/src/proc.rs` — spawning in a netns and cgroup
//! * `tests/src/probe.rs` — an HBONE client with chosen certificates
//! * `tests/src/sys.rs` — preflight and helpers
//! * `tests/src/seccomp.rs` — runs a process under a Kubernetes Localhost seccomp profile (the agent's)
//! * `tests/src/cluster.rs` — the simulated cluster (test API server, CNI plugins, `--kube` agents)
//! * `tests/src/apiserver.rs` — the test Kubernetes API server
//! * `tests/src/apiserver/http.rs` — its HTTP side
//! * `tests/src/apiserver/store.rs` — its object store
//! * `tests/src/apiserver/watch.rs` — its watches
//! * `tests/src/apiserver/selector.rs` — label and field selectors
//! * `tests/src/apiserver/resources.rs` — the resources it serves
//! * `tests/src/bin/selvedge-lab-app.rs` — the lab's test app
//! * `tests/src/bin/selvedge-lab.rs` — the demo's lab
//! * `tests/src/bin/selvedge-interop.rs` — Selvedge against ztunnel in the lab: PASS/FAIL per check
//! * `tests/src/bin/selvedge-bench/main.rs` — `cargo xtask bench`
//! * `tests/src/bin/selvedge-bench/rounds.rs` — the bench's mirrored rounds

pub mod accept;
pub mod addr;
pub mod app;
pub mod ca_service;
pub mod cancel;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod k8s;
pub mod limits;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod publish;
pub mod source;
pub mod state;
pub mod sys;
pub mod tls;
pub mod tuning;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The source files of the workspace's crates, relative to the workspace root (test-only
    /// files aside).
    fn source_files(root: &Path) -> Vec<String> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        for krate in ["agent/src", "ebpf/src", "common/src", "xtask/src", "tests/src"] {
            walk(&root.join(krate), &mut files);
        }
        let test_only =
            |p: &Path| p.file_name().is_some_and(|n| n == "tests.rs" || n.to_string_lossy().ends_with("_tests.rs"));
        let mut names: Vec<String> = files
            .iter()
            .filter(|p| !test_only(p))
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_source_file_has_a_line_in_the_module_map() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let lib = std::fs::read_to_string(root.join("agent/src/lib.rs")).unwrap();
        let listed: Vec<&str> =
            lib.lines().filter_map(|l| l.strip_prefix("//! * `")).filter_map(|l| l.split('`').next()).collect();
        let files = source_files(root);
        let missing: Vec<&String> = files.iter().filter(|f| !listed.contains(&f.as_str())).collect();
        assert!(missing.is_empty(), "source files without a line in the module map (agent/src/lib.rs): {missing:?}");
        let stale: Vec<&&str> = listed.iter().filter(|l| !files.iter().any(|f| f == *l)).collect();
        assert!(stale.is_empty(), "module map lines for files that do not exist: {stale:?}");
    }
}
