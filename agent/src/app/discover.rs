//! Finding the network namespace of a pod that started before the agent (or whose CNI ADD
//! the agent never saw): a process of the pod runs in a cgroup whose path carries the pod's
//! uid (`pod<uid>` with the cgroupfs driver, `pod<uid_with_underscores>` with systemd's),
//! and its `/proc/<pid>/ns/net` is the pod's netns.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The cgroup path fragments that identify pod `uid`.
fn markers(uid: &str) -> [String; 2] {
    [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
}

/// uid → `/proc/<pid>/ns/net` for each uid in `uids` with a live process not in the host's
/// network namespace (that of `proc_dir/1`, the host's init under hostPID).
pub fn find_netns(proc_dir: &Path, uids: &BTreeSet<String>) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    if uids.is_empty() {
        return found;
    }
    let ns_id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let host = ns_id(&proc_dir.join("1/ns/net"));
    let Ok(entries) = std::fs::read_dir(proc_dir) else { return found };
    let wanted: Vec<(&String, [String; 2])> = uids.iter().map(|u| (u, markers(u))).collect();
    for e in entries.flatten() {
        let pid_dir = e.path();
        if !e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(cgroup) = std::fs::read_to_string(pid_dir.join("cgroup")) else { continue };
        let Some((uid, _)) =
            wanted.iter().find(|(u, m)| !found.contains_key(*u) && m.iter().any(|m| cgroup_has(&cgroup, m)))
        else {
            continue;
        };
        let netns = pid_dir.join("ns/net");
        let id = ns_id(&netns);
        if id.is_none() || id == host {
            continue; // gone, or a hostNetwork process
        }
        found.insert((*uid).clone(), netns);
        if found.len() == uids.len() {
            break;
        }
    }
    found
}

/// Does a `/proc/<pid>/cgroup` text name a cgroup with this path component (whole
/// component, or a systemd slice/scope name containing it)?
fn cgroup_has(text: &str, marker: &str) -> bool {
    text.lines().filter_map(|l| l.splitn(3, ':').nth(2)).any(|path| {
        path.split('/').any(|c| c == marker || c.contains(&format!("-{marker}.")) || c.ends_with(&format!("-{marker}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_cgroup_drivers_and_nothing_else() {
        let uid = "6c1f0a2e-1111-2222-3333-444455556666";
        let [plain, underscored] = markers(uid);
        assert!(cgroup_has(&format!("0::/kubepods/besteffort/{plain}/abc\n"), &plain));
        assert!(cgroup_has(
            &format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{underscored}.slice/cri-containerd-x.scope\n"),
            &underscored
        ));
        assert!(!cgroup_has(&format!("0::/kubepods/besteffort/{plain}0/abc\n"), &plain), "a longer uid is another pod");
        assert!(!cgroup_has("0::/system.slice/containerd.service\n", &plain));
    }

    #[test]
    fn finds_nothing_for_unknown_pods() {
        let uids = BTreeSet::from(["no-such-pod-uid".to_owned()]);
        assert!(find_netns(Path::new("/proc"), &uids).is_empty());
    }
}
