//! Prometheus metrics: Istio's TCP metrics with Istio's standard labels (so existing
//! dashboards work), and Selvedge's own (enrollment, kernel counters, denials, certificates,
//! map occupancy, reconcile drift).
//!
//! Cheap on the hot path: a connection resolves its label set once, when it is opened, and
//! keeps the counter handles; its copy loops add bytes as they move them (one atomic add per
//! chunk, never a lookup), so a long-lived connection's bytes show in rates while it is open,
//! and bytes moved before an error or a reset are never dropped from the totals.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

mod live;
use live::Live;
pub use live::{Listing, LiveConnection};

/// Istio's labels for `istio_tcp_*`, the standard set ztunnel reports. `unknown` where a
/// value is not known; principals only ever come from verified certificates.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    /// `source` (the client's agent) or `destination` (the server's agent).
    pub reporter: &'static str,
    /// `source_workload`, `source_canonical_service`, … (see [`WorkloadLabels`]).
    pub source: WorkloadLabels,
    pub source_principal: String,
    pub destination: WorkloadLabels,
    pub destination_principal: String,
    /// `name.namespace.svc.cluster.local`, and its parts.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    /// `-` when the connection went through; Envoy-style flags otherwise (`UF` upstream
    /// failure, `NR` no route, `DENY` refused by the mesh).
    pub response_flags: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

/// One side's workload labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// The owning workload (a Deployment's name…), not the pod.
    pub workload: String,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// `--cluster-id` for a workload this agent knows (a peer's own, from its `baggage`).
    pub cluster: String,
}

impl WorkloadLabels {
    /// The labels of a workload (`unknown` throughout when it is not known).
    pub fn of(meta: Option<&crate::state::WorkloadMeta>, cluster: &str) -> Self {
        let or_unknown = |f: fn(&crate::state::WorkloadMeta) -> &str| meta.map_or(UNKNOWN, f).to_string();
        WorkloadLabels {
            workload: or_unknown(|m| &m.workload),
            namespace: or_unknown(|m| &m.namespace),
            canonical_service: or_unknown(|m| &m.canonical_service),
            canonical_revision: or_unknown(|m| &m.canonical_revision),
            cluster: match meta {
                Some(m) => m.cluster.as_deref().unwrap_or(cluster).to_string(),
                None => UNKNOWN.to_string(),
            },
        }
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let (s, d) = (&self.source, &self.destination);
        // `*_app` and `*_version` are the canonical service and revision, as ztunnel has them.
        [
            ("reporter", self.reporter),
            ("source_workload", &s.workload),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &s.canonical_service),
            ("source_version", &s.canonical_revision),
            ("source_cluster", &s.cluster),
            ("destination_service", &self.destination_service),
            ("destination_service_namespace", &self.destination_service_namespace),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &d.workload),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &d.canonical_service),
            ("destination_version", &d.canonical_revision),
            ("destination_cluster", &d.cluster),
            ("request_protocol", self.request_protocol),
            ("response_flags", self.response_flags),
            ("connection_security_policy", self.connection_security_policy),
        ]
        .encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    component: &'static str,
    tag: &'static str,
}

