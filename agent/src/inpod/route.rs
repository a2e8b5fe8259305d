//! Transparent delivery's plumbing inside a pod, without iptables: the agent connects to an
//! app from the client's own address (an `IP_TRANSPARENT` socket marked [`DELIVERY_MARK`]),
//! and the app's answers, addressed to that foreign address, must come back to the agent's
//! socket instead of leaving the pod.
//!
//! * `net.ipv4.tcp_fwmark_accept = 1`: a connection the app accepts carries the mark of
//!   the SYN that opened it (the agent's), and so does its SYN-ACK;
//! * a policy rule, `fwmark DELIVERY_MARK lookup DELIVERY_TABLE`, and in that table one
//!   route, `local default dev lo`: marked packets are delivered inside the pod, where the
//!   agent's socket (bound to the client's address) takes them.
//!
//! Nothing else in the pod carries the mark, so its other traffic routes as before. Set up
//! once per pod netns, from that netns's thread; idempotent.

use std::io;

/// The mark of the agent's delivery sockets, and of the app's side of those connections.
pub const DELIVERY_MARK: u32 = 0x5e1_0006;
/// The routing table holding the one `local default` route.
pub const DELIVERY_TABLE: u32 = 15006;
/// The rule's priority: before the main table (32766).
pub const RULE_PRIORITY: u32 = 15006;

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Set it up in this thread's network namespace (IPv4, and IPv6 where the pod has it).
pub fn set_up() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
    let nl = Netlink::open()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let done = nl.request(&rule(family)).and_then(|()| nl.request(&local_route(family)));
        match done {
            Ok(()) => {}
            // A pod without IPv6 (disabled in its netns) has nothing to deliver over it.
            Err(e) if family == libc::AF_INET6 as u8 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `RTM_NEWRULE`: `fwmark DELIVERY_MARK/0xffffffff lookup DELIVERY_TABLE pref RULE_PRIORITY`.
fn rule(family: u8) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut body = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attr(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    attr(&mut body, FRA_FWMARK, DELIVERY_MARK);
    attr(&mut body, FRA_FWMASK, u32::MAX);
    attr(&mut body, FRA_TABLE, DELIVERY_TABLE);
    message(RTM_NEWRULE, &body)
}

/// `RTM_NEWROUTE`: `local default dev lo table DELIVERY_TABLE`.
fn local_route(family: u8) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![family, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0, 0, 0, 0];
    attr(&mut body, RTA_TABLE, DELIVERY_TABLE);
    attr(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
    message(RTM_NEWROUTE, &body)
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).unwrap_or(u32::MAX);
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    m.extend_from_slice(body);
    m
}

/// The kernel's answer to one request: 0, or a negative errno (`EEXIST` counts as done).
fn ack_errno(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?))
}

/// A route netlink socket in this thread's namespace.
struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn request(&self, msg: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.0.as_raw_fd();
        // SAFETY: send/recv on an owned descriptor with live buffers of the given lengths.
        let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        // SAFETY: as above.
        let got = unsafe { libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        match ack_errno(&reply[..usize::try_from(got).unwrap_or(0)]) {
            Some(0) => Ok(()),
            Some(e) if -e == libc::EEXIST => Ok(()),
            Some(e) => Err(io::Error::from_raw_os_error(-e)),
            None => Err(io::Error::other("netlink: no acknowledgement")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_what_the_kernel_reads() {
        let r = rule(libc::AF_INET as u8);
        assert_eq!(r.len(), 16 + 12 + 4 * 8);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize, r.len(), "length");
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), RTM_NEWRULE);
        assert_eq!(r[16 + 7], FR_ACT_TO_TBL);
        let route = local_route(libc::AF_INET as u8);
        assert_eq!(&route[16..24], &[libc::AF_INET as u8, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL]);
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(-libc::EPERM));
        assert_eq!(ack_errno(&ack[..10]), None);
    }

    /// `ip link set lo up` in this thread's namespace.
    fn loopback_up() -> io::Result<()> {
        // SAFETY: ioctl(SIOCGIFFLAGS/SIOCSIFFLAGS) on a fresh socket with a zeroed ifreq
        // naming "lo"; the socket is closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                req.ifr_name[i] = *b as libc::c_char;
            }
            let rc = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
            } else {
                -1
            };
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc == 0 {
                Ok(())
            } else {
                Err(err)
            }
        }
    }

    /// In a network namespace of its own (root, as the lab): set up twice, then the rule and
    /// the route are what `ip` shows.
    #[test]
    fn sets_up_a_fresh_namespace_and_again_idempotently() {
        let out = std::thread::spawn(|| {
            // SAFETY: unshare(2) for this thread only; it ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            loopback_up()?; // as in every pod
            set_up()?;
            set_up()?;
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept")
        })
        .join()
        .unwrap();
        assert_eq!(out.expect("set up in a new netns (needs root)").trim(), "1");
    }
}
