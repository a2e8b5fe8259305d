//! The kernel side: load the eBPF object, attach and pin its programs, and read and write
//! its maps. This is the only module that imports aya.
//!
//! # Pins (`<pin-dir>` defaults to `/sys/fs/bpf/selvedge`)
//! * `maps/SV_*` — every map, pinned by name: a restarted agent re-adopts them, so
//!   enrollment survives restarts and capture stays in force (fail closed) meanwhile;
//! * `links/<program>` — the cgroup links (connect, getpeername, bind, sockops);
//! * `links/pod-<netns cookie>` — each enrolled pod's `sk_lookup` link.
//!
//! Links are replaced atomically on start (new link pinned beside the old one, then renamed
//! over it), so capture never has a gap and a new agent always runs its own programs.

mod batch;
mod logs;
mod pins;
mod walk;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash, SockMap},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use parking_lot::Mutex;
use selvedge_common::{
    capacity, maps, DeliveryKey, OrigDstKey, PairKey, PodInfo, Setting, SockAddr, Stat, VerdictKey, ABI_VERSION,
    POD_FLAG_STRICT, POD_SLOT_GLOBAL, SLOT_ENROLLED, SLOT_STRICT, STATS_LEN, VERDICT_DENY,
};

pub use pins::Uninstalled;
pub use walk::{KernelFacts, KernelWalk};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded when the agent was built
/// through xtask (empty otherwise; then `--bpf-object` or a file beside the binary is used).
static EMBEDDED_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/selvedge.bpf.o"));

/// Cgroup programs: (ELF function name, pin name).
const CGROUP_SOCK_ADDR: [&str; 8] = [
    "capture_connect4",
    "capture_connect6",
    "restore_peer4",
    "restore_peer6",
    "guard_bind4",
    "guard_bind6",
    "reveal_self4",
    "reveal_self6",
];
const SOCKOPS: &str = "track_captured";
const SK_MSG: &str = "redirect_loopback";
const SK_LOOKUP: &str = "steer_inbound";
/// Every link name this agent pins under `<pin>/links` (besides `pod-<cookie>`).
const LINK_NAMES: [&str; 9] = [
    CGROUP_SOCK_ADDR[0],
    CGROUP_SOCK_ADDR[1],
    CGROUP_SOCK_ADDR[2],
    CGROUP_SOCK_ADDR[3],
    CGROUP_SOCK_ADDR[4],
    CGROUP_SOCK_ADDR[5],
    CGROUP_SOCK_ADDR[6],
    CGROUP_SOCK_ADDR[7],
    SOCKOPS,
];

/// Remove Selvedge's pins under `pin_dir` (links first, so capture stops, then maps),
/// leaving anything else there in place; refuses a directory that is not on bpffs.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, DatapathError> {
    pins::uninstall(pin_dir, &LINK_NAMES)
}

/// Slot baked into a closed pod's `sk_lookup`: out of range, so it reads no flags and drops.
const NO_SLOT: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("eBPF object: {0}")]
    Object(String),
    #[error("bpffs: {dir} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs { dir: PathBuf },
    #[error("{dir} is not on a bpf filesystem, so it holds no pins of Selvedge's: nothing removed")]
    NotAPinDir { dir: PathBuf },
    #[error("eBPF: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF: loading the object failed (kernel too old or missing BPF features?): {}", chain(.0))]
    Load(aya::EbpfError),
    #[error("eBPF program {program}: {what}: {}", chain(.source))]
    Program { program: &'static str, what: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {map}: {what}: {}", chain(.source))]
    Map { map: &'static str, what: String, source: aya::maps::MapError },
    #[error("eBPF map {map} is missing from the object")]
    MissingMap { map: &'static str },
    #[error(
        "pinned maps under {dir} were written by ABI version {found}, this agent speaks {ABI_VERSION}; \
         run `selvedge uninstall --pin-dir {dir}` first"
    )]
    AbiMismatch { dir: PathBuf, found: u64 },
    #[error("{source}; {left}")]
    Abandoned {
        #[source]
        source: Box<DatapathError>,
        left: String,
    },
    #[error("eBPF map {map} is full: pod not enrolled (its inbound stays closed); raise --max-pods")]
    Full { map: &'static str },
}

/// An error and its sources on one line: aya's own messages omit the errno, their sources
/// carry it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn map_err(map: &'static str, what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Map { map, what, source }
}

