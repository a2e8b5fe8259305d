//! The cluster as a config source: snapshots from the Kubernetes API, pod network
//! namespaces from the CNI plugin (and from /proc or the runtime's netns directory for
//! pods that predate the agent), converted into the agent's config. The CNI plugin's ADD
//! waits here until the agent has enrolled the pod (`answer_waits`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use super::{discover, Event, SourceError};
use crate::{
    cni::{
        self,
        protocol::{Request, Response},
        registry::{Registered, Registry},
    },
    config::{KubeSettings, LocalConfig},
    k8s::{self, PodNetwork, Snapshot},
    pods::Pods,
    publish::metrics::Metrics,
};

/// A CNI request waiting for the pod to show up in the API or to be enrolled.
#[derive(Debug)]
struct Wait {
    req: Request,
    reply: oneshot::Sender<Response>,
    /// The pod's uid once known, and whether its network has been registered (ADD).
    uid: Option<String>,
    registered: bool,
    deadline: Instant,
}

/// Everything the cluster loop keeps besides the agent.
#[derive(Debug)]
struct Cluster {
    settings: KubeSettings,
    snapshot: Option<Arc<Snapshot>>,
    registry: Registry,
    /// Found through /proc (not persisted: the path names a process).
    discovered: BTreeMap<String, PodNetwork>,
    waits: Vec<Wait>,
    /// Needs a new apply (new snapshot or network registry change).
    dirty: bool,
    problems: Vec<String>,
}

/// How often (in 500 ms ticks) pods without a known netns are looked for in /proc, the
/// registry pruned, and the ServiceAccount credentials for the CNI plugin refreshed.
const SLOW_EVERY: u64 = 10;
const CREDENTIALS_EVERY: u64 = 120;

/// What the cluster loop needs that can fail, made before the kernel is touched: the API
/// client (the kubeconfig is read), the pod registry and the CNI plugin's socket.
pub struct KubeStart {
    client: k8s::Client,
    registry: Registry,
    cni: tokio::net::UnixListener,
    settings: KubeSettings,
}

type Converting = tokio::task::JoinHandle<k8s::Converted>;

/// The cluster source, running.
pub struct KubeSource {
    cluster: Cluster,
    /// A conversion in progress (see `next`).
    converting: Option<Converting>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    cni_requests: mpsc::Receiver<cni::server::Pending>,
    node: String,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for KubeStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStart").field("registry", &self.registry).finish_non_exhaustive()
    }
}

impl KubeStart {
    pub async fn prepare(ks: &KubeSettings) -> Result<Self, SourceError> {
        let client = k8s::client(ks.kubeconfig.as_deref()).await?;
        let state_err = |source| SourceError::State { path: ks.state_dir.clone(), source };
        let registry = Registry::open(&ks.state_dir).map_err(state_err)?;
        let cni = cni::server::bind(&ks.state_dir.join(cni::protocol::SOCKET_NAME)).map_err(state_err)?;
        Ok(Self { client, registry, cni, settings: ks.clone() })
    }
}

impl KubeSource {
    /// Watch the API and serve the CNI socket.
    pub fn start(prepared: KubeStart, node: &str) -> Self {
        let KubeStart { client, registry, cni: listener, settings } = prepared;
        let snapshots = k8s::watch::start(client);
        let (to_agent, cni_requests) = mpsc::channel(64);
        tokio::spawn(cni::server::serve(listener, to_agent));
        tracing::info!(state_dir = %settings.state_dir.display(), mesh_label = %settings.mesh_label, "watching the Kubernetes API");
        let cluster = Cluster {
            settings,
            snapshot: None,
            registry,
            discovered: BTreeMap::new(),
            waits: Vec::new(),
            dirty: false,
            problems: Vec::new(),
        };
        Self { cluster, converting: None, snapshots, cni_requests, node: node.to_owned() }
    }

