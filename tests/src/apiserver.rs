//! A test Kubernetes API server: real list/watch over plain HTTP/1.1, for pointing the real
//! agent (kube-rs `watcher`/`reflector`) at a cluster that is not there.
//!
//! It serves Pods, Namespaces, Services, ServiceAccounts, EndpointSlices and Istio's
//! AuthorizationPolicy / PeerAuthentication, stored as JSON. Tests write objects through the
//! control API ([`ApiServer::apply`], [`ApiServer::delete`]); clients only read (GET, list,
//! watch). Bearer tokens are accepted, never checked.
//!
//! Behaviour a test can rely on:
//! * one global resource-version counter; every write takes the next value, and watches from
//!   a version replay every later change, including changes made while
//!   [unreachable](ApiServer::set_reachable);
//! * after [`ApiServer::compact`] a watch from an older version gets a 410 `Expired` ERROR
//!   event and ends, so a kube-rs watcher relists (`Init` … `InitDone`);
//! * selectors behave as on a real server: an object that leaves a watch's selection is sent as
//!   DELETED, one that enters it as ADDED.
//!
//! # Layout
//! * `resources` — the served types and discovery documents;
//! * `store` — objects, resource versions and the change history (pure);
//! * `selector` — field and label selectors (pure);
//! * `http` — routing, GET/list and error statuses; `watch` — streaming watches.

mod http;
mod resources;
mod selector;
mod store;
mod watch;

use std::fmt;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch as channel, Mutex, MutexGuard};

use self::store::Store;

/// A running test API server; dropping it stops it and closes every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    /// Where it listens (in its network namespace), with the ephemeral port resolved.
    addr: SocketAddr,
    /// Fired by `Drop` to end the accept loop and with it the runtime.
    shutdown: Option<oneshot::Sender<()>>,
    /// The thread running the server's own tokio runtime, so synchronous tests can use it.
    thread: Option<JoinHandle<()>>,
}

/// State shared by the control API and the server's tasks.
struct Shared {
    store: Mutex<Store>,
    /// The latest resource version, sent after each write to wake watches.
    changed: channel::Sender<u64>,
    /// Whether the server is reachable, and which outage it is in (see `connection`).
    reach: channel::Sender<Reach>,
    /// Open connections, so `set_reachable(false)` can wait for them all to close.
    open_connections: AtomicUsize,
    bookmark_interval_ms: AtomicU64,
    /// `METHOD path?query` of every request, for assertions.
    requests: Mutex<Vec<String>>,
    /// For the `/api` discovery document.
    addr: SocketAddr,
    /// What TokenReview answers: token → (user object, audiences it is bound to).
    tokens: Mutex<std::collections::BTreeMap<String, (Value, Vec<String>)>>,
}

#[derive(Debug, Clone, Copy)]
struct Reach {
    up: bool,
    /// Bumped by every `set_reachable(false)`; a connection accepted in an earlier epoch is
    /// dropped even if the server is already back up when its task notices.
    epoch: u64,
}

/// How long `set_reachable(false)` waits for connections to close before failing the test.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// The names used in [`ApiServer::write_kubeconfig`].
const KUBECONFIG_NAME: &str = "selvedge-test";

