//! rustls configurations for HBONE: TLS 1.3 only, mutual authentication, ALPN `h2`, no SNI.
//!
//! rustls checks chains; it does not check URI SANs. Both sides check them here:
//! * client side: [`SpiffeServerVerifier`] verifies the chain against the trust bundle and
//!   requires the server's single URI SAN to be the identity expected for the destination;
//! * server side: rustls's client verifier checks the chain; [`peer_identity`] then requires
//!   exactly one URI SAN in our trust domain — that is the source principal.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    version::TLS13,
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, OtherError, ServerConfig,
    SignatureScheme,
};

use crate::identity::{identity_of, identity_valid_at, IdentityManager, SpiffeId};

mod provider;
pub use provider::{crypto_provider, provider_with, AesGcm};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The current certificate of one identity, looked up at each handshake so renewals take
/// effect without rebuilding configurations. None (expired, never issued) fails the
/// handshake: no certificate, no connection.
#[derive(Debug)]
struct CurrentSvid {
    ids: Arc<IdentityManager>,
    id: SpiffeId,
}

impl CurrentSvid {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.ids.current(&self.id).map(|s| s.certified.clone())
    }
}

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server side of one workload's HBONE listener: presents that workload's SVID.
pub fn server_config(ids: &Arc<IdentityManager>, id: &SpiffeId) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = ids.provider();
    let verifier = Arc::new(CurrentRootsClientVerifier::new(ids.clone())?);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentSvid { ids: ids.clone(), id: id.clone() }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // One session ticket per handshake (a resumption uses one, gets one): enough for the
    // next reconnection, and each ticket a client keeps holds a copy of our chain.
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// The client side of a tunnel from `src` to a server that must prove it is `expected`.
///
/// With `sessions` > 0 the config keeps that many TLS 1.3 session tickets for resumption.
/// Reuse the config for this (`src`, `expected`) pair only: rustls resumes a session only
/// under the verifier and certificate resolver that made it, which are this config's, and
/// a resumed session keeps the identities of its first handshake. 0: always a full one.
pub fn client_config(
    ids: &Arc<IdentityManager>,
    src: &SpiffeId,
    expected: &SpiffeId,
    sessions: usize,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = ids.provider();
    let verifier = SpiffeServerVerifier::new(ids, expected.clone())?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentSvid { ids: ids.clone(), id: src.clone() }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // IP addresses are not valid SNI; the server picks its certificate by local address.
    cfg.enable_sni = false;
    cfg.resumption = match sessions {
        0 => rustls::client::Resumption::disabled(),
        n => rustls::client::Resumption::in_memory_sessions(n),
    };
    Ok(Arc::new(cfg))
}

/// The source principal of an accepted connection: its leaf's single URI SAN, which must be
/// in our trust domain (the chain was verified by rustls in the full handshake) and valid
/// now (a resumed session carries the first handshake's certificate, unverified since).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Result<SpiffeId, String> {
    let leaf = certs.and_then(|c| c.first()).ok_or("the peer presented no certificate")?;
    let id = identity_valid_at(leaf, std::time::SystemTime::now()).map_err(|e| e.to_string())?;
    if id.trust_domain != trust_domain {
        return Err(format!("peer identity {id} is not in trust domain {trust_domain}"));
    }
    Ok(id)
}

/// Chain against our trust bundle, then the single URI SAN must equal `expected`. Server
/// names (IP addresses here) are not used: SVIDs do not carry them.
/// The anchors are the trust bundle in force at each full handshake (a rotated bundle is
/// used from the next one; open connections and resumed sessions keep theirs).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    ids: Arc<IdentityManager>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(ids: &Arc<IdentityManager>, expected: SpiffeId) -> Result<Self, TlsSetupError> {
        Ok(Self { ids: ids.clone(), expected, provider: ids.provider() })
    }
}

/// The server side's client verifier over the trust bundle in force: rustls's WebPKI
/// verifier, made again when the bundle changes (`IdentityManager::refresh_roots`).
#[derive(Debug)]
pub struct CurrentRootsClientVerifier {
    ids: Arc<IdentityManager>,
    /// The bundle the verifier below was made from, and the verifier.
    made: parking_lot::Mutex<(Arc<rustls::RootCertStore>, Arc<dyn rustls::server::danger::ClientCertVerifier>)>,
}

impl CurrentRootsClientVerifier {
    pub fn new(ids: Arc<IdentityManager>) -> Result<Self, TlsSetupError> {
        let roots = ids.roots();
        let verifier = Self::make(&ids, roots.clone())?;
        Ok(Self { ids, made: parking_lot::Mutex::new((roots, verifier)) })
    }

    fn make(
        ids: &IdentityManager,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsSetupError> {
        WebPkiClientVerifier::builder_with_provider(roots, ids.provider())
            .build()
            .map_err(|e| TlsSetupError::Config(e.to_string()))
    }

    /// The verifier for the bundle in force now.
    fn current(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let roots = self.ids.roots();
        let mut made = self.made.lock();
        if !Arc::ptr_eq(&made.0, &roots) {
            let verifier = Self::make(&self.ids, roots.clone()).map_err(|e| TlsError::General(e.to_string()))?;
            *made = (roots, verifier);
        }
        Ok(made.1.clone())
    }
}

impl rustls::server::danger::ClientCertVerifier for CurrentRootsClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: the bundle can change under a borrowed list, and an agent presents its
        // one SVID whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, TlsError> {
        self.current()?.verify_client_cert(end_entity, intermediates, now)
    }

    // Signatures and schemes do not depend on the bundle: the verifier last made answers.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.made.lock().1.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.made.lock().1.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.made.lock().1.supported_verify_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> TlsError {
    let kind = match e {
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    TlsError::InvalidCertificate(kind)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        let roots = self.ids.roots();
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let id = identity_of(end_entity)
            .map_err(|e| TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if id != self.expected {
            return Err(TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                crate::identity::SvidError::WrongId { found: id.to_string(), expected: self.expected.to_string() },
            )))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod rotation_tests;
