//! Embeds the eBPF object when `SELVEDGE_BPF_OBJECT` names one (set by `cargo xtask`), so
//! the `selvedge` binary is self-contained. A plain `cargo build` embeds nothing and the
//! agent then looks for `--bpf-object` or `selvedge.bpf.o` beside the binary.
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
}
