//! An X.509-SVID as the agent holds it: the chain, the key (never leaves the agent), the
//! identity and validity read once from the leaf, and the rustls signing key.

use std::{sync::Arc, time::SystemTime};

use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("certificate: cannot parse: {0}")]
    Parse(String),
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    UriSans(usize),
    #[error("certificate URI SAN: {0}")]
    Id(#[from] super::SpiffeError),
    #[error("certificate chain is empty")]
    Empty,
    #[error("the certificate of {0} is not valid now (expired, or not yet valid)")]
    NotValidNow(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("certificate is for {found}, expected {expected}")]
    WrongId { found: String, expected: String },
}

/// A certificate chain (leaf first) with its private key.
#[derive(Debug, Clone)]
pub struct Svid {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the agent got it: half-life is measured from here, not from a backdated
    /// `not_before`.
    pub received: SystemTime,
    /// What rustls presents and signs with.
    pub certified: Arc<CertifiedKey>,
}

impl Svid {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::Empty)?;
        let (id, not_before, not_after) = inspect(leaf)?;
        let signing = provider.key_provider.load_private_key(key).map_err(|e| SvidError::Key(e.to_string()))?;
        Ok(Self {
            id,
            not_before,
            not_after,
            received: SystemTime::now(),
            certified: Arc::new(CertifiedKey::new(chain, signing)),
        })
    }

    /// Half-way from receipt to expiry: when renewal starts.
    pub fn renew_at(&self) -> SystemTime {
        let start = self.received.max(self.not_before);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life / 2
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// Every certificate in a PEM file (a chain, a trust bundle); errors name the file.
pub fn read_pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The SPIFFE ID of a leaf certificate: exactly one URI SAN, a valid SPIFFE ID.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    inspect(leaf).map(|(id, _, _)| id)
}

/// The SPIFFE ID of a leaf certificate that is valid at `now`. For sessions that skip
/// chain verification (TLS resumption keeps the first handshake's certificates): a
/// certificate that has expired since must not authenticate anything.
pub fn identity_valid_at(leaf: &CertificateDer<'_>, now: SystemTime) -> Result<SpiffeId, SvidError> {
    let (id, not_before, not_after) = inspect(leaf)?;
    if now < not_before || now > not_after {
        return Err(SvidError::NotValidNow(id.to_string()));
    }
    Ok(id)
}

fn inspect(leaf: &CertificateDer<'_>) -> Result<(SpiffeId, SystemTime, SystemTime), SvidError> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(leaf).map_err(|e| SvidError::Parse(e.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(SvidError::Parse(e.to_string())),
    };
    let [uri] = uris.as_slice() else { return Err(SvidError::UriSans(uris.len())) };
    let id: SpiffeId = uri.parse()?;
    let v = cert.validity();
    let to_system = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Ok((id, to_system(v.not_before), to_system(v.not_after)))
}
