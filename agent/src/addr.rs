//! Conversions between std socket addresses and the kernel ABI's [`SockAddr`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use selvedge_common::SockAddr;

/// The ABI form: IPv6 shape, IPv4 mapped, address words in network byte order.
pub fn to_abi(addr: SocketAddr) -> SockAddr {
    let v6 = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    SockAddr::from_v6_raw([word(0), word(4), word(8), word(12)], addr.port())
}

/// Back to std; IPv4-mapped addresses become IPv4.
pub fn from_abi(a: &SockAddr) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in a.ip.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    canonical(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), a.port))
}

/// An address and a port as records held for a connection's whole life keep them: 20
/// bytes, where a `SocketAddr` takes 32 (it has room for an IPv6 flow label and scope id,
/// which no record needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compact(IpAddr, u16);

impl From<SocketAddr> for Compact {
    fn from(a: SocketAddr) -> Self {
        Self(a.ip(), a.port())
    }
}

impl From<Compact> for SocketAddr {
    fn from(a: Compact) -> Self {
        SocketAddr::new(a.0, a.1)
    }
}

/// `::ffff:a.b.c.d` (as a dual-stack listener reports IPv4 peers) becomes `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A listening address from a flag: `IP:PORT`, `[IPv6]:PORT`, or an IPv6 address without
/// brackets followed by `:PORT` (what a manifest gets from `$(HOST_IP):15020` on an IPv6
/// node: the last colon separates the port).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let bad = || format!("{s:?} is not IP:PORT (e.g. 0.0.0.0:15020, [::]:15020, 2001:db8::1:15020)");
    let (ip, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let ip: Ipv6Addr = ip.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(IpAddr::V6(ip), port.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_from_flags_and_manifests() {
        assert_eq!(parse_listen("198.18.0.1:15020").unwrap(), "198.18.0.1:15020".parse().unwrap());
        assert_eq!(parse_listen("[2001:db8::1]:15021").unwrap(), "[2001:db8::1]:15021".parse().unwrap());
        assert_eq!(parse_listen("2001:db8::1:15021").unwrap(), "[2001:db8::1]:15021".parse().unwrap());
        for bad in ["", "15020", ":15020", "198.18.0.1", "198.18.0.1:x", "host:15020", "2001:db8::1:99999"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trips_v4_and_v6() {
        for s in ["198.18.1.10:8080", "[2001:db8::1]:443", "127.0.0.1:15001", "[::1]:1"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(from_abi(&to_abi(a)), a, "{s}");
        }
    }

    #[test]
    fn matches_the_kernel_v4_encoding() {
        // The programs build v4 addresses from the kernel's network-order u32.
        let kernel = SockAddr::from_v4_raw(u32::from_ne_bytes([198, 18, 1, 10]), 80);
        assert_eq!(to_abi("198.18.1.10:80".parse().unwrap()), kernel);
        assert!(to_abi("127.0.0.1:1".parse().unwrap()).is_loopback());
    }
}
