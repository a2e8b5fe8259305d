//! One SVID per service account that has a workload on this node.
//!
//! * issued when the first workload of that account is enrolled, with a P-256 key the agent
//!   generates (it never leaves the agent);
//! * renewed from half its lifetime on; if renewal fails the valid certificate is kept and
//!   renewal retried;
//! * at expiry it is dropped: handshakes for that identity then fail and its traffic is
//!   refused — never sent without mTLS.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{crypto::CryptoProvider, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{BuiltinCa, SpiffeId, Svid};

/// How often the manager looks for certificates to renew or drop.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Wait between failed renewal attempts.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<Issued, String>> + Send + 'a>>;

/// Where certificates come from.
pub trait CertSource: Send + Sync + 'static {
    /// A certificate for `id`. Sources that sign (built-in CA, Istio CA) generate the key
    /// here, in the agent; file sources read the one they were given.
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a>;
    /// The trust bundle peers are verified against.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
    /// Whether `svid` should be replaced now: by default from half-life on.
    fn renew_due(&self, _id: &SpiffeId, svid: &Svid, now: SystemTime) -> bool {
        now >= svid.renew_at()
    }
}

/// A fresh P-256 key, generated in the agent.
pub fn new_key() -> Result<KeyPair, String> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("generate key: {e}"))
}

pub fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// The built-in CA as a source, issuing certificates of a fixed lifetime.
#[derive(Debug)]
pub struct BuiltinSource {
    pub ca: BuiltinCa,
    pub lifetime: Duration,
}

impl CertSource for BuiltinSource {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(async move {
            let key = new_key()?;
            let chain = self.ca.issue(id, &key, self.lifetime).map_err(|e| e.to_string())?;
            Ok(Issued { chain, key: key_der(&key) })
        })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca.root()]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no valid certificate for {id}: {reason}")]
    Unavailable { id: SpiffeId, reason: String },
    #[error("trust bundle: {0}")]
    Roots(String),
}

#[derive(Debug, Default)]
struct Entry {
    svid: Option<Arc<Svid>>,
    /// Enrolled workloads using this identity; the entry goes when it drops to zero.
    users: usize,
    last_error: Option<String>,
    retry_at: Option<SystemTime>,
}

/// What `certs` in the status / config dump shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub not_after: Option<u64>,
    pub last_error: Option<String>,
}

