//! The one wiring point: datapath, enrolled pods, their listeners and proxies, config
//! reloads, status and shutdown.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::{self, CertSourceConfig, LocalConfig, Settings},
    datapath::{Datapath, DatapathError, DatapathOptions, FlowMaps},
    identity::{BuiltinCa, BuiltinSource, CertSource, FilesSource, IdentityManager, IstioCaSource},
    pods::{self, Pods},
    proxy::{ConnTracker, Mesh},
    publish::admin::{self, AdminState},
    publish::{self, Publisher},
    source::{self, Event, Source},
    state, sys,
};

/// How long pods that failed to enroll wait before they are tried again (a file source).
const RETRY_FAILED: Duration = Duration::from_secs(5);
/// How often (in 500 ms ticks) the kernel's enrollment state is checked against the agent's.
const RECONCILE_EVERY: u64 = 20;
/// How often (in 500 ms ticks) each enrolled pod's netns path is checked to still name the
/// namespace the agent holds (`follow_netns_identity`).
const NETNS_CHECK_EVERY: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Pods(#[from] pods::PodError),
    #[error("cgroup: {what}: {source}")]
    Cgroup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate authority {dir}: {detail}")]
    Ca { dir: PathBuf, detail: String },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("config: working out what it asks for failed: {0}")]
    Computation(String),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("cgroup {path} is not a cgroup v2 directory (--cgroup must name one, e.g. the pods' parent cgroup)")]
    NotCgroup2 { path: PathBuf },
    #[error("{source}; {left}")]
    StartAbandoned {
        #[source]
        source: Box<AppError>,
        /// What this failed start did with the kernel state (see `Datapath::abandon`).
        left: String,
    },
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
}

/// SIGTERM, to be awaited by a run loop.
fn sigterm() -> Result<tokio::signal::unix::Signal, AppError> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AppError::Signal)
}

/// Resolves when the agent is asked to stop: SIGTERM, SIGINT or the admin API's
/// /quitquitquit.
async fn stop_requested(term: &mut tokio::signal::unix::Signal, quit: &tokio::sync::Notify) {
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = quit.notified() => {}
    }
}

#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    /// This node's pods, and the datapath handle (the pod lifecycle).
    pods: Pods,
    flows: Arc<FlowMaps>,
    /// Identities, the HBONE pool and the directory of meshed workloads.
    mesh: Arc<Mesh>,
    /// What the admin, metrics and readiness endpoints serve.
    admin: Arc<AdminState>,
    /// The config last applied (for the config dump).
    last_config: Arc<LocalConfig>,
    /// What the agent publishes about itself: readiness, the config dump, the status file,
    /// state-derived metrics, the config generation and refusals.
    publisher: Publisher,
    conns: Arc<ConnTracker>,
    /// AuthorizationPolicies already warned about for rules an L4 agent cannot enforce.
    l7_warned: BTreeSet<String>,
    /// The config source, prepared by `start` before anything was attached; taken by `run`.
    prepared: Option<source::Prepared>,
    admin_listeners: Vec<(SocketAddr, admin::Endpoints, Option<TcpListener>)>,
}

