//! The test API server, driven by the real kube-rs client, `watcher` and `reflector` (and, for
//! the wire format, by hand over a TCP socket). Needs no root: everything binds 127.0.0.1:0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use selvedge_tests::apiserver::ApiServer;
use serde_json::{json, Value};

/// Upper bound on every wait; tests poll, they never assert timings.
const WAIT: Duration = Duration::from_secs(20);

fn start() -> ApiServer {
    ApiServer::start(SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// A client built the way the agent builds one: from the kubeconfig the server wrote.
async fn client(server: &ApiServer, test: &str) -> kube::Client {
    let path = std::env::temp_dir().join(format!("selvedge-apiserver-{}-{test}.kubeconfig", std::process::id()));
    server.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the written kubeconfig");
    std::fs::remove_file(&path).expect("remove the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config from the kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    kube::Client::try_from(config).expect("a kube client")
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_within<S: futures::Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
}

fn pod(name: &str, node: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example/app"}]},
    })
}

fn names(store: &reflector::Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

fn rv(object: &Value) -> String {
    object["metadata"]["resourceVersion"].as_str().expect("a stored object has a resourceVersion").to_owned()
}

#[test]
fn reflector_follows_list_then_watch() {
    let server = start();
    server.apply(pod("a", "n1", "web"));
    server.apply(pod("b", "n2", "web"));
    runtime().block_on(async {
        let api: Api<Pod> = Api::all(client(&server, "reflector").await);
        let (reader, writer) = reflector::store();
        let task = tokio::spawn(
            reflector::reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .for_each(|_| async {}),
        );
        eventually("the initial list", || names(&reader) == ["a", "b"]).await;

        server.apply(pod("c", "n1", "web"));
        eventually("an added pod", || names(&reader) == ["a", "b", "c"]).await;

        let relabelled = server.apply(pod("a", "n1", "db"));
        let a = ObjectRef::new("a").within("default");
        eventually("a modified pod", || reader.get(&a).is_some_and(|p| p.labels()["app"] == "db")).await;
        assert_eq!(reader.get(&a).expect("a is stored").resource_version(), Some(rv(&relabelled)));

        assert!(server.delete("v1", "Pod", Some("default"), "b"));
        assert!(!server.delete("v1", "Pod", Some("default"), "b"), "b is already gone");
        eventually("a deleted pod", || names(&reader) == ["a", "c"]).await;
        task.abort();
    });
    let requests = server.requests();
    let list = requests.iter().any(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="));
    let watch = requests.iter().any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"));
    assert!(list && watch, "expected a list then a watch of /api/v1/pods: {requests:#?}");
}

#[test]
fn streaming_list_watcher_gets_initial_events_then_live_ones() {
    let server = start();
    server.apply(pod("a", "n1", "web"));
    runtime().block_on(async {
        let api: Api<Pod> = Api::all(client(&server, "streaming").await);
        let (reader, writer) = reflector::store();
        let config = watcher::Config::default().streaming_lists();
        let task =
            tokio::spawn(reflector::reflector(writer, watcher(api, config)).default_backoff().for_each(|_| async {}));
        eventually("the initial events", || names(&reader) == ["a"]).await;
        server.apply(pod("b", "n1", "web"));
        eventually("a live event", || names(&reader) == ["a", "b"]).await;
        task.abort();
    });
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.contains("watch=true")), "no list requests: {requests:#?}");
    assert!(requests[0].contains("sendInitialEvents=true"), "{requests:#?}");
}

#[test]
fn selectors_filter_and_relabelling_moves_objects_in_and_out() {
    let server = start();
    server.apply(pod("a", "n1", "web"));
    server.apply(pod("b", "n2", "web"));
    runtime().block_on(async {
        let client = client(&server, "selectors").await;

        // A field-selected reflector, as the agent watches its own node's pods.
        let (reader, writer) = reflector::store();
        let config = watcher::Config::default().fields("spec.nodeName=n1");
        let task = tokio::spawn(
            reflector::reflector(writer, watcher(Api::<Pod>::all(client.clone()), config))
                .default_backoff()
                .for_each(|_| async {}),
        );
        eventually("n1's pods", || names(&reader) == ["a"]).await;
        server.apply(pod("c", "n2", "web"));
        server.apply(pod("d", "n1", "web"));
        // Events arrive in order, so once d (written after c) is in, c was filtered out.
        eventually("a new pod on n1", || names(&reader) == ["a", "d"]).await;
        task.abort();

        // A label-selected raw watch: leaving the selection is DELETED, entering it ADDED.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let listed = pods.list(&ListParams::default().labels("app=web")).await.expect("a labelled list");
        assert_eq!(listed.items.len(), 4);
        let from = listed.metadata.resource_version.expect("a list has a resourceVersion");
        let params = WatchParams::default().labels("app in (web),!canary");
        let mut events = pods.watch(&params, &from).await.expect("a labelled watch").boxed();

        let left = server.apply(pod("a", "n1", "db"));
        server.apply(pod("e", "n1", "db")); // never matches: no event
        let entered = server.apply(pod("a", "n1", "web"));
        let moved = server.apply(pod("b", "n3", "web"));
        server.delete("v1", "Pod", Some("default"), "b");

        let mut seen = Vec::new();
        while seen.len() < 4 {
            match next_within(&mut events, "label watch events").await.expect("a watch event") {
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Added(p) => seen.push(("ADDED", p)),
                WatchEvent::Modified(p) => seen.push(("MODIFIED", p)),
                WatchEvent::Deleted(p) => seen.push(("DELETED", p)),
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
            }
        }
        let summary: Vec<(&str, String)> = seen.iter().map(|(t, p)| (*t, p.name_any())).collect();
        let expected = [("DELETED", "a"), ("ADDED", "a"), ("MODIFIED", "b"), ("DELETED", "b")];
        assert_eq!(summary, expected.map(|(t, n)| (t, n.to_owned())));
        // The DELETED for a relabel carries the last matching state at the relabel's version.
        assert_eq!(seen[0].1.labels()["app"], "web");
        assert_eq!(seen[0].1.resource_version(), Some(rv(&left)));
        assert_eq!(seen[1].1.resource_version(), Some(rv(&entered)));
        assert_eq!(seen[2].1.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("n3"));
        assert!(seen[3].1.resource_version() > Some(rv(&moved)));

        let bad = Api::<Pod>::all(client).list(&ListParams::default().labels("app > 1")).await;
        assert!(matches!(bad, Err(kube::Error::Api(ref s)) if s.code == 400), "a bad selector is a 400: {bad:?}");
    });
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.contains("watch=true") && r.contains("fieldSelector=spec.nodeName%3Dn1")),
        "the node watch carries its field selector: {requests:#?}"
    );
}

