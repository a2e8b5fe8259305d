//! Open inbound connections, so a policy change can close those it now denies.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use super::{Mesh, PodContext};
use crate::{
    cancel::Cancel,
    policy::{Applicable, ConnFacts, Decision, PolicySet},
};

/// How many connections a recheck looks at per hold of the lock: accepts and closes, which
/// register and unregister connections, wait at most that long.
const CHUNK: usize = 256;

/// What a recheck needs of the workload a connection goes to (a pod, or in unit tests a
/// stand-in).
pub trait Workload {
    fn name(&self) -> &str;
    fn namespace(&self) -> &str;
    fn labels(&self) -> &BTreeMap<String, String>;
}

impl Workload for PodContext {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
}

/// One open inbound connection as authorization saw it.
#[derive(Debug)]
struct Watched<P> {
    pod: Arc<P>,
    facts: ConnFacts,
    cancel: Arc<Cancel>,
}

/// Open inbound connections, so a policy change can close those it now denies.
#[derive(Debug)]
pub struct Watchers<P = PodContext> {
    open: parking_lot::Mutex<BTreeMap<u64, Watched<P>>>,
    next: AtomicUsize,
}

impl<P> Default for Watchers<P> {
    fn default() -> Self {
        Self { open: parking_lot::Mutex::new(BTreeMap::new()), next: AtomicUsize::new(0) }
    }
}

/// Registration of one connection; dropping it unregisters.
#[derive(Debug)]
pub struct WatchGuard<P = PodContext> {
    watchers: Arc<Watchers<P>>,
    id: u64,
    /// Cancelled when a policy change denies this connection.
    pub cancel: Arc<Cancel>,
}

impl<P> Drop for WatchGuard<P> {
    fn drop(&mut self) {
        self.watchers.open.lock().remove(&self.id);
    }
}

impl Watchers {
    /// Authorize a connection to `pod` and, if allowed, keep it for later rechecks.
    ///
    /// It is registered *before* the policies are read: a policy change publishes the new
    /// policies and then rechecks what is registered, so a connection decided under the old
    /// policies is always among those rechecked, even when the recheck runs on another
    /// thread while this connection is being decided.
    pub fn admit(
        self: &Arc<Self>,
        pod: &Arc<PodContext>,
        mesh: &Mesh,
        facts: ConnFacts,
    ) -> Result<WatchGuard, Decision> {
        let guard = self.add(pod.clone(), facts.clone());
        match pod.authorize(mesh, &facts) {
            Decision::Allow => Ok(guard),
            deny => Err(deny),
        }
    }
}

impl<P: Workload> Watchers<P> {
    fn add(self: &Arc<Self>, pod: Arc<P>, facts: ConnFacts) -> WatchGuard<P> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let cancel = Arc::new(Cancel::default());
        self.open.lock().insert(id, Watched { pod, facts, cancel: cancel.clone() });
        WatchGuard { watchers: self.clone(), id, cancel }
    }

    /// Close every open connection (when they could not be rechecked). Returns how many.
    pub fn close_all(&self) -> usize {
        let open = self.open.lock();
        for w in open.values() {
            w.cancel.cancel();
        }
        open.len()
    }

    /// Authorize every open connection again under `policies`; close those now denied.
    /// Returns how many. Meant for a blocking thread: it takes the lock for [`CHUNK`]
    /// connections at a time, and selects each pod's policies once, not per connection.
    pub fn recheck(&self, policies: &PolicySet) -> usize {
        // Keyed by the pod's allocation, which the entry keeps alive (no other pod can reuse
        // the address while the recheck runs).
        let mut per_pod: HashMap<*const P, (Arc<P>, Applicable<'_>)> = HashMap::new();
        let mut closed = 0;
        let mut from = 0;
        loop {
            let chunk: Vec<(Arc<P>, ConnFacts, Arc<Cancel>)> = {
                let open = self.open.lock();
                open.range(from..)
                    .take(CHUNK)
                    .map(|(id, w)| {
                        from = id + 1;
                        (w.pod.clone(), w.facts.clone(), w.cancel.clone())
                    })
                    .collect()
            };
            if chunk.is_empty() {
                return closed;
            }
            for (pod, facts, cancel) in chunk {
                let (_, applies) = per_pod
                    .entry(Arc::as_ptr(&pod))
                    .or_insert_with(|| (pod.clone(), policies.for_workload(pod.namespace(), pod.labels())));
                let v = applies.decide(&facts);
                if let Decision::Deny { .. } = v.decision {
                    tracing::info!(pod = %pod.name(), src = %facts.src_ip, port = facts.dst_port, "{}: closing an open connection", v.decision.reason());
                    // Seen even if the connection is not waiting yet.
                    cancel.cancel();
                    closed += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pod {
        namespace: String,
        labels: BTreeMap<String, String>,
    }

    impl Workload for Pod {
        fn name(&self) -> &str {
            "p"
        }
        fn namespace(&self) -> &str {
            &self.namespace
        }
        fn labels(&self) -> &BTreeMap<String, String> {
            &self.labels
        }
    }

    fn pod(app: &str) -> Arc<Pod> {
        Arc::new(Pod { namespace: "shop".into(), labels: BTreeMap::from([("app".into(), app.into())]) })
    }

    fn from(principal: &str, port: u16) -> ConnFacts {
        ConnFacts {
            principal: Some(format!("td/ns/shop/sa/{principal}").into()),
            src_ip: "198.18.1.10".parse().unwrap(),
            dst_ip: "198.18.1.20".parse().unwrap(),
            dst_port: port,
        }
    }

    fn policy(doc: &str) -> crate::policy::CompiledPolicy {
        let p: crate::policy::AuthorizationPolicy = serde_yaml_ng::from_str(doc).unwrap();
        p.compile("istio-system").unwrap()
    }

    #[test]
    fn a_recheck_closes_exactly_what_the_new_policies_deny_across_chunks_and_pods() {
        let w: Arc<Watchers<Pod>> = Arc::default();
        let (db, web) = (pod("db"), pod("web"));
        // More than two chunks' worth, alternating pods, principals and ports; some closed
        // before the recheck (ids it must step over).
        let mut guards = Vec::new();
        for i in 0..(2 * CHUNK + 37) {
            let target = if i % 2 == 0 { &db } else { &web };
            let who = if i % 3 == 0 { "api" } else { "batch" };
            guards.push((i, target.clone(), who, w.add(target.clone(), from(who, 5432))));
        }
        guards.retain(|(i, ..)| i % 7 != 0);
        // db admits only api; web is selected by no policy.
        let policies = PolicySet::new(vec![policy("metadata: {name: db, namespace: shop}\nspec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principals: [td/ns/shop/sa/api]}}]}]}")]);
        let closed = w.recheck(&policies);
        let (mut expected, mut last_denied) = (0, 0);
        for (i, target, who, guard) in &guards {
            let denied = Arc::ptr_eq(target, &db) && *who != "api";
            assert_eq!(guard.cancel.is_cancelled(), denied, "connection {i} ({who} to {})", target.labels["app"]);
            if denied {
                (expected, last_denied) = (expected + 1, *i);
            }
        }
        assert!(last_denied >= 2 * CHUNK, "denied connections in the third chunk too ({last_denied})");
        assert_eq!(closed, expected);
        assert_eq!(w.recheck(&PolicySet::default()), 0, "no policy: nothing denied");
        assert_eq!(w.close_all(), guards.len());
        assert!(guards.iter().all(|(.., g)| g.cancel.is_cancelled()));
        drop(guards);
        assert!(w.open.lock().is_empty(), "dropped guards unregister");
    }
}
