//! build, test, demo, load.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{cmd, ebpf, setup};

/// The env var the agent's build script reads to embed the eBPF object.
const OBJECT_ENV: &str = "SELVEDGE_BPF_OBJECT";

fn cargo(root: &Path, object: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root).env(OBJECT_ENV, object);
    c
}

/// Build the eBPF object, then the agent and the lab binaries; returns the bin directory.
pub fn build(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let object = ebpf::build(root)?;
    let mut c = cargo(root, &object);
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    cmd::run(&mut c)?;
    Ok(ebpf::target_dir(root).join(if release { "release" } else { "debug" }))
}

pub fn test(root: &Path, with_setup: bool, extra: &[String]) -> anyhow::Result<()> {
    if with_setup {
        setup::run()?;
    }
    if !cmd::is_root() {
        bail!("the lab tests need root (network namespaces, cgroups, eBPF); run `sudo cargo xtask test` — they are never skipped");
    }
    cmd::run(Command::new("cargo").current_dir(root).args(["fmt", "--all", "--check"]))?;
    cmd::run(Command::new("cargo").current_dir(root.join("ebpf")).args(["fmt", "--check"]))?;
    let object = ebpf::build(root)?;
    cmd::run(cargo(root, &object).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    let bin = build(root, false)?;
    cmd::run(
        cargo(root, &object)
            .env("SELVEDGE_BIN", bin.join("selvedge"))
            .env("SELVEDGE_LAB_APP", bin.join("selvedge-lab-app"))
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(extra),
    )
}

pub fn demo(root: &Path, keep: bool) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    let bin = build(root, false)?;
    let mut c = Command::new(bin.join("selvedge-lab"));
    c.arg("demo").env("SELVEDGE_BIN", bin.join("selvedge")).env("SELVEDGE_LAB_APP", bin.join("selvedge-lab-app"));
    if keep {
        c.arg("--keep");
    }
    cmd::run(&mut c)
}

pub fn bench(
    root: &Path,
    quick: bool,
    idle_only: bool,
    agent_threads: Option<u16>,
    rounds: Option<u16>,
) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!("the benchmarks build network namespaces and load eBPF: run them as root");
    }
    let bin = build(root, true)?;
    let stamp = cmd::output(Command::new("date").arg("-u").arg("+%Y%m%dT%H%M%SZ")).unwrap_or_default();
    let out = ebpf::target_dir(root).join("bench").join(format!("{}.json", stamp.trim()));
    let mut c = Command::new(bin.join("selvedge-bench"));
    c.env("SELVEDGE_BIN", bin.join("selvedge"))
        .env("SELVEDGE_LAB_APP", bin.join("selvedge-lab-app"))
        .arg("--out")
        .arg(&out);
    if quick {
        c.arg("--quick");
    }
    if idle_only {
        c.arg("--idle-only");
    }
    if let Some(n) = agent_threads {
        c.arg("--agent-threads").arg(n.to_string());
    }
    if let Some(n) = rounds {
        c.arg("--rounds").arg(n.to_string());
    }
    cmd::run(&mut c)
}

pub fn load(root: &Path, config: &Path, node: Option<String>, uninstall: bool, extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let bin = build(root, false)?;
    let selvedge = bin.join("selvedge");
    let node = match node {
        Some(n) => n,
        None => cmd::output(&mut Command::new("hostname")).map(|s| s.trim().to_string()).context("hostname")?,
    };
    // Ctrl-C reaches the agent too (same process group): it drains and exits.
    let status = Command::new(&selvedge)
        .arg("run")
        .arg("--config")
        .arg(config)
        .args(["--node", &node])
        .args(extra)
        .status()
        .context("start selvedge")?;
    eprintln!("agent exited: {status}");
    if uninstall {
        cmd::run(Command::new(&selvedge).arg("uninstall"))?;
    } else {
        eprintln!(
            "pins left in place (enrolled pods stay fail-closed); `{} uninstall` removes them",
            selvedge.display()
        );
    }
    Ok(())
}