#[test]
fn compaction_and_outage_force_a_relist() {
    let server = start();
    for name in ["a", "b", "c"] {
        server.apply(pod(name, "n1", "web"));
    }
    runtime().block_on(async {
        let api: Api<Pod> = Api::all(client(&server, "relist").await);
        let (reader, writer) = reflector::store();
        let counts: Arc<[AtomicUsize; 4]> = Arc::default();
        let [inits, init_dones, gone, errors] = [0, 1, 2, 3];
        let seen = Arc::clone(&counts);
        let task = tokio::spawn(
            reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff().for_each(
                move |event| {
                    let slot = match &event {
                        Ok(watcher::Event::Init) => Some(inits),
                        Ok(watcher::Event::InitDone) => Some(init_dones),
                        Err(watcher::Error::WatchError(status)) if status.code == 410 => Some(gone),
                        Err(_) => Some(errors),
                        Ok(_) => None,
                    };
                    if let Some(slot) = slot {
                        seen[slot].fetch_add(1, Ordering::SeqCst);
                    }
                    async {}
                },
            ),
        );
        let count = |slot: usize| counts[slot].load(Ordering::SeqCst);
        eventually("the initial list", || count(init_dones) == 1 && names(&reader) == ["a", "b", "c"]).await;
        let watching = || server.requests().iter().any(|r| r.contains("watch=true"));
        eventually("the watch to start", watching).await;

        server.set_reachable(false);
        server.delete("v1", "Pod", Some("default"), "b");
        server.apply(pod("d", "n1", "web"));
        server.compact();
        eventually("a failed reconnect while down", || count(errors) > 0).await;
        assert_eq!(names(&reader), ["a", "b", "c"], "nothing can arrive while down");

        server.set_reachable(true);
        eventually("a relist", || count(init_dones) == 2 && names(&reader) == ["a", "c", "d"]).await;
        assert_eq!(count(inits), 2);
        assert!(count(gone) >= 1, "the re-watch from a compacted version got 410 Expired");
        task.abort();
    });
}