/// What the datapath is asked to do at start.
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub fast_path: bool,
    pub agent_cgroup_id: u64,
    pub bpf_object: Option<PathBuf>,
    /// Capacity of the per-pod maps when they are created (pinned maps keep theirs).
    pub max_pods: u32,
}

/// Counters the programs keep, summed over CPUs.
pub type Stats = [u64; STATS_LEN as usize];

/// Maps the proxy uses per connection; shared across tasks.
pub struct FlowMaps {
    orig_dst: HashMap<MapData, OrigDstKey, SockAddr>,
    /// Cached denials the connect hooks refuse at once.
    verdicts: Mutex<HashMap<MapData, VerdictKey, u32>>,
    /// `SockHash::insert` takes `&mut`; inserts are one syscall each.
    pairs: Mutex<SockHash<MapData, PairKey>>,
    /// Deliveries from a client's address in flight (see [`FlowMaps::begin_delivery`]).
    delivering: Mutex<HashMap<MapData, DeliveryKey, u64>>,
    fast_path: bool,
}

/// A registered delivery ([`FlowMaps::begin_delivery`]); dropping it removes the entry.
#[derive(Debug)]
pub struct Delivering {
    flows: Arc<FlowMaps>,
    key: DeliveryKey,
}

impl Drop for Delivering {
    fn drop(&mut self) {
        let _ = self.flows.delivering.lock().remove(&self.key);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

impl std::fmt::Debug for FlowMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowMaps").field("fast_path", &self.fast_path).finish_non_exhaustive()
    }
}

impl FlowMaps {
    /// Let the pod's `sk_lookup` pass the SYNs of a delivery the agent is about to make from
    /// a client's address (else, by its address, it would be steered back to the agent),
    /// for at most `within`. The returned guard takes the entry out again when dropped: when
    /// the connect is over, or its task is cancelled.
    pub fn begin_delivery(self: &Arc<Self>, key: DeliveryKey, within: Duration) -> Result<Delivering, DatapathError> {
        let deadline = monotonic_ns().saturating_add(u64::try_from(within.as_nanos()).unwrap_or(u64::MAX));
        self.delivering.lock().insert(key, deadline, 0).map_err(map_err(maps::DELIVERING, "register a delivery"))?;
        Ok(Delivering { flows: self.clone(), key })
    }

    /// Forget every registered delivery (an earlier agent's, at start).
    pub fn clear_deliveries(&self) {
        use aya::maps::IterableMap;
        let d = self.delivering.lock();
        let data = IterableMap::<DeliveryKey, u64>::map(&*d);
        if let Ok(info) = data.info() {
            let _ = batch::delete_all(data.fd().as_fd(), info.key_size(), info.value_size());
        }
    }

    /// The destination a captured connection was dialled to, if the kernel recorded one.
    pub fn original_destination(&self, key: &OrigDstKey) -> Option<SockAddr> {
        self.orig_dst.get(key, 0).ok()
    }

    /// Remember that connects from the pod `netns_cookie` to `dst` are denied: the kernel
    /// refuses the next ones with EPERM instead of a handshake and a reset.
    pub fn cache_denial(&self, netns_cookie: u64, dst: &SockAddr) -> Result<(), DatapathError> {
        let key = VerdictKey { netns_cookie, dst: *dst, _pad: 0 };
        self.verdicts.lock().insert(key, VERDICT_DENY, 0).map_err(map_err(maps::VERDICTS, "cache a denial"))
    }