    /// The next cluster state to apply (a new snapshot from the API, or a pod network
    /// the CNI plugin or the netns search reported). CNI requests are taken in meanwhile.
    pub async fn next(&mut self) -> Event {
        loop {
            self.cluster.register_waits();
            if self.converting.is_none() && self.cluster.dirty {
                if let Some(snap) = self.cluster.snapshot.clone() {
                    self.converting = Some(self.convert(&snap));
                    self.cluster.dirty = false;
                }
            }
            // Kept across calls: a `select!` that drops `next` mid-conversion resumes it.
            if let Some(converting) = self.converting.as_mut() {
                let converted = converting.await;
                self.converting = None;
                return self.converted(converted);
            }
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        tracing::error!("the Kubernetes watch stopped");
                        return Event::Stopped;
                    }
                    self.cluster.snapshot = self.snapshots.borrow_and_update().clone();
                    self.cluster.dirty = true;
                }
                Some((req, reply)) = self.cni_requests.recv() => {
                    self.cluster.accept(req, reply, &self.node);
                    self.cluster.register_waits();
                    if !self.cluster.dirty {
                        return Event::Request;
                    }
                }
            }
        }
    }

    /// The cluster state as the agent's config, converted on a blocking thread (a large
    /// cluster's state takes milliseconds the data path does not wait out).
    fn convert(&self, snap: &Arc<Snapshot>) -> Converting {
        let c = &self.cluster;
        let mut networks: BTreeMap<String, PodNetwork> = c.discovered.clone();
        networks.extend(c.registry.networks().map(|(k, v)| (k.clone(), v.clone())));
        let (snap, node, key) = (snap.clone(), self.node.clone(), c.settings.mesh_label.clone());
        tokio::task::spawn_blocking(move || k8s::to_config(&snap, &node, &key, &networks))
    }

    fn converted(&mut self, result: Result<k8s::Converted, tokio::task::JoinError>) -> Event {
        let c = &mut self.cluster;
        let converted = match result {
            Ok(converted) => converted,
            Err(e) => return Event::Refused(format!("converting it failed: {e}")),
        };
        if converted.problems != c.problems {
            for p in converted.problems.iter().filter(|p| !c.problems.contains(p)) {
                tracing::warn!("cluster state: {p}");
            }
            c.problems = converted.problems;
        }
        Event::Config(Arc::new(converted.config))
    }

    /// The periodic work: every 5 s while pods wait for their netns, and every 30 s
    /// regardless (pruning registrations whose sandbox is gone), look for them; keep
    /// `selvedge-cni` chained; refresh the CNI plugin's credentials.
    pub fn chores(&mut self, ticks: u64, pods: &Pods, config: &LocalConfig, metrics: &Metrics) {
        let c = &mut self.cluster;
        let looking = ticks.is_multiple_of(SLOW_EVERY) && !pods.waiting().is_empty();
        if looking || ticks.is_multiple_of(SLOW_EVERY * 6) {
            let ips: BTreeMap<String, Vec<IpAddr>> = config
                .workloads
                .iter()
                .filter(|w| pods.waiting().contains_key(&w.uid))
                .map(|w| (w.uid.clone(), w.ips.clone()))
                .collect();
            c.slow_chores(pods.waiting(), &ips);
        }
        if ticks.is_multiple_of(SLOW_EVERY) {
            c.guard_chain(metrics);
        }
        if ticks.is_multiple_of(CREDENTIALS_EVERY) {
            c.refresh_credentials();
        }
    }

    /// Answer the CNI requests that can be answered now; refuse the overdue ones.
    pub fn answer_waits(&mut self, pods: &Pods, generation: u64) {
        let c = &mut self.cluster;
        let now = Instant::now();
        let waits = std::mem::take(&mut c.waits);
        for w in waits {
            let verdict = match (&c.snapshot, &w.uid) {
                (Some(snap), Some(uid)) if generation > 0 => c.cni_verdict(pods, &self.node, snap, uid, &w.req),
                _ => None,
            };
            match verdict {
                Some(answer) => {
                    let _ = w.reply.send(answer);
                }
                None if now >= w.deadline => {
                    let pod = w.req.pod().to_string();
                    let reason = match &w.uid {
                        None => format!("pod {pod} is not known to the Kubernetes API (yet)"),
                        Some(_) => format!("pod {pod} is not enrolled yet"),
                    };
                    tracing::warn!(pod = %pod, "CNI request refused: {reason}");
                    let _ = w.reply.send(Response::Refused { reason });
                }
                None => c.waits.push(w),
            }
        }
    }

    /// The agent stops: refuse what still waits.
    pub fn stop(&mut self) {
        for w in self.cluster.waits.drain(..) {
            let _ = w.reply.send(Response::Refused { reason: "the agent is shutting down".into() });
        }
    }
}

impl Cluster {
    fn cni_verdict(&self, pods: &Pods, node: &str, snap: &Snapshot, uid: &str, req: &Request) -> Option<Response> {
        let pod = req.pod();
        let facts = k8s::find_pod(snap, Some(uid), &pod.namespace, &pod.name, &self.settings.mesh_label)?;
        if facts.node.as_deref() != Some(node) {
            return Some(Response::Refused { reason: format!("pod {pod} is not scheduled on this node ({node})") });
        }
        if !facts.meshed {
            return Some(Response::NotMeshed);
        }
        if let Some(f) = pods.failed().get(uid) {
            return Some(Response::Refused { reason: f.reason.clone() });
        }
        let enrolled = pods.enrolled().get(uid)?;
        // Enrolled in the sandbox this request is about, not an older one.
        let netns = self.registry.get(uid).map(|r| r.network.netns.as_path());
        if matches!(req, Request::Add { .. }) && netns != Some(enrolled.spec.netns.as_path()) {
            return None;
        }
        Some(Response::Meshed { identity: enrolled.spec.identity.to_string() })
    }

