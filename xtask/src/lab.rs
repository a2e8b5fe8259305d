//! `cargo xtask lab up|test|down|ssh NODE`: the Vagrant k3s cluster in `vagrant/`.
//!
//! Each task is a list of [`Step`]s. `--dry-run` prints them, every command in full, and
//! runs none of them: CI checks the plan on machines that cannot boot VMs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::Subcommand;

use crate::{cmd, ebpf, setup, tasks};

/// The Vagrantfile's directory.
const LAB_DIR: &str = "vagrant";
/// Inside it, what the host stages for the VMs (gitignored, synced to every node).
const STAGE_DIR: &str = ".lab";
/// Where the VMs see `vagrant/` (the Vagrantfile's rsync folder).
const GUEST_LAB_DIR: &str = "/selvedge/vagrant";
/// The machine the scenario and the deployment run on.
const SERVER: &str = "server";
/// What goes into the image (deploy/Containerfile).
const BINARIES: [&str; 2] = ["selvedge", "selvedge-cni"];
const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Build the release binaries, boot the VMs (k3s server + agents), build the image on
    /// every node and deploy the DaemonSet; waits until an agent is ready on every node.
    Up {
        /// Print every step and run none.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the end-to-end scenario on the running lab: PASS/FAIL per step.
    Test {
        #[arg(long)]
        dry_run: bool,
    },
    /// Destroy the VMs and what `up` staged.
    Down {
        #[arg(long)]
        dry_run: bool,
    },
    /// A shell on a node (server, agent-1, agent-2, …).
    Ssh { node: String },
}

#[derive(Debug)]
enum Action {
    /// `cargo xtask setup`.
    Setup,
    /// `cargo xtask build --release`.
    Build,
    /// The host tools the lab drives.
    Require(&'static [&'static str]),
    /// Copy the release binaries into the stage directory.
    Stage,
    /// Create the lab mesh's CA unless the stage directory has one.
    CaInit,
    Run(Command),
    RemoveStage,
}

#[derive(Debug)]
struct Step {
    what: &'static str,
    action: Action,
    /// What runs inside the VMs (repository paths), for the dry run.
    inside: &'static [&'static str],
}

pub fn run(root: &Path, lab: LabCmd) -> anyhow::Result<()> {
    let is_up = matches!(lab, LabCmd::Up { .. });
    let (steps, dry_run) = match lab {
        LabCmd::Up { dry_run } => (up(root), dry_run),
        LabCmd::Test { dry_run } => (test(root), dry_run),
        LabCmd::Down { dry_run } => (down(root), dry_run),
        LabCmd::Ssh { node } => (vec![step("open a shell on the node", vagrant(root, &["ssh", &node]), &[])], false),
    };
    let total = steps.len();
    for (i, s) in steps.into_iter().enumerate() {
        if dry_run {
            println!("step {}/{total}: {}\n    {}", i + 1, s.what, describe(root, &s.action));
            if !s.inside.is_empty() {
                println!("    in the VMs: {}", s.inside.join(", "));
            }
        } else {
            eprintln!("lab: step {}/{total}: {}", i + 1, s.what);
            execute(root, s.action)?;
        }
    }
    if dry_run {
        println!("dry run: nothing was run");
    } else if is_up {
        eprintln!("lab: up. Next: `cargo xtask lab test`, or `cargo xtask lab ssh server` and `sudo selvedge status`");
    }
    Ok(())
}

fn up(root: &Path) -> Vec<Step> {
    vec![
        host("install and check the build toolchain", Action::Setup),
        host("check the host tools the lab drives", Action::Require(&["vagrant", "rsync"])),
        host("build the release binaries (eBPF object embedded)", Action::Build),
        host("stage the binaries for the VMs", Action::Stage),
        host("create the lab mesh's CA (kept until `lab down`)", Action::CaInit),
        step(
            "boot the VMs and install k3s (first time: downloads the box and k3s)",
            vagrant(root, &["up"]),
            &["vagrant/scripts/base.sh", "vagrant/scripts/k3s.sh"],
        ),
        step("copy vagrant/ and deploy/ to every VM", vagrant(root, &["rsync"]), &[]),
        step(
            "build selvedge:dev on every node and import it",
            vagrant(root, &["provision", "--provision-with", "image"]),
            &["vagrant/scripts/image.sh", "deploy/Containerfile"],
        ),
        step(
            "deploy the DaemonSet and wait for it on every node",
            vagrant(root, &["provision", SERVER, "--provision-with", "deploy"]),
            &["vagrant/scripts/deploy.sh", "vagrant/manifests/istio-security-crds.yaml", "vagrant/overlay"],
        ),
    ]
}

