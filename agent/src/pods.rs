//! The pod lifecycle: enroll a pod (its listeners in its netns, its identity, its kernel
//! entries), keep it closed when it cannot be, change its mTLS mode, enroll it again when
//! its namespace changes or the kernel drifts, unenroll it, and sweep what a previous agent
//! left. [`Pods`] owns the datapath handle; the rest of the agent reads it through here.
//!
//! * `drift.rs` — drift between the agent's pods and the kernel's entries, and a netns
//!   recreated at the same path: found and repaired.

mod drift;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use selvedge_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    config,
    datapath::{Datapath, DatapathError, FlowMaps},
    hbone,
    inpod::{InpodError, PodNetns},
    limits::Share,
    proxy::{self, ConnTracker, Mesh, PodContext},
    state::{self, Change, PodSpec},
    sys, tls,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Inpod(#[from] InpodError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error("pod {pod}: no free pod slot ({max} pods per node, see --max-pods); its inbound stays closed")]
    NoSlot { pod: String, max: u32 },
}

/// An enrolled pod and what serves it.
#[derive(Debug)]
pub struct Enrolled {
    pub spec: PodSpec,
    pub pod_id: u32,
    pub ctx: Arc<PodContext>,
    /// Accept loops; aborting them closes the pod's listeners.
    accept_tasks: Vec<JoinHandle<()>>,
}

/// A configured pod that is not enrolled, and why.
#[derive(Debug)]
pub struct Failed {
    pub reason: String,
    /// Set when its netns was reached and closed (`Datapath::close_pod`), to release later.
    pub closed: Option<u64>,
}

/// What every pod's proxies share, made once by the agent.
#[derive(Debug)]
pub struct Shared {
    pub flows: Arc<FlowMaps>,
    pub mesh: Arc<Mesh>,
    pub conns: Arc<ConnTracker>,
    /// TLS handshakes in progress on every pod's HBONE listener (`--max-handshakes`).
    pub handshakes: Arc<Share>,
    pub trust_domain: Arc<str>,
    /// `--max-conns-per-pod`.
    pub conns_per_pod: usize,
}

/// This node's pods: enrolled, failed (kept closed) and waiting for their netns.
#[derive(Debug)]
pub struct Pods {
    datapath: Datapath,
    flows: Arc<FlowMaps>,
    mesh: Arc<Mesh>,
    conns: Arc<ConnTracker>,
    handshakes: Arc<Share>,
    trust_domain: Arc<str>,
    conns_per_pod: usize,
    enrolled: BTreeMap<String, Enrolled>,
    /// Pods the config wants but that could not be enrolled.
    failed: BTreeMap<String, Failed>,
    /// Pods on this node whose network namespace is not known yet (uid → namespace/name).
    waiting: BTreeMap<String, String>,
    /// Whether stale kernel entries from a previous agent have been swept.
    swept: bool,
}

impl Pods {
    pub fn new(datapath: Datapath, shared: Shared) -> Self {
        let Shared { flows, mesh, conns, handshakes, trust_domain, conns_per_pod } = shared;
        Self {
            datapath,
            flows,
            mesh,
            conns,
            handshakes,
            trust_domain,
            conns_per_pod,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            waiting: BTreeMap::new(),
            swept: false,
        }
    }

    pub fn enrolled(&self) -> &BTreeMap<String, Enrolled> {
        &self.enrolled
    }

    pub fn failed(&self) -> &BTreeMap<String, Failed> {
        &self.failed
    }

    pub fn waiting(&self) -> &BTreeMap<String, String> {
        &self.waiting
    }

    /// The kernel side, to read (counters, the maps' walk, links).
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Enroll, unenroll and change pods until this node's pods are `desired`; `waiting`:
    /// the pods on this node whose netns is not known yet. Per-pod failures are recorded
    /// (and those pods kept closed), not returned.
    pub async fn converge(&mut self, desired: BTreeMap<String, PodSpec>, waiting: BTreeMap<String, String>) {
        self.waiting = waiting;
        let current: BTreeMap<String, PodSpec> =
            self.enrolled.iter().map(|(k, v)| (k.clone(), v.spec.clone())).collect();
        let gone: Vec<String> = self.failed.keys().filter(|uid| !desired.contains_key(*uid)).cloned().collect();
        for uid in gone {
            if let Some(Failed { closed: Some(cookie), .. }) = self.failed.remove(&uid) {
                if let Err(e) = self.datapath.release_closed_pod(cookie) {
                    tracing::error!(uid = %uid, "closed pod not released: {e}");
                }
            }
        }
        for change in state::plan(&current, &desired) {
            match change {
                Change::Unenroll(uid) => self.unenroll(&uid),
                Change::SetMtls(uid, mtls) => {
                    if let Some(p) = self.enrolled.get_mut(&uid) {
                        match self.datapath.set_flags(p.ctx.netns.cookie(), p.pod_id, mtls.kernel_strict()) {
                            Ok(()) => {
                                *p.ctx.mtls.write() = mtls.clone();
                                p.spec.mtls = mtls;
                            }
                            Err(e) => tracing::error!(pod = %p.spec.name, "mtls mode not updated: {e}"),
                        }
                    }
                }
                Change::Enroll(spec) => self.try_enroll(&spec).await,
            }
        }
    }

