//! Sockets inside pods' network namespaces.
//!
//! A socket belongs to the netns it was created in, for its whole life. So the agent keeps
//! one thread per enrolled pod that has `setns`-ed into the pod's namespace and does only
//! one thing: create sockets there on request. Everything else (accept, connect, copy)
//! runs on the shared tokio runtime; no per-pod process, no iptables.
//!
//! Connections need a fresh socket each, so the thread keeps spare IPv4 stream sockets
//! made in advance, ready for their use: taking one is a lock and a pop, with no thread
//! round trip and no setup call on the connection's path. Two reserves: sockets for dials
//! (`TCP_NODELAY` set) and sockets for deliveries to the pod's apps (also bound to the
//! delivery source with the port left to `connect`). The thread tops a reserve up once it
//! is half used, so waking it costs one wakeup per few connections, not one each.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
};

/// Spare IPv4 stream sockets kept per pod, per reserve.
const SPARE_SOCKETS: usize = 8;
/// A reserve is topped up when taking a socket leaves this many.
const REFILL_AT: usize = SPARE_SOCKETS / 2;

/// Source of the agent's connections to a pod's apps: a loopback address, which the pod's
/// `sk_lookup` recognises as "from inside the pod" and leaves alone (Istio uses the same).
pub const DELIVERY_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use crate::sys;

pub mod route;

#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    #[error("pod netns {path}: cannot open: {source} (is the pod still running?)")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod netns {path}: cannot enter: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod netns {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("pod netns {path}: its socket thread has stopped")]
    ThreadGone { path: PathBuf },
}

enum Request {
    Listen {
        addr: SocketAddr,
        reply: oneshot::Sender<io::Result<Socket>>,
    },
    Stream {
        ipv6: bool,
        use_: Use,
        reply: oneshot::Sender<io::Result<Socket>>,
    },
    /// Fill the spare IPv4 reserves back up.
    Refill,
}

/// What a socket is made ready for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A connection out of the pod (a tunnel to another node, a plaintext destination).
    Dial,
    /// A delivery to one of the pod's apps, from [`DELIVERY_SOURCE_V4`] (IPv4) or from
    /// the pod's own address (IPv6 has no spare loopback addresses; `sk_lookup` treats
    /// source == destination as from inside the pod).
    Deliver,
    /// A delivery from the client's own address: `IP_TRANSPARENT`, marked
    /// [`route::DELIVERY_MARK`], not bound yet (see [`PodNetns::transparent_socket`]).
    Transparent,
}

/// The spare IPv4 sockets, one reserve per [`Use`].
#[derive(Debug, Default)]
struct Reserves {
    dial: Vec<Socket>,
    deliver: Vec<Socket>,
    transparent: Vec<Socket>,
}

impl Reserves {
    fn of(&mut self, use_: Use) -> &mut Vec<Socket> {
        match use_ {
            Use::Dial => &mut self.dial,
            Use::Deliver => &mut self.deliver,
            Use::Transparent => &mut self.transparent,
        }
    }
}

type Spares = Arc<parking_lot::Mutex<Reserves>>;

/// Handle on one pod's network namespace.
#[derive(Debug)]
pub struct PodNetns {
    /// The netns file, kept open: it pins the namespace and is what `sk_lookup` attaches to.
    file: File,
    path: PathBuf,
    /// The namespace's cookie, the key of the pod in every eBPF map.
    cookie: u64,
    /// Requests to the pod's socket thread; dropping it ends the thread.
    tx: mpsc::Sender<Request>,
    /// IPv4 stream sockets the thread made in advance, ready for their use.
    spares: Spares,
    /// The pod's routing takes transparent deliveries back ([`route::set_up`] worked).
    transparent: bool,
}

