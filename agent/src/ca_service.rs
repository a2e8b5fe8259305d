//! `selvedge ca serve`: the cluster CA, so that no node holds the mesh's root key. It speaks
//! the Istio CA API the agents already use (`IstioCertificateService/CreateCertificate`,
//! gRPC over HTTP/2 over TLS), authenticates each caller by its bearer token, and
//! authorizes impersonation the way istiod does for ztunnel (`authorize.rs`): a node agent
//! gets a certificate only for a service account with a pod (not finished) on its own node.
//!
//! Who a token belongs to and which pods run where come from an [`Authority`]: in a
//! cluster, the Kubernetes API (`k8s::authority`: TokenReview and the pod list).

pub mod authorize;
pub mod metrics;

use std::{collections::BTreeSet, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};

use crate::identity::{
    frame, unframe, BuiltinCa, IstioCertificateRequest, IstioCertificateResponse, SpiffeId, IMPERSONATED_IDENTITY,
    ISTIO_CA_PATH,
};
use authorize::{Account, Caller, Rules};

/// Who presents a token, and which service accounts run where.
pub trait Authority: Send + Sync + 'static {
    /// The caller a bearer token stands for; Err(reason) when it is not valid.
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<Caller, String>> + Send;
    /// The (namespace, service account) pairs with a pod (not finished) on `node`.
    fn accounts_on(&self, node: &str) -> impl Future<Output = Result<BTreeSet<Account>, String>> + Send;
}

/// How the service is set up.
#[derive(Debug, Clone)]
pub struct CaSettings {
    pub trust_domain: String,
    /// Service accounts of node agents (may ask for their node's pods' identities).
    pub node_agents: BTreeSet<Account>,
    /// The longest certificate it issues; a request for longer gets this.
    pub max_lifetime: Duration,
}

/// gRPC status codes used here.
const UNAUTHENTICATED: u32 = 16;
const PERMISSION_DENIED: u32 = 7;
const INVALID_ARGUMENT: u32 = 3;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;

/// The CA service.
pub struct CaService<A> {
    ca: BuiltinCa,
    authority: A,
    settings: CaSettings,
    metrics: Arc<metrics::CaMetrics>,
}

impl<A> std::fmt::Debug for CaService<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl<A: Authority> CaService<A> {
    pub fn new(ca: BuiltinCa, authority: A, settings: CaSettings) -> Arc<Self> {
        let metrics = Arc::default();
        Arc::new(Self { ca, authority, settings, metrics })
    }

    /// Its counters, for the metrics listener.
    pub fn metrics(&self) -> Arc<metrics::CaMetrics> {
        self.metrics.clone()
    }

    /// (issued, refused) so far.
    pub fn counts(&self) -> (u64, u64) {
        self.metrics.counts()
    }

    /// TLS for `name` (the address the agents dial, as in their `--istio-ca-server-name`),
    /// with a serving certificate from the root.
    pub fn tls(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let (chain, key) =
            self.ca.serving_cert(name, Duration::from_secs(365 * 24 * 3600)).map_err(|e| e.to_string())?;
        let provider = Arc::new(crate::tls::crypto_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
            .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(tls))
    }