    /// Stop accepting on every pod's listeners (shutdown: open connections drain).
    pub fn stop_accepting(&mut self) {
        for p in self.enrolled.values_mut() {
            for t in p.accept_tasks.drain(..) {
                t.abort();
            }
        }
    }

    /// A start that failed after attaching: unenroll everything, then remove what this
    /// agent pinned if nothing was pinned before it (`Datapath::abandon`); says what is left.
    pub fn abandon(mut self) -> String {
        let uids: Vec<String> = self.enrolled.keys().cloned().collect();
        for uid in &uids {
            self.unenroll(uid);
        }
        self.datapath.abandon()
    }

    /// Enroll, or record why not; a pod whose netns was reached stays closed on failure.
    pub async fn try_enroll(&mut self, spec: &PodSpec) {
        let netns = match PodNetns::enter(&spec.netns) {
            Ok(n) => n,
            Err(e) => return self.record_failure(spec, e.into(), None),
        };
        let cookie = netns.cookie();
        let ns_fd = netns.file().try_clone_to_owned();
        match self.enroll(spec, netns).await {
            Ok(()) => {
                self.failed.remove(&spec.uid);
                tracing::info!(pod = %spec.name, namespace = %spec.namespace, identity = %spec.identity, strict = spec.mtls.kernel_strict(), "enrolled");
            }
            Err(e) => {
                let closed = match ns_fd {
                    Ok(fd) => match self.datapath.close_pod(cookie, fd.as_fd()) {
                        Ok(()) => Some(cookie),
                        Err(close) => {
                            tracing::error!(pod = %spec.name, "could not keep the pod closed: {close}");
                            None
                        }
                    },
                    Err(dup) => {
                        tracing::error!(pod = %spec.name, "could not keep the pod closed: {dup}");
                        None
                    }
                };
                self.record_failure(spec, e, closed);
            }
        }
    }

    fn record_failure(&mut self, spec: &PodSpec, e: PodError, closed: Option<u64>) {
        tracing::error!(pod = %spec.name, namespace = %spec.namespace, closed = closed.is_some(), "not enrolled: {e}");
        self.failed.insert(spec.uid.clone(), Failed { reason: e.to_string(), closed });
    }

    async fn enroll(&mut self, spec: &PodSpec, netns: PodNetns) -> Result<(), PodError> {
        let cookie = netns.cookie();
        let pod_id = self.pod_slot(cookie, &spec.name)?;
        // No certificate, no enrollment: the pod stays closed rather than unauthenticated.
        self.mesh.ids.acquire(&spec.identity).await?;
        let listeners = self.open_listeners(&netns, &spec.name).await;
        let (outbound, inbound, hbone) = match listeners {
            Ok(l) => l,
            Err(e) => {
                self.mesh.ids.release(&spec.identity);
                return Err(e);
            }
        };
        let addr = spec.ips.first().copied();
        if let Err(e) = self.datapath.enroll(cookie, netns.file(), pod_id, spec.mtls.kernel_strict(), &inbound, addr) {
            self.mesh.ids.release(&spec.identity);
            return Err(e.into());
        }

        let ctx = Arc::new(PodContext {
            uid: spec.uid.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            identity: spec.identity.clone(),
            ips: spec.ips.clone(),
            netns,
            mtls: parking_lot::RwLock::new(spec.mtls.clone()),
            labels: spec.labels.clone(),
            meta: spec.meta.clone(),
            conns: crate::limits::Share::new(self.conns_per_pod),
            slot: pod_id,
            baggage: hbone::headers::baggage(&spec.meta, &spec.name, self.mesh.metrics.cluster()),
            flows: self.flows.clone(),
        });
        let timeout = Duration::from_secs(config::CONNECT_TIMEOUT_SECS);
        let hbone_opts = hbone::server::ServerOptions {
            tls: tokio_rustls::TlsAcceptor::from(tls::server_config(&self.mesh.ids, &spec.identity)?),
            trust_domain: self.trust_domain.clone(),
            handshake_timeout: hbone::HANDSHAKE_TIMEOUT,
            idle_timeout: hbone::SERVER_IDLE,
            handshakes: self.handshakes.clone(),
            ping_interval: hbone::keepalive::PING_INTERVAL,
        };
        let upstream = Arc::new(proxy::inbound::HboneUpstream {
            pod: ctx.clone(),
            mesh: self.mesh.clone(),
            conns: self.conns.clone(),
            timeout,
        });
        let mut accept_tasks = vec![
            tokio::spawn(proxy::inbound::serve(inbound, ctx.clone(), self.mesh.clone(), self.conns.clone(), timeout)),
            tokio::spawn(hbone::server::serve(hbone, hbone_opts, upstream)),
        ];
        for l in outbound {
            accept_tasks.push(tokio::spawn(proxy::outbound::serve(
                l,
                ctx.clone(),
                self.flows.clone(),
                self.mesh.clone(),
                self.conns.clone(),
                timeout,
            )));
        }
        self.mesh.add_local(&ctx);
        self.enrolled.insert(spec.uid.clone(), Enrolled { spec: spec.clone(), pod_id, ctx, accept_tasks });
        Ok(())
    }

