//! Open inbound connections, so a policy change can close those it now denies.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use super::{Mesh, PodContext};
use crate::{
    cancel::Cancel,
    policy::{authorize, ConnFacts, Decision},
};

/// One open inbound connection as authorization saw it.
#[derive(Debug)]
struct Watched {
    pod: Arc<PodContext>,
    facts: ConnFacts,
    cancel: Arc<Cancel>,
}

/// Open inbound connections, so a policy change can close those it now denies.
#[derive(Debug, Default)]
pub struct Watchers {
    open: parking_lot::Mutex<std::collections::BTreeMap<u64, Watched>>,
    next: AtomicUsize,
}

/// Registration of one connection; dropping it unregisters.
#[derive(Debug)]
pub struct WatchGuard {
    watchers: Arc<Watchers>,
    id: u64,
    /// Cancelled when a policy change denies this connection.
    pub cancel: Arc<Cancel>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.watchers.open.lock().remove(&self.id);
    }
}

impl Watchers {
    pub fn add(self: &Arc<Self>, pod: Arc<PodContext>, facts: ConnFacts) -> WatchGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let cancel = Arc::new(Cancel::default());
        self.open.lock().insert(id, Watched { pod, facts, cancel: cancel.clone() });
        WatchGuard { watchers: self.clone(), id, cancel }
    }

    /// Authorize every open connection again; close those now denied. Returns how many.
    pub fn recheck(&self, mesh: &Mesh) -> usize {
        let policies = mesh.policies.read().clone();
        let open = self.open.lock();
        let mut closed = 0;
        for w in open.values() {
            let v = authorize(&policies, &w.pod.namespace, &w.pod.labels, &w.facts);
            if let Decision::Deny { .. } = v.decision {
                tracing::info!(pod = %w.pod.name, src = %w.facts.src_ip, port = w.facts.dst_port, "{}: closing an open connection", v.decision.reason());
                // Seen even if the connection is not waiting yet.
                w.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