/// The cluster Istio's `*_cluster` labels name when `--cluster-id` is not given (istiod's
/// default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DryRun {
    policy: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelCounter {
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handshake {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Identity {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapName {
    map: &'static str,
}

pub const UNKNOWN: &str = "unknown";

/// All of the agent's metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    /// `*_cluster` of the workloads it knows.
    cluster: String,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    /// Bytes of the request, source → destination (`istio_tcp_received_bytes`).
    request_bytes: Family<TcpLabels, Counter>,
    /// Bytes of the response, destination → source (`istio_tcp_sent_bytes`).
    response_bytes: Family<TcpLabels, Counter>,
    denials: Family<Reason, Counter>,
    enrolled: Gauge,
    kernel: Family<KernelCounter, Counter>,
    /// Last kernel totals seen, to add only the difference.
    kernel_last: Mutex<Vec<u64>>,
    cert_expiry: Family<Identity, Gauge>,
    map_entries: Family<MapName, Gauge>,
    map_capacity: Family<MapName, Gauge>,
    drift: Counter,
    dry_run: Family<DryRun, Counter>,
    handshakes: Family<Handshake, Counter>,
    /// Last (full, resumed) totals seen from the HBONE pool.
    handshakes_last: Mutex<Vec<u64>>,
    dialled_ahead: Counter,
    config_rejected: Counter,
    config_generation: Gauge,
    /// Last total of connections the HBONE pool dialled ahead of need.
    dialled_ahead_last: std::sync::atomic::AtomicU64,
    /// Connections open right now, for `/connections`.
    live: Mutex<Live>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// One connection's counters, resolved once.
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    pub closed: Counter,
    /// Source → destination.
    pub request_bytes: Counter,
    /// Destination → source.
    pub response_bytes: Counter,
}

/// Bytes one way of one connection, counted as they move: its own total (for the access
/// log) and, once the connection is counted as opened, its Prometheus byte counter.
///
/// Only the task that owns the connection adds; atomics make the count readable from
/// wherever the connection's future is dropped or ends.
#[derive(Debug, Default)]
pub struct ByteCount {
    total: AtomicU64,
    counter: Option<Counter>,
}

impl ByteCount {
    pub fn add(&self, n: u64) {
        // One writer: a plain load and store, no locked add for the per-connection total.
        let total = self.total.load(Ordering::Relaxed);
        self.total.store(total + n, Ordering::Relaxed);
        if let Some(c) = &self.counter {
            c.inc_by(n);
        }
    }

    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// From now on, also count into `counter` (what was counted before is added to it).
    pub fn report_to(&mut self, counter: Counter) {
        counter.inc_by(self.get());
        self.counter = Some(counter);
    }
}

/// Something bytes are counted into as they move: one [`ByteCount`], or two at once (a
/// same-node handoff counts for the source's record and the destination's).
pub trait Count: Sync {
    fn add(&self, n: u64);
}

impl Count for ByteCount {
    fn add(&self, n: u64) {
        ByteCount::add(self, n);
    }
}

impl<A: Count, B: Count> Count for (&A, &B) {
    fn add(&self, n: u64) {
        self.0.add(n);
        self.1.add(n);
    }
}

/// A connection's bytes both ways: `sent` source → destination (the request), `received`
/// destination → source (the response), on either side's agent. Istio names them the other
/// way round, from the server's side: `istio_tcp_received_bytes_total` and the access log's
/// `bytes_received` are `sent` here, `istio_tcp_sent_bytes_total` and `bytes_sent` are
/// `received`.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: ByteCount,
    pub received: ByteCount,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_CLUSTER_ID)
    }
}

