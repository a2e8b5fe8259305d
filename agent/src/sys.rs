//! Thin wrappers over the few Linux interfaces the agent needs beyond std and tokio:
//! cgroup v2 discovery, network-namespace cookies, `setns` and one socket option.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the socket's network namespace, the same
/// value `bpf_get_netns_cookie()` returns to the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on pure-v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&info).ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted (Selvedge needs cgroup v2)")
    })
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// The cgroup v2 id (the directory's inode number) of the cgroup this process is in:
/// the value `bpf_get_current_cgroup_id()` returns for it.
pub fn own_cgroup_id(mount: &Path) -> io::Result<u64> {
    let rel = cgroup_v2_path(&std::fs::read_to_string("/proc/self/cgroup")?)?;
    // In a container with a private cgroup namespace (the default on cgroup v2) our own
    // cgroup reads as "/": ask from the host's namespace (the DaemonSet runs with hostPID,
    // so PID 1 is the host's init), as the kernel's ids are global.
    let rel = if rel == "/" && !same_ns("/proc/self/ns/cgroup", "/proc/1/ns/cgroup") {
        host_view_of_own_cgroup()?
    } else {
        rel
    };
    cgroup_id(&mount.join(rel.trim_start_matches('/')))
}

fn cgroup_v2_path(text: &str) -> io::Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "/proc/self/cgroup has no cgroup v2 entry"))
}

fn same_ns(a: &str, b: &str) -> bool {
    match (ns_id(Path::new(a)), ns_id(Path::new(b))) {
        (Ok(x), Ok(y)) => x == y,
        // Cannot tell (no access to PID 1's namespace): keep our own view.
        _ => true,
    }
}

/// A namespace file's identity (device, inode): two files name the same namespace when
/// these are equal.
pub fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
}

/// Our cgroup path as the host's cgroup namespace shows it, read by a short-lived thread
/// that joins that namespace (namespaces are per thread; the rest of the agent stays put).
fn host_view_of_own_cgroup() -> io::Result<String> {
    let pid = std::process::id();
    std::thread::spawn(move || -> io::Result<String> {
        let ns = std::fs::File::open("/proc/1/ns/cgroup")?;
        // SAFETY: setns on an fd we own; affects only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
            return Err(io::Error::last_os_error());
        }
        cgroup_v2_path(&std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?)
    })
    .join()
    .map_err(|_| io::Error::other("cgroup namespace thread panicked"))?
}

pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// Network-namespace cookie of the namespace `sock` lives in.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a pointer/length pair to a live u64.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a later bind to port 0 leaves the port to `connect`, which
/// picks one unique for the connection's 4-tuple. A plain bind to port 0 must find a port
/// no other socket on that address holds, scanning past every TIME_WAIT connection: 5 ms
/// per bind with 15,000 of them (measured in a lab pod), 8 µs with this.
pub fn bind_address_no_port(sock: &impl AsRawFd) -> io::Result<()> {
    set_flag(sock, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT)
}

/// `IPV6_TRANSPARENT` (socket2 has only the IPv4 option): bind to an address that is not
/// the host's. Needs `CAP_NET_ADMIN`.
pub fn set_ipv6_transparent(sock: &impl AsRawFd) -> io::Result<()> {
    set_flag(sock, libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
}

/// Turn an integer socket option on.
fn set_flag(sock: &impl AsRawFd, level: libc::c_int, option: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, and a pointer/length pair to a live c_int.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), level, option, (&raw const on).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Move the calling thread into the network namespace `ns`.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; affects only the calling thread's netns.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Is `ip` an address of one of the calling thread's network namespace's interfaces
/// (loopback excluded)? For the agent's runtime thread that namespace is the node's, so
/// this says "the connection comes from the node itself" (the kubelet). Read afresh on
/// every call (a netlink dump, tens of microseconds): addresses come and go with the CNI.
pub fn is_own_address(ip: std::net::IpAddr) -> io::Result<bool> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return Ok(false);
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: out-parameter for the list, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = false;
    let mut at = head;
    while !at.is_null() && !found {
        // SAFETY: a node of the list getifaddrs returned; its address, when not null,
        // points to a sockaddr of the family it names.
        unsafe {
            let addr = (*at).ifa_addr;
            if !addr.is_null() {
                let own = match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = addr.cast::<libc::sockaddr_in>();
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = addr.cast::<libc::sockaddr_in6>();
                        Some(IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.s6_addr)))
                    }
                    _ => None,
                };
                found = own.is_some_and(|o| o.to_canonical() == ip);
            }
            at = (*at).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// Make every close of `sock` (and, on a listener, of every connection it accepts: they
/// inherit it) a reset, until [`disarm_reset`]: a relay that ends by an error, a policy
/// close, a cancelled task or the agent's own death (the kernel closes a killed process's
/// sockets) then shows the app a reset, never a FIN after a prefix of the stream.
pub fn arm_reset(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    // A zero linger makes close() send RST at once; it never blocks.
    socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO))
}

/// A relay ended cleanly: close with FIN again, after the bytes still queued (a zero
/// linger would discard them).
pub fn disarm_reset(sock: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(None);
}

/// Close `sock` with RST, so the peer sees a reset rather than a clean end of stream.
pub fn reset(sock: impl std::os::fd::AsFd) {
    let _ = arm_reset(&sock);
}

/// Is `dir` a directory of a cgroup v2 filesystem?
pub fn is_cgroup2(dir: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    fs_magic(dir) == Some(CGROUP2_SUPER_MAGIC) && dir.is_dir()
}

/// The filesystem type (`statfs`'s `f_type`) of `path`.
fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Is a bpffs mounted at (or above) `dir`?
pub fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    fs_magic(dir) == Some(BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_the_namespaces_interfaces_but_not_loopback() {
        // Every address `ip` lists for this namespace's interfaces, loopback aside.
        let out = std::process::Command::new("ip").args(["-o", "addr", "show"]).output().expect("run ip");
        let listed: Vec<std::net::IpAddr> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| !w.starts_with("inet")).nth(1))
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .filter(|a: &std::net::IpAddr| !a.is_loopback())
            .collect();
        assert!(!listed.is_empty(), "this namespace has an address besides loopback");
        for a in listed {
            assert!(is_own_address(a).unwrap(), "{a} is this namespace's");
        }
        assert!(!is_own_address("127.0.0.1".parse().unwrap()).unwrap(), "loopback never counts");
        assert!(!is_own_address("198.18.255.254".parse().unwrap()).unwrap(), "an address no interface holds");
    }

    #[test]
    fn a_bind_to_port_zero_leaves_the_port_to_connect() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bind_address_no_port(&sock).unwrap();
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        let bound = sock.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(bound.port(), 0, "no port taken at bind");
        sock.connect(&server.local_addr().unwrap().into()).unwrap();
        let connected = sock.local_addr().unwrap().as_socket().unwrap();
        assert!(connected.port() != 0 && connected.ip() == bound.ip(), "connect chose it: {connected}");
    }

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      35 30 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn netns_cookie_of_a_local_socket() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = netns_cookie(&s).unwrap();
        let b = netns_cookie(&std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, b, "same namespace, same cookie");
    }
}
