//! The one wiring point: datapath, enrolled pods, their listeners and proxies, config
//! reloads, status and shutdown.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::{self, CertSourceConfig, LocalConfig, Settings},
    datapath::{Datapath, DatapathError, DatapathOptions, FlowMaps},
    hbone,
    identity::{BuiltinCa, BuiltinSource, CertSource, FilesSource, IdentityManager, IstioCaSource},
    pods::{self, Pods},
    proxy::{self, ConnTracker, Mesh},
    publish::admin::{self, AdminState},
    publish::{self, Publisher},
    state, sys,
};

mod discover;
mod kube;

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
    Tls(#[from] crate::tls::TlsSetupError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("config: working out what it asks for failed: {0}")]
    Computation(String),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// What was read and checked before the kernel was touched, for the run loop to start with.
#[derive(Debug)]
enum Initial {
    /// The config file's text and the config it parses to.
    File {
        text: String,
        config: LocalConfig,
    },
    Kube(kube::KubeStart),
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
    /// Made by `start` before anything was attached; taken by `run`.
    initial: Option<Initial>,
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
        let initial = match &settings.source {
            config::Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| config::ConfigError::Read { path: path.clone(), source })?;
                let config = LocalConfig::parse(&text, path)?;
                Initial::File { text, config }
            }
            config::Source::Kube(ks) => Initial::Kube(kube::KubeStart::prepare(ks).await?),
        };
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
        let mesh = Arc::new(Mesh {
            directory: parking_lot::RwLock::new(Arc::new(state::Directory::default())),
            pool: hbone::client::Pool::new(ids.clone()),
            ids,
            metrics: Arc::new(crate::publish::metrics::Metrics::new()),
            policies: parking_lot::RwLock::new(Arc::default()),
            watchers: Arc::new(proxy::Watchers::default()),
            local: parking_lot::RwLock::new(std::collections::HashMap::new()),
            node_conns: crate::limits::Share::new(settings.limits.conns_total),
        });
        let reaper = mesh.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(hbone::POOL_IDLE / 2);
            loop {
                every.tick().await;
                let closed = reaper.pool.reap(hbone::POOL_IDLE);
                if closed > 0 {
                    tracing::debug!(closed, "idle HBONE connections closed");
                }
            }
        });
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
            initial: Some(initial),
            l7_warned: BTreeSet::new(),
            admin_listeners,
        })
    }

    /// Serve until SIGTERM/SIGINT, then drain.
    pub async fn run(mut self, status_file: Option<PathBuf>) -> Result<(), AppError> {
        match (self.settings.source.clone(), self.initial.take()) {
            (config::Source::File(path), Some(Initial::File { text, config })) => {
                self.run_file(path, text, config, status_file).await
            }
            (config::Source::Kube(k), Some(Initial::Kube(prepared))) => self.run_kube(k, prepared, status_file).await,
            _ => Err(AppError::Computation("the agent was started twice".into())),
        }
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

    async fn run_file(
        mut self,
        path: PathBuf,
        text: String,
        cfg: LocalConfig,
        status_file: Option<PathBuf>,
    ) -> Result<(), AppError> {
        self.serve_admin();
        let mut last_text = Some(text);
        if let Err(e) = self.first_apply(cfg, status_file.as_ref()).await {
            return Err(self.abandon_start(e));
        }
        tracing::info!(enrolled = self.pods.enrolled().len(), failed = self.pods.failed().len(), "started");

        let mut term = sigterm()?;
        let mut tick = tokio::time::interval(Duration::from_millis(config::RELOAD_INTERVAL_MS));
        let mut retry_at = tokio::time::Instant::now();
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                () = stop_requested(&mut term, &self.admin.quit) => break,
                () = self.admin.dump_wanted.notified() => {
                    self.publish_dump();
                    continue;
                }
                _ = tick.tick() => {}
            }
            ticks += 1;
            if ticks.is_multiple_of(NETNS_CHECK_EVERY) {
                self.pods.follow_netns_identity().await;
            }
            if ticks.is_multiple_of(RECONCILE_EVERY) {
                self.pods.repair_drift().await;
            }
            let text = std::fs::read_to_string(&path).ok();
            let changed = text != last_text;
            let retry = !self.pods.failed().is_empty() && tokio::time::Instant::now() >= retry_at;
            if !changed && !retry {
                // Kernel counters move without config changes: keep the status current.
                self.refresh_observability(false);
                if let Err(e) = self.write_status(status_file.as_ref(), true) {
                    tracing::warn!("{e}");
                }
                continue;
            }
            // Parse the text just read (not the file again) so what is applied is what is
            // remembered. Only a changed config counts as a new generation; a retry of
            // failed pods re-applies the current one. Parsed on a blocking thread: a
            // cluster-sized file takes tens of milliseconds, which the runtime's thread
            // (the data path's) does not wait out.
            // A retry re-applies the config in force, never text that was refused.
            let parsed = if changed {
                let (text, path) = (text.clone(), path.clone());
                tokio::task::spawn_blocking(move || match &text {
                    Some(t) => LocalConfig::parse(t, &path),
                    None => LocalConfig::load(&path),
                })
                .await
                .map_err(|e| format!("the parser failed: {e}"))
                .and_then(|r| r.map(Arc::new).map_err(|e| e.to_string()))
            } else {
                Ok(self.last_config.clone())
            };
            last_text = text;
            match parsed {
                Ok(cfg) => match self.apply(cfg).await {
                    Ok(()) if changed => self.applied_new_config(),
                    Ok(()) => {}
                    Err(e) if changed => self.reject_config(e.to_string()),
                    Err(e) => tracing::error!("retrying failed workloads: {e}"),
                },
                Err(reason) => self.reject_config(reason),
            }
            retry_at = tokio::time::Instant::now() + Duration::from_secs(5);
            if let Err(e) = self.pods.sweep_stale() {
                tracing::error!("stale enrollments not removed: {e}");
            }
            // Right after applying: readiness and the dump describe the new state at once.
            self.refresh_observability(true);
            if let Err(e) = self.write_status(status_file.as_ref(), true) {
                tracing::warn!("{e}");
            }
        }
        self.shutdown(status_file.as_ref()).await
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
            tokio::task::spawn_blocking(move || -> Result<_, config::ConfigError> {
                let mesh = state::Mesh { node: &node, trust_domain: &td, root_namespace: &root };
                Ok((
                    state::desired(&cfg, &mesh)?,
                    state::directory(&cfg, &td)?,
                    crate::policy::PolicySet::new(cfg.compile_policies(&root)?),
                ))
            })
        };
        let (desired, directory, policies) = compute.await.map_err(|e| AppError::Computation(e.to_string()))??;
        for p in policies.iter() {
            if let Some(note) = p.l7_note() {
                // Once per policy and wording, not at every apply of an unchanged one.
                if self.l7_warned.insert(format!("{}: {note}", p.id())) {
                    tracing::warn!(policy = %p.id(), "AuthorizationPolicy {}: {note}", p.id());
                }
            }
        }
        let waiting = desired.waiting;
        let desired = desired.pods;
        let old_directory = std::mem::replace(&mut *self.mesh.directory.write(), Arc::new(directory));
        let old_policies = std::mem::replace(&mut *self.mesh.policies.write(), Arc::new(policies));
        // Cached verdicts were for the old policies and workloads (an IP may now be someone
        // else's): forget them all.
        let forgot = self.flows.clear_verdicts();
        if forgot > 0 {
            tracing::debug!(forgot, "cached connect verdicts cleared");
        }
        // Live changes: what the new policies deny is closed now, not at its next connect.
        // On a blocking thread: with thousands of open connections it takes milliseconds
        // (tens with hundreds of policies), which the data path does not wait out.
        let (watchers, policies) = (self.mesh.watchers.clone(), self.mesh.policies.read().clone());
        let closed = match tokio::task::spawn_blocking(move || watchers.recheck(&policies)).await {
            Ok(closed) => closed,
            Err(e) => {
                // Fail closed: what the new policies deny must not stay open unchecked.
                let closed = self.mesh.watchers.close_all();
                tracing::error!(closed, "policy recheck failed ({e}); closed every open inbound connection");
                closed
            }
        };
        if closed > 0 {
            tracing::info!(closed, "open connections closed after a policy change");
        }
        let old_config = std::mem::replace(&mut self.last_config, cfg);
        // What the old state frees (thousands of entries) is freed off the runtime's thread.
        tokio::task::spawn_blocking(move || drop((old_directory, old_policies, old_config)));
        self.pods.converge(desired, waiting).await;
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
