//! Reflectors for everything the agent reads, and a stream of consistent snapshots.
//!
//! Each kind has a kube-rs reflector: its store is replaced atomically when a (re)list
//! completes, so a relist after an outage also removes what was deleted meanwhile; watch
//! errors are retried with kube's default backoff while the store keeps the last-known
//! state (which the agent keeps enforcing). A snapshot is published only once every kind
//! has completed its first list, then after each change (coalesced).

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::{watch as chan, Notify};

use super::convert::Snapshot;

/// How long changes are gathered before one snapshot is published.
const COALESCE: Duration = Duration::from_millis(50);
/// How often a missing Istio CRD is looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(30);

/// Shared between the reflector tasks and the publisher.
#[derive(Debug, Default)]
struct Signals {
    changed: Notify,
}

/// A kind's first list is done (or the kind does not exist in this cluster).
#[derive(Debug, Default)]
struct Ready(AtomicBool);

fn istio(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("security.istio.io", "v1", kind), plural)
}

/// Start the reflectors; the receiver yields a snapshot once all kinds are listed, then on
/// every change. Runs until the runtime stops.
pub fn start(client: Client) -> chan::Receiver<Option<Arc<Snapshot>>> {
    let signals = Arc::new(Signals::default());
    let pods = spawn_typed::<Pod>(Api::all(client.clone()), &signals);
    let namespaces = spawn_typed::<Namespace>(Api::all(client.clone()), &signals);
    let services = spawn_typed::<Service>(Api::all(client.clone()), &signals);
    let authz = spawn_dynamic(client.clone(), istio("AuthorizationPolicy", "authorizationpolicies"), &signals);
    let peer_auth = spawn_dynamic(client, istio("PeerAuthentication", "peerauthentications"), &signals);
    let (tx, rx) = chan::channel(None);
    tokio::spawn(async move {
        let all_ready = || {
            [&pods.1, &namespaces.1, &services.1, &authz.1, &peer_auth.1].iter().all(|r| r.0.load(Ordering::Acquire))
        };
        loop {
            signals.changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            if !all_ready() {
                continue;
            }
            let snap = Snapshot {
                pods: pods.0.state(),
                namespaces: namespaces.0.state(),
                services: services.0.state(),
                authorization_policies: authz.0.state(),
                peer_authentications: peer_auth.0.state(),
            };
            if tx.send(Some(Arc::new(snap))).is_err() {
                return; // the agent stopped listening
            }
        }
    });
    rx
}

fn spawn_typed<K>(api: Api<K>, signals: &Arc<Signals>) -> (Store<K>, Arc<Ready>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let ready = Arc::new(Ready::default());
    let kind = K::kind(&K::DynamicType::default()).to_string();
    tokio::spawn(drive(kind, api, writer, ready.clone(), signals.clone()));
    (reader, ready)
}

fn spawn_dynamic(client: Client, ar: ApiResource, signals: &Arc<Signals>) -> (Store<DynamicObject>, Arc<Ready>) {
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let ready = Arc::new(Ready::default());
    let (ready2, signals2) = (ready.clone(), signals.clone());
    tokio::spawn(async move {
        let api: Api<DynamicObject> = Api::all_with(client, &ar);
        // A cluster without Istio's CRDs has no such policies: the kind counts as listed
        // (empty), and is looked for again until it appears.
        loop {
            match api.list(&ListParams::default().limit(1)).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    if !ready2.0.swap(true, Ordering::AcqRel) {
                        tracing::warn!(kind = %ar.kind, "CRD not installed: no such policies; checking again every {}s", CRD_RECHECK.as_secs());
                        signals2.changed.notify_one();
                    }
                    tokio::time::sleep(CRD_RECHECK).await;
                }
                // Reachable with the kind present, or another error the watcher will retry.
                _ => break,
            }
        }
        // Not ready again until this kind's first real list completes.
        ready2.0.store(false, Ordering::Release);
        drive(ar.kind.clone(), api, writer, ready2, signals2).await;
    });
    (reader, ready)
}

async fn drive<K>(
    kind: String,
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    ready: Arc<Ready>,
    signals: Arc<Signals>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone) => {
                if failing || !ready.0.load(Ordering::Acquire) {
                    tracing::info!(kind = %kind, "listed");
                }
                failing = false;
                ready.0.store(true, Ordering::Release);
            }
            Ok(_) => failing = false,
            Err(e) => {
                // The store keeps the last-known state; kube retries with backoff.
                if !failing {
                    tracing::warn!(kind = %kind, "watch failed, keeping the last-known state and retrying: {e}");
                }
                failing = true;
                continue;
            }
        }
        signals.changed.notify_one();
    }
}
