//! One proxied connection as the access log and the metrics see it, and why connections
//! are refused.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use super::{Direction, PodContext};
use crate::{
    addr::Compact,
    identity::SpiffeId,
    publish::metrics::{Listing, Metrics, Tally, TcpLabels, WorkloadLabels, UNKNOWN},
    state::{Peer, ServiceName, WorkloadMeta},
};

/// Why a connection was refused: a stable code for metrics and logs (append-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoOriginalDestination,
    NoEndpoints,
    UpstreamUnreachable,
    TunnelFailed,
    PlaintextStrict,
    ReservedPort,
    TlsHandshake,
    BadClientCertificate,
    BadTarget,
    MethodNotAllowed,
    /// An AuthorizationPolicy denied it.
    Policy,
    /// Over a connection or handshake limit (`limits`).
    OverLimit,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::TunnelFailed => "tunnel_failed",
            Refusal::PlaintextStrict => "plaintext_strict",
            Refusal::ReservedPort => "reserved_port",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::BadClientCertificate => "bad_client_certificate",
            Refusal::BadTarget => "bad_target",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::Policy => "policy",
            Refusal::OverLimit => "over_limit",
        }
    }

    /// Envoy-style response flags, as Istio dashboards expect them.
    fn response_flags(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination | Refusal::NoEndpoints => "NR",
            Refusal::UpstreamUnreachable | Refusal::TunnelFailed => "UF",
            // Envoy's "upstream overflow" (a circuit breaker's limit).
            Refusal::OverLimit => "UO",
            _ => "DENY",
        }
    }
}

/// A workload as Istio's labels name it: through the pod or directory entry the connection
/// holds anyway, or a shared copy where neither lasts (a lookup). One pointer and a tag: a
/// record holds two for its connection's whole life.
#[derive(Debug, Clone)]
pub enum WorkloadName<'a> {
    Pod(&'a PodContext),
    Peer(&'a Peer),
    Owned(Arc<WorkloadMeta>),
}

impl<'a> From<&'a Peer> for WorkloadName<'a> {
    fn from(p: &'a Peer) -> Self {
        WorkloadName::Peer(p)
    }
}

impl WorkloadName<'_> {
    pub fn meta(&self) -> &WorkloadMeta {
        match self {
            WorkloadName::Pod(p) => &p.meta,
            WorkloadName::Peer(p) => &p.meta,
            WorkloadName::Owned(o) => o,
        }
    }

    /// Owned, for keeping beyond the lookup that found it (a reference count, no copy).
    pub fn owned(&self) -> WorkloadName<'static> {
        WorkloadName::Owned(match self {
            WorkloadName::Pod(p) => p.meta.clone(),
            WorkloadName::Peer(p) => p.meta.clone(),
            WorkloadName::Owned(o) => o.clone(),
        })
    }
}

/// How a connection is carried: its `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plaintext.
    None,
    /// Through HBONE.
    MutualTls,
    /// Handed from one pod to another on this node (see `same_node`).
    SameNode,
    /// Plaintext from the node itself to one of the pod's probe ports (the kubelet's health
    /// checks), admitted whatever STRICT or AuthorizationPolicy say (`proxy::inbound`).
    NodeProbe,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::None => "none",
            Security::MutualTls => "mutual_tls",
            Security::SameNode => "same_node",
            Security::NodeProbe => "node_probe",
        }
    }
}

/// One proxied connection: what the access log and the metrics say about it.
#[derive(Debug)]
pub struct Flow<'a> {
    pub direction: Direction,
    /// The pod whose listener accepted the connection.
    pub pod: &'a str,
    pub namespace: &'a str,
    /// Where from and where to ([`Self::src`], [`Self::dst`]), held compactly: an open
    /// connection holds its record for its whole life.
    src: Compact,
    dst: Compact,
    pub security: Security,
    /// Verified identities (never taken from anything but a certificate).
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_identity: Option<&'a SpiffeId>,
    /// The workloads at either end, where known.
    pub src_workload: Option<WorkloadName<'a>>,
    pub dst_workload: Option<WorkloadName<'a>>,
    /// The service: at the source, the one whose VIP was dialled; at the destination, the
    /// one this pod and port serve (guessed as ztunnel does; see `Directory::by_endpoint`).
    pub service: Option<Arc<ServiceName>>,
    metrics: Option<&'a Metrics>,
    /// Its clock, bytes and listing.
    pub state: Opened,
}

