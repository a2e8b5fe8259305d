//! Kubernetes: the only module that imports kube.
//!
//! * `convert.rs` — cluster objects → the agent's internal state (pure);
//! * `watch.rs`   — reflectors and the snapshot stream.
//!
//! In a cluster the agent reads Pods (all of them: local ones are enrolled, every meshed
//! one is a peer whose IP → identity the proxy needs), Namespaces (the enrollment label),
//! Services (VIPs), and Istio's `security.istio.io/v1` AuthorizationPolicy and
//! PeerAuthentication. Enrollment is by label (`selvedge.dev/mesh=enabled` on the
//! namespace or pod; `disabled` on a pod opts out); hostNetwork pods are never enrolled.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Api, Config,
};

pub mod authority;
pub mod convert;
pub mod watch;

/// The API client the agent's cluster loop holds (made before the kernel is touched).
pub use kube::Client;

pub use convert::{find_pod, meshed, to_config, Converted, PodFacts, PodNetwork, Snapshot};

/// The default enrollment label key.
pub const DEFAULT_MESH_LABEL: &str = "selvedge.dev/mesh";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {detail}")]
    Kubeconfig { path: String, detail: String },
    #[error("no kubeconfig given and not running in a pod: {0}")]
    InCluster(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// A client from `kubeconfig`, or the in-cluster ServiceAccount when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |detail: String| KubeError::Kubeconfig { path: path.display().to_string(), detail };
            let kc = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(|e| bad(e.to_string()))?
        }
        None => Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// Ask the API directly whether a pod is meshed (the CNI plugin's answer when the agent is
/// down). Errors when the API cannot tell: the caller fails closed.
pub async fn pod_is_meshed(client: Client, namespace: &str, name: &str, key: &str) -> Result<bool, KubeError> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace).get(name).await?;
    let ns = Api::<Namespace>::all(client).get(namespace).await?;
    let namespaces: BTreeMap<&str, &Namespace> = BTreeMap::from([(namespace, &ns)]);
    Ok(convert::pod_meshed(&pod, &namespaces, key))
}