pub struct IdentityManager {
    source: Arc<dyn CertSource>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    /// The trust bundle in force: the source's roots, re-read every check (a root
    /// rotation: old and new root both trusted, leaves re-issued, the old root removed).
    roots: RwLock<(Vec<CertificateDer<'static>>, Arc<RootCertStore>)>,
    entries: RwLock<BTreeMap<SpiffeId, Entry>>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl IdentityManager {
    pub fn new(
        source: Arc<dyn CertSource>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
    ) -> Result<Arc<Self>, IdentityError> {
        let ders = source.roots();
        let roots = store(&ders).map_err(IdentityError::Roots)?;
        Ok(Arc::new(Self {
            source,
            provider,
            trust_domain: trust_domain.into(),
            roots: RwLock::new((ders, Arc::new(roots))),
            entries: RwLock::new(BTreeMap::new()),
        }))
    }

    /// Take the source's roots if they changed; an empty or unusable bundle keeps the one in
    /// force (a half-written file must not leave the agent trusting nothing — or anything).
    /// Returns whether the bundle changed.
    pub fn refresh_roots(&self) -> bool {
        let ders = self.source.roots();
        if self.roots.read().0 == ders {
            return false;
        }
        match store(&ders) {
            Ok(roots) => {
                tracing::info!(roots = ders.len(), "trust bundle changed");
                *self.roots.write() = (ders, Arc::new(roots));
                true
            }
            Err(e) => {
                tracing::warn!("trust bundle not changed: {e}");
                false
            }
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle in force now (verifiers read it at every full handshake).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.read().1.clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// Start using `id` (a workload of that account is enrolled): issue its certificate
    /// now if there is none.
    pub async fn acquire(&self, id: &SpiffeId) -> Result<Arc<Svid>, IdentityError> {
        self.entries.write().entry(id.clone()).or_default().users += 1;
        if let Some(svid) = self.current(id) {
            return Ok(svid);
        }
        self.renew(id).await;
        self.current(id).ok_or_else(|| IdentityError::Unavailable { id: id.clone(), reason: self.last_error(id) })
    }

    /// Stop using `id`; its certificate is forgotten when no workload uses it.
    pub fn release(&self, id: &SpiffeId) {
        let mut entries = self.entries.write();
        if let Some(e) = entries.get_mut(id) {
            e.users = e.users.saturating_sub(1);
            if e.users == 0 {
                entries.remove(id);
            }
        }
    }

    /// The valid certificate for `id`, if any (none once expired).
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        let entries = self.entries.read();
        let svid = entries.get(id)?.svid.clone()?;
        (!svid.expired(SystemTime::now())).then_some(svid)
    }

    fn last_error(&self, id: &SpiffeId) -> String {
        self.entries.read().get(id).and_then(|e| e.last_error.clone()).unwrap_or_else(|| "not issued".into())
    }

    /// Issue a fresh certificate for `id`; on failure keep the old one and note the error.
    async fn renew(&self, id: &SpiffeId) {
        let result = match self.source.issue(id).await {
            Ok(issued) => {
                Svid::new(issued.chain, issued.key, &self.provider).map_err(|e| e.to_string()).and_then(|svid| {
                    if &svid.id == id {
                        Ok(svid)
                    } else {
                        Err(format!("the certificate is for {}, not {id}", svid.id))
                    }
                })
            }
            Err(e) => Err(e),
        };
        let mut entries = self.entries.write();
        let Some(entry) = entries.get_mut(id) else { return };
        match result {
            Ok(svid) => {
                tracing::info!(identity = %id, valid_for_s = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "certificate issued");
                entry.svid = Some(Arc::new(svid));
                entry.last_error = None;
                entry.retry_at = None;
            }
            Err(e) => {
                tracing::warn!(identity = %id, "certificate not renewed (keeping the current one while valid): {e}");
                entry.last_error = Some(e);
                entry.retry_at = Some(SystemTime::now() + RETRY_AFTER);
            }
        }
    }

    /// One pass: renew what is past half-life (or missing), drop what has expired.
    pub async fn refresh(&self) {
        self.refresh_roots();
        let now = SystemTime::now();
        let due: Vec<SpiffeId> = {
            let mut entries = self.entries.write();
            for (id, e) in entries.iter_mut() {
                if e.svid.as_ref().is_some_and(|s| s.expired(now)) {
                    tracing::error!(identity = %id, "certificate expired; this identity's traffic is refused until renewal succeeds");
                    e.svid = None;
                }
            }
            entries
                .iter()
                .filter(|(_, e)| e.retry_at.is_none_or(|t| now >= t))
                .filter(|(id, e)| e.svid.as_ref().is_none_or(|s| self.source.renew_due(id, s, now)))
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in due {
            self.renew(&id).await;
        }
    }

    /// Run [`refresh`](Self::refresh) forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            self.refresh().await;
        }
    }

    pub fn status(&self) -> Vec<CertStatus> {
        self.entries
            .read()
            .iter()
            .map(|(id, e)| CertStatus {
                identity: id.to_string(),
                not_after: e
                    .svid
                    .as_ref()
                    .and_then(|s| s.not_after.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                last_error: e.last_error.clone(),
            })
            .collect()
    }
}

/// A root store from a bundle; Err when it is empty or holds no usable certificate.
fn store(ders: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for r in ders {
        roots.add(r.clone()).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("the certificate source has no roots".into());
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A source that signs with the built-in CA but can be told to fail.
    struct Flaky {
        inner: BuiltinSource,
        fail: AtomicBool,
    }

    impl CertSource for Flaky {
        fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err("CA unreachable".to_string()) });
            }
            self.inner.issue(id)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.inner.roots()
        }
    }

    fn source(lifetime: Duration) -> Arc<Flaky> {
        let dir = std::env::temp_dir().join(format!("selvedge-mgr-{}-{}", std::process::id(), lifetime.as_millis()));
        let _ = std::fs::remove_dir_all(&dir);
        BuiltinCa::init(&dir, "td").unwrap();
        let ca = BuiltinCa::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Arc::new(Flaky { inner: BuiltinSource { ca, lifetime }, fail: AtomicBool::new(false) })
    }

    #[tokio::test]
    async fn issues_renews_keeps_on_failure_and_drops_at_expiry() {
        // Valid for 4 s from issue: past half-life after 2 s.
        let src = source(Duration::from_secs(4));
        let mgr =
            IdentityManager::new(src.clone(), Arc::new(rustls::crypto::aws_lc_rs::default_provider()), "td").unwrap();
        let id = SpiffeId::new("td", "ns", "sa").unwrap();
        let first = mgr.acquire(&id).await.unwrap();
        mgr.refresh().await;
        assert!(Arc::ptr_eq(&first, &mgr.current(&id).unwrap()), "not renewed before half-life");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        mgr.refresh().await;
        let second = mgr.current(&id).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "renewed past half-life");

        src.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        mgr.refresh().await;
        let kept = mgr.current(&id).expect("the valid certificate is kept while renewal fails");
        assert!(Arc::ptr_eq(&kept, &second));
        assert!(mgr.status()[0].last_error.as_deref() == Some("CA unreachable"));

        tokio::time::sleep(Duration::from_secs(4)).await;
        mgr.refresh().await;
        assert!(mgr.current(&id).is_none(), "dropped at expiry: no certificate, no traffic");

        mgr.release(&id);
        assert!(mgr.status().is_empty());
    }
}
