//! One proxied connection as the access log and the metrics see it, and why connections
//! are refused.

use std::{borrow::Cow, net::SocketAddr, time::Instant};

use super::{Direction, PodContext};
use crate::{
    identity::SpiffeId,
    metrics::{Listing, Metrics, Tally, TcpLabels, UNKNOWN},
    state::Peer,
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
        }
    }

    /// Envoy-style response flags, as Istio dashboards expect them.
    fn response_flags(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination | Refusal::NoEndpoints => "NR",
            Refusal::UpstreamUnreachable | Refusal::TunnelFailed => "UF",
            _ => "DENY",
        }
    }
}

/// A workload's name and namespace, for labels: borrowed from the directory snapshot or
/// the pod the connection holds anyway, owned only where neither lasts (a lookup).
#[derive(Debug, Clone, Default)]
pub struct WorkloadName<'a> {
    pub name: Cow<'a, str>,
    pub namespace: Cow<'a, str>,
}

impl<'a> From<&'a Peer> for WorkloadName<'a> {
    fn from(p: &'a Peer) -> Self {
        WorkloadName { name: Cow::Borrowed(&p.name), namespace: Cow::Borrowed(&p.namespace) }
    }
}

impl WorkloadName<'_> {
    /// Owned, for keeping beyond the lookup that found it.
    pub fn owned(&self) -> WorkloadName<'static> {
        WorkloadName { name: Cow::Owned(self.name.to_string()), namespace: Cow::Owned(self.namespace.to_string()) }
    }
}

/// One proxied connection: what the access log and the metrics say about it.
#[derive(Debug)]
pub struct Flow<'a> {
    pub direction: Direction,
    /// The pod whose listener accepted the connection.
    pub pod: &'a str,
    pub namespace: &'a str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `mutual_tls` for HBONE, `none` for plaintext.
    pub security: &'static str,
    /// Verified identities (never taken from anything but a certificate).
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_identity: Option<&'a SpiffeId>,
    /// The workloads at either end, where known.
    pub src_workload: Option<WorkloadName<'a>>,
    pub dst_workload: Option<WorkloadName<'a>>,
    /// The service dialled, when the destination was a service VIP.
    pub service: Option<String>,
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
        let me = WorkloadName { name: Cow::Borrowed(&pod.name), namespace: Cow::Borrowed(&pod.namespace) };
        let (src_workload, dst_workload) = match direction {
            Direction::Outbound => (Some(me), None),
            Direction::Inbound => (None, Some(me)),
        };
        Flow {
            direction,
            pod: &pod.name,
            namespace: &pod.namespace,
            src,
            dst,
            security: "none",
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
            src,
            dst,
            security: "none",
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            service: None,
            metrics: None,
            state: Opened::new(),
        }
    }

    /// Report to `metrics` (flows without it only log: in-process tests).
    pub fn with_metrics(mut self, metrics: &'a Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn labels(&self, response_flags: &'static str) -> TcpLabels {
        let name = |w: &Option<WorkloadName>| w.as_ref().map_or(UNKNOWN, |w| &w.name).to_string();
        let ns = |w: &Option<WorkloadName>| w.as_ref().map_or(UNKNOWN, |w| &w.namespace).to_string();
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
            source_workload: name(&self.src_workload),
            source_workload_namespace: ns(&self.src_workload),
            source_principal: id_str(self.src_identity),
            destination_workload: name(&self.dst_workload),
            destination_workload_namespace: ns(&self.dst_workload),
            destination_principal: id_str(self.dst_identity),
            destination_service: self.service.clone().unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: self.security,
        }
    }

    /// The connection is through: count it as opened (its labels are final now).
    pub fn opened(&mut self) {
        if let Some(m) = self.metrics {
            let labels = self.labels("-");
            let counters = m.open(&labels);
            self.state.tally.sent.report_to(counters.sent);
            self.state.tally.received.report_to(counters.received);
            let id = m.track(&Listing {
                direction: self.direction.as_str(),
                pod: self.pod,
                namespace: self.namespace,
                src: self.src,
                dst: self.dst,
                security: self.security,
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
            m.open(&self.labels(why.response_flags())).closed.inc();
        }
        tracing::warn!(
            target: "selvedge::access",
            direction = self.direction.as_str(),
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src, dst = %self.dst,
            security = self.security,
            src_identity = %id_str(self.src_identity), dst_identity = %id_str(self.dst_identity),
            service = %self.service.as_deref().unwrap_or(UNKNOWN),
            result = "refused", reason_code = why.code(), reason = detail,
            "connection refused"
        );
    }

    /// Log (and count) a finished connection, with the bytes its tally counted (also those
    /// moved before an error or a cancel).
    pub fn closed(&self, error: Option<String>) {
        if let (Some((closed, id)), Some(m)) = (&self.state.live, self.metrics) {
            closed.inc();
            m.untrack(*id);
        }
        let (sent, received) = (self.state.tally.sent.get(), self.state.tally.received.get());
        tracing::info!(
            target: "selvedge::access",
            direction = self.direction.as_str(),
            pod = %self.pod, namespace = %self.namespace,
            src = %self.src, dst = %self.dst,
            security = self.security,
            src_identity = %id_str(self.src_identity), dst_identity = %id_str(self.dst_identity),
            service = %self.service.as_deref().unwrap_or(UNKNOWN),
            bytes_sent = sent, bytes_received = received,
            duration_ms = self.state.started.elapsed().as_millis() as u64,
            result = if error.is_some() { "error" } else { "ok" },
            reason = %error.unwrap_or_default(),
            "connection closed"
        );
    }
}