fn test(root: &Path) -> Vec<Step> {
    let script = format!("sudo bash {GUEST_LAB_DIR}/e2e/run.sh");
    vec![
        host("check the host tools the lab drives", Action::Require(&["vagrant", "rsync"])),
        step("copy the scenario to the server", vagrant(root, &["rsync", SERVER]), &[]),
        step("run the end-to-end scenario", vagrant(root, &["ssh", SERVER, "-c", &script]), &["vagrant/e2e/run.sh"]),
    ]
}

fn down(root: &Path) -> Vec<Step> {
    vec![
        host("check the host tools the lab drives", Action::Require(&["vagrant"])),
        step("destroy every VM", vagrant(root, &["destroy", "-f"]), &[]),
        host("remove the staged binaries and the lab CA", Action::RemoveStage),
    ]
}

fn step(what: &'static str, c: Command, inside: &'static [&'static str]) -> Step {
    Step { what, action: Action::Run(c), inside }
}

fn host(what: &'static str, action: Action) -> Step {
    Step { what, action, inside: &[] }
}

/// `vagrant ARGS` in `vagrant/`. No update check: it phones home on every command.
fn vagrant(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("vagrant");
    c.current_dir(root.join(LAB_DIR)).env("VAGRANT_CHECKPOINT_DISABLE", "1").args(args);
    c
}

fn release_dir(root: &Path) -> PathBuf {
    ebpf::target_dir(root).join("release")
}

fn stage_dir(root: &Path) -> PathBuf {
    root.join(LAB_DIR).join(STAGE_DIR)
}

/// What a step would do, as a shell line.
fn describe(root: &Path, action: &Action) -> String {
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    let stage = rel(&stage_dir(root));
    match action {
        Action::Setup => "cargo xtask setup".into(),
        Action::Build => "cargo xtask build --release".into(),
        Action::Require(tools) => tools.iter().map(|t| format!("command -v {t}")).collect::<Vec<_>>().join(" && "),
        Action::Stage => {
            let from: Vec<String> = BINARIES.iter().map(|b| rel(&release_dir(root).join(b))).collect();
            format!("mkdir -p {stage}/bin && cp {} {stage}/bin/", from.join(" "))
        }
        Action::CaInit => format!(
            "test -f {stage}/ca/root-cert.pem || {} ca init --dir {stage}/ca --trust-domain {TRUST_DOMAIN}",
            rel(&release_dir(root).join("selvedge"))
        ),
        Action::Run(c) => {
            let args: Vec<String> = c.get_args().map(|a| quote(&a.to_string_lossy())).collect();
            format!(
                "(cd {LAB_DIR} && VAGRANT_CHECKPOINT_DISABLE=1 {} {})",
                c.get_program().to_string_lossy(),
                args.join(" ")
            )
        }
        Action::RemoveStage => format!("rm -rf {stage}"),
    }
}

/// `arg` as one shell word.
fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+@,".contains(c)) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn execute(root: &Path, action: Action) -> anyhow::Result<()> {
    match action {
        Action::Setup => setup::run(),
        Action::Build => tasks::build(root, true).map(|_| ()),
        Action::Require(tools) => require(tools),
        Action::Stage => {
            let bin = stage_dir(root).join("bin");
            std::fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
            for b in BINARIES {
                let from = release_dir(root).join(b);
                std::fs::copy(&from, bin.join(b)).with_context(|| format!("copy {}", from.display()))?;
            }
            Ok(())
        }
        Action::CaInit => {
            let ca = stage_dir(root).join("ca");
            if ca.join("root-cert.pem").exists() {
                return Ok(());
            }
            cmd::run(
                Command::new(release_dir(root).join("selvedge"))
                    .args(["ca", "init", "--dir"])
                    .arg(&ca)
                    .args(["--trust-domain", TRUST_DOMAIN]),
            )
        }
        Action::Run(mut c) => cmd::run(&mut c),
        Action::RemoveStage => match std::fs::remove_dir_all(stage_dir(root)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("remove vagrant/.lab"),
            _ => Ok(()),
        },
    }
}

fn require(tools: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> =
        tools.iter().copied().filter(|t| Command::new(t).arg("--version").output().is_err()).collect();
    if !missing.is_empty() {
        bail!(
            "the lab needs {} on this host (Vagrant 2.2.19+ with VirtualBox or vagrant-libvirt, and rsync); \
             see vagrant/README.md",
            missing.join(" and ")
        );
    }
    Ok(())
}