    /// A new CNI request: DEL is done at once; ADD and CHECK wait for an answer.
    fn accept(&mut self, req: Request, reply: oneshot::Sender<Response>, node: &str) {
        let pod = req.pod().clone();
        let uid = pod.uid.clone().or_else(|| self.uid_of(&pod.namespace, &pod.name));
        match &req {
            Request::Del { container_id, .. } => {
                if let Some(uid) = &uid {
                    if self.registry.remove(uid, container_id) {
                        tracing::info!(pod = %pod, uid = %uid, "CNI DEL: sandbox gone");
                        self.dirty = true;
                    }
                }
                let _ = reply.send(Response::Done);
            }
            Request::Add { netns, .. } => {
                tracing::info!(pod = %pod, netns = %netns.display(), node, "CNI ADD");
                self.waits.push(Wait {
                    req,
                    reply,
                    uid,
                    registered: false,
                    deadline: Instant::now() + cni::server::ANSWER_TIMEOUT - Duration::from_millis(500),
                });
            }
            Request::Check { .. } => self.waits.push(Wait {
                req,
                reply,
                uid,
                registered: true,
                deadline: Instant::now() + Duration::from_secs(5),
            }),
        }
    }

    fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        let from_api = self.snapshot.as_ref().and_then(|s| k8s::find_pod(s, None, namespace, name, "").map(|f| f.uid));
        from_api.or_else(|| self.registry.uid_of(namespace, name).map(str::to_owned))
    }

    /// Record the network of each waiting ADD whose uid is known.
    fn register_waits(&mut self) {
        for i in 0..self.waits.len() {
            if self.waits[i].uid.is_none() {
                let p = self.waits[i].req.pod().clone();
                self.waits[i].uid = self.uid_of(&p.namespace, &p.name);
            }
            let w = &self.waits[i];
            let (Some(uid), false, Request::Add { pod, container_id, netns, ips }) = (&w.uid, w.registered, &w.req)
            else {
                continue;
            };
            let entry = Registered {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                container_id: container_id.clone(),
                network: PodNetwork { netns: netns.clone(), ips: ips.clone() },
            };
            let uid = uid.clone();
            if let Err(e) = self.registry.insert(&uid, entry) {
                tracing::error!(pod = %pod, "pod registry not written: {e}");
            }
            self.discovered.remove(&uid);
            self.waits[i].registered = true;
            self.dirty = true;
        }
    }

    /// Look for waiting pods' netns (by IP in the runtime's netns directory, then by cgroup
    /// in /proc); forget registrations whose netns is gone.
    fn slow_chores(&mut self, waiting: &BTreeMap<String, String>, ips: &BTreeMap<String, Vec<IpAddr>>) {
        if self.registry.prune() > 0 {
            self.dirty = true;
        }
        let before = self.discovered.len();
        self.discovered.retain(|_, n| n.netns.exists());
        if self.discovered.len() != before {
            self.dirty = true;
        }
        let unknown = |u: &String| self.registry.get(u).is_none() && !self.discovered.contains_key(u);
        let by_ip: BTreeMap<String, Vec<IpAddr>> = waiting
            .keys()
            .filter(|u| unknown(u))
            .map(|u| (u.clone(), ips.get(u).cloned().unwrap_or_default()))
            .collect();
        let mut found = discover::find_netns_by_ip(&self.settings.netns_dir, &by_ip);
        let rest: BTreeSet<String> = by_ip.keys().filter(|u| !found.contains_key(*u)).cloned().collect();
        found.extend(discover::find_netns(&self.settings.proc_dir, &rest));
        for (uid, netns) in found {
            tracing::info!(uid = %uid, netns = %netns.display(), pod = %waiting[&uid], "found a running pod's network namespace");
            self.discovered.insert(uid, PodNetwork { netns, ips: Vec::new() });
            self.dirty = true;
        }
    }

    /// Keep `selvedge-cni` in the node's CNI chain (counted as drift when it had gone).
    fn guard_chain(&self, metrics: &Metrics) {
        let Some(dir) = &self.settings.cni_conf_dir else { return };
        match cni::install::ensure_chained(dir, &self.settings.state_dir, &self.settings.mesh_label) {
            Ok(Some(file)) => {
                metrics.drift(1);
                tracing::warn!(file = %file.display(), "drift: selvedge-cni was missing from the CNI chain; chained it again");
            }
            Ok(None) => {}
            Err(e) => tracing::error!("cannot check the CNI chain in {}: {e:#}", dir.display()),
        }
    }

    /// Keep the CNI plugin's copy of the (rotating) ServiceAccount token current.
    fn refresh_credentials(&self) {
        let sa = Path::new(cni::install::SERVICE_ACCOUNT_DIR);
        if sa.join("token").exists() {
            if let Err(e) = cni::install::refresh_credentials(sa, &self.settings.state_dir) {
                tracing::warn!("CNI plugin credentials not refreshed: {e:#}");
            }
        }
    }
}