/// A minimal HTTP/1.1 client that shows the watch response exactly as sent.
struct RawWatch {
    reader: BufReader<TcpStream>,
    /// Bytes of a line not yet complete at the end of the last chunk.
    partial: Vec<u8>,
}

/// How a chunked body went on.
#[derive(Debug, PartialEq)]
enum Next {
    Event(Value),
    /// The terminating zero-length chunk: a clean end.
    End,
    /// The connection closed without the terminating chunk: an abrupt end.
    Dropped,
}

impl RawWatch {
    fn open(addr: SocketAddr, target: &str) -> (String, Vec<String>, Self) {
        let mut stream = TcpStream::connect(addr).expect("connect to the test API server");
        stream.set_read_timeout(Some(WAIT)).expect("set a read timeout");
        write!(stream, "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer test-token\r\n\r\n")
            .expect("send the request");
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read the response head");
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let status = head.remove(0);
        (status, head, Self { reader, partial: Vec::new() })
    }

    fn next(&mut self) -> Next {
        loop {
            if let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                return Next::Event(serde_json::from_slice(&line).expect("each line is one JSON event"));
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).expect("read a chunk size") == 0 {
                return Next::Dropped;
            }
            let size = usize::from_str_radix(size.trim_end(), 16).expect("a hex chunk size");
            let mut chunk = vec![0; size + 2];
            if self.reader.read_exact(&mut chunk).is_err() {
                return Next::Dropped;
            }
            if size == 0 {
                return Next::End;
            }
            self.partial.extend_from_slice(&chunk[..size]);
        }
    }
}

fn bookmark(rv: &str) -> Next {
    Next::Event(
        json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}}),
    )
}