impl ApiServer {
    /// Starts serving on `addr` in the current network namespace (port 0 picks a free port).
    pub fn start(addr: SocketAddr) -> Self {
        let listener =
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("test API server: bind {addr}: {e}"));
        Self::serve(listener)
    }

    /// Starts serving on `addr` inside the network namespace `netns` (e.g. `/run/netns/NAME`).
    /// Only the listening socket lives there; the server's threads stay where they are.
    pub fn start_in_netns(netns: &Path, addr: SocketAddr) -> Self {
        let netns = netns.to_owned();
        let bind = std::thread::spawn(move || {
            let ns = File::open(&netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
            // SAFETY: `ns` is an open namespace fd; setns only moves this short-lived thread,
            // and a socket keeps the namespace it was created in after the thread exits.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns({}): {}", netns.display(), std::io::Error::last_os_error());
            }
            std::net::TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("test API server: bind {addr} in {}: {e}", netns.display()))
        });
        let listener = bind.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Self::serve(listener)
    }

    fn serve(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().expect("a bound listener has a local address");
        listener.set_nonblocking(true).expect("set the listener non-blocking for tokio");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: channel::Sender::new(0),
            reach: channel::Sender::new(Reach { up: true, epoch: 0 }),
            open_connections: AtomicUsize::new(0),
            bookmark_interval_ms: AtomicU64::new(millis(DEFAULT_BOOKMARK_INTERVAL)),
            requests: Mutex::new(Vec::new()),
            tokens: Mutex::new(std::collections::BTreeMap::new()),
            addr,
        });
        let (shutdown, stop) = oneshot::channel();
        let server = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the test API server's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("register the listener with tokio");
                    accept_loop(listener, server, stop).await;
                });
                // Dropping the runtime here cancels every connection task and closes its socket.
            })
            .expect("spawn the test API server thread");
        Self { shared, addr, shutdown: Some(shutdown), thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, as written into the kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces the object with this apiVersion, kind, namespace and name, emitting
    /// ADDED or MODIFIED; returns it as stored (with `resourceVersion`, `uid`,
    /// `creationTimestamp`). A given `resourceVersion` is ignored (no optimistic concurrency);
    /// identical content is a no-op, as on a real server. Panics on an unknown kind, a missing
    /// name or namespace, or an object its k8s-openapi type cannot parse.
    pub fn apply(&self, object: Value) -> Value {
        let mut store = blocking(&self.shared.store);
        let stored = store.apply(object).unwrap_or_else(|why| panic!("test API server: apply: {why}"));
        self.shared.changed.send_replace(store.rv());
        stored
    }

    /// [`apply`](Self::apply) for a k8s-openapi object.
    pub fn apply_typed<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> Value {
        let mut value = serde_json::to_value(object).expect("a k8s-openapi object serializes");
        value["apiVersion"] = K::API_VERSION.into();
        value["kind"] = K::KIND.into();
        self.apply(value)
    }

    /// Deletes an object, emitting DELETED (the object's last state with a new resource
    /// version); `false` if it did not exist. Panics on an unknown kind.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let resource = resources::by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("test API server: delete: unknown kind {api_version} {kind}"));
        let mut store = blocking(&self.shared.store);
        let deleted = store.delete(resource, namespace.unwrap_or(""), name);
        self.shared.changed.send_replace(store.rv());
        deleted
    }

    /// [`delete`](Self::delete) by k8s-openapi type.
    pub fn delete_typed<K: k8s_openapi::Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        self.delete(K::API_VERSION, K::KIND, namespace, name)
    }

    /// The stored object, if any. Panics on an unknown kind.
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let resource = resources::by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("test API server: get: unknown kind {api_version} {kind}"));
        blocking(&self.shared.store).get(resource, namespace.unwrap_or(""), name).cloned()
    }

    /// Forgets history, as an etcd compaction does: a watch that later asks to start from a
    /// resource version below the current one gets a 410 `Expired` ERROR event. Open watches
    /// carry on.
    /// Make TokenReview accept `token` for audience `audience` as the ServiceAccount
    /// `namespace/name`, bound to a pod on `node` (a projected, pod-bound token: its
    /// `extra` names the pod's node), or to no pod when `node` is None.
    pub fn add_token(&self, token: &str, namespace: &str, name: &str, node: Option<&str>, audience: &str) {
        let mut extra = serde_json::Map::new();
        if let Some(node) = node {
            extra.insert("authentication.kubernetes.io/node-name".into(), serde_json::json!([node]));
            extra.insert("authentication.kubernetes.io/pod-name".into(), serde_json::json!([format!("{name}-pod")]));
        }
        let user = serde_json::json!({"username": format!("system:serviceaccount:{namespace}:{name}"), "extra": extra});
        blocking(&self.shared.tokens).insert(token.to_owned(), (user, vec![audience.to_owned()]));
    }

    pub fn compact(&self) {
        blocking(&self.shared.store).compact();
    }

    /// Down: every open connection (watches included) is dropped mid-stream, without the final
    /// chunk, and new connections are accepted and closed at once; returns once every open
    /// connection has closed. Up: serves normally again. Writes while down are kept, so a
    /// client that re-watches from its last version afterwards receives them (or relists, if
    /// [`compact`](Self::compact) was called meanwhile).
    pub fn set_reachable(&self, up: bool) {
        self.shared.reach.send_modify(|reach| {
            reach.epoch += u64::from(!up);
            reach.up = up;
        });
        if up {
            return;
        }
        let started = Instant::now();
        while self.shared.open_connections.load(Ordering::SeqCst) > 0 {
            assert!(started.elapsed() < CLOSE_TIMEOUT, "test API server: connections did not close when set down");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `METHOD path?query` of every request served so far, oldest first, query as sent.
    pub fn requests(&self) -> Vec<String> {
        blocking(&self.shared.requests).clone()
    }

    /// Writes a kubeconfig for this server: one cluster `http://ADDR`, a user with token
    /// `test-token`, one context (namespace `default`), which is current.
    pub fn write_kubeconfig(&self, path: &Path) {
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": KUBECONFIG_NAME, "cluster": {"server": self.url()}}],
            "users": [{"name": KUBECONFIG_NAME, "user": {"token": "test-token"}}],
            "contexts": [{"name": KUBECONFIG_NAME,
                          "context": {"cluster": KUBECONFIG_NAME, "user": KUBECONFIG_NAME, "namespace": "default"}}],
            "current-context": KUBECONFIG_NAME,
            "preferences": {},
        });
        let yaml = serde_yaml_ng::to_string(&kubeconfig).expect("a kubeconfig serializes to YAML");
        std::fs::write(path, yaml).unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }

    /// How often watches that allow bookmarks get one (default 1 s); applies from each
    /// watch's next bookmark on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.bookmark_interval_ms.store(millis(interval).max(1), Ordering::Relaxed);
    }
}

impl fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // Err only if the server already stopped, which the join below reports.
            shutdown.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Locks from synchronous code, which may itself run inside some other async runtime (where
/// tokio's `blocking_lock` would panic). The server never holds these locks across an await.
fn blocking<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    futures::executor::block_on(mutex.lock())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            // Out of fds or similar: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let reach = shared.reach.subscribe();
        let Reach { up, epoch } = *reach.borrow();
        if !up {
            continue; // unreachable: the stream drops here, closing the connection at once
        }
        shared.open_connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(Arc::clone(&shared), stream, reach, epoch));
    }
}

/// Serves one connection until it ends or an outage begins, whichever comes first.
async fn connection(shared: Arc<Shared>, stream: TcpStream, mut reach: channel::Receiver<Reach>, epoch: u64) {
    struct Open(Arc<Shared>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let open = Open(shared);
    // Watch events are small writes that must not wait for Nagle.
    stream.set_nodelay(true).ok();
    let service_shared = Arc::clone(&open.0);
    let service = service_fn(move |req| http::handle(Arc::clone(&service_shared), req));
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        biased;
        () = outage(&mut reach, epoch) => {} // dropping `conn` drops the socket mid-response
        _ = conn => {}
    }
    drop(open);
}

/// Completes when an outage starts after `epoch`.
async fn outage(reach: &mut channel::Receiver<Reach>, epoch: u64) {
    while reach.borrow_and_update().epoch == epoch {
        if reach.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
