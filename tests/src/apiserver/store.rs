//! The object store: current objects, one global resource-version counter, and the history of
//! changes that watches replay from. Pure data, no I/O; the server wraps it in a mutex.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::BuildHasher;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Map, Value};

use super::resources::{by_kind, RESOURCES};

/// (resource index, namespace or `""`, name).
type Key = (usize, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as a watch replays it.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: usize,
    pub kind: ChangeType,
    /// The object after the change; for a deletion its last state stamped with the deletion's rv.
    pub object: Value,
    /// The object before the change, so a selecting watch can tell an object that left its
    /// selection (sent as DELETED) from one that entered it (sent as ADDED).
    pub previous: Option<Value>,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    /// The last resource version handed out; every write takes the next one.
    rv: u64,
    /// Watches from below this version get 410 Expired, as after an etcd compaction.
    floor: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change in rv order. Kept whole even across `compact` (which only moves `floor`),
    /// because watches opened before the compaction must still see every later event.
    history: Vec<Change>,
}

impl Store {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn compact(&mut self) {
        self.floor = self.rv;
    }

    /// Creates or replaces an object. Returns the stored object, or why it was refused.
    /// Replacing with identical content is a no-op (no new rv, no event), as on a real server.
    pub fn apply(&mut self, mut object: Value) -> Result<Value, String> {
        let api_version = object["apiVersion"].as_str().ok_or("the object has no apiVersion")?;
        let kind = object["kind"].as_str().ok_or("the object has no kind")?;
        let resource = by_kind(api_version, kind).ok_or_else(|| format!("unknown kind {api_version} {kind}"))?;
        let rt = &RESOURCES[resource];
        let kind = rt.kind;
        if let Some(check) = rt.check {
            check(&object).map_err(|e| format!("not a valid {kind}: {e}"))?;
        }
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = metadata(&mut object);
        let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or("").to_owned();
        if rt.namespaced == namespace.is_empty() {
            let why = if rt.namespaced { "needs" } else { "must not have" };
            return Err(format!("{kind} {why} metadata.namespace"));
        }
        if meta.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            let prefix = meta.get("generateName").and_then(Value::as_str).ok_or("the object has no name")?;
            let name = format!("{prefix}{:05x}", random() & 0xf_ffff);
            meta.insert("name".into(), name.into());
        }
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        meta.remove("resourceVersion");

        let key = (resource, namespace, name);
        let previous = self.objects.get(&key).cloned();
        if let Some(prev) = &previous {
            let prev_meta = prev["metadata"].as_object().cloned().unwrap_or_default();
            for carried in ["uid", "creationTimestamp"] {
                if let (None, Some(v)) = (meta.get(carried), prev_meta.get(carried)) {
                    meta.insert(carried.into(), v.clone());
                }
            }
            let mut unstamped = prev.clone();
            metadata(&mut unstamped).remove("resourceVersion");
            if unstamped == object {
                return Ok(prev.clone());
            }
        }
        let meta = metadata(&mut object);
        meta.entry("uid").or_insert_with(|| new_uid().into());
        meta.entry("creationTimestamp").or_insert_with(now);
        let kind = if previous.is_some() { ChangeType::Modified } else { ChangeType::Added };
        Ok(self.record(key, kind, object, previous))
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&mut self, resource: usize, namespace: &str, name: &str) -> bool {
        let key = (resource, namespace.to_owned(), name.to_owned());
        let Some(previous) = self.objects.remove(&key) else { return false };
        self.record(key, ChangeType::Deleted, previous.clone(), Some(previous));
        true
    }

    /// Stamps the next rv on `object`, stores it (or not, for a deletion) and logs the change.
    fn record(&mut self, key: Key, kind: ChangeType, mut object: Value, previous: Option<Value>) -> Value {
        self.rv += 1;
        metadata(&mut object).insert("resourceVersion".into(), self.rv.to_string().into());
        let resource = key.0;
        if kind != ChangeType::Deleted {
            self.objects.insert(key, object.clone());
        }
        self.history.push(Change { rv: self.rv, resource, kind, object: object.clone(), previous });
        object
    }

    pub fn get(&self, resource: usize, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(resource, namespace.to_owned(), name.to_owned()))
    }

    /// Every current object of one resource type, ordered by namespace then name.
    pub fn list(&self, resource: usize) -> impl Iterator<Item = &Value> {
        let range = (resource, String::new(), String::new())..(resource + 1, String::new(), String::new());
        self.objects.range(range).map(|(_, v)| v)
    }

    /// The objects of one type as they were at `rv` (a `resourceVersionMatch=Exact` list),
    /// rebuilt by undoing later changes; `None` if `rv` is compacted away or in the future.
    pub fn list_at(&self, resource: usize, rv: u64) -> Option<Vec<Value>> {
        if rv < self.floor || rv > self.rv {
            return None;
        }
        let mut objects: BTreeMap<(String, String), Value> =
            self.list(resource).map(|o| (name_of(o), o.clone())).collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv).filter(|c| c.resource == resource) {
            match &change.previous {
                Some(prev) => objects.insert(name_of(prev), prev.clone()),
                None => objects.remove(&name_of(&change.object)),
            };
        }
        Some(objects.into_values().collect())
    }

    /// The changes after `rv`, oldest first.
    pub fn changes_since(&self, rv: u64) -> &[Change] {
        let start = self.history.partition_point(|c| c.rv <= rv);
        &self.history[start..]
    }
}