/// What a connection's record accrues while it is open: the time it started, the bytes
/// each way (the copy loops add to the tally as they go), and once opened, its
/// `connections_closed` counter and `/connections` entry. Kept alone (see
/// [`Flow::detach`]) by a connection whose record is cheap to describe again at the end.
#[derive(Debug)]
pub struct Opened {
    pub started: Instant,
    pub tally: Tally,
    live: Option<(prometheus_client::metrics::counter::Counter, u64)>,
}

impl Opened {
    fn new() -> Self {
        Opened { started: Instant::now(), tally: Tally::default(), live: None }
    }
}

fn id_str(id: Option<&SpiffeId>) -> String {
    id.map(ToString::to_string).unwrap_or_else(|| UNKNOWN.into())
}

impl<'a> Flow<'a> {
    pub fn new(direction: Direction, pod: &'a PodContext, src: SocketAddr, dst: SocketAddr) -> Self {
        let me = WorkloadName::Pod(pod);
        let (src_workload, dst_workload) = match direction {
            Direction::Outbound => (Some(me), None),
            Direction::Inbound => (None, Some(me)),
        };
        Flow {
            direction,
            pod: &pod.name,
            namespace: &pod.namespace,
            src: src.into(),
            dst: dst.into(),
            security: Security::None,
            src_identity: None,
            dst_identity: None,
            src_workload,
            dst_workload,
            service: None,
            metrics: None,
            state: Opened::new(),
        }
    }