impl Agent {
    /// Check and read everything that can be checked — the cgroup, the config file (or the
    /// kubeconfig and state directory), the admin addresses, the certificate source —, then
    /// load and attach the programs; nothing is enrolled yet. A bad flag or config fails
    /// here with the kernel untouched.
    pub async fn start(settings: Settings, set_log_level: admin::SetLogLevel) -> Result<Self, AppError> {
        if !sys::is_cgroup2(&settings.cgroup) {
            return Err(AppError::NotCgroup2 { path: settings.cgroup.clone() });
        }
        let prepared = source::Prepared::new(&settings.source).await?;
        let admin_listeners = admin::bind(settings.admin_addr, settings.metrics_addr, settings.readiness_addr).await?;
        let mount = sys::cgroup2_mount().map_err(|source| AppError::Cgroup { what: "find cgroup2".into(), source })?;
        let agent_cgroup_id =
            sys::own_cgroup_id(&mount).map_err(|source| AppError::Cgroup { what: "read own cgroup".into(), source })?;
        let opts = DatapathOptions {
            pin_dir: settings.pin_dir.clone(),
            cgroup: settings.cgroup.clone(),
            fast_path: settings.fast_path,
            agent_cgroup_id,
            bpf_object: settings.bpf_object.clone(),
            max_pods: settings.max_pods,
        };
        let provider = Arc::new(crate::tls::crypto_provider());
        let source: Arc<dyn CertSource> = match &settings.certs {
            CertSourceConfig::Builtin { ca_dir, lifetime } => {
                let ca = BuiltinCa::load(ca_dir).map_err(|e| AppError::Ca {
                    dir: ca_dir.clone(),
                    detail: format!("{e}; create one with `selvedge ca init --dir {}`", ca_dir.display()),
                })?;
                Arc::new(BuiltinSource { ca, lifetime: *lifetime })
            }
            CertSourceConfig::Files { dir } => {
                Arc::new(FilesSource::new(dir).map_err(|detail| AppError::Ca { dir: dir.clone(), detail })?)
            }
            CertSourceConfig::Istio(cfg) => Arc::new(
                IstioCaSource::new(cfg.clone(), provider.clone())
                    .map_err(|detail| AppError::Ca { dir: cfg.root_file.clone(), detail })?,
            ),
        };
        let ids = IdentityManager::new(source, provider, &settings.trust_domain)?;
        tokio::spawn(ids.clone().run());
        let mesh = Arc::new(Mesh::new(ids, settings.limits.conns_total, &settings.cluster_id));
        tokio::spawn(mesh.clone().reap_idle_tunnels());
        let admin = Arc::new(AdminState {
            snapshot: parking_lot::RwLock::new(serde_json::Value::Null),
            dump_wanted: tokio::sync::Notify::new(),
            dump_built: tokio::sync::watch::Sender::new(0),
            ready: std::sync::atomic::AtomicBool::new(false),
            not_ready: parking_lot::RwLock::new("starting".into()),
            metrics: mesh.metrics.clone(),
            set_log_level,
            quit: tokio::sync::Notify::new(),
            handover: tokio::sync::Notify::new(),
        });
        let handshakes = crate::limits::Share::new(settings.limits.handshakes);
        let (datapath, flows) = Datapath::open(&opts)?;
        tracing::info!(pin_dir = %settings.pin_dir.display(), cgroup = %settings.cgroup.display(), "eBPF programs attached");
        let (flows, conns) = (Arc::new(flows), Arc::new(ConnTracker::default()));
        let shared = pods::Shared {
            flows: flows.clone(),
            mesh: mesh.clone(),
            conns: conns.clone(),
            handshakes,
            trust_domain: settings.trust_domain.as_str().into(),
            conns_per_pod: settings.limits.conns_per_pod,
        };
        let publisher = Publisher::new(admin.clone());
        Ok(Self {
            settings,
            pods: Pods::new(datapath, shared),
            flows,
            mesh,
            admin,
            last_config: Arc::default(),
            publisher,
            conns,
            prepared: Some(prepared),
            l7_warned: BTreeSet::new(),
            admin_listeners,
        })
    }

    /// Serve until SIGTERM/SIGINT (or /quitquitquit), then drain.
    pub async fn run(mut self, status_file: Option<PathBuf>) -> Result<(), AppError> {
        let prepared =
            self.prepared.take().ok_or_else(|| AppError::Computation("the agent was started twice".into()))?;
        let (mut source, first) = Source::start(prepared, &self.settings.node);
        self.serve_admin();
        if let Some(cfg) = first {
            if let Err(e) = self.first_apply(cfg, status_file.as_ref()).await {
                return Err(self.abandon_start(e));
            }
            tracing::info!(enrolled = self.pods.enrolled().len(), failed = self.pods.failed().len(), "started");
        }
        self.serve(&mut source, status_file.as_ref()).await?;
        source.stop();
        self.shutdown(status_file.as_ref()).await
    }

