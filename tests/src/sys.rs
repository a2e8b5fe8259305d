//! Preflight checks and small helpers. The lab needs root, cgroup v2, a bpffs and the
//! binaries built by `cargo xtask build`; when any is missing it panics with the reason —
//! a privileged test never passes by not running.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where the lab pins: each agent's pin directory sits directly on the bpffs, named with
/// its lab's prefix, so nothing shared between labs is left behind (and nothing lands in
/// the agent's default pin directory).
pub const PIN_ROOT: &str = "/sys/fs/bpf";

/// Everything the lab needs, checked once per lab.
#[derive(Debug, Clone)]
pub struct Env {
    pub selvedge: PathBuf,
    pub app: PathBuf,
    pub cgroup2: PathBuf,
}

/// Check the machine and find the binaries, or panic saying what is missing.
pub fn preflight() -> Env {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "lab tests need root (they create network namespaces, cgroups and load eBPF); run `sudo cargo xtask test`"
        );
    }
    let selvedge = binary("SELVEDGE_BIN", "selvedge");
    let app = binary("SELVEDGE_LAB_APP", "selvedge-lab-app");
    let cgroup2 =
        selvedge::sys::cgroup2_mount().unwrap_or_else(|e| panic!("{e}; the lab needs a cgroup v2 filesystem"));
    if !Path::new("/sys/fs/bpf").exists() || !selvedge::sys::is_bpffs(Path::new("/sys/fs/bpf")) {
        panic!("/sys/fs/bpf is not a bpf filesystem; run `cargo xtask setup` (it mounts one)");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        panic!("`ip` (iproute2) is not installed; run `cargo xtask setup`");
    }
    Env { selvedge, app, cgroup2 }
}

/// A binary built by `cargo xtask build`: from its env var, else beside the test binary.
fn binary(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(p.exists(), "{var}={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let candidates = exe.ancestors().skip(1).take(3).map(|d| d.join(name)).collect::<Vec<_>>();
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!("{name} not found (looked beside the test binary and in ${var}); run the lab through `cargo xtask test`")
    })
}

/// Run a command that must succeed (lab plumbing); panic with its stderr otherwise.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// Is process `pid` alive?
pub fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) still has /proc/PID; its state is 'Z'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Poll `f` until it returns `Some`, or panic after `secs` with `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