    /// Forget every cached verdict (policies or workloads changed). Returns how many. A
    /// batch of entries per system call: the map holds up to 65,536, and this runs on the
    /// runtime's thread at every change (key by key it took two calls per entry).
    pub fn clear_verdicts(&self) -> usize {
        use aya::maps::IterableMap;
        let mut v = self.verdicts.lock();
        let data = IterableMap::<VerdictKey, u32>::map(&*v);
        // The kernel's own key and value sizes: its writes must fit the buffers.
        let cleared = data
            .info()
            .map_err(std::io::Error::other)
            .and_then(|info| batch::delete_all(data.fd().as_fd(), info.key_size(), info.value_size()));
        match cleared {
            Ok(n) => n,
            Err(e) => {
                // Stale denials would refuse what the new state may allow: key by key.
                tracing::warn!("clearing cached verdicts in batches failed ({e}); one by one");
                let keys: Vec<VerdictKey> = v.keys().filter_map(Result::ok).collect();
                for k in &keys {
                    let _ = v.remove(k);
                }
                keys.len()
            }
        }
    }

    /// Is the sockmap fast path on?
    pub fn fast_path(&self) -> bool {
        self.fast_path
    }

    /// Put the agent's end of an app<->agent loopback connection in the fast-path sockhash.
    /// Must happen before the agent writes to it (see ebpf/src/skmsg.rs on ordering).
    /// Returns whether it joined: redirected bytes wait in the sockmap's own queue, which
    /// only `read` serves (`splice` would never see them), so the caller must copy.
    pub fn join_fast_path(&self, key: &PairKey, sock: &impl AsRawFd) -> Result<bool, DatapathError> {
        if !self.fast_path {
            return Ok(false);
        }
        self.pairs.lock().insert(key, sock.as_raw_fd(), 0).map_err(map_err(maps::PAIRS, "insert agent socket"))?;
        Ok(true)
    }
}

/// The loaded object, its control maps and the links it owns.
pub struct Datapath {
    pin_dir: PathBuf,
    /// No pins were there when this agent started (no earlier agent's state to keep).
    fresh: bool,
    /// The object's bytes: each pod's `sk_lookup` instance is loaded from them.
    object: Vec<u8>,
    /// Keeps the programs (and the aya-log reader) of the main load alive.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodInfo>,
    /// netns cookie -> the pod's IPv4 address (what `getsockname` reports).
    pod_addr: HashMap<MapData, u64, SockAddr>,
    slots: Array<MapData, u32>,
    inbound: SockMap<MapData>,
    /// The `inbound` indices this agent has set: a sockmap cannot be read back from user
    /// space (its slots all iterate, set or not, and a lookup of a 4-byte value is refused),
    /// and the kernel drops a closed listener from it by itself.
    inbound_set: std::collections::BTreeSet<u32>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("pin_dir", &self.pin_dir).finish_non_exhaustive()
    }
}

impl Datapath {
    /// Load (re-adopting pinned maps), attach and pin everything; returns the datapath and
    /// the per-connection maps for the proxy.
    ///
    /// If it fails after pinning anything and no earlier agent's pins were there, it
    /// removes what it pinned (the kernel is left as it was found); pins an earlier agent
    /// left stay, and the error says so.
    pub fn open(opts: &DatapathOptions) -> Result<(Self, FlowMaps), DatapathError> {
        let object = load_object(opts.bpf_object.as_deref())?;
        let bpffs_root = opts.pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !crate::sys::is_bpffs(bpffs_root) {
            return Err(DatapathError::NoBpffs { dir: opts.pin_dir.clone() });
        }
        let fresh = !pins::has_pins(&opts.pin_dir);
        Self::attach(opts, object, fresh).map_err(|e| DatapathError::Abandoned {
            source: Box::new(e),
            left: pins::after_failed_start(&opts.pin_dir, fresh, &LINK_NAMES),
        })
    }

    /// A start that fails after `open`: remove what this agent pinned if nothing was pinned
    /// before it; says what is left and why.
    pub fn abandon(self) -> String {
        let (pin_dir, fresh) = (self.pin_dir.clone(), self.fresh);
        drop(self);
        pins::after_failed_start(&pin_dir, fresh, &LINK_NAMES)
    }