    /// Serve until the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        loop {
            let (tcp, peer) = crate::accept::next("CA service", || listener.accept()).await;
            tokio::spawn(self.clone().connection(tcp, peer, tls.clone()));
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, tls: Arc<rustls::ServerConfig>) {
        let handshake = async {
            let stream = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await.map_err(|e| e.to_string())?;
            h2::server::handshake(stream).await.map_err(|e| e.to_string())
        };
        let mut conn = match tokio::time::timeout(crate::hbone::HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return tracing::debug!(%peer, "CA connection: handshake failed: {e}"),
            Err(_) => return tracing::debug!(%peer, "CA connection: handshake timed out"),
        };
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(self.clone().call(req, respond, peer));
        }
    }

    async fn call(
        self: Arc<Self>,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        peer: SocketAddr,
    ) {
        let ok = Response::builder().header("content-type", "application/grpc").body(()).unwrap_or_default();
        let answer = if req.uri().path() == ISTIO_CA_PATH {
            let headers = req.headers().clone();
            match read_body(req.into_body()).await {
                Ok(body) => self.create_certificate(&headers, body).await,
                Err(e) => Err((INVALID_ARGUMENT, e)),
            }
        } else {
            Err((12, format!("unknown method {}", req.uri().path())))
        };
        match answer {
            Ok(resp) => {
                self.metrics.issued();
                if let Ok(mut send) = respond.send_response(ok, false) {
                    let _ = send.send_data(frame(&resp), false);
                    let _ = send.send_trailers(grpc_status(0, ""));
                }
            }
            Err((code, reason)) => {
                let refused = self.metrics.refused(code);
                tracing::warn!(%peer, grpc_status = code, refused_total = refused, "certificate refused: {reason}");
                let mut resp = ok;
                resp.headers_mut().extend(grpc_status(code, &reason));
                let _ = respond.send_response(resp, true);
            }
        }
    }

    /// Authenticate, read the request, authorize, sign.
    async fn create_certificate(
        &self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<IstioCertificateResponse, (u32, String)> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or((UNAUTHENTICATED, "no bearer token".to_string()))?;
        let caller = self.authority.authenticate(token.trim()).await.map_err(|e| (UNAUTHENTICATED, e))?;
        let req: IstioCertificateRequest = unframe(body).map_err(|e| (INVALID_ARGUMENT, e))?;
        let requested = requested_identity(&req).map_err(|e| (INVALID_ARGUMENT, e))?;
        let rules = Rules { trust_domain: &self.settings.trust_domain, node_agents: &self.settings.node_agents };
        let on_node = match authorize::node_to_ask(&rules, &caller, &requested) {
            Some(node) => Some(self.authority.accounts_on(node).await.map_err(|e| (UNAVAILABLE, e))?),
            None => None,
        };
        authorize::authorize(&rules, &caller, &requested, on_node.as_ref()).map_err(|e| (PERMISSION_DENIED, e))?;
        let asked = u64::try_from(req.validity_duration).unwrap_or(0);
        let lifetime = match asked {
            0 => self.settings.max_lifetime,
            s => Duration::from_secs(s).min(self.settings.max_lifetime),
        };
        let leaf = self.ca.sign_csr_for(&req.csr, &requested, lifetime).map_err(|e| (INTERNAL, e.to_string()))?;
        tracing::info!(identity = %requested, caller = %format!("{}/{}", caller.namespace, caller.service_account), node = caller.node.as_deref().unwrap_or("-"), "certificate issued");
        // Leaf, intermediates, root: the order istiod answers in.
        let cert_chain = std::iter::once(leaf)
            .chain(self.ca.chain_pems().iter().cloned())
            .chain(std::iter::once(self.ca.root_pem().to_string()))
            .collect();
        Ok(IstioCertificateResponse { cert_chain })
    }
}

/// The identity asked for: `ImpersonatedIdentity` when given, else the CSR's one URI SAN;
/// the CSR must name exactly that identity.
fn requested_identity(req: &IstioCertificateRequest) -> Result<SpiffeId, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr).map_err(|e| format!("CSR: {e}"))?;
    let sans: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| if let rcgen::SanType::URI(u) = s { Some(u.as_str().to_string()) } else { None })
        .collect();
    let impersonated =
        req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    let wanted = match (impersonated, sans.as_slice()) {
        (Some(id), _) => id,
        (None, [one]) => one.clone(),
        (None, _) => return Err(format!("the CSR names {} URI SANs, not one", sans.len())),
    };
    if sans != [wanted.clone()] {
        return Err(format!("the CSR's URI SANs {sans:?} are not {wanted}"));
    }
    wanted.parse().map_err(|e| format!("{wanted}: {e}"))
}

async fn read_body(mut body: h2::RecvStream) -> Result<Bytes, String> {
    const MAX: usize = 64 * 1024;
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if data.len() + chunk.len() > MAX {
            return Err(format!("request over {MAX} bytes"));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

fn grpc_status(code: u32, msg: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code));
    let printable: String = msg.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    h.insert("grpc-message", HeaderValue::from_str(&printable).unwrap_or(HeaderValue::from_static("error")));
    h
}

#[cfg(test)]
mod tests;
