//! `selvedge`: the node agent and its command line.

use std::path::PathBuf;

/// The allocator: many small allocations live as long as their connections, and bursts of
/// short-lived ones (setup, handshakes) come and go. mimalloc keeps them in per-size pages
/// and gives freed pages back to the kernel a second or two later (with the housekeeping
/// thread below), where glibc's arenas kept a burst's high-water mark resident
/// (ARCHITECTURE "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Load and attach the eBPF programs, enroll this node's workloads — from the config
    /// file (`--config`) or the Kubernetes API (`--kube`) — and proxy their traffic.
    /// Changes apply live. On SIGTERM the agent
    /// drains and exits; pins stay, so enrolled pods stay fail-closed (their connects are
    /// refused) until an agent runs again or `selvedge uninstall` removes everything.
    /// On x86-64 glibc it first restarts itself once (same PID) with
    /// `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1073741824`, unless that tunable is
    /// already set: on AMD EPYC, glibc's `rep movsb` made the copy into each TLS record
    /// cost 3.5 times the encryption.
    Run(Box<RunArgs>),
    /// Detach every program and remove every pin Selvedge made under the pin directory.
    /// Enrolled pods go back to unmeshed networking. Stop the agent first. Refuses a
    /// directory that is not on a bpf filesystem, and leaves anything there that is not
    /// one of Selvedge's pins (each one is named).
    Uninstall {
        #[arg(long, env = config::ENV_PIN_DIR, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The built-in certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The agent at a glance: readiness, enrolled and failed workloads, kernel counters.
    Status(InspectArgs),
    /// Every workload the agent knows, on every node (its directory): namespace, name,
    /// owning workload, node, IPs, protocol, identity; HERE says which are this node's
    /// (enrolled, or why not). The protocol is HBONE for all: the directory holds meshed
    /// workloads only.
    Workloads(WorkloadsArgs),
    /// Services: VIPs and their endpoints.
    Services(InspectArgs),
    /// Policies and the workloads they select.
    Policies(InspectArgs),
    /// Workload certificates (identity, serial, validity in UTC, state: valid, expiring —
    /// in the last quarter of its life —, expired or missing; last renewal error) and the
    /// trust bundle's roots.
    Certs(InspectArgs),
    /// Open proxied connections: direction, pod, source, destination, security, identities,
    /// age. Sources as the apps see them: outbound, the pod's IP and the app's port;
    /// inbound over HBONE, the client app's address from its CONNECT (else the tunnel's).
    Connections(InspectArgs),
    /// eBPF state from the kernel: pinned links (each pod's named), maps with entry counts.
    Bpf(InspectArgs),
    /// Show the running agent's log filter, or set it (e.g. `debug`, `warn,selvedge=debug`).
    Log(LogArgs),
    /// This command's version and commit, and the running agent's (fails when no agent
    /// answers).
    Version(InspectArgs),
}

#[derive(Debug, clap::Args)]
struct WorkloadsArgs {
    /// Only the workloads on this node.
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    inspect: InspectArgs,
}

#[derive(Debug, clap::Args)]
struct LogArgs {
    /// The new filter: a level (off, error, warn, info, debug, trace) or comma-separated
    /// TARGET=LEVEL directives. Without it, the filter in force is shown.
    level: Option<String>,
    #[command(flatten)]
    inspect: InspectArgs,
}

