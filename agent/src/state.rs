//! Desired enrollment state and the plan that moves the kernel towards it. Pure: the
//! caller (`app`) carries the plan out.

use std::{collections::BTreeMap, path::PathBuf};

use crate::config::{ConfigError, LocalConfig, MtlsMode};

/// What enrolling one local pod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    pub strict: bool,
}

/// The pods this node must enroll, by uid.
pub fn desired(cfg: &LocalConfig, node: &str) -> Result<BTreeMap<String, PodSpec>, ConfigError> {
    let mut out = BTreeMap::new();
    for (index, w) in cfg.workloads.iter().enumerate().filter(|(_, w)| w.node == node) {
        let netns = w.netns.clone().ok_or_else(|| ConfigError::Workload {
            index,
            uid: w.uid.clone(),
            problem: format!("runs on this node ({node}) but has no netns path"),
        })?;
        let spec = PodSpec {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            netns,
            strict: w.mtls_mode == MtlsMode::Strict,
        };
        out.insert(w.uid.clone(), spec);
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Unenroll(String),
    Enroll(PodSpec),
    /// Same pod, same netns: only its kernel flags change.
    SetStrict(String, bool),
}

/// Steps from `current` to `desired`: every unenroll before any enroll, so a pod that moved
/// to a new netns is released first.
pub fn plan(current: &BTreeMap<String, PodSpec>, desired: &BTreeMap<String, PodSpec>) -> Vec<Change> {
    let mut unenroll = Vec::new();
    let mut rest = Vec::new();
    for (uid, cur) in current {
        match desired.get(uid) {
            None => unenroll.push(Change::Unenroll(uid.clone())),
            Some(want) if want.netns != cur.netns => {
                unenroll.push(Change::Unenroll(uid.clone()));
                rest.push(Change::Enroll(want.clone()));
            }
            Some(want) if want.strict != cur.strict => rest.push(Change::SetStrict(uid.clone(), want.strict)),
            Some(_) => {}
        }
    }
    for (uid, want) in desired {
        if !current.contains_key(uid) {
            rest.push(Change::Enroll(want.clone()));
        }
    }
    unenroll.extend(rest);
    unenroll
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn pod(uid: &str, netns: &str, strict: bool) -> PodSpec {
        PodSpec { uid: uid.into(), name: uid.into(), namespace: "ns".into(), netns: netns.into(), strict }
    }

    fn map(pods: &[PodSpec]) -> BTreeMap<String, PodSpec> {
        pods.iter().map(|p| (p.uid.clone(), p.clone())).collect()
    }

    #[test]
    fn plans_enroll_unenroll_and_flag_changes() {
        let cur = map(&[pod("a", "/a", false), pod("b", "/b", false), pod("c", "/c", false)]);
        let want = map(&[pod("a", "/a", false), pod("b", "/b", true), pod("c", "/c2", false), pod("d", "/d", false)]);
        assert_eq!(
            plan(&cur, &want),
            vec![
                Change::Unenroll("c".into()),
                Change::SetStrict("b".into(), true),
                Change::Enroll(pod("c", "/c2", false)),
                Change::Enroll(pod("d", "/d", false)),
            ]
        );
        assert!(plan(&want, &want).is_empty());
        assert_eq!(plan(&cur, &BTreeMap::new()).len(), 3);
    }

    #[test]
    fn local_workload_without_netns_is_an_error() {
        let cfg = LocalConfig::parse(
            "workloads:\n- {uid: u, name: a, node: n1}\n- {uid: v, name: b, node: n2, netns: /v}\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(desired(&cfg, "n3").unwrap().is_empty(), "peers on other nodes need no netns");
        assert_eq!(desired(&cfg, "n2").unwrap().len(), 1);
        let e = desired(&cfg, "n1").unwrap_err();
        assert!(e.to_string().contains("no netns"), "{e}");
    }
}