    /// A start that failed after the programs were attached: stop serving what it
    /// enrolled and leave the kernel as it was found (see `Datapath::abandon`); the error
    /// says what was left and why.
    fn abandon_start(self, e: AppError) -> AppError {
        let left = self.pods.abandon();
        tracing::error!("start failed after the programs were attached: {e}; {left}");
        AppError::StartAbandoned { source: Box::new(e), left }
    }

    fn serve_admin(&mut self) {
        for (addr, which, listener) in std::mem::take(&mut self.admin_listeners) {
            let (state, admin_addr) = (self.admin.clone(), self.settings.admin_addr);
            tokio::spawn(async move {
                if which == admin::Endpoints::Readiness {
                    return admin::serve_readiness(listener, addr, admin_addr, state).await;
                }
                let listener = match listener {
                    Some(l) => l,
                    None => admin::bind_when_free(addr).await,
                };
                admin::serve(listener, which, state).await;
            });
        }
    }

    /// The file loop's first apply: a failure here abandons the start.
    async fn first_apply(&mut self, cfg: LocalConfig, status_file: Option<&PathBuf>) -> Result<(), AppError> {
        self.apply(Arc::new(cfg)).await?;
        self.applied_new_config();
        self.pods.sweep_stale()?;
        self.refresh_observability(true);
        self.write_status(status_file, true)
    }

    /// The one loop: apply what the source yields, keep the pods and the kernel in step,
    /// publish the state; until asked to stop.
    async fn serve(&mut self, source: &mut Source, status_file: Option<&PathBuf>) -> Result<(), AppError> {
        let mut term = sigterm()?;
        let mut tick = tokio::time::interval(Duration::from_millis(config::RELOAD_INTERVAL_MS));
        let mut retry_at = tokio::time::Instant::now();
        let mut ticks: u64 = 0;
        loop {
            let changed = tokio::select! {
                () = stop_requested(&mut term, &self.admin.quit) => return Ok(()),
                () = self.admin.dump_wanted.notified() => {
                    self.publish_dump();
                    continue;
                }
                event = source.next() => match event {
                    Event::Config(cfg) => {
                        match self.apply(cfg).await {
                            Ok(()) => self.applied_new_config(),
                            Err(e) => self.reject_config(source.refusal(e.to_string())),
                        }
                        retry_at = tokio::time::Instant::now() + RETRY_FAILED;
                        true
                    }
                    Event::Refused(reason) => {
                        self.reject_config(source.refusal(reason));
                        false
                    }
                    Event::Request => false,
                    Event::Stopped => return Ok(()),
                },
                _ = tick.tick() => {
                    ticks += 1;
                    self.chores(ticks, source).await;
                    // Pods that failed to enroll are tried again with the config in force.
                    let retry = source.retries_failed() && !self.pods.failed().is_empty();
                    if retry && tokio::time::Instant::now() >= retry_at {
                        if let Err(e) = self.apply(self.last_config.clone()).await {
                            tracing::error!("retrying failed workloads: {e}");
                        }
                        retry_at = tokio::time::Instant::now() + RETRY_FAILED;
                        true
                    } else {
                        false
                    }
                }
            };
            if changed {
                if let Err(e) = self.pods.sweep_stale() {
                    tracing::error!("stale enrollments not removed: {e}");
                }
            }
            // Right after a change, the kernel is walked again: readiness and the dump
            // describe the new state at once.
            self.refresh_observability(changed);
            if let Err(e) = self.write_status(status_file, true) {
                tracing::warn!("{e}");
            }
            // After the status: what a CNI answer reports is already visible there.
            source.after(&self.pods, self.publisher.generation());
        }
    }

