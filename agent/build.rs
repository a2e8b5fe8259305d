//! Embeds the eBPF object when `SELVEDGE_BPF_OBJECT` names one (set by `cargo xtask`), so
//! the `selvedge` binary is self-contained. A plain `cargo build` embeds nothing and the
//! agent then looks for `--bpf-object` or `selvedge.bpf.o` beside the binary.
//!
//! Also sets `SELVEDGE_GIT_COMMIT` (`selvedge version`, the admin API's `/version`): the
//! short commit of the checkout it is built from, or `unknown` outside git (a source
//! tarball, no `git` installed) — never a build failure.
fn main() {
    println!("cargo:rerun-if-env-changed=SELVEDGE_BPF_OBJECT");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("selvedge.bpf.o");
    match std::env::var_os("SELVEDGE_BPF_OBJECT") {
        Some(src) => {
            println!("cargo:rerun-if-changed={}", std::path::Path::new(&src).display());
            std::fs::copy(&src, &out).expect("SELVEDGE_BPF_OBJECT must name a readable file");
        }
        None => std::fs::write(&out, b"").expect("OUT_DIR is writable"),
    }
    println!("cargo:rustc-env=SELVEDGE_GIT_COMMIT={}", git_commit().unwrap_or_else(|| "unknown".into()));
}

/// `git rev-parse --short HEAD`, and the files whose change means a new commit (HEAD, and the
/// branch it points to) watched so that the next build embeds it.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    for file in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file]) {
            watch(&path);
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &branch]) {
            watch(&path);
        }
    }
    Some(commit)
}

/// Only files that exist: a missing one would make cargo run this script on every build.
fn watch(path: &str) {
    if std::path::Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}
