//! Certificates from the Istio CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`,
//! so a cluster running istiod (or anything serving that API, e.g. cert-manager istio-csr)
//! can issue Selvedge's workload certificates.
//!
//! A unary gRPC call over HTTP/2 over TLS: the agent generates the key, sends a CSR whose one
//! URI SAN is the workload's SPIFFE ID, authenticates with a bearer token read from a file
//! (re-read every time: tokens rotate), and names the workload in the `ImpersonatedIdentity`
//! metadata (the node agent asks on behalf of its pods, as ztunnel does). The CA's root,
//! read from a file, verifies the CA and is the trust bundle for peers.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Request};
use parking_lot::Mutex;
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    ca::svid_params,
    manager::{key_der, new_key, Issued},
    svid::read_pem_certs,
    CertSource, IssueFuture, SpiffeId,
};

pub const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key naming the workload a node agent asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity, seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// Where and how to reach the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioCaConfig {
    pub addr: SocketAddr,
    /// The name on the CA's certificate (e.g. `istiod.istio-system.svc`).
    pub server_name: String,
    /// PEM file with the mesh root(s): verifies the CA, and is the peers' trust bundle.
    pub root_file: PathBuf,
    pub token_file: PathBuf,
    pub lifetime: Duration,
}

pub struct IstioCaSource {
    cfg: IstioCaConfig,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The root file as last read well; a change also re-makes `tls` (the CA's own
    /// certificate may come from the new root).
    roots: Mutex<Vec<CertificateDer<'static>>>,
    tls: Mutex<Arc<ClientConfig>>,
    /// The HTTP/2 connection to the CA, reused while it lives.
    conn: Mutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl std::fmt::Debug for IstioCaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaSource").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl IstioCaSource {
    pub fn new(cfg: IstioCaConfig, provider: Arc<rustls::crypto::CryptoProvider>) -> Result<Self, String> {
        let roots = read_pem_certs(&cfg.root_file)?;
        let tls = client_tls(&provider, &roots).map_err(|e| format!("{}: {e}", cfg.root_file.display()))?;
        ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| format!("CA server name {:?}: {e}", cfg.server_name))?;
        Ok(Self { cfg, provider, roots: Mutex::new(roots), tls: Mutex::new(tls), conn: Mutex::new(None) })
    }

    async fn connect(&self) -> Result<h2::client::SendRequest<Bytes>, String> {
        let tcp = TcpStream::connect(self.cfg.addr).await.map_err(|e| format!("connect {}: {e}", self.cfg.addr))?;
        let name = ServerName::try_from(self.cfg.server_name.clone()).map_err(|e| e.to_string())?;
        let config = self.tls.lock().clone();
        let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS to the CA: {e}"))?;
        let (sender, conn) = h2::client::handshake(tls).await.map_err(|e| format!("HTTP/2 to the CA: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call(&self, body: Bytes, token: &str) -> Result<IstioCertificateResponse, String> {
        let pooled = self.conn.lock().clone();
        let sender = match pooled {
            Some(s) => s,
            None => {
                let s = self.connect().await?;
                *self.conn.lock() = Some(s.clone());
                s
            }
        };
        let result = unary(sender, &self.cfg.server_name, body, token).await;
        if result.is_err() {
            // Next call dials again.
            *self.conn.lock() = None;
        }
        result
    }
}

/// TLS to the CA, verified with `roots`.
fn client_tls(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let mut tls = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}

/// Frame a message the gRPC way: uncompressed flag, 4-byte length, bytes.
pub fn frame(msg: &impl prost::Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.encoded_len()).unwrap_or(u32::MAX));
    msg.encode(&mut b).unwrap_or_default();
    b.freeze()
}

/// The first framed message in `buf`, if complete.
pub fn unframe<M: prost::Message + Default>(mut buf: Bytes) -> Result<M, String> {
    if buf.len() < 5 {
        return Err("truncated gRPC message".into());
    }
    if buf.get_u8() != 0 {
        return Err("compressed gRPC messages are not supported".into());
    }
    let len = buf.get_u32() as usize;
    if buf.len() < len {
        return Err("truncated gRPC message".into());
    }
    M::decode(buf.split_to(len)).map_err(|e| format!("decode: {e}"))
}

fn grpc_error(headers: &http::HeaderMap) -> Option<String> {
    let status = headers.get("grpc-status")?.to_str().ok()?;
    (status != "0").then(|| {
        let msg = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
        format!("CA refused: grpc-status {status} {msg}")
    })
}

async fn unary(
    sender: h2::client::SendRequest<Bytes>,
    authority: &str,
    body: Bytes,
    token: &str,
) -> Result<IstioCertificateResponse, String> {
    let mut ready = sender.ready().await.map_err(|e| format!("HTTP/2 to the CA: {e}"))?;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{authority}{PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let auth =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "the token is not a valid header value")?;
    req.headers_mut().insert("authorization", auth);
    let (response, mut send) = ready.send_request(req, false).map_err(|e| e.to_string())?;
    send.send_data(body, true).map_err(|e| e.to_string())?;
    let exchange = async {
        let response = response.await.map_err(|e| format!("CA: {e}"))?;
        if let Some(e) = grpc_error(response.headers()) {
            return Err(e);
        }
        if response.status() != http::StatusCode::OK {
            return Err(format!("CA answered HTTP {}", response.status()));
        }
        let mut body = response.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("CA: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(|e| format!("CA: {e}"))?.unwrap_or_default();
        if let Some(e) = grpc_error(&trailers) {
            return Err(e);
        }
        unframe(data.freeze())
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange).await.map_err(|_| "the CA did not answer in time".to_string())?
}

impl CertSource for IstioCaSource {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(async move {
            let key = new_key()?;
            let csr = svid_params(id)
                .map_err(|e| e.to_string())?
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .map_err(|e| format!("CSR: {e}"))?;
            let token = std::fs::read_to_string(&self.cfg.token_file)
                .map_err(|e| format!("token {}: {e}", self.cfg.token_file.display()))?;
            let metadata = prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
                )]
                .into_iter()
                .collect(),
            };
            let req = IstioCertificateRequest {
                csr,
                validity_duration: i64::try_from(self.cfg.lifetime.as_secs()).unwrap_or(i64::MAX),
                metadata: Some(metadata),
            };
            let resp = self.call(frame(&req), token.trim()).await?;
            let mut chain = Vec::new();
            for pem in &resp.cert_chain {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    chain.push(cert.map_err(|e| format!("CA returned a bad certificate: {e}"))?);
                }
            }
            if chain.is_empty() {
                return Err("the CA returned no certificate".into());
            }
            Ok(Issued { chain, key: key_der(&key) })
        })
    }

    /// The root file as it is now (re-read at every check: a root rotation needs no
    /// restart); the last good bundle if it cannot be read or used.
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut last = self.roots.lock();
        if let Ok(now) = read_pem_certs(&self.cfg.root_file) {
            if !now.is_empty() && now != *last {
                if let Ok(tls) = client_tls(&self.provider, &now) {
                    *self.tls.lock() = tls;
                    // The next call dials again, verifying the CA with the new bundle.
                    *self.conn.lock() = None;
                    *last = now;
                }
            }
        }
        last.clone()
    }
}

#[cfg(test)]
mod tests;
