//! Finding the network namespace of a pod that started before the agent (or whose CNI ADD
//! the agent never saw), two ways:
//! * by address: the runtime's netns files (`/var/run/netns/*`) are tried for the pod's IPs
//!   (from the API): the namespace where a socket can bind the pod's IP is the pod's. Needs
//!   no privilege beyond entering a namespace;
//! * by cgroup: a process of the pod runs in a cgroup whose path carries the pod's uid
//!   (`pod<uid>` with the cgroupfs driver, `pod<uid_with_underscores>` with systemd's), and
//!   its `/proc/<pid>/ns/net` is the pod's netns (reading that of a process owned by another
//!   user, like the pause container, needs CAP_SYS_PTRACE).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

/// uid → netns file under `dir` holding all of the pod's IPs, for each pod with IPs.
pub fn find_netns_by_ip(dir: &Path, pods: &BTreeMap<String, Vec<IpAddr>>) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let wanted: Vec<(&String, &Vec<IpAddr>)> = pods.iter().filter(|(_, ips)| !ips.is_empty()).collect();
    if wanted.is_empty() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let path = e.path();
        let all: Vec<IpAddr> = wanted.iter().flat_map(|(_, ips)| ips.iter().copied()).collect();
        let Ok(held) = ips_held_in(&path, &all) else { continue };
        for (uid, ips) in &wanted {
            if !found.contains_key(*uid) && ips.iter().all(|ip| held.contains(ip)) {
                found.insert((*uid).clone(), path.clone());
            }
        }
    }
    found
}

/// Which of `ips` the network namespace `netns` holds: tried by binding a UDP socket to
/// each, on a short-lived thread that joins the namespace.
fn ips_held_in(netns: &Path, ips: &[IpAddr]) -> std::io::Result<Vec<IpAddr>> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(netns)?;
    let ips = ips.to_vec();
    if crate::sys::ns_id(Path::new("/proc/thread-self/ns/net"))? == crate::sys::ns_id(netns)? {
        // Our own namespace: no need (nor privilege) to join it.
        return Ok(ips.into_iter().filter(|ip| std::net::UdpSocket::bind(SocketAddr::new(*ip, 0)).is_ok()).collect());
    }
    std::thread::spawn(move || -> std::io::Result<Vec<IpAddr>> {
        // SAFETY: setns on an fd we own; affects only this thread, which ends here.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ips.into_iter().filter(|ip| std::net::UdpSocket::bind(SocketAddr::new(*ip, 0)).is_ok()).collect())
    })
    .join()
    .map_err(|_| std::io::Error::other("netns probe thread panicked"))?
}

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
    let ns_id = |p: &Path| crate::sys::ns_id(p).ok();
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
    fn finds_a_namespace_by_the_addresses_it_holds() {
        // This process's own namespace holds loopback, not a test address.
        let dir = std::env::temp_dir().join(format!("selvedge-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", dir.join("self")).unwrap();
        let pods = BTreeMap::from([
            ("lo".to_owned(), vec!["127.0.0.1".parse().unwrap()]),
            ("away".to_owned(), vec!["198.18.250.250".parse().unwrap()]),
            ("no-ip".to_owned(), vec![]),
        ]);
        let found = find_netns_by_ip(&dir, &pods);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["lo"]);
    }

    #[test]
    fn finds_nothing_for_unknown_pods() {
        let uids = BTreeSet::from(["no-such-pod-uid".to_owned()]);
        assert!(find_netns(Path::new("/proc"), &uids).is_empty());
    }
}