fn metadata(object: &mut Value) -> &mut Map<String, Value> {
    object["metadata"].as_object_mut().expect("apply made metadata an object")
}

fn name_of(object: &Value) -> (String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (text(&object["metadata"]["namespace"]), text(&object["metadata"]["name"]))
}

/// 64 random bits from the standard library's per-process random hash keys.
fn random() -> u64 {
    RandomState::new().hash_one(0_u8)
}

/// A version-4-shaped UUID, unique enough for a test server.
fn new_uid() -> String {
    let (a, b) = (random(), random());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// Now, formatted exactly as the API server formats `metav1.Time` (RFC 3339, seconds, `Z`).
fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a metav1.Time serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
               "spec": {"nodeName": node, "containers": []}})
    }

    #[test]
    fn apply_stamps_and_dedups() {
        let mut store = Store::default();
        let a = store.apply(pod("a", "n1")).expect("valid pod");
        assert_eq!(a["metadata"]["resourceVersion"], "1");
        assert!(a["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
        assert!(a["metadata"]["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(store.apply(pod("a", "n1")).expect("valid pod"), a, "identical apply is a no-op");
        let a2 = store.apply(pod("a", "n2")).expect("valid pod");
        assert_eq!(a2["metadata"]["resourceVersion"], "2");
        assert_eq!(a2["metadata"]["uid"], a["metadata"]["uid"]);
        assert!(store.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})).is_err());
        assert!(store.apply(json!({"apiVersion": "v1", "kind": "Nope", "metadata": {"name": "x"}})).is_err());
        assert!(store
            .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "n"},
                                   "spec": {"containers": 5}}))
            .is_err());
    }

    #[test]
    fn history_and_exact_lists() {
        let mut store = Store::default();
        store.apply(pod("a", "n1")).expect("valid pod");
        store.apply(pod("b", "n1")).expect("valid pod");
        store.apply(pod("a", "n2")).expect("valid pod");
        assert!(store.delete(0, "ns", "b"));
        assert!(!store.delete(0, "ns", "b"));
        assert_eq!(store.rv(), 4);
        let kinds: Vec<_> = store.changes_since(1).iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChangeType::Added, ChangeType::Modified, ChangeType::Deleted]);
        let at2 = store.list_at(0, 2).expect("not compacted");
        assert_eq!(at2.len(), 2);
        assert_eq!(at2[0]["spec"]["nodeName"], "n1");
        assert_eq!(store.list_at(0, 4).expect("current").len(), 1);
        store.compact();
        assert!(store.list_at(0, 2).is_none());
        assert_eq!(store.floor(), 4);
    }
}