/// The inspection commands read the running agent's admin API.
#[derive(Debug, clap::Args)]
struct InspectArgs {
    /// Admin API address (loopback, in the agent's network namespace).
    #[arg(long, env = "SELVEDGE_ADMIN", default_value = selvedge::publish::admin::DEFAULT_ADMIN)]
    admin: std::net::SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root (root-cert.pem, and root-key.pem readable by root only) in DIR. Every
    /// agent that should trust the others loads the same directory (`run --ca-dir`).
    /// Refuses to overwrite an existing root.
    Init {
        #[arg(long, env = config::ENV_CA_DIR, default_value = config::DEFAULT_CA_DIR)]
        dir: PathBuf,
        #[arg(long, env = config::ENV_TRUST_DOMAIN, default_value = config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Create an intermediate CA in DIR signed by the CA in --root-dir, in the layout of
    /// Istio's plug-in CA: ca-cert.pem, ca-key.pem (readable by root only), cert-chain.pem
    /// (intermediate up to root) and root-cert.pem. Give DIR to `ca serve --dir` (or
    /// `run --ca-dir`) and keep the root key offline; certificates it issues carry the
    /// intermediate, so peers still need only the root. It signs workload certificates
    /// only (path length 0). Refuses to overwrite.
    Intermediate {
        /// Where to write the intermediate.
        #[arg(long)]
        dir: PathBuf,
        /// The CA that signs it (a root from `ca init`, or another intermediate).
        #[arg(long)]
        root_dir: PathBuf,
        #[arg(long, env = config::ENV_TRUST_DOMAIN, default_value = config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long it is valid, in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Serve the cluster CA: the Istio CA API (`IstioCertificateService/CreateCertificate`,
    /// gRPC over TLS) that agents with `--cert-source istio` ask, so that no node holds the
    /// root key. Callers are authenticated with their ServiceAccount token (TokenReview,
    /// bound to `--audience`); a node agent (`--node-agent`) gets a certificate only for a
    /// service account with a pod (not finished) on its own node (the node its token is bound
    /// to), any other caller only its own identity. Every refusal is logged with the reason.
    Serve(Box<CaServeArgs>),
}

#[derive(Debug, clap::Args)]
struct CaServeArgs {
    /// The CA that signs: a root (from `selvedge ca init`; this is then the only place its
    /// key is needed) or an intermediate (from `selvedge ca intermediate`, or Istio's
    /// plug-in CA layout: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem), so that
    /// the root key stays offline.
    #[arg(long, env = config::ENV_CA_DIR, default_value = config::DEFAULT_CA_DIR)]
    dir: PathBuf,
    #[arg(long, env = config::ENV_TRUST_DOMAIN, default_value = config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Where to listen (Istio's CA port is 15012).
    #[arg(long, env = "SELVEDGE_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// Prometheus metrics (/metrics: certificates issued, refusals by gRPC status) and
    /// readiness (/healthz/ready). 15014 is istiod's monitoring port.
    #[arg(long, env = "SELVEDGE_CA_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    metrics_addr: std::net::SocketAddr,
    /// The name agents dial (their `--istio-ca-server-name`, or the host of
    /// `--istio-ca-addr`): the serving certificate is issued for it.
    #[arg(long, env = "SELVEDGE_CA_SERVER_NAME", default_value = "selvedge-ca.selvedge-system.svc")]
    server_name: String,
    /// Service accounts (`namespace/name`) of node agents, which may ask for the identities
    /// of their node's pods. Repeatable.
    #[arg(
        long = "node-agent",
        env = "SELVEDGE_CA_NODE_AGENTS",
        value_delimiter = ',',
        default_value = "selvedge-system/selvedge"
    )]
    node_agents: Vec<String>,
    /// The audience callers' tokens must be bound to.
    #[arg(long, env = "SELVEDGE_CA_AUDIENCE", default_value = "istio-ca")]
    audience: String,
    /// The longest certificate lifetime it issues, in seconds.
    #[arg(long, env = "SELVEDGE_CA_MAX_LIFETIME", default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    max_lifetime_secs: u64,
    /// kubeconfig (default: the pod's ServiceAccount).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// YAML file with the workloads (see README "Local config"); re-read on change. A
    /// change that is empty, unparsable or invalid (or a deleted file) is refused and the
    /// config in force stays; `workloads: []` means "no workloads".
    #[arg(long, env = config::ENV_CONFIG, conflicts_with = "kube")]
    config: Option<PathBuf>,
    /// Take workloads, services and policies from the Kubernetes API, and pods' network
    /// namespaces from the `selvedge-cni` plugin. The default when running in a pod
    /// (KUBERNETES_SERVICE_HOST set) and no --config is given.
    #[arg(long, env = config::ENV_KUBE)]
    kube: bool,
    /// kubeconfig for --kube (default: the pod's ServiceAccount).
    #[arg(long, env = "KUBECONFIG", requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// Label key that enrolls a namespace or a pod when set to `enabled`; `disabled` on a
    /// pod opts it out. hostNetwork pods are never enrolled.
    #[arg(long, env = config::ENV_MESH_LABEL, default_value = selvedge::k8s::DEFAULT_MESH_LABEL)]
    mesh_label: String,
    /// Directory for the CNI plugin's socket (cni.sock) and the registry of pods'
    /// network namespaces (--kube).
    #[arg(long, env = config::ENV_STATE_DIR, default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The host's /proc, where the network namespaces of pods that started before the agent
    /// are found (--kube; the DaemonSet runs with hostPID).
    #[arg(long, env = config::ENV_PROC_DIR, default_value = "/proc")]
    proc_dir: PathBuf,
    /// Where the container runtime keeps pods' network namespace files; searched for a
    /// running pod's IPs when its netns is not known otherwise (--kube).
    #[arg(long, env = config::ENV_NETNS_DIR, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// The node's CNI configuration directory: when set, the agent checks every 5 s that
    /// `selvedge-cni` is still chained last in the cluster CNI's configuration and chains it
    /// again if the cluster CNI rewrote the file (--kube).
    #[arg(long, env = config::ENV_CNI_CONF_DIR)]
    cni_conf_dir: Option<PathBuf>,
    /// This node's name: workloads on it (`node:` in the config file, `spec.nodeName` in
    /// the cluster) are enrolled here.
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
    /// Threads carrying connections. Default: half the CPUs this process may use (affinity
    /// and cgroup quota), at least one. The agent shares its cores with the apps it
    /// proxies, whose own work per connection is of the same order as its; threads beyond
    /// its share add cross-thread wakeups and lock handoffs to every connection (see
    /// ARCHITECTURE.md, "Performance"). Match it to the node's CPU budget for the agent.
    /// With one (the default on up to three CPUs), everything runs on that one thread,
    /// the agent's control loop included, under tokio's current-thread scheduler.
    #[arg(long, env = config::ENV_WORKER_THREADS, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// Connections in flight one enrolled pod may have (both directions); more are reset
    /// at once, counted (`selvedge_denials_total{reason="over_limit"}`) and logged.
    /// Default: a quarter of --max-conns (as given, or its default), at least 16.
    #[arg(long, env = "SELVEDGE_MAX_CONNS_PER_POD", value_parser = clap::value_parser!(u32).range(1..))]
    max_conns_per_pod: Option<u32>,
    /// Connections in flight on the node. Default: what the open-file limit holds at two
    /// descriptors a connection, after a reserve of 1,024 for the agent's own work.
    #[arg(long, env = "SELVEDGE_MAX_CONNS", value_parser = clap::value_parser!(u32).range(1..))]
    max_conns: Option<u32>,
    /// TLS handshakes in progress on all HBONE listeners together; more connections are
    /// reset at once. Default: an eighth of the open-file limit.
    #[arg(long, env = "SELVEDGE_MAX_HANDSHAKES", value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: Option<u32>,
    /// eBPF object to load instead of the one embedded in this binary.
    #[arg(long)]
    bpf_object: Option<PathBuf>,
    /// Keep a JSON status (ready, config generation, enrolled and failed pods with the
    /// reason, kernel counters) in this file, rewritten atomically every half second.
    #[arg(long, env = config::ENV_STATUS_FILE)]
    status_file: Option<PathBuf>,
    /// Log format. The level is SELVEDGE_LOG (an EnvFilter, default info) and can be
    /// changed at runtime with the admin API's /logging?level=…. Text is coloured only when
    /// stderr is a terminal and NO_COLOR is unset.
    #[arg(long, env = config::ENV_LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Admin API: /config_dump, /connections, /logging, /version, /quitquitquit, /readiness/handover. Loopback only.
    #[arg(long, env = "SELVEDGE_ADMIN_ADDR", default_value = selvedge::publish::admin::DEFAULT_ADMIN)]
    admin_addr: std::net::SocketAddr,
    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, env = "SELVEDGE_METRICS_ADDR", value_parser = selvedge::addr::parse_listen, default_value = selvedge::publish::admin::DEFAULT_METRICS)]
    metrics_addr: std::net::SocketAddr,
    /// Readiness (/healthz/ready): ready once programs are attached, local workloads
    /// enrolled and their certificates present. An older agent on the node that holds the
    /// port (a rolling update) is asked to hand it over.
    #[arg(long, env = "SELVEDGE_READINESS_ADDR", value_parser = selvedge::addr::parse_listen, default_value = selvedge::publish::admin::DEFAULT_READINESS)]
    readiness_addr: std::net::SocketAddr,
    /// SPIFFE trust domain of this mesh: identities are spiffe://<TD>/ns/<ns>/sa/<sa>.
    #[arg(long, env = config::ENV_TRUST_DOMAIN, default_value = config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Namespace whose selector-less PeerAuthentication applies mesh-wide.
    #[arg(long, env = config::ENV_ROOT_NAMESPACE, default_value = config::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// The cluster's name in Istio's `source_cluster`/`destination_cluster` metric labels
    /// (istiod's CLUSTER_ID; its default is `Kubernetes`).
    #[arg(long, env = "SELVEDGE_CLUSTER_ID", default_value = selvedge::publish::metrics::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// Where workload certificates come from: `builtin` (the agent signs them with the CA in
    /// --ca-dir), `files` (watched files under --cert-dir, e.g. from SPIRE or cert-manager:
    /// root-cert.pem, and <namespace>/<serviceAccount>/{cert-chain,key}.pem) or `istio`
    /// (the Istio CA API of istiod or istio-csr, see --istio-ca-*).
    #[arg(long, env = config::ENV_CERT_SOURCE, value_enum, default_value_t = CertSourceKind::Builtin)]
    cert_source: CertSourceKind,
    /// Built-in CA directory (from `selvedge ca init`). All agents of a mesh share the root.
    #[arg(long, env = config::ENV_CA_DIR, default_value = config::DEFAULT_CA_DIR)]
    ca_dir: PathBuf,
    /// Certificate directory for `--cert-source files`.
    #[arg(long, env = config::ENV_CERT_DIR, required_if_eq("cert_source", "files"))]
    cert_dir: Option<PathBuf>,
    /// Istio CA address (HOST:PORT, e.g. istiod.istio-system.svc:15012) for `--cert-source istio`.
    #[arg(long, env = config::ENV_ISTIO_CA_ADDR, required_if_eq("cert_source", "istio"))]
    istio_ca_addr: Option<String>,
    /// Name on the CA's serving certificate (default: the host of --istio-ca-addr).
    #[arg(long, env = config::ENV_ISTIO_CA_SERVER_NAME)]
    istio_ca_server_name: Option<String>,
    /// PEM file with the mesh root: verifies the CA and is the trust bundle for peers.
    #[arg(long, env = config::ENV_ISTIO_CA_ROOT, required_if_eq("cert_source", "istio"))]
    istio_ca_root: Option<PathBuf>,
    /// File holding the bearer token for the CA (re-read on every request; e.g. a
    /// projected service-account token with audience istio-ca).
    #[arg(long, env = config::ENV_ISTIO_CA_TOKEN, required_if_eq("cert_source", "istio"))]
    istio_ca_token: Option<PathBuf>,
    /// Lifetime, in seconds, of the workload certificates the built-in CA issues; they are
    /// renewed at half-life.
    #[arg(long, env = config::ENV_CERT_LIFETIME, default_value_t = 24 * 3600,
          value_parser = clap::value_parser!(u64).range(10..))]
    cert_lifetime_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CertSourceKind {
    Builtin,
    Files,
    Istio,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr; returns the function that changes the filter at runtime.
fn init_tracing(format: LogFormat) -> selvedge::publish::admin::SetLogLevel {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter};
    let initial = EnvFilter::try_from_env("SELVEDGE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(initial);
    let registry = tracing_subscriber::registry().with(filter);
    let colour = colour_logs(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    match format {
        LogFormat::Text => {
            registry.with(fmt::layer().with_ansi(colour).with_writer(selvedge::proxy::accesslog::writer)).init()
        }
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(selvedge::proxy::accesslog::writer))
            .init(),
    }
    Box::new(move |level: Option<&str>| {
        if let Some(level) = level {
            let f = EnvFilter::try_new(level).map_err(|e| format!("bad log filter {level:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle.with_current(ToString::to_string).map_err(|e| e.to_string())
    })
}

/// Text logs are coloured only on a terminal, and not when `NO_COLOR` is set (no-color.org):
/// a journal, a file or a container runtime's log pipe would keep the escape codes.
fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

fn output(args: &InspectArgs) -> selvedge::publish::inspect::Output {
    use selvedge::publish::inspect::Output;
    match args.output {
        OutputFormat::Table => Output::Table,
        OutputFormat::Json => Output::Json,
        OutputFormat::Yaml => Output::Yaml,
    }
}

fn inspect(view: selvedge::publish::inspect::View, args: &InspectArgs) -> anyhow::Result<()> {
    inspect_filtered(view, args, &selvedge::publish::inspect::Filter::default())
}

fn inspect_filtered(
    view: selvedge::publish::inspect::View,
    args: &InspectArgs,
    filter: &selvedge::publish::inspect::Filter,
) -> anyhow::Result<()> {
    print!("{}", selvedge::publish::inspect::show(args.admin, view, output(args), filter)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            selvedge::identity::SpiffeId::new(&trust_domain, "default", "default")
                .with_context(|| format!("trust domain {trust_domain:?}"))?;
            let cert = selvedge::identity::BuiltinCa::init(&dir, &trust_domain)?;
            println!("root written: {} (trust domain {trust_domain})", cert.display());
            Ok(())
        }
        Command::Ca(CaCommand::Intermediate { dir, root_dir, trust_domain, days }) => {
            selvedge::identity::SpiffeId::new(&trust_domain, "default", "default")
                .with_context(|| format!("trust domain {trust_domain:?}"))?;
            let root =
                selvedge::identity::BuiltinCa::load(&root_dir).with_context(|| format!("CA {}", root_dir.display()))?;
            let lifetime = std::time::Duration::from_secs(days * 24 * 3600);
            let cert = root.init_intermediate(&dir, &trust_domain, lifetime)?;
            println!("intermediate written: {} (valid {days} days, signed by {})", cert.display(), root_dir.display());
            Ok(())
        }
        Command::Ca(CaCommand::Serve(args)) => ca_serve(*args),
        Command::Status(a) => inspect(selvedge::publish::inspect::View::Status, &a),
        Command::Workloads(a) => {
            let filter = selvedge::publish::inspect::Filter { node: a.node };
            inspect_filtered(selvedge::publish::inspect::View::Workloads, &a.inspect, &filter)
        }
        Command::Services(a) => inspect(selvedge::publish::inspect::View::Services, &a),
        Command::Policies(a) => inspect(selvedge::publish::inspect::View::Policies, &a),
        Command::Certs(a) => inspect(selvedge::publish::inspect::View::Certs, &a),
        Command::Connections(a) => inspect(selvedge::publish::inspect::View::Connections, &a),
        Command::Bpf(a) => inspect(selvedge::publish::inspect::View::Bpf, &a),
        Command::Log(a) => {
            print!(
                "{}",
                selvedge::publish::inspect::log_level(a.inspect.admin, a.level.as_deref(), output(&a.inspect))?
            );
            Ok(())
        }
        Command::Version(a) => {
            let (text, answered) = selvedge::publish::inspect::version(a.admin, output(&a));
            print!("{text}");
            if !answered {
                std::process::exit(1); // the text says why
            }
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            let done = datapath::uninstall(&pin_dir).with_context(|| format!("uninstall {}", pin_dir.display()))?;
            println!("removed {} pins under {}", done.removed, pin_dir.display());
            for kept in &done.kept {
                println!("left in place (not a pin of Selvedge's): {}", kept.display());
            }
            Ok(())
        }
    }
}

/// `selvedge ca serve`: until SIGTERM or Ctrl-C.
fn ca_serve(args: CaServeArgs) -> anyhow::Result<()> {
    use std::collections::BTreeSet;
    let _ = init_tracing(LogFormat::Text);
    let node_agents: BTreeSet<(String, String)> = args
        .node_agents
        .iter()
        .map(|a| {
            a.split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
                .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
                .with_context(|| format!("--node-agent {a:?}: want namespace/name"))
        })
        .collect::<anyhow::Result<_>>()?;
    let ca = selvedge::identity::BuiltinCa::load(&args.dir).with_context(|| format!("CA {}", args.dir.display()))?;
    if selvedge::tls::provider_with(selvedge::tls::AesGcm::for_this_cpu()).install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let rt = runtime(1).context("start the async runtime")?;
    rt.block_on(async move {
        use selvedge::ca_service::{CaService, CaSettings};
        let client = selvedge::k8s::client(args.kubeconfig.as_deref()).await?;
        let authority = selvedge::k8s::authority::KubeAuthority::new(client, vec![args.audience.clone()]);
        let settings = CaSettings {
            trust_domain: args.trust_domain.clone(),
            node_agents,
            max_lifetime: std::time::Duration::from_secs(args.max_lifetime_secs),
        };
        let service = CaService::new(ca, authority, settings);
        let tls = service.tls(&args.server_name).map_err(anyhow::Error::msg)?;
        let listener =
            tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listen {}", args.listen))?;
        let metrics = tokio::net::TcpListener::bind(args.metrics_addr)
            .await
            .with_context(|| format!("listen {} (metrics)", args.metrics_addr))?;
        let metrics = tokio::spawn(selvedge::ca_service::metrics::serve(metrics, service.metrics()));
        tracing::info!(listen = %args.listen, metrics = %args.metrics_addr, server_name = %args.server_name, "CA service ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            () = service.clone().serve(listener, tls) => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        metrics.abort();
        let (issued, refused) = service.counts();
        tracing::info!(issued, refused, "CA service stopped");
        anyhow::Ok(())
    })
}

/// Every proxied connection holds two or three sockets: lift the soft descriptor limit to
/// the hard one (a default of 1024 would cap a node at a few hundred connections). Returns
/// the soft limit in force after it (1024 if it cannot be read).
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 1024, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                tracing::debug!(from = lim.rlim_cur, to = lim.rlim_max, "raised the open-file limit");
                return lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn cert_source(args: &RunArgs) -> anyhow::Result<config::CertSourceConfig> {
    let lifetime = std::time::Duration::from_secs(args.cert_lifetime_secs);
    Ok(match args.cert_source {
        CertSourceKind::Builtin => config::CertSourceConfig::Builtin { ca_dir: args.ca_dir.clone(), lifetime },
        CertSourceKind::Files => config::CertSourceConfig::Files {
            dir: args.cert_dir.clone().context("--cert-source files needs --cert-dir")?,
        },
        CertSourceKind::Istio => {
            use std::net::ToSocketAddrs as _;
            let addr = args.istio_ca_addr.clone().context("--cert-source istio needs --istio-ca-addr")?;
            let host = addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(&addr).to_string();
            let resolved = addr
                .to_socket_addrs()
                .with_context(|| format!("resolve --istio-ca-addr {addr}"))?
                .next()
                .with_context(|| format!("--istio-ca-addr {addr} resolves to nothing"))?;
            config::CertSourceConfig::Istio(selvedge::identity::IstioCaConfig {
                addr: resolved,
                server_name: args.istio_ca_server_name.clone().unwrap_or(host),
                root_file: args.istio_ca_root.clone().context("--cert-source istio needs --istio-ca-root")?,
                token_file: args.istio_ca_token.clone().context("--cert-source istio needs --istio-ca-token")?,
                lifetime,
            })
        }
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // First, before any thread exists: may replace this process with a tuned copy of it.
    selvedge::tuning::reexec_with_copy_threshold();
    let set_log_level = init_tracing(args.log_format);
    // Held to the end of `run`: dropping it logs the access lines still queued.
    let _access_log = selvedge::proxy::accesslog::start().context("start the access-log thread")?;
    start_allocator_housekeeping().context("start the allocator's housekeeping thread")?;
    let certs = cert_source(&args)?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => selvedge::sys::cgroup2_mount().context("find the cgroup v2 mount")?,
    };
    let source = match (args.config, args.kube || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()) {
        (Some(path), _) => config::Source::File(path),
        (None, true) => config::Source::Kube(config::KubeSettings {
            kubeconfig: args.kubeconfig,
            mesh_label: args.mesh_label,
            state_dir: args.state_dir,
            proc_dir: args.proc_dir,
            netns_dir: args.netns_dir,
            cni_conf_dir: args.cni_conf_dir,
        }),
        (None, false) => anyhow::bail!("give --config FILE (local workloads) or --kube (a Kubernetes cluster)"),
    };
    let limits = selvedge::limits::Limits::resolve(
        raise_fd_limit(),
        args.max_conns.map(|n| n as usize),
        args.max_conns_per_pod.map(|n| n as usize),
        args.max_handshakes.map(|n| n as usize),
    );
    let settings = Settings {
        source,
        node: args.node,
        pin_dir: args.pin_dir,
        cgroup,
        fast_path: args.fast_path,
        bpf_object: args.bpf_object,
        max_pods: args.max_pods,
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        cluster_id: args.cluster_id,
        certs,
        limits,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
    };
    if let Some(path) = &args.status_file {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(dir.is_dir(), "--status-file {}: directory {} does not exist", path.display(), dir.display());
    }
    tracing::info!(?settings, "starting");
    // One crypto provider for the whole process, installed explicitly.
    let aes_gcm = selvedge::tls::AesGcm::for_this_cpu();
    tracing::info!(aes_gcm = aes_gcm.name(), "TLS record encryption");
    if selvedge::tls::provider_with(aes_gcm).install_default().is_err() {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let threads = args.worker_threads.map(usize::from).unwrap_or_else(default_worker_threads);
    tracing::info!(worker_threads = threads, "async runtime");
    let rt = runtime(threads).context("start the async runtime")?;
    rt.block_on(async move {
        let agent = Agent::start(settings, set_log_level).await?;
        agent.run(args.status_file).await
    })?;
    Ok(())
}

/// The runtime for `threads` worker threads. One thread gets tokio's current-thread
/// scheduler, not the multi-thread one with a single worker, so that one write to an HBONE
/// connection carries the frames of every stream ready in the same turn (why, and what
/// it measured: `hbone/batch.rs`, which does the same with several workers).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()
}

/// mimalloc gives a freed range of pages back to the kernel once it has been free for a
/// second, but only when it is next asked to free a page: an agent that goes quiet after a
/// burst of connections kept the burst's setup memory resident until something next freed a
/// page, at no predictable time (the bench's freshly warmed agent read 29 to 58 MiB from run
/// to run of the same code). This thread asks once a second; with nothing due, the call
/// reads a clock and returns.
fn start_allocator_housekeeping() -> std::io::Result<()> {
    std::thread::Builder::new().name("selvedge-alloc".into()).spawn(|| {
        // SAFETY: both take no pointers; mi_collect needs this thread's heap initialised.
        unsafe { libmimalloc_sys::mi_thread_init() };
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: as above; `false`: purge what is due, do not force.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    })?;
    Ok(())
}

/// Half the CPUs this process may use, at least one (`--worker-threads`).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::{colour_logs, start_allocator_housekeeping};

    #[test]
    fn text_logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None), "a pipe or a file gets no escape codes");
    }

    /// This process's resident memory, KiB.
    fn rss_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        line.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_bursts_freed_memory_goes_back_to_the_kernel_with_nothing_else_allocating() {
        start_allocator_housekeeping().unwrap();
        let before = rss_kb();
        // 100,000 small blocks (50 MiB), as a burst of connections' setup leaves them.
        let burst: Vec<Box<[u8; 512]>> = (0..100_000).map(|i| Box::new([i as u8; 512])).collect();
        let grown = rss_kb().saturating_sub(before);
        assert!(grown > 40 * 1024, "the burst is resident: {grown} KiB");
        drop(burst);
        // Nothing on this thread allocates from here on: mimalloc alone would purge the
        // freed pages only at its next page free, which never comes.
        let mut kept = grown;
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            kept = rss_kb().saturating_sub(before);
            if kept < grown / 4 {
                return;
            }
        }
        panic!("{kept} of the burst's {grown} KiB still resident after 10 s idle");
    }
}
