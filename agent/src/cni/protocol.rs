//! What `selvedge-cni` and the agent say over the agent's unix socket: one JSON line each
//! way per connection.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The socket's file name in the agent's state directory.
pub const SOCKET_NAME: &str = "cni.sock";

/// The pod a request is about, from the runtime's `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it (containerd and CRI-O do).
    #[serde(default)]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "op")]
pub enum Request {
    /// The pod's sandbox exists: its netns and addresses. Answered once capture is in place
    /// (or the pod is known not to be meshed).
    Add { pod: PodRef, container_id: String, netns: PathBuf, ips: Vec<IpAddr> },
    /// The sandbox is going away.
    Del { pod: PodRef, container_id: String },
    /// Is the pod in the state the agent wants (enrolled when meshed)?
    Check { pod: PodRef, container_id: String },
}

impl Request {
    pub fn pod(&self) -> &PodRef {
        match self {
            Request::Add { pod, .. } | Request::Del { pod, .. } | Request::Check { pod, .. } => pod,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Response {
    /// Captured: the pod's traffic goes through the agent as `identity`.
    Meshed { identity: String },
    /// Not in the mesh (no label, opted out, hostNetwork): nothing to do.
    NotMeshed,
    /// Done (DEL).
    Done,
    /// The pod must be meshed and is not: the runtime must not start it.
    Refused { reason: String },
}
