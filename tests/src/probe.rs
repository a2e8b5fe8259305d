//! A hostile (or merely honest) HBONE client for lab tests: it presents whatever certificate
//! a test asks for and sends whatever request, to a real agent's 15008 listener. Certificates
//! are minted with the agent's own CA code from the lab's root (or from a stranger's).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use rcgen::SanType;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use selvedge::identity::{new_key, svid_params, BuiltinCa, SpiffeId};

/// Which certificate to present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cert {
    Good,
    Expired,
    TwoUriSans,
    NoUriSan,
    OtherTrustDomain,
    UnknownRoot,
}

impl Cert {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "good" => Cert::Good,
            "expired" => Cert::Expired,
            "two-sans" => Cert::TwoUriSans,
            "no-san" => Cert::NoUriSan,
            "other-td" => Cert::OtherTrustDomain,
            "unknown-root" => Cert::UnknownRoot,
            _ => return None,
        })
    }
}

/// The probe does not care who the server is; it only reports what happened.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn mint(
    ca_dir: &Path,
    who: &SpiffeId,
    kind: Cert,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    let key = new_key()?;
    let e = |e: selvedge::identity::CaError| e.to_string();
    let stranger;
    let ca = match kind {
        Cert::UnknownRoot => {
            let dir = std::env::temp_dir().join(format!("selvedge-probe-stranger-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            BuiltinCa::init(&dir, &who.trust_domain).map_err(e)?;
            stranger = BuiltinCa::load(&dir).map_err(e)?;
            let _ = std::fs::remove_dir_all(&dir);
            &stranger
        }
        _ => {
            stranger = BuiltinCa::load(ca_dir).map_err(e)?;
            &stranger
        }
    };
    let mut params = match kind {
        Cert::OtherTrustDomain => svid_params(
            &SpiffeId::new("elsewhere.local", &who.namespace, &who.service_account).map_err(|x| x.to_string())?,
        ),
        _ => svid_params(who),
    }
    .map_err(e)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + Duration::from_secs(3600);
    match kind {
        Cert::Expired => {
            params.not_before = now - Duration::from_secs(7200);
            params.not_after = now - Duration::from_secs(3600);
        }
        Cert::TwoUriSans => params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/ns/{}/sa/admin", who.trust_domain, who.namespace).try_into().map_err(|_| "uri")?,
        )),
        Cert::NoUriSan => params.subject_alt_names.clear(),
        _ => {}
    }
    let cert = ca.sign(&params, &key).map_err(e)?;
    Ok((cert, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
}

/// Connect to `hbone` presenting `kind` for `who`, send `method` for `target`; returns the
/// HTTP status, or the error that ended the attempt.
pub async fn probe(
    hbone: SocketAddr,
    ca_dir: &Path,
    who: &SpiffeId,
    kind: Cert,
    method: &str,
    target: &str,
) -> Result<u16, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (cert, key) = mint(ca_dir, who, kind)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.enable_sni = false;
    let tcp = tokio::net::TcpStream::connect(hbone).await.map_err(|e| format!("connect: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(hbone.ip().into()), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (sender, conn) = h2::client::handshake(tls).await.map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let method: http::Method = method.parse().map_err(|_| "bad method")?;
    let uri = if method == http::Method::CONNECT { target.to_string() } else { format!("https://{target}/") };
    let req = http::Request::builder().method(method).uri(uri).body(()).map_err(|e| e.to_string())?;
    let mut ready = sender.ready().await.map_err(|e| format!("h2: {e}"))?;
    let (resp, mut send) = ready.send_request(req, false).map_err(|e| format!("h2: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("h2: {e}"))?;
    let _ = send.send_data(Bytes::new(), true);
    Ok(resp.status().as_u16())
}
