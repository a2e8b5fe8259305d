//! `selvedge`: the node agent and its command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use selvedge::{
    app::Agent,
    config::{self, Settings},
    datapath,
};

/// Selvedge: a node-level service-mesh data plane. eBPF captures every enrolled pod's TCP
/// in the kernel and hands it to this agent, which proxies it from sockets it owns inside
/// each pod's network namespace.
#[derive(Debug, Parser)]
#[command(name = "selvedge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the eBPF programs, enroll this node's workloads from the config
    /// file and proxy their traffic. Config changes apply live. On SIGTERM the agent
    /// drains and exits; pins stay, so enrolled pods stay fail-closed (their connects are
    /// refused) until an agent runs again or `selvedge uninstall` removes everything.
    Run(RunArgs),
    /// Detach every program and remove every pin under the pin directory. Enrolled pods
    /// go back to unmeshed networking. Stop the agent first.
    Uninstall {
        #[arg(long, env = config::ENV_PIN_DIR, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// YAML file with the workloads (see README "Local config"); re-read on change.
    #[arg(long, env = config::ENV_CONFIG)]
    config: PathBuf,
    /// This node's name: workloads with `node: <NAME>` are enrolled here.
    #[arg(long, env = config::ENV_NODE)]
    node: String,
    /// bpffs directory for Selvedge's pinned maps and links.
    #[arg(long, env = config::ENV_PIN_DIR, default_value = config::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup v2 directory holding the pods; capture programs attach here. Default: the
    /// cgroup2 mount point (every process on the host).
    #[arg(long, env = config::ENV_CGROUP)]
    cgroup: Option<PathBuf>,
    /// Loopback fast path (sockmap + sk_msg) between apps and the agent. Off by default:
    /// with a socket in a sockmap, the kernel can return EAGAIN to a *blocking* read after a
    /// spurious wakeup, which breaks blocking apps; event-loop apps are unaffected.
    #[arg(long, env = config::ENV_FAST_PATH, default_value_t = false, action = clap::ArgAction::Set)]
    fast_path: bool,
    /// How many pods the per-pod eBPF maps hold, set when the maps are first created
    /// (pinned maps keep their size across restarts). A pod beyond it is reported as
    /// failed and kept closed (inbound dropped) until a slot frees up.
    #[arg(long, env = config::ENV_MAX_PODS, default_value_t = selvedge_common::capacity::INBOUND_LISTENERS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(selvedge_common::capacity::INBOUND_LISTENERS)))]
    max_pods: u32,
    /// eBPF object to load instead of the one embedded in this binary.
    #[arg(long)]
    bpf_object: Option<PathBuf>,
    /// Keep a JSON status (ready, config generation, enrolled and failed pods with the
    /// reason, kernel counters) in this file, rewritten atomically every half second.
    #[arg(long, env = config::ENV_STATUS_FILE)]
    status_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = config::ENV_LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SELVEDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Uninstall { pin_dir } => {
            let n = datapath::uninstall(&pin_dir).with_context(|| format!("uninstall {}", pin_dir.display()))?;
            println!("removed {n} pins under {}", pin_dir.display());
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => selvedge::sys::cgroup2_mount().context("find the cgroup v2 mount")?,
    };
    let settings = Settings {
        config: args.config,
        node: args.node,
        pin_dir: args.pin_dir,
        cgroup,
        fast_path: args.fast_path,
        bpf_object: args.bpf_object,
        max_pods: args.max_pods,
    };
    tracing::info!(?settings, "starting");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the async runtime")?;
    rt.block_on(async move {
        let agent = Agent::start(settings)?;
        agent.run(args.status_file).await
    })?;
    Ok(())
}
