//! Where the agent's config comes from: the local file (`file.rs`) or the Kubernetes API
//! with the CNI plugin's reports and the netns discovery of pods that predate the agent
//! (`kube.rs`, `discover.rs`). A source yields [`Event`]s — a new config, or a refused
//! change — and never calls into the agent; the agent's one loop (`app`) applies them.

mod discover;
pub mod file;
pub mod kube;

use std::{path::PathBuf, sync::Arc};

use crate::{
    config::{self, LocalConfig},
    pods::Pods,
    publish::metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a source says.
#[derive(Debug)]
pub enum Event {
    /// A new config to apply (a changed file, a new cluster state).
    Config(Arc<LocalConfig>),
    /// A change that cannot be applied: the config in force stays.
    Refused(String),
    /// A request of the CNI plugin came in: the loop answers what it can at once
    /// (`Source::after`), not at its next tick.
    Request,
    /// The source has ended (the Kubernetes watch stopped): the agent stops.
    Stopped,
}

/// A source as prepared before the kernel is touched: everything that can fail on a bad
/// flag or file has been tried.
#[derive(Debug)]
pub enum Prepared {
    /// The config file, read and parsed.
    File(file::FileSource, LocalConfig),
    Kube(kube::KubeStart),
}

impl Prepared {
    pub async fn new(source: &config::Source) -> Result<Self, SourceError> {
        Ok(match source {
            config::Source::File(path) => {
                let (file, config) = file::FileSource::open(path)?;
                Prepared::File(file, config)
            }
            config::Source::Kube(ks) => Prepared::Kube(kube::KubeStart::prepare(ks).await?),
        })
    }
}

/// A running source.
#[derive(Debug)]
pub enum Source {
    File(file::FileSource),
    Kube(Box<kube::KubeSource>),
}

impl Source {
    /// Start it; a file source also hands back the config read at start (applied before the
    /// loop: a start whose first config fails is abandoned).
    pub fn start(prepared: Prepared, node: &str) -> (Self, Option<LocalConfig>) {
        match prepared {
            Prepared::File(file, config) => (Source::File(file), Some(config)),
            Prepared::Kube(k) => (Source::Kube(Box::new(kube::KubeSource::start(k, node))), None),
        }
    }

    /// The next event. Cancel-safe: a `select!` may drop it at any await.
    pub async fn next(&mut self) -> Event {
        match self {
            Source::File(f) => f.next().await,
            Source::Kube(k) => k.next().await,
        }
    }

    /// A refusal's reason as logs and the status show it (the file's errors name the file
    /// already; a cluster state's are introduced as such).
    pub fn refusal(&self, reason: String) -> String {
        match self {
            Source::File(_) => reason,
            Source::Kube(_) => format!("cluster state: {reason}"),
        }
    }

    /// Whether pods that failed to enroll are retried with the config in force every few
    /// seconds (the file source: nothing else would retry them; in a cluster the CNI
    /// plugin's retries of the pod's ADD do).
    pub fn retries_failed(&self) -> bool {
        matches!(self, Source::File(_))
    }

    /// Periodic work of the source, on the agent's 500 ms tick `ticks`.
    pub fn chores(&mut self, ticks: u64, pods: &Pods, config: &LocalConfig, metrics: &Metrics) {
        if let Source::Kube(k) = self {
            k.chores(ticks, pods, config, metrics);
        }
    }

    /// After each turn of the loop (the status written): answer what waited for the pods'
    /// state (the CNI plugin's requests).
    pub fn after(&mut self, pods: &Pods, generation: u64) {
        if let Source::Kube(k) = self {
            k.answer_waits(pods, generation);
        }
    }

    /// The agent stops: refuse what still waits.
    pub fn stop(&mut self) {
        if let Source::Kube(k) = self {
            k.stop();
        }
    }
}