    /// The agent's listeners inside a pod: outbound 15001 (IPv4, and IPv6 when the pod has
    /// it), inbound 15006 and HBONE 15008 (dual-stack when possible).
    async fn open_listeners(
        &self,
        netns: &PodNetns,
        pod: &str,
    ) -> Result<(Vec<TcpListener>, TcpListener, TcpListener), PodError> {
        let mut outbound = vec![netns.listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT)).await?];
        match netns.listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), OUTBOUND_PORT)).await {
            Ok(l) => outbound.push(l),
            Err(e) => tracing::debug!(pod, "no IPv6 outbound listener: {e}"),
        }
        let any = |port| async move {
            match netns.listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)).await {
                Ok(l) => Ok(l),
                Err(_) => netns.listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await,
            }
        };
        let inbound = any(INBOUND_PORT).await?;
        // Every connection these accept resets its app unless its relay ends cleanly.
        for l in outbound.iter().chain([&inbound]) {
            sys::arm_reset(l).map_err(|source| InpodError::Socket {
                path: netns.path().to_owned(),
                what: "SO_LINGER on a listener".into(),
                source,
            })?;
        }
        Ok((outbound, inbound, any(HBONE_PORT).await?))
    }

    /// Reuse the slot a previous agent gave this netns, else the lowest free one.
    fn pod_slot(&self, cookie: u64, name: &str) -> Result<u32, PodError> {
        let used: BTreeSet<u32> = self.enrolled.values().map(|p| p.pod_id).collect();
        let in_kernel = self.datapath.enrolled();
        if let Some(prev) = in_kernel.get(&cookie) {
            if !used.contains(&prev.pod_id) {
                return Ok(prev.pod_id);
            }
        }
        let taken_in_kernel: BTreeSet<u32> = in_kernel.values().map(|i| i.pod_id).collect();
        let max = self.datapath.max_pods();
        (0..max)
            .find(|id| !used.contains(id) && !taken_in_kernel.contains(id))
            .ok_or_else(|| PodError::NoSlot { pod: name.into(), max })
    }

    pub fn unenroll(&mut self, uid: &str) {
        let Some(p) = self.enrolled.remove(uid) else {
            return;
        };
        self.mesh.remove_local(uid);
        if let Err(e) = self.datapath.unenroll(p.ctx.netns.cookie(), p.pod_id) {
            tracing::error!(pod = %p.spec.name, "unenroll incomplete: {e}");
        }
        for t in p.accept_tasks {
            t.abort();
        }
        self.mesh.ids.release(&p.spec.identity);
        tracing::info!(pod = %p.spec.name, namespace = %p.spec.namespace, "unenrolled");
    }

    /// Remove kernel entries a previous agent left for pods no longer configured, once
    /// (until it succeeds; see `remove_orphans` for when it holds back).
    pub fn sweep_stale(&mut self) -> Result<(), PodError> {
        if self.swept || !self.failed.is_empty() || !self.waiting.is_empty() {
            return Ok(());
        }
        self.remove_orphans("removing a stale enrollment left by a previous agent")?;
        self.swept = true;
        Ok(())
    }
}
