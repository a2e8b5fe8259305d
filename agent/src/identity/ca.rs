//! The built-in certificate authority: the default in local mode, the lab and the demo, and
//! what `selvedge ca serve` signs with. `selvedge ca init --dir DIR` writes a root;
//! `selvedge ca intermediate --root-dir ROOT --dir DIR` an intermediate signed by it, in
//! the layout of Istio's plug-in CA (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
//! `root-cert.pem`), so that the root key can stay offline. [`BuiltinCa::load`] takes
//! either; with an intermediate, every certificate it issues carries the chain up to (not
//! including) the root, which is all a peer needs in its trust bundle.

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
/// An intermediate's certificate, key, and its chain up to and including the root.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
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
    #[error("CA {path}: {what}")]
    Layout { path: PathBuf, what: String },
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

/// A loaded root, or intermediate, that can sign SVIDs.
pub struct BuiltinCa {
    root: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The certificates between what it signs and the root, nearest first: empty when it
    /// signs with the root itself. Sent with every certificate it issues.
    chain: Vec<CertificateDer<'static>>,
    chain_pems: Vec<String>,
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
        let params = ca_params(trust_domain, "Selvedge root CA", BasicConstraints::Unconstrained, ROOT_LIFETIME);
        let cert = params.self_signed(&key).map_err(cert_err("self-sign the root"))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, &cert.pem())?;
        Ok(cert_path)
    }

    /// Create an intermediate in `dir`, signed by this CA (a root, or an intermediate
    /// itself): `ca-cert.pem`, `ca-key.pem` (readable by root only), `cert-chain.pem` (the
    /// intermediate, the ones above it, the root) and `root-cert.pem`. It may sign
    /// workload certificates only (path length 0). Refuses to overwrite anything.
    pub fn init_intermediate(&self, dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<PathBuf, CaError> {
        let names = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, ROOT_KEY];
        if names.iter().any(|n| dir.join(n).exists()) {
            return Err(CaError::Exists { path: dir.to_owned() });
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io { path: dir.to_owned(), what: "create", source })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err("generate intermediate key"))?;
        let params = ca_params(trust_domain, "Selvedge intermediate CA", BasicConstraints::Constrained(0), lifetime);
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err("sign the intermediate"))?;
        let chain: String = std::iter::once(cert.pem())
            .chain(self.chain_pems.iter().cloned())
            .chain(std::iter::once(self.root_pem.clone()))
            .collect();
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
        write_public(&dir.join(CA_CERT), &cert.pem())?;
        write_public(&dir.join(CERT_CHAIN), &chain)?;
        write_public(&dir.join(ROOT_CERT), &self.root_pem)?;
        Ok(dir.join(CA_CERT))
    }

    /// Load a root (written by [`BuiltinCa::init`]: `root-cert.pem`, `root-key.pem`) or an
    /// intermediate (Istio's plug-in CA layout, as [`BuiltinCa::init_intermediate`] writes
    /// it: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, and `cert-chain.pem` if there are
    /// certificates between them). An intermediate is checked at once: a certificate it
    /// signs must verify against the root, else loading fails and says so.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|source| CaError::Io { path: p, what: "read", source })
        };
        let layout = |what: &str| CaError::Layout { path: dir.to_owned(), what: what.to_owned() };
        let intermediate = dir.join(CA_KEY).exists();
        if intermediate && dir.join(ROOT_KEY).exists() {
            return Err(layout(
                "holds both root-key.pem and ca-key.pem: sign with the intermediate and keep the root key elsewhere",
            ));
        }
        let root_pem = read(ROOT_CERT)?;
        let root = first_cert(&root_pem).ok_or_else(|| layout("root-cert.pem holds no certificate"))?;
        let (cert_pem, key_name) = if intermediate { (read(CA_CERT)?, CA_KEY) } else { (root_pem.clone(), ROOT_KEY) };
        let key_path = dir.join(key_name);
        let key = KeyPair::from_pem(&read(key_name)?).map_err(cert_err(format!("parse {}", key_path.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(cert_err(format!("parse the CA certificate in {}", dir.display())))?;
        let mut ca = Self { root, root_pem, issuer, chain: Vec::new(), chain_pems: Vec::new() };
        if intermediate {
            let chain_pem = if dir.join(CERT_CHAIN).exists() { read(CERT_CHAIN)? } else { cert_pem.clone() };
            let signer = first_cert(&cert_pem).ok_or_else(|| layout("ca-cert.pem holds no certificate"))?;
            for (der, pem) in pem_certs(&chain_pem) {
                if der != ca.root {
                    ca.chain.push(der);
                    ca.chain_pems.push(pem);
                }
            }
            if ca.chain.first() != Some(&signer) {
                return Err(layout("cert-chain.pem does not start with ca-cert.pem"));
            }
            ca.check_chain().map_err(|e| layout(&format!("ca-cert.pem does not chain to root-cert.pem: {e}")))?;
        }
        Ok(ca)
    }

    /// A throwaway certificate from this CA verifies against the root alone.
    fn check_chain(&self) -> Result<(), String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let id = SpiffeId::new("check.invalid", "check", "check").map_err(|e| e.to_string())?;
        let chain = self.issue(&id, &key, Duration::from_secs(600)).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).map_err(|e| e.to_string())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(crate::tls::crypto_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let now = rustls_pki_types::UnixTime::now();
        verifier.verify_client_cert(&chain[0], &chain[1..], now).map(|_| ()).map_err(|e| e.to_string())
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
        Ok(std::iter::once(cert.der().clone()).chain(self.chain.iter().cloned()).collect())
    }

    /// The same as [`issue`](Self::issue), as PEM (for writing certificate files).
    pub fn issue_pem(&self, id: &SpiffeId, key: &KeyPair, lifetime: Duration) -> Result<String, CaError> {
        let mut params = svid_params(id)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let leaf = params.signed_by(key, &self.issuer).map_err(cert_err(format!("sign {id}")))?.pem();
        Ok(std::iter::once(leaf).chain(self.chain_pems.iter().cloned()).collect())
    }

    /// Sign a PKCS#10 request as-is (what a test CA server does with an agent's CSR);
    /// returns the certificate as PEM (without the chain: see [`chain_pems`](Self::chain_pems)).
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
    /// key. What a CA serving other agents signs. The leaf alone, as PEM (the chain to send
    /// with it is [`chain_pems`](Self::chain_pems)).
    pub fn sign_csr_for(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<String, CaError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err("parse CSR"))?;
        csr.params = svid_params(id)?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - BACKDATE;
        csr.params.not_after = now + lifetime;
        Ok(csr.signed_by(&self.issuer).map_err(cert_err(format!("sign {id}")))?.pem())
    }

    /// A serving certificate for `name` (DNS or IP), for the CA service's own TLS; returns
    /// the chain to present (the certificate first) and its new key.
    pub fn serving_cert(
        &self,
        name: &str,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("key"))?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_err(format!("name {name}")))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err("sign the serving certificate"))?;
        Ok((std::iter::once(cert.der().clone()).chain(self.chain.iter().cloned()).collect(), key))
    }

    /// The root as PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The certificates between what it signs and the root (PEM, nearest first); empty
    /// for a root.
    pub fn chain_pems(&self) -> &[String] {
        &self.chain_pems
    }

    /// Sign arbitrary parameters (tests use it to make deliberately bad certificates).
    pub fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Result<CertificateDer<'static>, CaError> {
        Ok(params.signed_by(key, &self.issuer).map_err(cert_err("sign"))?.der().clone())
    }
}