    fn attach(opts: &DatapathOptions, object: Vec<u8>, fresh: bool) -> Result<(Self, FlowMaps), DatapathError> {
        let map_dir = pins::ensure_dirs(&opts.pin_dir)?;
        let max_pods = opts.max_pods.clamp(1, capacity::INBOUND_LISTENERS);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .map_max_entries(maps::ENROLLED, max_pods)
            .map_max_entries(maps::SLOTS, max_pods)
            .map_max_entries(maps::INBOUND_LISTENERS, max_pods)
            .load(&object)
            .map_err(DatapathError::Load)?;
        logs::start(&mut ebpf);

        let mut settings: Array<MapData, u64> = take(&mut ebpf, maps::SETTINGS)?;
        check_abi(&settings, &opts.pin_dir)?;
        let set = |s: &mut Array<MapData, u64>, k: Setting, v: u64| {
            s.set(k as u32, v, 0).map_err(map_err(maps::SETTINGS, format!("set {k:?}")))
        };
        set(&mut settings, Setting::AbiVersion, u64::from(ABI_VERSION))?;
        set(&mut settings, Setting::AgentCgroup, opts.agent_cgroup_id)?;
        set(&mut settings, Setting::FastPath, u64::from(opts.fast_path))?;

        let pairs: SockHash<MapData, PairKey> = take(&mut ebpf, maps::PAIRS)?;
        if opts.fast_path {
            // A map attachment, not a pinnable link: the program (kept in `_ebpf`) owns it,
            // so it lives as long as this agent. With the agent gone, sends fall back to TCP.
            let prog: &mut SkMsg = program(&mut ebpf, SK_MSG)?;
            prog.load().map_err(prog_err(SK_MSG, "load"))?;
            prog.attach(pairs.fd()).map_err(prog_err(SK_MSG, "attach to the sockhash"))?;
        }

        // Cgroup bpf_links always coexist with other links on the same cgroup (the kernel
        // rejects BPF_F_ALLOW_MULTI on BPF_LINK_CREATE), so `Single` is the right mode here.
        let cgroup = std::fs::File::open(&opts.cgroup)
            .map_err(|source| DatapathError::Io { what: format!("open cgroup {}", opts.cgroup.display()), source })?;
        for name in CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name, "load"))?;
            let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(name, "attach"))?;
            let link = prog.take_link(id).map_err(prog_err(name, "take link"))?;
            pins::replace_link(&opts.pin_dir, name, link.try_into().map_err(link_err(name))?)?;
        }
        let ops: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
        ops.load().map_err(prog_err(SOCKOPS, "load"))?;
        let id = ops.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(SOCKOPS, "attach"))?;
        let link = ops.take_link(id).map_err(prog_err(SOCKOPS, "take link"))?;
        pins::replace_link(&opts.pin_dir, SOCKOPS, link.try_into().map_err(link_err(SOCKOPS))?)?;

        let flows = FlowMaps {
            orig_dst: take(&mut ebpf, maps::ORIG_DST)?,
            verdicts: Mutex::new(take(&mut ebpf, maps::VERDICTS)?),
            pairs: Mutex::new(pairs),
            delivering: Mutex::new(take(&mut ebpf, maps::DELIVERING)?),
            fast_path: opts.fast_path,
        };
        flows.clear_deliveries();
        let dp = Datapath {
            pin_dir: opts.pin_dir.clone(),
            fresh,
            enrolled: take(&mut ebpf, maps::ENROLLED)?,
            pod_addr: take(&mut ebpf, maps::POD_ADDR)?,
            slots: take(&mut ebpf, maps::SLOTS)?,
            inbound: take(&mut ebpf, maps::INBOUND_LISTENERS)?,
            inbound_set: std::collections::BTreeSet::new(),
            stats: take(&mut ebpf, maps::STATS)?,
            object,
            _ebpf: ebpf,
        };
        Ok((dp, flows))
    }

    /// Pods enrolled in the kernel (possibly by a previous agent): netns cookie -> info.
    pub fn enrolled(&self) -> BTreeMap<u64, PodInfo> {
        self.enrolled.iter().filter_map(Result::ok).collect()
    }

    /// Capture a pod: inbound steering first (it drops until the rest is in place), then
    /// its inbound listener, then the enrollment entry that turns on outbound capture.
    /// `addr`: its own address, which `getsockname` tells its apps (IPv4).
    pub fn enroll(
        &mut self,
        netns_cookie: u64,
        netns: BorrowedFd<'_>,
        pod_id: u32,
        strict: bool,
        inbound_listener: &impl AsRawFd,
        addr: Option<std::net::IpAddr>,
    ) -> Result<(), DatapathError> {
        self.attach_lookup(netns_cookie, netns, pod_id)?;
        if let Some(ip) = addr.map(|a| a.to_canonical()).filter(std::net::IpAddr::is_ipv4) {
            let abi = crate::addr::to_abi(std::net::SocketAddr::new(ip, 0));
            self.pod_addr.insert(netns_cookie, abi, 0).map_err(map_err(maps::POD_ADDR, "set the pod's address"))?;
        }
        self.inbound
            .set(pod_id, inbound_listener, 0)
            .map_err(map_err(maps::INBOUND_LISTENERS, format!("set pod {pod_id}")))?;
        self.inbound_set.insert(pod_id);
        self.set_flags(netns_cookie, pod_id, strict)
    }

    /// Keep a pod that could not be enrolled closed: its own `sk_lookup` instance with no
    /// slot drops every inbound SYN from outside the pod. A later successful enrollment
    /// replaces it.
    pub fn close_pod(&mut self, netns_cookie: u64, netns: BorrowedFd<'_>) -> Result<(), DatapathError> {
        self.attach_lookup(netns_cookie, netns, NO_SLOT)
    }

    /// Remove what `close_pod` attached.
    pub fn release_closed_pod(&mut self, netns_cookie: u64) -> Result<(), DatapathError> {
        pins::remove_link(&self.pin_dir, &pins::pod_link_name(netns_cookie))
    }

    /// How many pods the per-pod maps hold, as the kernel has them (pinned maps keep the
    /// size they were created with, possibly by an earlier agent).
    pub fn max_pods(&self) -> u32 {
        let pin = self.pin_dir.join("maps").join(maps::SLOTS);
        aya::maps::MapInfo::from_pin(&pin).map(|i| i.max_entries()).unwrap_or(0)
    }

    /// Load this pod's own sk_lookup instance with `slot` baked in (the program type cannot
    /// read the netns cookie), attach it to the pod's netns and pin the link. Pinned maps
    /// are shared with the main load; this load's log ring is shrunk to one page since
    /// sk_lookup does not log.
    fn attach_lookup(&mut self, netns_cookie: u64, netns: BorrowedFd<'_>, slot: u32) -> Result<(), DatapathError> {
        let mut instance = EbpfLoader::new()
            .default_map_pin_directory(self.pin_dir.join("maps"))
            .override_global(POD_SLOT_GLOBAL, &slot, true)
            .map_max_entries("AYA_LOGS", 4096)
            .load(&self.object)
            .map_err(DatapathError::Load)?;
        let lookup: &mut SkLookup = program(&mut instance, SK_LOOKUP)?;
        lookup.load().map_err(prog_err(SK_LOOKUP, "load"))?;
        let id = lookup.attach(netns.as_fd()).map_err(prog_err(SK_LOOKUP, "attach to pod netns"))?;
        let link = lookup.take_link(id).map_err(prog_err(SK_LOOKUP, "take link"))?;
        pins::replace_link(&self.pin_dir, &pins::pod_link_name(netns_cookie), link.into())
    }

    /// Rewrite a pod's enrollment entry (e.g. its STRICT flag changed).
    pub fn set_flags(&mut self, netns_cookie: u64, pod_id: u32, strict: bool) -> Result<(), DatapathError> {
        let slot = SLOT_ENROLLED | if strict { SLOT_STRICT } else { 0 };
        self.slots.set(pod_id, slot, 0).map_err(map_err(maps::SLOTS, format!("set pod {pod_id}")))?;
        let info = PodInfo { pod_id, flags: if strict { POD_FLAG_STRICT } else { 0 } };
        self.enrolled.insert(netns_cookie, info, 0).map_err(|source| {
            if matches!(&source, aya::maps::MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG))
            {
                DatapathError::Full { map: maps::ENROLLED }
            } else {
                DatapathError::Map { map: maps::ENROLLED, what: format!("enroll netns {netns_cookie}"), source }
            }
        })
    }

    /// Release a pod: stop steering its inbound, then its outbound capture.
    pub fn unenroll(&mut self, netns_cookie: u64, pod_id: u32) -> Result<(), DatapathError> {
        pins::remove_link(&self.pin_dir, &pins::pod_link_name(netns_cookie))?;
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            // Already gone (e.g. removed behind the agent's back: drift being repaired).
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => return Err(DatapathError::Map { map: maps::ENROLLED, what: "unenroll".into(), source }),
        }
        let _ = self.pod_addr.remove(&netns_cookie);
        let _ = self.slots.set(pod_id, 0, 0);
        let _ = self.inbound.clear_index(&pod_id);
        self.inbound_set.remove(&pod_id);
        Ok(())
    }

    /// Kernel counters with their names (the names dashboards and the status file use).
    pub fn named_stats(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats();
        [
            (Stat::Captured, "captured"),
            (Stat::OrigMapFull, "orig_map_full"),
            (Stat::InboundAssigned, "inbound_assigned"),
            (Stat::InboundStrictDrop, "inbound_strict_drop"),
            (Stat::InboundNoListener, "inbound_no_listener"),
            (Stat::BindRefused, "bind_refused"),
            (Stat::FastPathHit, "fast_path_hit"),
            (Stat::FastPathMiss, "fast_path_miss"),
            (Stat::PolicyRefused, "policy_refused"),
        ]
        .into_iter()
        .map(|(stat, name)| (name, s[stat as usize]))
        .collect()
    }

    /// A reader of what the kernel holds (map entries, attached programs) that works from
    /// the pins alone: run its walk off the runtime's threads.
    pub fn walker(&self) -> KernelWalk {
        KernelWalk::new(self.pin_dir.clone())
    }

    /// The number of inbound listener slots this agent has set (see `inbound_set`).
    pub fn inbound_listeners(&self) -> u64 {
        self.inbound_set.len() as u64
    }

    /// The pinned links (attachments) present now.
    pub fn links(&self) -> Vec<String> {
        links(&self.pin_dir)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Per-CPU counters summed.
    pub fn stats(&self) -> Stats {
        let mut out = [0u64; STATS_LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// The links pinned under `pin_dir`, sorted.
fn links(pin_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(pin_dir.join("links"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn load_object(path: Option<&Path>) -> Result<Vec<u8>, DatapathError> {
    if let Some(p) = path {
        return std::fs::read(p).map_err(|source| DatapathError::Io { what: format!("read {}", p.display()), source });
    }
    if !EMBEDDED_OBJECT.is_empty() {
        return Ok(EMBEDDED_OBJECT.to_vec());
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("selvedge.bpf.o")));
    match beside {
        Some(p) if p.exists() => {
            std::fs::read(&p).map_err(|source| DatapathError::Io { what: format!("read {}", p.display()), source })
        }
        _ => Err(DatapathError::Object(
            "this binary has no eBPF object embedded and none was found beside it; \
             build with `cargo xtask build` or pass --bpf-object"
                .into(),
        )),
    }
}

fn check_abi(settings: &Array<MapData, u64>, dir: &Path) -> Result<(), DatapathError> {
    let found = settings.get(&(Setting::AbiVersion as u32), 0).map_err(map_err(maps::SETTINGS, "read ABI version"))?;
    if found != 0 && found != u64::from(ABI_VERSION) {
        return Err(DatapathError::AbiMismatch { dir: dir.to_owned(), found });
    }
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap { map: name })?;
    T::try_from(map).map_err(map_err(name, "open"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| DatapathError::Object(format!("program {name} is missing")))?;
    p.try_into().map_err(prog_err(name, "type"))
}

fn prog_err(program: &'static str, what: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, what, source }
}

fn link_err<E: std::fmt::Debug>(program: &'static str) -> impl FnOnce(E) -> DatapathError {
    move |e| DatapathError::Object(format!("program {program}: link is not pinnable: {e:?}"))
}
