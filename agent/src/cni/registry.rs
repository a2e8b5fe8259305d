//! Pod uid → where its network is, as the CNI plugin reported it: kept in memory and in
//! `<state-dir>/pods/<uid>.json`, so a restarted agent finds the pods it enrolled (the
//! directory is on a tmpfs on real nodes: a reboot empties it, and new sandboxes mean new
//! CNI ADDs anyway).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::k8s::PodNetwork;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub network: PodNetwork,
}

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    entries: BTreeMap<String, Registered>,
}

impl Registry {
    /// Load what a previous agent recorded; entries whose netns file is gone are dropped.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("pods");
        std::fs::create_dir_all(&dir)?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            let Some(uid) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Registered>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if r.network.netns.exists() => {
                    entries.insert(uid, r);
                }
                Ok(_) => {
                    tracing::info!(uid, "forgetting a registered pod whose netns is gone");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => tracing::warn!(file = %path.display(), "ignoring an unreadable pod registration: {e}"),
            }
        }
        Ok(Registry { dir, entries })
    }

    pub fn get(&self, uid: &str) -> Option<&Registered> {
        self.entries.get(uid)
    }

    pub fn networks(&self) -> impl Iterator<Item = (&String, &PodNetwork)> {
        self.entries.iter().map(|(k, v)| (k, &v.network))
    }

    /// Record (or replace: a recreated sandbox) a pod's network.
    pub fn insert(&mut self, uid: &str, r: Registered) -> std::io::Result<()> {
        let path = self.dir.join(format!("{uid}.json"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&r).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)?;
        self.entries.insert(uid.to_owned(), r);
        Ok(())
    }

    /// Forget a pod's sandbox; a DEL for an older sandbox (another container id) leaves the
    /// newer one registered. Returns whether something was removed.
    pub fn remove(&mut self, uid: &str, container_id: &str) -> bool {
        match self.entries.get(uid) {
            Some(r) if container_id.is_empty() || r.container_id == container_id => {}
            _ => return false,
        }
        self.entries.remove(uid);
        let _ = std::fs::remove_file(self.dir.join(format!("{uid}.json")));
        true
    }

    /// The uid registered for `namespace/name`, for runtimes that do not pass the uid.
    pub fn uid_of(&self, namespace: &str, name: &str) -> Option<&str> {
        self.entries.iter().find(|(_, r)| r.namespace == namespace && r.name == name).map(|(k, _)| k.as_str())
    }

    /// Drop entries whose netns file no longer exists (sandbox gone without a DEL).
    pub fn prune(&mut self) -> usize {
        let gone: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(_, r)| !r.network.netns.exists())
            .map(|(k, r)| (k.clone(), r.container_id.clone()))
            .collect();
        for (uid, cid) in &gone {
            self.remove(uid, cid);
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_replaces_and_forgets() {
        let dir = std::env::temp_dir().join(format!("selvedge-registry-{}", std::process::id()));
        let netns = dir.join("ns-a");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&netns, "").unwrap();
        let reg = |cid: &str| Registered {
            namespace: "shop".into(),
            name: "a".into(),
            container_id: cid.into(),
            network: PodNetwork { netns: netns.clone(), ips: vec!["198.18.1.5".parse().unwrap()] },
        };
        let mut r = Registry::open(&dir).unwrap();
        r.insert("u1", reg("c1")).unwrap();
        r.insert("u1", reg("c2")).unwrap();
        assert!(!r.remove("u1", "c1"), "a DEL of the old sandbox keeps the new one");
        let again = Registry::open(&dir).unwrap();
        assert_eq!(again.get("u1"), Some(&reg("c2")), "survives a restart");
        assert_eq!(again.uid_of("shop", "a"), Some("u1"));
        std::fs::remove_file(&netns).unwrap();
        let mut pruned = Registry::open(&dir).unwrap();
        assert!(pruned.get("u1").is_none(), "a registration whose netns is gone is dropped at load");
        assert_eq!(pruned.prune(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
