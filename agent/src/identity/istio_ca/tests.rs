//! Against a test CA server speaking the same API as istiod: gRPC framing over HTTP/2 over
//! TLS, bearer-token authentication, `ImpersonatedIdentity`, CSR signing.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use parking_lot::Mutex;
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use super::*;
use crate::identity::{new_key, BuiltinCa, IdentityManager};

const TOKEN: &str = "good-token";

/// What the server saw, for assertions.
#[derive(Default)]
struct Seen {
    impersonated: Vec<String>,
}

fn grpc_status(code: u32, msg: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_str(msg).unwrap_or(HeaderValue::from_static("error")));
    h
}

/// Answer one CreateCertificate call; Err((code, message)) for a gRPC error.
fn handle(
    ca: &BuiltinCa,
    headers: &HeaderMap,
    body: Bytes,
    seen: &Mutex<Seen>,
) -> Result<IstioCertificateResponse, (u32, String)> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return Err((16, "bad token".into()));
    }
    let req: IstioCertificateRequest = unframe(body).map_err(|e| (3, e))?;
    let who = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .ok_or((3, "no ImpersonatedIdentity".to_string()))?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr).map_err(|e| (3, e.to_string()))?;
    let sans: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| if let SanType::URI(u) = s { Some(u.as_str().to_string()) } else { None })
        .collect();
    if sans != [who.clone()] {
        return Err((7, format!("CSR SANs {sans:?} are not {who}")));
    }
    seen.lock().impersonated.push(who);
    let leaf = ca
        .sign_csr(&req.csr, Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(60)))
        .map_err(|e| (13, e.to_string()))?;
    Ok(IstioCertificateResponse { cert_chain: vec![leaf, ca.root_pem().to_string()] })
}

async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, ca: Arc<BuiltinCa>, seen: Arc<Mutex<Seen>>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (tls, ca, seen) = (tls.clone(), ca.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else { return };
            let Ok(mut conn) = h2::server::handshake(stream).await else { return };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let (ca, seen) = (ca.clone(), seen.clone());
                tokio::spawn(async move {
                    assert_eq!(req.uri().path(), PATH);
                    let headers = req.headers().clone();
                    let mut body = req.into_body();
                    let mut data = BytesMut::new();
                    while let Some(Ok(c)) = body.data().await {
                        let _ = body.flow_control().release_capacity(c.len());
                        data.extend_from_slice(&c);
                    }
                    let ok = Response::builder().header("content-type", "application/grpc").body(()).unwrap();
                    match handle(&ca, &headers, data.freeze(), &seen) {
                        Ok(resp) => {
                            let mut send = respond.send_response(ok, false).unwrap();
                            send.send_data(frame(&resp), false).unwrap();
                            send.send_trailers(grpc_status(0, "")).unwrap();
                        }
                        Err((code, msg)) => {
                            // Trailers-only response.
                            let mut resp = ok;
                            resp.headers_mut().extend(grpc_status(code, &msg));
                            let _ = respond.send_response(resp, true);
                        }
                    }
                });
            }
        });
    }
}

struct Fixture {
    source_cfg: IstioCaConfig,
    seen: Arc<Mutex<Seen>>,
    _dir: tempdir::TempDir,
}

mod tempdir {
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn start_ca(token_in_file: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("selvedge-istioca-{}-{}", std::process::id(), token_in_file));
    let _ = std::fs::remove_dir_all(&dir);
    BuiltinCa::init(&dir.join("ca"), "cluster.local").unwrap();
    let ca = Arc::new(BuiltinCa::load(&dir.join("ca")).unwrap());
    // The CA's own serving certificate, for the name the agent will verify.
    let key = new_key().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName("istiod.test".try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = ca.sign(&params, &key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(serve(listener, Arc::new(tls), ca, seen.clone()));
    std::fs::write(dir.join("token"), format!("{token_in_file}\n")).unwrap();
    let source_cfg = IstioCaConfig {
        addr,
        server_name: "istiod.test".into(),
        root_file: dir.join("ca").join("root-cert.pem"),
        token_file: dir.join("token"),
        lifetime: Duration::from_secs(3600),
    };
    Fixture { source_cfg, seen, _dir: tempdir::TempDir(dir) }
}

fn manager(cfg: IstioCaConfig) -> Arc<IdentityManager> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let source = Arc::new(IstioCaSource::new(cfg, provider.clone()).unwrap());
    IdentityManager::new(source, provider, "cluster.local").unwrap()
}

#[tokio::test]
async fn issues_workload_certificates_through_the_istio_ca_api() {
    let f = start_ca(TOKEN).await;
    let ids = manager(f.source_cfg.clone());
    for sa in ["web", "db"] {
        let id = SpiffeId::new("cluster.local", "shop", sa).unwrap();
        let svid = ids.acquire(&id).await.unwrap();
        assert_eq!(svid.id, id);
    }
    assert_eq!(
        f.seen.lock().impersonated,
        ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"],
        "the agent named each workload it asked for"
    );
}

#[tokio::test]
async fn a_refused_token_is_an_error_with_the_reason() {
    let f = start_ca("wrong-token").await;
    let ids = manager(f.source_cfg.clone());
    let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let err = ids.acquire(&id).await.unwrap_err().to_string();
    assert!(err.contains("grpc-status 16"), "{err}");
    assert!(ids.current(&id).is_none(), "no certificate, so no traffic for this identity");
}

#[tokio::test]
async fn a_ca_with_an_untrusted_certificate_is_refused() {
    let f = start_ca(TOKEN).await;
    let mut cfg = f.source_cfg.clone();
    cfg.server_name = "not-istiod.test".into();
    let ids = manager(cfg);
    let err = ids.acquire(&SpiffeId::new("cluster.local", "shop", "web").unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("TLS to the CA"), "{err}");
}