    /// The periodic work of a 500 ms tick: the pods' netns identity, kernel drift, and the
    /// source's own chores.
    async fn chores(&mut self, ticks: u64, source: &mut Source) {
        if ticks.is_multiple_of(NETNS_CHECK_EVERY) {
            self.pods.follow_netns_identity().await;
        }
        if ticks.is_multiple_of(RECONCILE_EVERY) {
            self.pods.repair_drift().await;
        }
        source.chores(ticks, &self.pods, &self.last_config, &self.mesh.metrics);
    }

    /// Enroll and unenroll to match `cfg`. Per-pod failures are recorded, not fatal.
    async fn apply(&mut self, cfg: Arc<LocalConfig>) -> Result<(), AppError> {
        // Everything that can fail is computed before anything changes, on a blocking
        // thread: with thousands of workloads it takes milliseconds the data path, on the
        // runtime's thread, does not wait out.
        let compute = {
            let cfg = cfg.clone();
            let (node, td, root) =
                (self.settings.node.clone(), self.settings.trust_domain.clone(), self.settings.root_namespace.clone());
            tokio::task::spawn_blocking(move || {
                state::work_out(&cfg, &state::Mesh { node: &node, trust_domain: &td, root_namespace: &root })
            })
        };
        let state::WorkedOut { desired, directory, policies } =
            compute.await.map_err(|e| AppError::Computation(e.to_string()))??;
        for p in policies.iter() {
            if let Some(note) = p.l7_note() {
                // Once per policy and wording, not at every apply of an unchanged one.
                if self.l7_warned.insert(format!("{}: {note}", p.id())) {
                    tracing::warn!(policy = %p.id(), "AuthorizationPolicy {}: {note}", p.id());
                }
            }
        }
        let replaced = self.mesh.install(directory, policies, &self.flows).await;
        let old_config = std::mem::replace(&mut self.last_config, cfg);
        // What the old state frees (thousands of entries) is freed off the runtime's thread.
        tokio::task::spawn_blocking(move || drop((replaced, old_config)));
        self.pods.converge(desired.pods, desired.waiting).await;
        Ok(())
    }

    fn applied_new_config(&mut self) {
        let generation = self.publisher.applied(&self.mesh.metrics);
        tracing::info!(
            generation,
            enrolled = self.pods.enrolled().len(),
            failed = self.pods.failed().len(),
            "config applied"
        );
    }

    /// A config change was refused: the one in force stays (see `Publisher::rejected`).
    fn reject_config(&mut self, reason: String) {
        self.publisher.rejected(reason, &self.mesh.metrics);
    }

    /// The publisher, and the state it reads.
    fn published(&mut self) -> (&mut Publisher, publish::View<'_>) {
        let view =
            publish::View { pods: &self.pods, mesh: &self.mesh, settings: &self.settings, config: &self.last_config };
        (&mut self.publisher, view)
    }

    fn refresh_observability(&mut self, after_change: bool) {
        let (publisher, view) = self.published();
        publisher.refresh(&view, after_change);
    }

    fn publish_dump(&mut self) {
        let (publisher, view) = self.published();
        publisher.publish_dump(&view);
    }

    fn write_status(&mut self, path: Option<&PathBuf>, ready: bool) -> Result<(), AppError> {
        let (publisher, view) = self.published();
        Ok(publisher.write_status(&view, path, ready)?)
    }

    /// Stop accepting, let open connections finish (bounded), leave pins in place so
    /// enrolled pods stay fail-closed until the next agent starts.
    async fn shutdown(mut self, status_file: Option<&PathBuf>) -> Result<(), AppError> {
        // While draining, the loop no longer answers `/config_dump`: it serves this one.
        self.publish_dump();
        tracing::info!(open = self.conns.active(), "shutting down: draining connections");
        self.pods.stop_accepting();
        let left = self.conns.drain(Duration::from_secs(config::DRAIN_TIMEOUT_SECS)).await;
        if left > 0 {
            tracing::warn!(open = left, "drain timed out; closing remaining connections");
        }
        self.write_status(status_file, false)?;
        tracing::info!("stopped; capture stays in force until the next agent or `selvedge uninstall`");
        Ok(())
    }
}