    /// A flow with no pod behind it, for in-process tests of the copy path.
    #[cfg(test)]
    pub(super) fn for_test(src: SocketAddr, dst: SocketAddr) -> Flow<'static> {
        Flow {
            direction: Direction::Outbound,
            pod: "test",
            namespace: "test",
            src: src.into(),
            dst: dst.into(),
            security: Security::None,
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            service: None,
            metrics: None,
            state: Opened::new(),
        }
    }

    pub fn src(&self) -> SocketAddr {
        self.src.into()
    }

    pub fn dst(&self) -> SocketAddr {
        self.dst.into()
    }

    /// Report to `metrics` (flows without it only log: in-process tests).
    pub fn with_metrics(mut self, metrics: &'a Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn labels(&self, cluster: &str, response_flags: &'static str) -> TcpLabels {
        let side = |w: &Option<WorkloadName>| WorkloadLabels::of(w.as_ref().map(WorkloadName::meta), cluster);
        let service = |f: fn(&ServiceName) -> &str| self.service.as_deref().map_or(UNKNOWN, f).to_string();
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
            source: side(&self.src_workload),
            source_principal: id_str(self.src_identity),
            destination: side(&self.dst_workload),
            destination_principal: id_str(self.dst_identity),
            destination_service: service(|s| &s.fqdn),
            destination_service_name: service(|s| &s.name),
            destination_service_namespace: service(|s| &s.namespace),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: self.security.as_str(),
        }
    }

    fn service_str(&self) -> &str {
        self.service.as_deref().map_or(UNKNOWN, |s| &s.fqdn)
    }

    /// The connection is through: count it as opened (its labels are final now).
    pub fn opened(&mut self) {
        if let Some(m) = self.metrics {
            let labels = self.labels(m.cluster(), "-");
            let counters = m.open(&labels);
            // Istio's meaning: "received" is the request (source → destination), "sent"
            // the response.
            self.state.tally.sent.report_to(counters.request_bytes);
            self.state.tally.received.report_to(counters.response_bytes);
            let id = m.track(&Listing {
                direction: self.direction.as_str(),
                pod: self.pod,
                namespace: self.namespace,
                src: self.src(),
                dst: self.dst(),
                security: self.security.as_str(),
                src_identity: &labels.source_principal,
                dst_identity: &labels.destination_principal,
            });
            self.state.live = Some((counters.closed, id));
        }
    }

    /// Keep only what accrues while open (the rest is described again at the end).
    pub fn detach(self) -> Opened {
        self.state
    }

    /// The record described again, with what accrued while it was open.
    pub fn attach(mut self, state: Opened) -> Self {
        self.state = state;
        self
    }

    /// Log (and count) a connection refused before any byte moved.
    pub fn refused(&self, why: Refusal, detail: &str) {
        if let Some(m) = self.metrics {
            m.denied(why.code());
            m.open(&self.labels(m.cluster(), why.response_flags())).closed.inc();
        }
        tracing::warn!(
            target: "selvedge::access",
            direction = self.direction.as_str(),
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src(), dst = %self.dst(),
            security = self.security.as_str(),
            src_identity = %id_str(self.src_identity), dst_identity = %id_str(self.dst_identity),
            service = %self.service_str(),
            result = "refused", reason_code = why.code(), reason = detail,
            "connection refused"
        );
    }

    /// Log (and count) a finished connection, with the bytes its tally counted (also those
    /// moved before an error or a cancel). The line itself is logged by the access-log
    /// thread (`accesslog`).
    pub fn closed(&self, error: Option<String>) {
        if let (Some((closed, id)), Some(m)) = (&self.state.live, self.metrics) {
            closed.inc();
            m.untrack(*id);
        }
        if !super::accesslog::enabled() {
            return;
        }
        super::accesslog::log(super::accesslog::Closed {
            direction: self.direction.as_str(),
            pod: self.pod.to_string(),
            namespace: self.namespace.to_string(),
            src: self.src(),
            dst: self.dst(),
            security: self.security.as_str(),
            src_identity: id_str(self.src_identity),
            dst_identity: id_str(self.dst_identity),
            service: self.service_str().to_string(),
            request_bytes: self.state.tally.sent.get(),
            response_bytes: self.state.tally.received.get(),
            duration_ms: self.state.started.elapsed().as_millis() as u64,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open connection holds its record for its whole life (the outbound task holds it
    /// inline): 328 bytes before addresses, security, workloads and service were compact.
    #[test]
    fn a_record_is_compact() {
        assert!(std::mem::size_of::<Flow<'static>>() <= 216, "{}", std::mem::size_of::<Flow<'static>>());
        assert_eq!(std::mem::size_of::<Option<WorkloadName<'static>>>(), 16);
    }

    #[test]
    fn a_record_reads_back_its_addresses_and_words() {
        for (src, dst) in [("198.18.0.2:40001", "198.18.1.10:8080"), ("[2001:db8::2]:40001", "[2001:db8::1]:443")] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let mut flow = Flow::for_test(src, dst);
            assert_eq!((flow.src(), flow.dst()), (src, dst));
            assert_eq!(flow.security.as_str(), "none");
            flow.security = Security::MutualTls;
            flow.service = Some(Arc::new(ServiceName::new("db", "lab")));
            let labels = flow.labels("Kubernetes", "-");
            assert_eq!(labels.connection_security_policy, "mutual_tls");
            assert_eq!(labels.destination_service, "db.lab.svc.cluster.local");
            assert_eq!(
                (labels.destination_service_name.as_str(), labels.destination_service_namespace.as_str()),
                ("db", "lab")
            );
            assert_eq!(labels.source.workload, UNKNOWN);
            assert_eq!(labels.source.cluster, UNKNOWN, "a workload it does not know is in no known cluster");
        }
        let meta = WorkloadMeta::of("api", "lab", &Default::default());
        let owned = WorkloadName::Owned(Arc::new(meta.clone())).owned();
        assert_eq!(owned.meta(), &meta);
    }
}
