//! What the agent publishes about itself, in one place: the admin API (`admin.rs`), the
//! metrics (`metrics.rs`), the `/config_dump` document and readiness (`dump.rs`), the
//! status file and the config's generation and refusals (here), and the inspection CLI
//! that reads them back (`inspect.rs`). [`Publisher`] keeps what is published between
//! refreshes; it reads the rest of the agent through a [`View`].

pub mod admin;
mod dump;
pub mod inspect;
pub mod metrics;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    config::{LocalConfig, Settings},
    pods::Pods,
    proxy::Mesh,
};
use admin::AdminState;
use dump::KernelView;
use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("status file {path}: {source}")]
    Status {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's state a refresh reads.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub pods: &'a Pods,
    pub mesh: &'a Mesh,
    pub settings: &'a Settings,
    /// The config in force.
    pub config: &'a LocalConfig,
}

/// Config changes refused while the config in force stays (a parse or validation error,
/// an emptied or deleted file, a cluster state that could not be worked out).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Rejections {
    /// How many since the agent started.
    total: u64,
    /// The newest refusal, until a later config is applied.
    last: Option<Rejected>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    reason: String,
    /// When it was refused (Unix seconds).
    at: u64,
    /// The generation that stayed in force.
    kept_generation: u64,
}

/// What `--status-file` holds, rewritten after every change.
#[derive(Debug, Serialize)]
struct Status<'a> {
    node: &'a str,
    ready: bool,
    /// Incremented each time a new (changed, valid) config is applied.
    generation: u64,
    config_rejected_total: u64,
    /// The newest refused config change, while no later one has been applied.
    config_last_rejected: Option<&'a Rejected>,
    enrolled: Vec<&'a str>,
    failed: BTreeMap<&'a str, String>,
    /// On this node, meshed, network namespace not known yet.
    waiting: Vec<&'a str>,
    stats: BTreeMap<&'static str, u64>,
}

/// What is published, kept between refreshes.
#[derive(Debug)]
pub struct Publisher {
    /// What the admin, metrics and readiness endpoints serve.
    admin: Arc<AdminState>,
    /// Refreshes so far, to do the occasional heavier one.
    ticks: u64,
    /// Maps and programs as last read from the kernel (refreshed every few seconds).
    kernel_view: KernelView,
    /// Incremented each time a new (changed, valid) config is applied.
    generation: u64,
    rejections: Rejections,
}

impl Publisher {
    pub fn new(admin: Arc<AdminState>) -> Self {
        Self { admin, ticks: 0, kernel_view: KernelView::default(), generation: 0, rejections: Rejections::default() }
    }

    /// The generation of the config in force (0: none applied yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A new config was applied; returns its generation.
    pub fn applied(&mut self, metrics: &Metrics) -> u64 {
        self.generation += 1;
        self.rejections.last = None;
        metrics.set_config_generation(self.generation);
        self.generation
    }

    /// A config change was refused: the one in force stays. Logged, counted, and kept for
    /// the status file, `/config_dump` (`selvedge status`) and the metrics.
    pub fn rejected(&mut self, reason: String, metrics: &Metrics) {
        tracing::error!(
            generation_in_force = self.generation,
            "config not applied, keeping the one in force: {reason}"
        );
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.rejections.total += 1;
        self.rejections.last = Some(Rejected { reason, at, kept_generation: self.generation });
        metrics.config_rejected();
    }

    /// Rewrite `--status-file` (atomically: a temporary file renamed over it).
    pub fn write_status(&self, v: &View<'_>, path: Option<&PathBuf>, ready: bool) -> Result<(), PublishError> {
        let Some(path) = path else { return Ok(()) };
        let status = Status {
            node: &v.settings.node,
            ready,
            generation: self.generation,
            config_rejected_total: self.rejections.total,
            config_last_rejected: self.rejections.last.as_ref(),
            enrolled: v.pods.enrolled().values().map(|p| p.spec.name.as_str()).collect(),
            failed: v.pods.failed().iter().map(|(k, f)| (k.as_str(), f.reason.clone())).collect(),
            waiting: v.pods.waiting().values().map(String::as_str).collect(),
            stats: self.kernel_view.counters().iter().copied().collect(),
        };
        let text = serde_json::to_string_pretty(&status).unwrap_or_default();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)).map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            PublishError::Status { path: path.clone(), source }
        })
    }
}
