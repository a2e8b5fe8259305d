//! Building the eBPF object. Two routes (ARCHITECTURE.md, "The kernel side"):
//!
//! * **nightly**: a rustup nightly with `rust-src` → `cargo +nightly build -Z build-std=core`;
//! * **debian**: Debian's `rustc-web` with a prebuilt `core` for `bpfel-unknown-none`
//!   (`/usr/bin/rustc`, `RUSTC_BOOTSTRAP=1` for aya-ebpf's `#![feature]`s).
//!
//! Either way `bpf-linker` links it. The object lands in `target/ebpf/selvedge.bpf.o`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::cmd;

pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Nightly,
    Debian,
}

/// The route available here, preferring a nightly with rust-src.
pub fn route() -> Option<Route> {
    if nightly_has_rust_src() {
        Some(Route::Nightly)
    } else if Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_BPF_CORE).exists() {
        Some(Route::Debian)
    } else {
        None
    }
}

fn nightly_has_rust_src() -> bool {
    let Some(sysroot) = cmd::output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
    else {
        return false;
    };
    Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core").exists()
}

/// `bpf-linker` on PATH or in cargo's bin directory.
pub fn bpf_linker() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("bpf-linker")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    from_path.into_iter().chain(cargo_home.map(|c| c.join("bin/bpf-linker"))).find(|p| p.exists())
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Build the object; returns its path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let Some(route) = route() else {
        bail!("no eBPF toolchain: run `cargo xtask setup` (installs Debian's rustc-web route)");
    };
    let Some(linker) = bpf_linker() else {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    };
    let target = target_dir(root).join("ebpf");
    let mut c = Command::new("cargo");
    c.current_dir(root.join("ebpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER");
    match route {
        Route::Nightly => {
            c.env_remove("RUSTC").args(["+nightly", "build", "-Z", "build-std=core"]);
        }
        Route::Debian => {
            c.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1").arg("build");
        }
    }
    c.args(["--release", "--target", "bpfel-unknown-none", "--target-dir"]).arg(&target);
    cmd::run(&mut c).context("building the eBPF programs")?;
    let built = target.join("bpfel-unknown-none/release/selvedge-ebpf");
    let object = target.join("selvedge.bpf.o");
    // Copy only when it changed, so the agent's build script does not rerun for nothing.
    let new = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
    if std::fs::read(&object).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(&object, &new).with_context(|| format!("write {}", object.display()))?;
    }
    eprintln!("eBPF object: {} ({route:?} route)", object.display());
    Ok(object)
}