impl PodNetns {
    /// Open `path`, start its socket thread and read the namespace cookie.
    pub fn enter(path: &Path) -> Result<Self, InpodError> {
        let file = File::open(path).map_err(|source| InpodError::Open { path: path.to_owned(), source })?;
        let thread_file = file.try_clone().map_err(|source| InpodError::Open { path: path.to_owned(), source })?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<(u64, bool)>>();
        let spares = Spares::default();
        let thread_spares = spares.clone();
        let name = format!("netns-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || serve(thread_file, rx, ready_tx, thread_spares))
            .map_err(|source| InpodError::Enter { path: path.to_owned(), source })?;
        let (cookie, transparent) = ready_rx
            .recv()
            .map_err(|_| InpodError::ThreadGone { path: path.to_owned() })?
            .map_err(|source| InpodError::Enter { path: path.to_owned(), source })?;
        let _ = tx.send(Request::Refill);
        Ok(Self { file, path: path.to_owned(), cookie, tx, spares, transparent })
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Does the path still name the namespace this holds? A pod sandbox recreated at the
    /// same path (same IP) is a new namespace: same path, another device and inode. Err:
    /// the path names nothing now.
    pub fn still_at_path(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt as _;
        let (held, named) = (self.file.metadata()?, std::fs::metadata(&self.path)?);
        Ok((held.dev(), held.ino()) == (named.dev(), named.ino()))
    }

    pub fn file(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A listening socket bound to `addr` inside the pod.
    pub async fn listen(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener, InpodError> {
        let sock = self.ask(|reply| Request::Listen { addr, reply }, format!("listen on {addr}")).await?;
        tokio::net::TcpListener::from_std(sock.into()).map_err(|source| InpodError::Socket {
            path: self.path.clone(),
            what: format!("register {addr}"),
            source,
        })
    }

    /// An unconnected TCP socket inside the pod with `TCP_NODELAY` set, ready for
    /// `connect`; for [`Use::Deliver`] over IPv4, already bound to the delivery source.
    pub async fn stream_socket(&self, ipv6: bool, use_: Use) -> Result<tokio::net::TcpSocket, InpodError> {
        let spare = if ipv6 {
            None
        } else {
            let mut spares = self.spares.lock();
            let reserve = spares.of(use_);
            let s = reserve.pop();
            // Only the take that crosses the mark asks: one wakeup per few connections.
            let refill = s.is_none() || reserve.len() == REFILL_AT;
            drop(spares);
            if refill {
                let _ = self.tx.send(Request::Refill);
            }
            s
        };
        let sock = match spare {
            Some(s) => s,
            None => self.ask(|reply| Request::Stream { ipv6, use_, reply }, "create a socket".into()).await?,
        };
        Ok(tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock)))
    }

    /// Whether deliveries from the client's own address work in this pod.
    pub fn transparent(&self) -> bool {
        self.transparent
    }

    /// A socket inside the pod bound to `from` (a client's address, not the pod's; its own
    /// port when that is free, else one the kernel picks), marked for [`route`]'s rule: for
    /// a delivery the app sees as coming from that client. Returns it with the address it
    /// is bound to.
    pub async fn transparent_socket(
        &self,
        from: SocketAddr,
    ) -> Result<(tokio::net::TcpSocket, SocketAddr), InpodError> {
        let sock = self.stream_socket(from.is_ipv6(), Use::Transparent).await?;
        let fail = |what: &str, source| InpodError::Socket { path: self.path.clone(), what: what.into(), source };
        let bound = sock.bind(from).or_else(|e| match from.port() {
            0 => Err(e),
            _ => sock.bind(SocketAddr::new(from.ip(), 0)),
        });
        bound.map_err(|e| fail(&format!("bind to {from}"), e))?;
        let bound = sock.local_addr().map_err(|e| fail("read the bound address", e))?;
        Ok((sock, bound))
    }

    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<Socket>>) -> Request,
        what: String,
    ) -> Result<Socket, InpodError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| InpodError::ThreadGone { path: self.path.clone() })?;
        rx.await.map_err(|_| InpodError::ThreadGone { path: self.path.clone() })?.map_err(|source| InpodError::Socket {
            path: self.path.clone(),
            what,
            source,
        })
    }
}

/// The pod's socket thread: enter the namespace, report its cookie, then serve requests.
fn serve(ns: File, rx: mpsc::Receiver<Request>, ready: mpsc::Sender<io::Result<(u64, bool)>>, spares: Spares) {
    let entered = sys::setns_net(ns.as_fd()).and_then(|()| {
        let probe = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        sys::netns_cookie(&probe)
    });
    let ok = entered.is_ok();
    if ok {
        if let Err(e) = reserve_agent_ports() {
            tracing::warn!("agent ports not reserved in the pod's netns (an app's connection could take one): {e}");
        }
        if let Err(e) = migrate_on_close() {
            tracing::warn!("listener migration not enabled in the pod's netns (connections queued at a stopping agent's listeners are reset in a rolling update): {e}");
        }
    }
    let transparent = ok
        && route::set_up()
            .inspect_err(|e| {
                tracing::warn!(
                    "transparent delivery not set up in the pod's netns (its apps see 127.0.0.6 as the client): {e}"
                );
            })
            .is_ok();
    if ready.send(entered.map(|cookie| (cookie, transparent))).is_err() || !ok {
        return;
    }
    drop(ns);
    for req in rx {
        match req {
            Request::Listen { addr, reply } => {
                let _ = reply.send(listener(addr));
            }
            Request::Stream { ipv6, use_, reply } => {
                let _ = reply.send(stream_socket(ipv6, use_));
            }
            Request::Refill => {
                let uses: &[Use] =
                    if transparent { &[Use::Dial, Use::Deliver, Use::Transparent] } else { &[Use::Dial, Use::Deliver] };
                for &use_ in uses {
                    while spares.lock().of(use_).len() < SPARE_SOCKETS {
                        match stream_socket(false, use_) {
                            Ok(s) => spares.lock().of(use_).push(s),
                            // Out of descriptors, say: connections fall back to asking.
                            Err(_) => break,
                        }
                    }
                }
            }
        }
    }
}

