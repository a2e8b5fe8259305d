//! The built-in certificate authority: the default in local mode, the lab and the demo.
//! `selvedge ca init --dir DIR` writes a root; the agent loads it and signs its local
//! workloads' SVIDs with keys it generates itself.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;

use super::SpiffeId;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
/// A root lives ten years.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start a little in the past, for peers whose clocks lag.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CA {path} already holds a root; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("CA: {what}: {source}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CaError {
    let what = what.into();
    move |source| CaError::Cert { what, source }
}

/// A loaded root that can sign SVIDs.
pub struct BuiltinCa {
    root: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa").finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Create a root in `dir` (`root-cert.pem`, and `root-key.pem` readable by root only).
    pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, CaError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        if cert_path.exists() || key_path.exists() {
            return Err(CaError::Exists { path: dir.to_owned() });
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_owned(), what: "create", source })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("generate root key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Selvedge root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        let cert = params.self_signed(&key).map_err(cert_err("self-sign the root"))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Io {
            path: cert_path.clone(),
            what: "write",
            source,
        })?;
        Ok(cert_path)
    }

    /// Load the root written by [`BuiltinCa::init`].
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|source| CaError::Io { path: p, what: "read", source })
        };
        let (cert_pem, key_pem) = (read(ROOT_CERT)?, read(ROOT_KEY)?);
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err(format!("parse {}", dir.join(ROOT_KEY).display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(cert_err(format!("parse {}", dir.join(ROOT_CERT).display())))?;
        let root = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Cert { what: format!("{e}"), source: rcgen::Error::CouldNotParseCertificate })?;
        Ok(Self { root, root_pem: cert_pem, issuer })
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// Sign an SVID for `id` over `key`'s public key, valid for `lifetime`. Returns the
    /// chain to present (the leaf; the root is in every peer's trust bundle).
    pub fn issue(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut params = svid_params(id)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params.signed_by(key, &self.issuer).map_err(cert_err(format!("sign {id}")))?;
        Ok(vec![cert.der().clone()])
    }

    /// The same as [`issue`](Self::issue), as PEM (for writing certificate files).
    pub fn issue_pem(&self, id: &SpiffeId, key: &KeyPair, lifetime: Duration) -> Result<String, CaError> {
        let mut params = svid_params(id)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        Ok(params.signed_by(key, &self.issuer).map_err(cert_err(format!("sign {id}")))?.pem())
    }

    /// Sign a PKCS#10 request as-is (what a test CA server does with an agent's CSR);
    /// returns the certificate as PEM.
    pub fn sign_csr(&self, csr_pem: &str, lifetime: Duration) -> Result<String, CaError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err("parse CSR"))?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - BACKDATE;
        csr.params.not_after = now + lifetime;
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        Ok(csr.signed_by(&self.issuer).map_err(cert_err("sign CSR"))?.pem())
    }

    /// Sign the public key of a PKCS#10 request for `id` alone: the certificate carries
    /// the SVID's own fields (`svid_params`), never what the request asked for beyond its
    /// key. What a CA serving other agents signs.
    pub fn sign_csr_for(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<String, CaError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err("parse CSR"))?;
        csr.params = svid_params(id)?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - BACKDATE;
        csr.params.not_after = now + lifetime;
        Ok(csr.signed_by(&self.issuer).map_err(cert_err(format!("sign {id}")))?.pem())
    }

    /// A serving certificate for `name` (DNS or IP), for the CA service's own TLS; returns
    /// the certificate and its new key.
    pub fn serving_cert(&self, name: &str, lifetime: Duration) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("key"))?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_err(format!("name {name}")))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err("sign the serving certificate"))?;
        Ok((cert.der().clone(), key))
    }

    /// The root as PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Sign arbitrary parameters (tests use it to make deliberately bad certificates).
    pub fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Result<CertificateDer<'static>, CaError> {
        Ok(params.signed_by(key, &self.issuer).map_err(cert_err("sign"))?.der().clone())
    }
}

/// What every SVID carries: one URI SAN, no subject, signature-only key usage, and both
/// server and client authentication (each agent is both).
pub fn svid_params(id: &SpiffeId) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(cert_err("encode URI SAN"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaError::Io { path: path.to_owned(), what: "create", source })?;
    f.write_all(bytes).map_err(|source| CaError::Io { path: path.to_owned(), what: "write", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::svid::{identity_of, identity_valid_at, SvidError};

    #[test]
    fn init_load_issue() {
        let dir = std::env::temp_dir().join(format!("selvedge-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        BuiltinCa::init(&dir, "lab.local").unwrap();
        assert!(matches!(BuiltinCa::init(&dir, "lab.local"), Err(CaError::Exists { .. })), "never overwrites");
        let ca = BuiltinCa::load(&dir).unwrap();
        let id = SpiffeId::new("lab.local", "shop", "web").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = ca.issue(&id, &key, Duration::from_secs(3600)).unwrap();
        assert_eq!(identity_of(&chain[0]).unwrap(), id);
        // What a resumed session's certificate is held to: valid now, not just once.
        let now = std::time::SystemTime::now();
        assert_eq!(identity_valid_at(&chain[0], now).unwrap(), id);
        let later = now + Duration::from_secs(2 * 3600);
        assert!(matches!(identity_valid_at(&chain[0], later), Err(SvidError::NotValidNow(_))), "expired");
        let earlier = now - Duration::from_secs(24 * 3600);
        assert!(matches!(identity_valid_at(&chain[0], earlier), Err(SvidError::NotValidNow(_))), "not yet valid");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(ROOT_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the root key is private");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