/// A CA certificate's fields: the trust domain as organization, certificate and CRL signing.
fn ca_params(trust_domain: &str, name: &str, constraints: BasicConstraints, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    params
}

/// Each certificate of a PEM text, as DER and as its own PEM block.
fn pem_certs(pem: &str) -> Vec<(CertificateDer<'static>, String)> {
    use rustls_pki_types::pem::PemObject;
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let (Some(start), Some(end)) = (rest.find("-----BEGIN CERTIFICATE-----"), rest.find(END)) {
        if end < start {
            rest = &rest[end + END.len()..];
            continue;
        }
        let block = format!("{}\n", &rest[start..end + END.len()]);
        if let Ok(der) = CertificateDer::from_pem_slice(block.as_bytes()) {
            out.push((der, block));
        }
        rest = &rest[end + END.len()..];
    }
    out
}

fn first_cert(pem: &str) -> Option<CertificateDer<'static>> {
    pem_certs(pem).into_iter().next().map(|(der, _)| der)
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

fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    std::fs::write(path, text).map_err(|source| CaError::Io { path: path.to_owned(), what: "write", source })
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

    #[test]
    fn an_intermediate_signs_with_the_chain_and_is_checked_against_its_root() {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let base = std::env::temp_dir().join(format!("selvedge-ca-intermediate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        BuiltinCa::init(&base.join("root"), "lab.local").unwrap();
        BuiltinCa::init(&base.join("other"), "lab.local").unwrap();
        let root = BuiltinCa::load(&base.join("root")).unwrap();
        let mid = base.join("mid");
        root.init_intermediate(&mid, "lab.local", YEAR).unwrap();
        assert!(
            matches!(root.init_intermediate(&mid, "lab.local", YEAR), Err(CaError::Exists { .. })),
            "never overwrites"
        );
        let ca = BuiltinCa::load(&mid).unwrap();
        assert_eq!(ca.root(), root.root());
        assert_eq!(ca.chain_pems().len(), 1, "the intermediate, not the root");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id = SpiffeId::new("lab.local", "shop", "web").unwrap();
        let chain = ca.issue(&id, &key, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        assert_eq!(identity_of(&chain[0]).unwrap(), id);
        assert_eq!(ca.issue_pem(&id, &key, Duration::from_secs(3600)).unwrap().matches("BEGIN CERTIFICATE").count(), 2);

        // An intermediate of another root, under this root: refused at load, with the reason.
        let wrong = base.join("wrong");
        BuiltinCa::load(&base.join("other")).unwrap().init_intermediate(&wrong, "lab.local", YEAR).unwrap();
        std::fs::copy(base.join("root").join(ROOT_CERT), wrong.join(ROOT_CERT)).unwrap();
        let e = BuiltinCa::load(&wrong).unwrap_err().to_string();
        assert!(e.contains("does not chain to root-cert.pem"), "{e}");
        // The root key beside an intermediate is refused: it belongs offline.
        std::fs::copy(base.join("root").join(ROOT_KEY), mid.join(ROOT_KEY)).unwrap();
        let e = BuiltinCa::load(&mid).unwrap_err().to_string();
        assert!(e.contains("keep the root key elsewhere"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