/// A non-blocking TCP socket in this thread's netns, ready for `use_`. Every connection
/// the agent makes carries small writes that must not wait (a CONNECT, an app's request).
fn stream_socket(ipv6: bool, use_: Use) -> io::Result<Socket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    s.set_nodelay(true)?;
    if use_ == Use::Deliver && !ipv6 {
        // The port is chosen at connect, unique per 4-tuple (see `sys::bind_address_no_port`).
        sys::bind_address_no_port(&s)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(DELIVERY_SOURCE_V4, 0)).into())?;
    }
    if use_ == Use::Transparent {
        // Bound later, to a client's address: allowed by IP_TRANSPARENT (CAP_NET_ADMIN).
        if ipv6 {
            sys::set_ipv6_transparent(&s)?;
        } else {
            s.set_ip_transparent(true)?;
        }
        s.set_mark(route::DELIVERY_MARK)?;
        // The client's own port may still be held by an earlier delivery in TIME_WAIT.
        s.set_reuse_address(true)?;
    }
    Ok(s)
}

/// Keep the agent's ports out of the pod's ephemeral range (`ip_local_reserved_ports`, a
/// per-netns sysctl; /proc/sys/net follows this thread's netns): an app connection that
/// took local port 15008 would stop a restarted agent from listening there.
fn reserve_agent_ports() -> io::Result<()> {
    const FILE: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let current = std::fs::read_to_string(FILE)?;
    let ours = [selvedge_common::OUTBOUND_PORT, selvedge_common::INBOUND_PORT, selvedge_common::HBONE_PORT];
    let mut all: Vec<String> = current.trim().split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect();
    let before = all.len();
    for p in ours {
        if !all.iter().any(|r| port_in(r, p)) {
            all.push(p.to_string());
        }
    }
    if all.len() == before {
        return Ok(());
    }
    std::fs::write(FILE, all.join(","))
}

/// Let the kernel move the connections queued at a closing listener to another listener of
/// its `SO_REUSEPORT` group instead of resetting them (`tcp_migrate_req`, a per-netns
/// sysctl, Linux 5.14). In a rolling update both agents listen in the pod; when the old one
/// stops, what its listeners had accepted in the kernel but it had not yet taken goes to the
/// new agent's. It only concerns reuseport groups: an app's own listener without
/// `SO_REUSEPORT` is unaffected.
fn migrate_on_close() -> io::Result<()> {
    const FILE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if std::fs::read_to_string(FILE)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(FILE, "1")
}

/// Is `port` in a reserved-ports entry (`N` or `A-B`)?
fn port_in(entry: &str, port: u16) -> bool {
    match entry.split_once('-') {
        Some((a, b)) => {
            a.trim().parse::<u16>().is_ok_and(|a| a <= port) && b.trim().parse::<u16>().is_ok_and(|b| port <= b)
        }
        None => entry.trim().parse::<u16>() == Ok(port),
    }
}

fn listener(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    // Accepted connections inherit it: no call per connection.
    s.set_nodelay(true)?;
    // During a DaemonSet rolling update (maxSurge) the next agent binds beside the one still
    // running; both serve until the old one drains. Pods cannot join: the bind guard
    // refuses their binds to the agent's ports.
    s.set_reuse_port(true)?;
    if let SocketAddr::V6(v6) = addr {
        // [::]:15006 takes IPv4 too (sk_lookup hands it both families); ::1 stays v6-only.
        s.set_only_v6(!v6.ip().is_unspecified())?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_come_ready_for_their_use() {
        let server = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        server.set_nonblocking(false).unwrap();
        let at = server.local_addr().unwrap();
        for use_ in [Use::Dial, Use::Deliver, Use::Transparent] {
            let s = stream_socket(false, use_).unwrap();
            assert!(s.nodelay().unwrap(), "{use_:?}: TCP_NODELAY set before connect");
            let bound = s.local_addr().unwrap().as_socket().unwrap();
            match use_ {
                // Bound to the delivery source, the port left to connect.
                Use::Deliver => assert_eq!(bound, SocketAddr::from((DELIVERY_SOURCE_V4, 0))),
                Use::Dial => assert!(bound.ip().is_unspecified(), "a dial is not bound: {bound}"),
                // Bound when used, to a client's address; marked for the pod's rule.
                Use::Transparent => {
                    assert!(bound.ip().is_unspecified(), "{bound}");
                    assert_eq!(s.mark().unwrap(), route::DELIVERY_MARK);
                    assert!(s.ip_transparent().unwrap());
                }
            }
            let _ = s.connect(&at);
            let (accepted, from) = server.accept().unwrap();
            if use_ == Use::Deliver {
                assert_eq!(from.as_socket().unwrap().ip(), std::net::IpAddr::from(DELIVERY_SOURCE_V4));
            }
            assert!(s.nodelay().unwrap(), "{use_:?}: still set once connected");
            // Accepted connections inherit it from the listener: no call per connection.
            assert!(accepted.nodelay().unwrap(), "accepted socket inherits TCP_NODELAY");
        }
    }

    #[test]
    fn reserved_port_entries() {
        assert!(port_in("15008", 15008));
        assert!(port_in("15000-15010", 15008));
        assert!(!port_in("15009-15010", 15008));
        assert!(!port_in("", 15008));
    }
}
