//! `cargo xtask interop --ztunnel DIR`: Selvedge against Istio's ztunnel, built from a
//! source checkout. Not part of `cargo xtask test`: CI has no ztunnel source (and no
//! network to fetch it).
//!
//! The build follows what ztunnel needs on a machine without network access to git
//! dependencies: the optional FIPS provider's git dependency is left out of the checkout's
//! `Cargo.toml` (said, and done only when it is there), and ztunnel is built with its
//! `testing` feature (its fake CA) together with the `inpodserver` example (what hands it a
//! pod, as istio-cni does). Then `selvedge-interop` runs the checks in the netns lab.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{cmd, setup, tasks};

const PROFILE: &str = "quick-release";
/// The git dependency the build cannot fetch here, and the feature line that needs it.
const GIT_DEP: &str = "boring-rustls-provider";

pub fn run(root: &Path, ztunnel: &Path) -> anyhow::Result<()> {
    setup::run()?;
    if !cmd::is_root() {
        bail!(
            "the interop run builds network namespaces, iptables rules in ztunnel's pod and loads eBPF: run it as root"
        );
    }
    let ztunnel = ztunnel.canonicalize().with_context(|| format!("ztunnel checkout {}", ztunnel.display()))?;
    let (bin, inpodserver) = build_ztunnel(&ztunnel)?;
    let selvedge = tasks::build(root, false)?;
    cmd::run(
        Command::new(selvedge.join("selvedge-interop"))
            .env("SELVEDGE_BIN", selvedge.join("selvedge"))
            .env("SELVEDGE_LAB_APP", selvedge.join("selvedge-lab-app"))
            .env("ZTUNNEL_BIN", bin)
            .env("ZTUNNEL_INPODSERVER", inpodserver)
            .env("ZTUNNEL_SRC", &ztunnel),
    )
}

/// Build ztunnel and its `inpodserver` example; returns their paths.
fn build_ztunnel(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !dir.join("Cargo.toml").exists() || !dir.join("src/tls/root-cert.pem").exists() {
        bail!("{} is not a ztunnel checkout (no Cargo.toml or src/tls/root-cert.pem)", dir.display());
    }
    if Command::new("protoc").arg("--version").output().is_err() {
        eprintln!("interop: installing protobuf-compiler (ztunnel's build needs protoc)");
        cmd::run(Command::new("apt-get").args(["install", "-y", "-q", "protobuf-compiler"]))?;
    }
    drop_git_dependency(&dir.join("Cargo.toml"))?;
    let mut c = Command::new("cargo");
    c.current_dir(dir).args(["build", "--profile", PROFILE, "--features", "testing"]);
    c.args(["--bin", "ztunnel", "--example", "inpodserver"]);
    cmd::run(&mut c)?;
    // ztunnel's .cargo/config.toml puts its target directory under out/rust.
    let target = ["out/rust", "target"].iter().map(|t| dir.join(t).join(PROFILE)).find(|t| t.join("ztunnel").exists());
    let Some(target) = target else { bail!("built, but no ztunnel binary under out/rust or target") };
    Ok((target.join("ztunnel"), target.join("examples").join("inpodserver")))
}

/// Leave the FIPS provider's git dependency out (the `tls-boring` feature keeps `boring`).
fn drop_git_dependency(manifest: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest).with_context(|| format!("read {}", manifest.display()))?;
    if !text.lines().any(|l| l.trim_start().starts_with(GIT_DEP)) {
        return Ok(());
    }
    let edited: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with(GIT_DEP))
        .map(|l| l.replace(&format!(", \"{GIT_DEP}/fips-only\""), ""))
        .map(|l| l + "\n")
        .collect();
    std::fs::write(manifest, edited).with_context(|| format!("write {}", manifest.display()))?;
    eprintln!("interop: left {GIT_DEP} (a git dependency, unreachable here) out of {}", manifest.display());
    Ok(())
}
