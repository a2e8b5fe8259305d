//! Spawning processes inside a network namespace and a cgroup — what a container runtime
//! does for a pod's processes — without `ip netns exec` (it remounts /sys, which would hide
//! bpffs and the cgroup tree from the agent).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
};

/// Where a process should run.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// `/run/netns/NAME`, or `None` to stay in the caller's netns.
    pub netns: Option<&'a Path>,
    /// cgroup v2 directory to join, or `None` to stay in the caller's cgroup.
    pub cgroup: Option<&'a Path>,
}

/// Prepare `cmd` to start in `place`. The files are opened here, before fork, so the
/// child only makes two syscalls between fork and exec.
pub fn command_in(mut cmd: Command, place: Place<'_>) -> Command {
    let netns = place.netns.map(|p| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display())));
    let procs = place.cgroup.map(|c| {
        let p = c.join("cgroup.procs");
        std::fs::OpenOptions::new().write(true).open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    });
    // SAFETY: the closure only calls async-signal-safe syscalls (setns, write) on fds opened
    // before fork, and owns those files so they stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                // Writing "0" moves the writing process itself.
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(ns) = &netns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Spawn with stdout piped (reports) and stderr to `stderr_to` (or inherited).
pub fn spawn(cmd: Command, place: Place<'_>, stderr_to: Option<&Path>) -> Child {
    let mut cmd = command_in(cmd, place);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    if let Some(p) = stderr_to {
        let f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        cmd.stderr(f);
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()))
}

/// Send `sig` to `child` if it is still running.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}