impl Metrics {
    /// Metrics of an agent in cluster `cluster` (Istio's `*_cluster` labels).
    pub fn new(cluster: &str) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            cluster: cluster.to_string(),
            opened: Family::default(),
            closed: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            denials: Family::default(),
            enrolled: Gauge::default(),
            kernel: Family::default(),
            kernel_last: Mutex::new(Vec::new()),
            cert_expiry: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            drift: Counter::default(),
            dry_run: Family::default(),
            handshakes: Family::default(),
            handshakes_last: Mutex::new(Vec::new()),
            dialled_ahead: Counter::default(),
            config_rejected: Counter::default(),
            config_generation: Gauge::default(),
            dialled_ahead_last: std::sync::atomic::AtomicU64::new(0),
            live: Mutex::new(Live::default()),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response (destination to source)",
            m.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request (source to destination)",
            m.request_bytes.clone(),
        );
        let build = Family::<Build, Gauge>::default();
        // `component="ztunnel"`: what Istio's ztunnel dashboard counts node proxies by; the
        // tag is Selvedge's version.
        build.get_or_create(&Build { component: "ztunnel", tag: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("istio_build", "Build of the node proxy (Selvedge's version as the tag)", build);
        registry.register("selvedge_denials", "Connections refused, by reason", m.denials.clone());
        registry.register("selvedge_enrolled_workloads", "Workloads enrolled on this node", m.enrolled.clone());
        registry.register(
            "selvedge_kernel_events",
            "Events counted by the eBPF programs (captured connects, fast-path hits and misses, SYNs steered or dropped, binds refused)",
            m.kernel.clone(),
        );
        registry.register(
            "selvedge_certificate_expiry_seconds",
            "Unix time at which each workload identity's certificate expires",
            m.cert_expiry.clone(),
        );
        registry.register("selvedge_map_entries", "Entries in each eBPF map", m.map_entries.clone());
        registry.register("selvedge_map_capacity", "Capacity of each eBPF map", m.map_capacity.clone());
        registry.register(
            "selvedge_reconcile_drift",
            "Kernel enrollments found without a matching workload and removed",
            m.drift.clone(),
        );
        registry.register(
            "selvedge_authz_dry_run",
            "Connections a dry-run AuthorizationPolicy matched (reported, never enforced)",
            m.dry_run.clone(),
        );
        registry.register(
            "selvedge_hbone_handshakes",
            "TLS handshakes of outgoing HBONE connections, full or resumed (session tickets)",
            m.handshakes.clone(),
        );
        registry.register(
            "selvedge_hbone_dialled_ahead",
            "Outgoing HBONE connections dialled before any stream needed them (a key's free stream slots ran low)",
            m.dialled_ahead.clone(),
        );
        registry.register(
            "selvedge_config_rejected",
            "Config changes refused (parse or validation error, emptied or deleted file); the one in force stays",
            m.config_rejected.clone(),
        );
        registry.register(
            "selvedge_config_generation",
            "Generation of the config in force (incremented by each applied change)",
            m.config_generation.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Fold in the HBONE pool's running total of connections dialled ahead of need.
    pub fn dialled_ahead_total(&self, total: u64) {
        let last = self.dialled_ahead_last.swap(total, std::sync::atomic::Ordering::Relaxed);
        self.dialled_ahead.inc_by(total.saturating_sub(last));
    }

    /// Fold in the HBONE pool's running (full, resumed) handshake totals.
    pub fn handshake_totals(&self, (full, resumed): (u64, u64)) {
        let totals = [("full", full), ("resumed", resumed)];
        add_growth(&self.handshakes, &self.handshakes_last, &totals, |kind| Handshake { kind });
    }

    /// Count a connection as opened and return the handles it closes with.
    pub fn open(&self, labels: &TcpLabels) -> ConnMetrics {
        self.opened.get_or_create(labels).inc();
        ConnMetrics {
            closed: self.closed.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
        }
    }

    /// The cluster its workloads' `*_cluster` labels name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn config_rejected(&self) {
        self.config_rejected.inc();
    }

    pub fn set_config_generation(&self, generation: u64) {
        self.config_generation.set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub fn denied(&self, reason: &'static str) {
        self.denials.get_or_create(&Reason { reason }).inc();
    }

    pub fn set_enrolled(&self, n: usize) {
        self.enrolled.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Fold in the kernel's running totals (name, value), adding only what is new.
    pub fn kernel_totals(&self, totals: &[(&'static str, u64)]) {
        add_growth(&self.kernel, &self.kernel_last, totals, |counter| KernelCounter { counter });
    }

    pub fn cert_expiry(&self, identity: &str, unix: Option<u64>) {
        let g = self.cert_expiry.get_or_create(&Identity { identity: identity.to_string() });
        g.set(unix.and_then(|u| i64::try_from(u).ok()).unwrap_or(0));
    }

    pub fn map_occupancy(&self, map: &'static str, entries: u64, capacity: u64) {
        self.map_entries.get_or_create(&MapName { map }).set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.map_capacity.get_or_create(&MapName { map }).set(i64::try_from(capacity).unwrap_or(i64::MAX));
    }

    pub fn dry_run(&self, policy: &str, action: &'static str) {
        self.dry_run.get_or_create(&DryRun { policy: policy.to_string(), action }).inc();
    }

    pub fn drift(&self, n: u64) {
        self.drift.inc_by(n);
    }

    /// List an open connection; returns its id.
    pub fn track(&self, c: &Listing<'_>) -> u64 {
        let opened_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        self.live.lock().track(c, opened_unix_ms)
    }

    pub fn untrack(&self, id: u64) {
        self.live.lock().untrack(id);
    }

    pub fn live_connections(&self) -> serde_json::Value {
        serde_json::to_value(self.live.lock().list()).unwrap_or_default()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Add to each `(name, running total)` counter what its total grew by since `last` saw it.
/// A restarted agent may see totals from before it (the kernel's); they only ever grow.
fn add_growth<L>(
    family: &Family<L, Counter>,
    last: &Mutex<Vec<u64>>,
    totals: &[(&'static str, u64)],
    label: impl Fn(&'static str) -> L,
) where
    L: Clone + std::hash::Hash + Eq,
{
    let mut last = last.lock();
    last.resize(totals.len(), 0);
    for (i, (name, value)) in totals.iter().enumerate() {
        let delta = value.saturating_sub(last[i]);
        if delta > 0 {
            family.get_or_create(&label(name)).inc_by(delta);
        }
        last[i] = *value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(reporter: &'static str) -> TcpLabels {
        let web = crate::state::WorkloadMeta::of("web", "shop", &[("app".to_string(), "web".to_string())].into());
        TcpLabels {
            reporter,
            source: WorkloadLabels::of(Some(&web), "c1"),
            source_principal: "spiffe://td/ns/shop/sa/a".into(),
            destination: WorkloadLabels::of(None, "c1"),
            destination_principal: UNKNOWN.into(),
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    #[test]
    fn counts_connections_and_bytes_with_istio_names_and_meanings() {
        let m = Metrics::new("c1");
        // Bytes show while the connection is open, those counted before it was opened too.
        // The client sends 10 (the request) and receives 20 (the response): Istio's "sent"
        // is the response.
        let mut t = Tally::default();
        t.sent.add(4);
        let c = m.open(&labels("source"));
        t.sent.report_to(c.request_bytes);
        t.received.report_to(c.response_bytes);
        t.sent.add(6);
        t.received.add(20);
        let line = |text: &str, name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        assert!(line(&m.encode(), "istio_tcp_received_bytes_total{").ends_with(" 10"), "counted while open");
        assert!(line(&m.encode(), "istio_tcp_sent_bytes_total{").ends_with(" 20"), "the response");
        assert_eq!((t.sent.get(), t.received.get()), (10, 20));
        c.closed.inc();
        let c = m.open(&labels("source"));
        c.request_bytes.inc_by(1);
        c.response_bytes.inc_by(2);
        c.closed.inc();
        m.denied("no_original_destination");
        m.kernel_totals(&[("captured", 5)]);
        m.kernel_totals(&[("captured", 7)]);
        let text = m.encode();
        let line = |name: &str| line(&text, name);
        assert!(line("istio_tcp_connections_opened_total{").ends_with(" 2"), "{text}");
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 22"), "{text}");
        assert!(line("istio_tcp_received_bytes_total{").ends_with(" 11"), "{text}");
        let sent = line("istio_tcp_sent_bytes_total{");
        for label in [
            r#"connection_security_policy="mutual_tls""#,
            r#"source_workload="web""#,
            r#"source_app="web""#,
            r#"source_canonical_service="web""#,
            r#"source_version="latest""#,
            r#"source_canonical_revision="latest""#,
            r#"source_cluster="c1""#,
            r#"destination_cluster="unknown""#,
            r#"destination_service_name="unknown""#,
            r#"destination_service_namespace="unknown""#,
        ] {
            assert!(sent.contains(label), "{label} in {sent}");
        }
        assert_eq!(sent.matches("=\"").count(), 23, "Istio's 23 standard labels: {sent}");
        assert!(line("istio_build{").contains(r#"component="ztunnel""#), "{text}");
        assert!(line("selvedge_denials_total{").contains("reason=\"no_original_destination\""));
        assert!(line("selvedge_kernel_events_total{").ends_with(" 7"), "deltas add up to the kernel total: {text}");
    }
}
