//! Watches: a chunked response of newline-separated `{"type": …, "object": …}` events, replayed
//! from the store's history after the requested resource version and then followed live.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::http::{status, status_object, Body, Params};
use super::resources::{ResourceType, RESOURCES};
use super::selector::Selection;
use super::store::{Change, ChangeType};
use super::Shared;

/// The annotation on the bookmark that ends a streaming list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Validates a watch request and starts streaming it.
pub(super) async fn respond(
    shared: Arc<Shared>,
    resource: usize,
    selection: Selection,
    params: &Params,
) -> Response<Body> {
    // The real server's validation of watch-list ("streaming list") requests.
    let invalid = |message: &str| status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message.into());
    if params.send_initial_events == Some(true) {
        if params.version_match.as_deref() != Some("NotOlderThan") {
            return invalid("sendInitialEvents requires setting resourceVersionMatch to NotOlderThan");
        }
        if !params.bookmarks {
            return invalid("sendInitialEvents requires setting allowWatchBookmarks to true");
        }
    } else if params.version_match.is_some() {
        return invalid("resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided");
    }
    let from = match params.resource_version.as_deref() {
        None | Some("" | "0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", format!("invalid resourceVersion {v:?}")),
        },
    };
    // Without a resource version a watch starts with the current state, as on a real server.
    let send_initial = params.send_initial_events.unwrap_or(from.is_none());

    let mut stream = Watch {
        changes: shared.changed.subscribe(),
        resource: &RESOURCES[resource],
        resource_index: resource,
        selection,
        cursor: 0,
        queue: VecDeque::new(),
        finished: false,
        bookmarks: params.bookmarks,
        last_bookmark: Instant::now(),
        deadline: params.timeout.map(|t| Instant::now() + t),
        shared: Arc::clone(&shared),
    };
    {
        let store = shared.store.lock().await;
        if let Some(rv) = from.filter(|&rv| rv > store.rv()) {
            // A real server waits briefly for the version to appear, then fails the same way.
            let message = format!("Too large resource version: {rv}, current: {}", store.rv());
            return status(StatusCode::GATEWAY_TIMEOUT, "Timeout", message);
        }
        if send_initial {
            for object in store.list(resource).filter(|o| stream.selection.matches(o)) {
                stream.queue.push_back(line("ADDED", object));
            }
            stream.cursor = store.rv();
            if params.send_initial_events == Some(true) {
                stream.push_bookmark(true);
            }
        } else if let Some(rv) = from {
            if rv < store.floor() {
                // How a real server says "410 Gone" once the watch response has started.
                let message = format!("too old resource version: {rv} ({})", store.floor());
                stream.push("ERROR", &status_object(StatusCode::GONE, "Expired", message));
                stream.finished = true;
            }
            stream.cursor = rv;
        } else {
            stream.cursor = store.rv();
        }
    }

    let lines = futures::stream::unfold(stream, |mut stream| async move {
        let line = stream.next().await?;
        Some((Ok(Frame::data(line)), stream))
    });
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// One open watch. Lives inside the response body, so a closed connection drops it.
struct Watch {
    shared: Arc<Shared>,
    /// Wakes the watch after each write to the store.
    changes: watch::Receiver<u64>,
    resource: &'static ResourceType,
    resource_index: usize,
    selection: Selection,
    /// Every change up to this resource version has been turned into events.
    cursor: u64,
    /// Serialized event lines not yet handed to hyper.
    queue: VecDeque<Bytes>,
    /// End the stream once the queue drains (after a 410 ERROR event).
    finished: bool,
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
    last_bookmark: Instant,
    /// From `timeoutSeconds`: the stream ends cleanly then.
    deadline: Option<Instant>,
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
}

impl Watch {
    /// The next line to send; `None` ends the response cleanly.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(line) = self.queue.pop_front() {
                return Some(line);
            }
            if self.finished || self.deadline.is_some_and(|d| d <= Instant::now()) {
                return None;
            }
            // Mark the current value seen *before* reading the store, so a write that lands
            // after the read still wakes the wait below.
            self.changes.borrow_and_update();
            self.collect().await;
            if !self.queue.is_empty() {
                continue;
            }
            let interval = Duration::from_millis(self.shared.bookmark_interval_ms.load(Ordering::Relaxed));
            let bookmark_at = self.last_bookmark + interval;
            let deadline = self.deadline;
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None; // the server is shutting down
                    }
                }
                () = sleep_until(bookmark_at), if self.bookmarks => {
                    self.collect().await;
                    self.push_bookmark(false);
                    self.last_bookmark = Instant::now();
                }
                () = sleep_until(deadline.unwrap_or(bookmark_at)), if deadline.is_some() => return None,
            }
        }
    }

    /// Turns every change after the cursor into events for this watch's selection.
    async fn collect(&mut self) {
        let shared = Arc::clone(&self.shared);
        let store = shared.store.lock().await;
        for change in store.changes_since(self.cursor).iter().filter(|c| c.resource == self.resource_index) {
            if let Some((kind, object)) = event_for(change, &self.selection) {
                self.queue.push_back(line(kind, &object));
            }
        }
        self.cursor = store.rv();
    }

    fn push(&mut self, kind: &str, object: &Value) {
        self.queue.push_back(line(kind, object));
    }

    fn push_bookmark(&mut self, initial_events_end: bool) {
        let mut metadata = json!({"resourceVersion": self.cursor.to_string()});
        if initial_events_end {
            metadata["annotations"][INITIAL_EVENTS_END] = "true".into();
        }
        let object =
            json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(), "metadata": metadata});
        self.push("BOOKMARK", &object);
    }
}

/// One event as sent: JSON and a newline.
fn line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&Event { kind, object }).expect("a watch event serializes");
    line.push(b'\n');
    line.into()
}

/// What a watch with `selection` sees of `change`, with the real server's rules: an object
/// that stops matching is DELETED (its previous state at the new rv), one that starts matching
/// is ADDED.
fn event_for<'a>(change: &'a Change, selection: &Selection) -> Option<(&'static str, Cow<'a, Value>)> {
    let now = selection.matches(&change.object);
    let before = change.previous.as_ref().is_some_and(|p| selection.matches(p));
    let current = || Cow::Borrowed(&change.object);
    match change.kind {
        ChangeType::Added => now.then(|| ("ADDED", current())),
        ChangeType::Deleted => now.then(|| ("DELETED", current())),
        ChangeType::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", current())),
            (false, true) => Some(("ADDED", current())),
            (true, false) => {
                let mut last = change.previous.clone()?;
                last["metadata"]["resourceVersion"] = change.rv.to_string().into();
                Some(("DELETED", Cow::Owned(last)))
            }
            (false, false) => None,
        },
    }
}