#[test]
fn raw_watch_bookmarks_expiry_timeout_and_outage() {
    let server = start();
    server.set_bookmark_interval(Duration::from_millis(50));
    let a = server.apply(pod("a", "n1", "web"));
    let target = format!("/api/v1/namespaces/default/pods?watch=1&allowWatchBookmarks=true&resourceVersion={}", rv(&a));

    let (status, head, mut watch) = RawWatch::open(server.addr(), &target);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let head = head.join("\n").to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked") && head.contains("content-type: application/json"), "{head}");
    assert_eq!(watch.next(), bookmark(&rv(&a)));
    assert_eq!(watch.next(), bookmark(&rv(&a)));
    let b = server.apply(pod("b", "n1", "web"));
    let added = loop {
        match watch.next() {
            Next::Event(e) if e["type"] == "BOOKMARK" => continue,
            other => break other,
        }
    };
    assert_eq!(added, Next::Event(json!({"type": "ADDED", "object": b})));
    assert_eq!(watch.next(), bookmark(&rv(&b)));

    // timeoutSeconds ends the stream with the terminating chunk.
    let (_, _, mut timed) =
        RawWatch::open(server.addr(), &format!("/api/v1/pods?watch=true&timeoutSeconds=1&resourceVersion={}", rv(&b)));
    assert_eq!(timed.next(), Next::End);

    // After compaction, a watch from an older version gets one 410 ERROR event, then a clean end.
    server.compact();
    let (status, _, mut old) =
        RawWatch::open(server.addr(), &format!("/api/v1/pods?watch=true&resourceVersion={}", rv(&a)));
    assert_eq!(status, "HTTP/1.1 200 OK");
    let Next::Event(error) = old.next() else { panic!("expected an ERROR event") };
    assert_eq!(error["type"], "ERROR");
    assert_eq!((error["object"]["kind"].as_str(), error["object"]["code"].as_u64()), (Some("Status"), Some(410)));
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(old.next(), Next::End);

    // Going down drops open watches mid-stream; coming back serves again.
    server.set_reachable(false);
    let dropped = loop {
        match watch.next() {
            Next::Event(e) if e["type"] == "BOOKMARK" => continue,
            other => break other,
        }
    };
    assert_eq!(dropped, Next::Dropped);
    server.set_reachable(true);
    let (status, _, _) = RawWatch::open(server.addr(), "/api/v1/namespaces/default/pods/a");
    assert_eq!(status, "HTTP/1.1 200 OK");

    // Unknown resources and objects are 404s with a Status body.
    for path in ["/api/v1/widgets", "/apis/security.istio.io/v1/namespaces/default/authorizationpolicies/nope"] {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let status: Value = serde_json::from_str(body).expect("a JSON Status");
        assert_eq!((status["kind"].as_str(), status["reason"].as_str()), (Some("Status"), Some("NotFound")));
        assert_eq!((status["status"].as_str(), status["code"].as_u64()), (Some("Failure"), Some(404)));
    }
}

#[test]
fn istio_policies_through_dynamic_objects_and_discovery() {
    let server = start();
    server.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web", "namespace": "default"},
        "spec": {
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/web"]}}]}],
        },
    }));
    server.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }));
    runtime().block_on(async {
        let client = client(&server, "istio").await;
        let version = client.apiserver_version().await.expect("GET /version");
        assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));

        let discovery =
            Discovery::new(client.clone()).filter(&["", "security.istio.io"]).run().await.expect("discovery");
        let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
        let (resource, caps) = discovery.resolve_gvk(&gvk).expect("AuthorizationPolicy is discoverable");
        assert_eq!((resource.plural.as_str(), caps.scope), ("authorizationpolicies", Scope::Namespaced));
        let namespaces = GroupVersionKind::gvk("", "v1", "Namespace");
        assert_eq!(discovery.resolve_gvk(&namespaces).expect("Namespace is discoverable").1.scope, Scope::Cluster);

        let ar = ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        };
        let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        let got = policies.get("allow-web").await.expect("get the policy");
        assert_eq!(got.data["spec"]["action"], "ALLOW");
        let listed = policies.list(&ListParams::default()).await.expect("list policies");
        assert_eq!(listed.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["allow-web"]);
        let missing = policies.get("nope").await;
        assert!(
            matches!(missing, Err(kube::Error::Api(ref s)) if s.code == 404 && s.reason == "NotFound"),
            "{missing:?}"
        );

        let mut applied = watcher(Api::<DynamicObject>::all_with(client, &ar), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        let first = next_within(&mut applied, "the listed policy").await.expect("a policy");
        assert_eq!(first.name_any(), "allow-web");
        server.apply(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-db", "namespace": "db"},
            "spec": {"action": "DENY", "rules": [{}]},
        }));
        let second = next_within(&mut applied, "the new policy").await.expect("a policy");
        assert_eq!((second.name_any(), second.namespace()), ("deny-db".to_owned(), Some("db".to_owned())));
        assert_eq!(second.data["spec"]["action"], "DENY");
    });
}
