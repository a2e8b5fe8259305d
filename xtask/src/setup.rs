//! `cargo xtask setup`: make this machine able to build and test Selvedge. Every step
//! checks first and acts only when something is missing, so a second run takes a second.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::{
    cmd,
    ebpf::{self, Route},
};

/// Always needed: the lab (iproute2, util-linux), inspection (bpftool), packet captures,
/// the benchmark's tools (iperf3, sockperf, wrk against nginx),
/// the reference CNI plugins the cluster tests build pod networks with (bridge, host-local),
/// and what CI checks the Vagrant lab with (`vagrant validate`, shellcheck).
const BASE_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "procps",
    "bpftool",
    "tcpdump",
    "iperf3",
    "sockperf",
    "wrk",
    "nginx-light",
    "containernetworking-plugins",
    "vagrant",
    "shellcheck",
];
/// The Debian eBPF route: rustc-web with a prebuilt `core` for bpfel-unknown-none.
const DEBIAN_ROUTE_PACKAGES: &[&str] = &["rustc-web", "libstd-rust-web-dev-bpf"];
/// What `cargo install bpf-linker` links against (LLVM 22, as rustc-web 1.96 uses).
const LINKER_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Prometheus's `promtool`, which the dashboards test evaluates PromQL with. Only the one
/// binary is taken out of Debian's `prometheus` package: installing the package would start
/// a Prometheus server on the machine.
const PROMTOOL: &str = "/usr/local/lib/selvedge/promtool";

pub fn run() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("Selvedge needs Linux (eBPF, network namespaces, cgroup v2)");
    }
    check_kernel()?;
    let nightly = ebpf::route() == Some(Route::Nightly);
    let mut wanted: Vec<&str> = BASE_PACKAGES.to_vec();
    if !nightly {
        wanted.extend(DEBIAN_ROUTE_PACKAGES);
    }
    if ebpf::bpf_linker().is_none() {
        wanted.extend(LINKER_PACKAGES);
    }
    install_packages(&wanted)?;
    if ebpf::route().is_none() {
        bail!(
            "no eBPF build route: neither a rustup nightly with rust-src nor Debian's rustc-web + \
             libstd-rust-web-dev-bpf is available on this system"
        );
    }
    install_bpf_linker()?;
    install_promtool()?;
    mount_bpffs()?;
    check_cgroup2()?;
    eprintln!("setup: ok (eBPF route: {:?})", ebpf::route().unwrap_or(Route::Debian));
    Ok(())
}

/// The programs use helpers from kernel 5.15 (netns cookies in sockops/sk_msg).
fn check_kernel() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").context("read kernel version")?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 15) {
        bail!("kernel {} is too old: Selvedge needs 5.15 or newer", release.trim());
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn install_packages(wanted: &[&str]) -> anyhow::Result<()> {
    if Command::new("dpkg-query").arg("--version").output().is_err() {
        bail!("not a Debian/Ubuntu system (no dpkg); install by hand: {}", wanted.join(" "));
    }
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("missing packages: {}; run `sudo cargo xtask setup` or apt-get install them", missing.join(" "));
    }
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if ebpf::bpf_linker().is_some() {
        return Ok(());
    }
    // bpf-linker 0.13's build script finds LLVM through LLVM_PREFIX; llvm-sys through
    // LLVM_SYS_221_PREFIX. Both point at Debian's LLVM 22.
    cmd::run(Command::new("cargo").env("LLVM_PREFIX", LLVM_PREFIX).env("LLVM_SYS_221_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
    .context("installing bpf-linker")
}

/// `apt-get download prometheus` into a scratch directory, unpack it there (`dpkg-deb -x`,
/// nothing is installed) and keep only `usr/bin/promtool`, at [`PROMTOOL`].
fn install_promtool() -> anyhow::Result<()> {
    let target = Path::new(PROMTOOL);
    if cmd::output(Command::new(target).arg("--version")).is_some() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("{PROMTOOL} is missing; run `sudo cargo xtask setup`");
    }
    let scratch = std::env::temp_dir().join(format!("selvedge-promtool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let result = extract_promtool(&scratch, target);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn extract_promtool(scratch: &Path, target: &Path) -> anyhow::Result<()> {
    let download = |s: &Path| cmd::run(Command::new("apt-get").current_dir(s).args(["download", "-q", "prometheus"]));
    if download(scratch).is_err() {
        // The package lists may be older than the archive: refresh them once.
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        download(scratch).context("apt-get download prometheus")?;
    }
    let deb = std::fs::read_dir(scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    let unpacked = scratch.join("root");
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let dir = target.parent().context("promtool's directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Copied beside the target, then renamed: a run stopped halfway leaves no broken binary.
    let tmp = target.with_extension("tmp");
    std::fs::copy(unpacked.join("usr/bin/promtool"), &tmp).context("the package holds no usr/bin/promtool")?;
    std::fs::rename(&tmp, target).with_context(|| format!("install {}", target.display()))?;
    let version = cmd::output(Command::new(target).arg("--version")).context("the extracted promtool does not run")?;
    eprintln!("setup: {} ({})", target.display(), version.lines().next().unwrap_or_default());
    Ok(())
}

fn mount_bpffs() -> anyhow::Result<()> {
    let dir = Path::new("/sys/fs/bpf");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"));
    if mounted {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("/sys/fs/bpf is not a bpf filesystem; run `sudo mount -t bpf bpf /sys/fs/bpf`");
    }
    std::fs::create_dir_all(dir).ok();
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn check_cgroup2() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("cgroup2")) {
        return Ok(());
    }
    bail!("no cgroup v2 hierarchy is mounted; boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2")
}
