//! Certificates from files, for setups where something else issues them (SPIRE, cert-manager
//! with csi-driver-spiffe, …). Layout under the directory:
//!
//! ```text
//! root-cert.pem                                  trust bundle (one or more certificates)
//! <namespace>/<service-account>/cert-chain.pem   leaf first
//! <namespace>/<service-account>/key.pem          its private key (PKCS#8, SEC1 or PKCS#1)
//! ```
//!
//! Files are watched: when either file of an identity changes, the new pair is loaded (and
//! must still be for that identity); a bad or half-written pair keeps the previous one.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use super::{manager::Issued, svid::read_pem_certs, CertSource, IssueFuture, SpiffeId, Svid};

pub const BUNDLE: &str = "root-cert.pem";
pub const CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";

#[derive(Debug)]
pub struct FilesSource {
    dir: PathBuf,
    /// The bundle last read well (a bad or half-written file keeps it).
    roots: parking_lot::Mutex<Vec<CertificateDer<'static>>>,
}

impl FilesSource {
    pub fn new(dir: &Path) -> Result<Self, String> {
        let bundle = dir.join(BUNDLE);
        let roots = read_pem_certs(&bundle)?;
        if roots.is_empty() {
            return Err(format!("{}: no certificates", bundle.display()));
        }
        Ok(Self { dir: dir.to_owned(), roots: parking_lot::Mutex::new(roots) })
    }

    fn paths(&self, id: &SpiffeId) -> (PathBuf, PathBuf) {
        let d = self.dir.join(&id.namespace).join(&id.service_account);
        (d.join(CHAIN), d.join(KEY))
    }

    fn read(&self, id: &SpiffeId) -> Result<Issued, String> {
        let (chain_path, key_path) = self.paths(id);
        let chain = read_pem_certs(&chain_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
        Ok(Issued { chain, key })
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertSource for FilesSource {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(async move { self.read(id) })
    }

    /// The bundle file as it is now (re-read at every check, so a rotated bundle is
    /// taken without a restart); the last good one if it cannot be read or is empty.
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut last = self.roots.lock();
        if let Ok(now) = read_pem_certs(&self.dir.join(BUNDLE)) {
            if !now.is_empty() {
                *last = now;
            }
        }
        last.clone()
    }

    /// Reload when a file changed since the current pair was loaded (or at half-life, in
    /// case the issuer rotates by other means).
    fn renew_due(&self, id: &SpiffeId, svid: &Svid, now: SystemTime) -> bool {
        let (chain, key) = self.paths(id);
        let changed = [chain, key].iter().any(|p| modified(p).is_some_and(|m| m > svid.received));
        changed || now >= svid.renew_at()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::identity::{new_key, BuiltinCa, IdentityManager};

    fn write_pair(dir: &Path, ca: &BuiltinCa, id: &SpiffeId) {
        let d = dir.join(&id.namespace).join(&id.service_account);
        std::fs::create_dir_all(&d).unwrap();
        let key = new_key().unwrap();
        std::fs::write(d.join(CHAIN), ca.issue_pem(id, &key, Duration::from_secs(3600)).unwrap()).unwrap();
        std::fs::write(d.join(KEY), key.serialize_pem()).unwrap();
    }

    #[tokio::test]
    async fn loads_watches_and_keeps_the_last_good_pair() {
        let base = std::env::temp_dir().join(format!("selvedge-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        BuiltinCa::init(&base.join("ca"), "td").unwrap();
        let ca = BuiltinCa::load(&base.join("ca")).unwrap();
        let certs = base.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::copy(base.join("ca").join("root-cert.pem"), certs.join(BUNDLE)).unwrap();
        let id = SpiffeId::new("td", "shop", "web").unwrap();
        write_pair(&certs, &ca, &id);

        let source = Arc::new(FilesSource::new(&certs).unwrap());
        let mgr = IdentityManager::new(source, Arc::new(rustls::crypto::aws_lc_rs::default_provider()), "td").unwrap();
        let first = mgr.acquire(&id).await.unwrap();

        // Rotation: new files (later mtime) are picked up.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        write_pair(&certs, &ca, &id);
        mgr.refresh().await;
        let second = mgr.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "rotated files were loaded");

        // A broken write keeps the last good pair.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(certs.join("shop/web").join(KEY), "not a key").unwrap();
        mgr.refresh().await;
        assert!(Arc::ptr_eq(&second, &mgr.current(&id).unwrap()), "kept while the files are bad");
        assert!(mgr.status()[0].last_error.is_some());

        // A pair for another identity is refused.
        let other = SpiffeId::new("td", "shop", "admin").unwrap();
        write_pair(&certs, &ca, &other);
        std::fs::remove_dir_all(certs.join("shop/web")).unwrap();
        std::fs::rename(certs.join("shop/admin"), certs.join("shop/web")).unwrap();
        // Past the retry delay that followed the previous failure.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let touch = std::fs::read(certs.join("shop/web").join(CHAIN)).unwrap();
        std::fs::write(certs.join("shop/web").join(CHAIN), touch).unwrap();
        mgr.refresh().await;
        assert!(mgr.status()[0].last_error.as_deref().unwrap_or_default().contains("not spiffe://td/ns/shop/sa/web"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
