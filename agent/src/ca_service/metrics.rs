//! What `selvedge ca serve` counts, as Prometheus text on its `--metrics-addr`: certificates
//! issued, and refusals by gRPC status (the reason of each is in the log line beside it).
//! The same listener answers `/healthz/ready` (the service is listening).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    /// The gRPC status name: `unauthenticated`, `permission_denied`, `invalid_argument`,
    /// `unavailable` (the Kubernetes API did not answer), `internal`, `unimplemented`.
    reason: &'static str,
}

/// The CA service's counters.
#[derive(Debug)]
pub struct CaMetrics {
    registry: Registry,
    issued: Counter,
    refused: Family<Refusal, Counter>,
    /// All refusals, whatever the status (the family is not summed on the hot path).
    refused_total: Counter,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let issued = Counter::default();
        let refused = Family::<Refusal, Counter>::default();
        registry.register("selvedge_ca_certificates_issued", "Certificates the CA service issued", issued.clone());
        registry.register(
            "selvedge_ca_requests_refused",
            "Certificate requests the CA service refused, by gRPC status (the reason is logged)",
            refused.clone(),
        );
        Self { registry, issued, refused, refused_total: Counter::default() }
    }
}

impl CaMetrics {
    pub fn issued(&self) {
        self.issued.inc();
    }

    /// A refusal with gRPC status `code`; returns how many refusals there have been.
    pub fn refused(&self, code: u32) -> u64 {
        self.refused.get_or_create(&Refusal { reason: status_name(code) }).inc();
        self.refused_total.inc() + 1
    }

    /// (issued, refused) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.issued.get(), self.refused_total.get())
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn status_name(code: u32) -> &'static str {
    match code {
        3 => "invalid_argument",
        7 => "permission_denied",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        16 => "unauthenticated",
        _ => "other",
    }
}

/// Serve `/metrics` and `/healthz/ready` until the task is aborted.
pub async fn serve(listener: TcpListener, metrics: Arc<CaMetrics>) {
    loop {
        let (tcp, _) = crate::accept::next("CA metrics", || listener.accept()).await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" | "/stats/prometheus" => (StatusCode::OK, metrics.encode()),
                    "/healthz/ready" => (StatusCode::OK, "ready\n".to_string()),
                    _ => (StatusCode::NOT_FOUND, "not found: /metrics, /healthz/ready\n".to_string()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut()
                    .insert("content-type", http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
