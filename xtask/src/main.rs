//! `cargo xtask …`: everything beyond a plain `cargo build` of the host crates.
//!
//! # Layout
//! * `setup.rs` — install and check the toolchain and system pieces (idempotent);
//! * `ebpf.rs`  — pick the eBPF build route and build the object;
//! * `tasks.rs` — build, test (the CI command), demo, load;
//! * `lab.rs`   — the Vagrant k3s lab (`lab up|test|down|ssh`);
//! * `interop.rs` — build Istio's ztunnel from a checkout and run `selvedge-interop` against it;
//! * `cmd.rs`   — running commands with clear failures.

mod cmd;
mod ebpf;
mod interop;
mod lab;
mod setup;
mod tasks;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Selvedge's build, test and lab tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install and check everything the build and tests need (apt packages, bpf-linker,
    /// bpffs, cgroup v2). Idempotent; fast when all is in place.
    Setup,
    /// Build the eBPF object (target/ebpf/selvedge.bpf.o).
    BuildEbpf,
    /// Build the eBPF object, then the agent (with the object embedded) and lab binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The whole suite, as CI runs it: setup, fmt, clippy -D warnings, unit tests and the
    /// privileged lab tests (root required; fails, never skips, when they cannot run).
    Test {
        /// Skip `setup` (when you know it has run).
        #[arg(long)]
        no_setup: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, build, bring up a two-node, three-pod lab with agents, send traffic and
    /// print a report of every connection; then tear it all down.
    Demo {
        /// Keep the lab up after the report (until Ctrl-C) and print how to look around.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks on the netns lab (release build): the same pods unmeshed (baseline),
    /// meshed, and meshed with the fast path; prints a table, writes target/bench/<time>.json.
    Bench {
        /// A smoke run that finishes in under a minute (one second per tool; its memory rows
        /// come from 1,000 connections).
        #[arg(long)]
        quick: bool,
        /// Only the idle-connection memory rows (10,000 connections), for iterating on memory.
        #[arg(long, conflicts_with = "quick")]
        idle_only: bool,
        /// Worker threads per agent (`--worker-threads`). Default: the agent's own (half
        /// the cores, at least one).
        #[arg(long)]
        agent_threads: Option<u16>,
        /// Measure every mode this many times, in mirrored order (baseline, Selvedge, fast
        /// path, then the reverse), and report each row's median. Default: 2 (1 with
        /// --quick or --idle-only).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        rounds: Option<u16>,
    },
    /// Build and run the agent on this machine in the foreground (Ctrl-C stops it; pins
    /// stay, so enrolled pods stay fail-closed, unless --uninstall).
    Load {
        #[arg(long)]
        config: PathBuf,
        /// Node name (default: this host's name).
        #[arg(long)]
        node: Option<String>,
        /// Remove every pin when the agent exits.
        #[arg(long)]
        uninstall: bool,
        /// Extra arguments for `selvedge run` (after `--`).
        #[arg(last = true)]
        run_args: Vec<String>,
    },
    /// Selvedge against Istio's ztunnel built from a source checkout (both directions,
    /// policy both ways, metrics, the client's address): PASS/FAIL per check. Not part of
    /// `test` (it needs the ztunnel source). Root.
    Interop {
        /// A ztunnel source checkout (github.com/istio/ztunnel); built here if needed.
        #[arg(long)]
        ztunnel: PathBuf,
    },
    /// The Vagrant lab: a k3s cluster running the DaemonSet (vagrant/README.md).
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
}

fn main() {
    // The error chain is the message; a backtrace of xtask itself would only bury it.
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => ebpf::build(&root).map(|_| ()),
        Task::Build { release } => tasks::build(&root, release).map(|_| ()),
        Task::Test { no_setup, cargo_test_args } => tasks::test(&root, !no_setup, &cargo_test_args),
        Task::Demo { keep } => tasks::demo(&root, keep),
        Task::Bench { quick, idle_only, agent_threads, rounds } => {
            tasks::bench(&root, quick, idle_only, agent_threads, rounds)
        }
        Task::Load { config, node, uninstall, run_args } => tasks::load(&root, &config, node, uninstall, &run_args),
        Task::Interop { ztunnel } => interop::run(&root, &ztunnel),
        Task::Lab { cmd } => lab::run(&root, cmd),
    }
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
