//! A small real application for the lab: TCP servers and clients that report what they
//! saw as one JSON line, so tests assert on bytes and addresses, not on logs.
//!
//! * `echo PORT`    — echo every byte back; on the client's EOF, finish and shut down.
//! * `whoami PORT`  — send `{"peer":..,"local":..,"peer_in_pod":..}` as seen by the server,
//!   then close; `peer_in_pod`: the client's end is a socket in the server's own netns
//!   (the agent delivering inside the pod), not a connection from outside.
//! * `send ADDR N`  — connect, write N deterministic bytes while reading the echo
//!   concurrently, half-close, read to EOF; print sizes, hashes and socket addresses.
//!   A blocking client: one thread writes, one reads.
//! * `send-poll ADDR N` — the same as an event loop (non-blocking socket + poll(2)), the
//!   way Go, tokio, nginx or Java NIO programs do I/O.
//! * `send-split ADDR N MS` — like `send-poll`, but writes the first half, pauses MS
//!   milliseconds, then writes the rest.
//! * `sink PORT FILE` — read each connection to its end; append one JSON line per
//!   connection to FILE: bytes read and how it ended (`eof`, or the read error).
//! * `source PORT`  — write to each connection until it fails.
//! * `stream ADDR SECONDS` — write for SECONDS (unless it fails first), half-close, read to
//!   the end; print bytes both ways and how each direction ended.
//! * `drain ADDR`   — read until the end; print the bytes and how it ended.
//! * `ask ADDR`     — connect to a whoami server; print its view and ours.
//! * `bind PORT`    — try to bind 0.0.0.0:PORT; print whether it worked.
//! * `pingpong ADDR SIZE N` — one kept-alive connection to an echo server, N round trips of
//!   SIZE bytes; prints each round trip's microseconds (latency benchmark).
//! * `connrate ADDR MILLIS` — new connections back to back for MILLIS (connect, 1 byte each
//!   way, close); prints the count and each time to first byte (microseconds).
//! * `hold ADDR N SECONDS` — open N connections, keep them idle SECONDS, close (a connect
//!   reset at once is counted as `reset_at_connect`, not fatal).
//! * `refusal-time ADDR N` — N connects to a destination that refuses; for each, the time
//!   until the app learns it (connect() fails, or the first read is reset): microseconds.
//! * `respond PORT` — for each connection: read an 8-byte big-endian count DOWN, write DOWN
//!   bytes, half-close, then read the client's remaining bytes to their end.
//! * `exchange ADDR UP DOWN` — the client of `respond`: send exactly UP bytes (the 8-byte
//!   count DOWN first, so UP ≥ 8), half-close, read to the end while writing; print the
//!   bytes sent and received and any errors. An asymmetric exchange: request and response
//!   sizes differ, so their directions can be told apart.
//! * `http ADDR METHOD PATH` — one plain HTTP/1.1 request; prints the status and body.
//! * `seccomp-exec PROFILE [--log] -- CMD ARGS…` — install the seccomp profile PROFILE (the
//!   JSON a Kubernetes `Localhost` profile is), then execute CMD: what a container runtime
//!   does last before the container's process starts. `--log` turns the default action into
//!   `SCMP_ACT_LOG` (what would be refused shows in the kernel log instead).
//! * `hbone-probe HBONE_ADDR CA_DIR SPIFFE_ID CERT METHOD TARGET` — an HBONE client
//!   presenting CERT (good, expired, two-sans, no-san, other-td, unknown-root) as SPIFFE_ID;
//!   prints the HTTP status or the error.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use serde_json::json;
use sha2::{Digest, Sha256};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    match arg(0) {
        "echo" => serve(port(arg(1)), echo),
        "whoami" => serve(port(arg(1)), whoami),
        "send" => send(addr(arg(1)), arg(2).parse().unwrap_or_else(|_| usage())),
        "send-poll" => send_poll(addr(arg(1)), arg(2).parse().unwrap_or_else(|_| usage()), None),
        "send-split" => {
            let n: usize = arg(2).parse().unwrap_or_else(|_| usage());
            let ms: u64 = arg(3).parse().unwrap_or_else(|_| usage());
            send_poll(addr(arg(1)), n, Some((n / 2, Duration::from_millis(ms))))
        }
        "ask" => ask(addr(arg(1))),
        "sink" => sink(port(arg(1)), arg(2)),
        "source" => serve(port(arg(1)), source),
        "stream" => stream(addr(arg(1)), num(arg(2)) as u64),
        "drain" => drain(addr(arg(1))),
        "bind" => bind(port(arg(1))),
        "hbone-probe" => hbone_probe(&args[1..]),
        "seccomp-exec" => seccomp_exec(&args[1..]),
        "http" => http(addr(arg(1)), arg(2), arg(3)),
        "respond" => serve(port(arg(1)), respond),
        "exchange" => exchange(addr(arg(1)), num(arg(2)), num(arg(3))),
        "refusal-time" => refusal_time(addr(arg(1)), arg(2).parse().unwrap_or_else(|_| usage())),
        "pingpong" => pingpong(addr(arg(1)), num(arg(2)), num(arg(3))),
        "connrate" => connrate(addr(arg(1)), num(arg(2))),
        "hold" => hold(addr(arg(1)), num(arg(2)), num(arg(3))),
        "reset-after" => reset_after(addr(arg(1)), num(arg(2)), num(arg(3))),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: selvedge-lab-app echo PORT | whoami PORT | send ADDR BYTES | ask ADDR | bind PORT");
    std::process::exit(2)
}

fn port(s: &str) -> u16 {
    s.parse().unwrap_or_else(|_| usage())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| usage())
}

fn serve(port: u16, handler: fn(TcpStream)) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&format!("bind {port}: {e}")));
    // Tell the harness we are listening.
    println!("{}", json!({"listening": port}));
    let _ = std::io::stdout().flush();
    for s in l.incoming().flatten() {
        std::thread::spawn(move || handler(s));
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn whoami(mut s: TcpStream) {
    let (peer, local) = (s.peer_addr().ok(), s.local_addr().ok());
    let in_pod = peer.zip(local).is_some_and(|(p, l)| socket_here(p, l));
    let line = json!({"peer": peer, "local": local, "peer_in_pod": in_pod}).to_string() + "\n";
    let _ = s.write_all(line.as_bytes());
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.read(&mut [0u8; 1]);
}

/// Where this socket is really connected, as the kernel's table has it (`getpeername` and
/// `getsockname` answers can be rewritten by the mesh's hooks; /proc/net/tcp is not): the
/// lab's proof that a connect was captured (to the agent's 127.0.0.1:15001) or not.
fn wire_peer(s: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat on a live descriptor into a zeroed stat.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(s.as_raw_fd(), &mut st) == 0).then_some(st.st_ino)?
    };
    tcp_table().into_iter().find(|(_, _, i)| *i == inode).map(|(_, remote, _)| remote)
}

/// Every TCP socket of this network namespace: (local, remote, inode), IPv4-mapped
/// addresses as IPv4.
fn tcp_table() -> Vec<(SocketAddr, SocketAddr, u64)> {
    let parse = |field: &str| -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let ip: std::net::IpAddr = match ip.len() {
            8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes()).into(),
            32 => {
                let mut bytes = [0u8; 16];
                for (i, word) in bytes.chunks_mut(4).enumerate() {
                    word.copy_from_slice(&u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?.to_ne_bytes());
                }
                std::net::Ipv6Addr::from(bytes).to_canonical()
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    };
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"].iter().filter_map(|f| std::fs::read_to_string(f).ok()) {
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(l), Some(r), Some(inode)) = (
                f.get(1).and_then(|x| parse(x)),
                f.get(2).and_then(|x| parse(x)),
                f.get(9).and_then(|x| x.parse().ok()),
            ) {
                out.push((l, r, inode));
            }
        }
    }
    out
}

/// Is there a TCP socket in this network namespace bound to `local` and connected to
/// `remote` (the other end of one of ours)? Read from /proc/net/tcp{,6}, which show this
/// process's namespace. How the lab tells a connection the agent made inside the pod
/// (from the client's address, or 127.0.0.6) from one that came in from outside.
fn socket_here(local: SocketAddr, remote: SocketAddr) -> bool {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (local, remote) = (canon(local), canon(remote));
    tcp_table().iter().any(|(l, r, _)| *l == local && *r == remote)
}

fn fail(msg: &str) -> ! {
    println!("{}", json!({"error": msg}));
    std::process::exit(1)
}

/// Read `s` to its end: (bytes, "eof" or the error).
fn read_all(s: &mut TcpStream) -> (u64, String) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, "eof".into()),
            Ok(n) => total += n as u64,
            Err(e) => return (total, format!("{:?}: {e}", e.kind())),
        }
    }
}

fn sink(port: u16, file: &str) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| fail(&format!("bind {port}: {e}")));
    println!("{}", json!({"listening": port}));
    let _ = std::io::stdout().flush();
    for mut s in l.incoming().flatten() {
        let file = file.to_owned();
        std::thread::spawn(move || {
            let (bytes, end) = read_all(&mut s);
            let line = json!({"received": bytes, "end": end}).to_string() + "\n";
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&file).expect("report file");
            let _ = f.write_all(line.as_bytes());
        });
    }
}

fn source(mut s: TcpStream) {
    let chunk = vec![5u8; 64 * 1024];
    while s.write_all(&chunk).is_ok() {}
}

fn stream(to: SocketAddr, seconds: u64) {
    let mut s = connect(to);
    let chunk = vec![3u8; 64 * 1024];
    let until = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut write_error = None;
    while std::time::Instant::now() < until {
        match s.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) => {
                write_error = Some(format!("{:?}: {e}", e.kind()));
                break;
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let (received, end) = read_all(&mut s);
    println!("{}", json!({"sent": sent, "write_error": write_error, "received": received, "end": end}));
}

fn drain(to: SocketAddr) {
    let mut s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let (received, end) = read_all(&mut s);
    println!("{}", json!({"received": received, "end": end}));
}

fn connect(to: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).unwrap_or_else(|e| fail(&format!("connect {to}: {e}")))
}

use selvedge_tests::app::payload;

fn send(to: SocketAddr, n: usize) {
    let s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let (local, peer, wire) = (s.local_addr().ok(), s.peer_addr().ok(), wire_peer(&s));
    let data = payload(n);
    let sent_sha = hex(&Sha256::digest(&data));
    let mut w = s.try_clone().unwrap_or_else(|e| fail(&format!("clone: {e}")));
    // Write and read at once: both directions carry data simultaneously.
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
        r.map_err(|e| e.to_string())
    });
    let mut got = Vec::with_capacity(n);
    let mut r = s;
    let read = r.read_to_end(&mut got).map_err(|e| e.to_string());
    let wrote = writer.join().unwrap_or_else(|_| Err("writer panicked".into()));
    println!(
        "{}",
        json!({
            "local": local, "peer": peer, "wire_peer": wire, "sent": n, "received": got.len(),
            "sent_sha256": sent_sha, "received_sha256": hex(&Sha256::digest(&got)),
            "write_error": wrote.err(), "read_error": read.err(),
        })
    );
}

/// `pause`: after writing this many bytes, sleep this long before writing the rest.
fn send_poll(to: SocketAddr, n: usize, mut pause: Option<(usize, Duration)>) {
    use std::os::fd::AsRawFd;
    let data = payload(n);
    let mut s = connect(to);
    let mut off = 0usize;
    if let Some((at, _)) = pause {
        // Write the first part the moment connect() returns (a small, blocking write).
        match s.write(&data[..at]) {
            Ok(w) => off = w,
            Err(e) => fail(&format!("first write: {e}")),
        }
    }
    let (local, peer, wire) = (s.local_addr().ok(), s.peer_addr().ok(), wire_peer(&s));
    s.set_nonblocking(true).unwrap_or_else(|e| fail(&format!("nonblocking: {e}")));
    let (mut got, mut shut) = (Vec::with_capacity(n), false);
    let (mut write_error, mut read_error) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !shut && off == data.len() {
            let _ = s.shutdown(Shutdown::Write);
            shut = true;
        }
        if let Some((at, wait)) = pause {
            if off >= at {
                std::thread::sleep(wait);
                pause = None;
            }
        }
        let events = libc::POLLIN | if shut { 0 } else { libc::POLLOUT };
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if std::time::Instant::now() > deadline {
            read_error = Some("timed out".to_string());
            break;
        }
        if rc <= 0 {
            continue;
        }
        if !shut && pfd.revents & (libc::POLLOUT | libc::POLLERR) != 0 {
            let end = match pause {
                Some((at, _)) => at.max(off),
                None => data.len(),
            };
            match s.write(&data[off..end]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    write_error = Some(e.to_string());
                    break;
                }
            }
        }
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(r) => got.extend_from_slice(&buf[..r]),
                // Spurious readiness is normal for an event loop: poll again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    read_error = Some(e.to_string());
                    break;
                }
            }
        }
    }
    println!(
        "{}",
        json!({
            "local": local, "peer": peer, "wire_peer": wire, "sent": off, "received": got.len(),
            "sent_sha256": hex(&Sha256::digest(&data)), "received_sha256": hex(&Sha256::digest(&got)),
            "write_error": write_error, "read_error": read_error,
        })
    );
}

fn ask(to: SocketAddr) {
    let mut s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let (local, peer, wire) = (s.local_addr().ok(), s.peer_addr().ok(), wire_peer(&s));
    let mut text = String::new();
    let read = s.read_to_string(&mut text);
    let server: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null);
    println!(
        "{}",
        json!({"local": local, "peer": peer, "wire_peer": wire, "server": server, "read_error": read.err().map(|e| e.to_string())})
    );
}

fn bind(port: u16) {
    match TcpListener::bind(("0.0.0.0", port)) {
        Ok(_) => println!("{}", json!({"bound": port})),
        Err(e) => println!("{}", json!({"error": e.to_string(), "errno": e.raw_os_error()})),
    }
}

fn hbone_probe(a: &[String]) {
    let [hbone, ca, id, cert, method, target] = a else { usage() };
    let who: selvedge::identity::SpiffeId = id.parse().unwrap_or_else(|_| usage());
    let cert = selvedge_tests::probe::Cert::parse(cert).unwrap_or_else(|| usage());
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| fail(&e.to_string()));
    let out =
        rt.block_on(selvedge_tests::probe::probe(addr(hbone), std::path::Path::new(ca), &who, cert, method, target));
    match out {
        Ok(status) => println!("{}", json!({"status": status})),
        Err(e) => println!("{}", json!({"error": e})),
    }
}

fn num(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| usage())
}

fn pingpong(to: SocketAddr, size: usize, n: usize) {
    let mut s = connect(to);
    let _ = s.set_nodelay(true);
    let msg = payload(size.max(1));
    let mut back = vec![0u8; msg.len()];
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        if s.write_all(&msg).and_then(|()| s.read_exact(&mut back)).is_err() {
            fail("echo broke");
        }
        micros.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    println!("{}", json!({"micros": micros}));
}

fn connrate(to: SocketAddr, millis: usize) {
    let deadline = std::time::Instant::now() + Duration::from_millis(millis as u64);
    let (mut count, mut ttfb) = (0u64, Vec::new());
    while std::time::Instant::now() < deadline {
        let t0 = std::time::Instant::now();
        let Ok(mut s) = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) else { continue };
        let _ = s.set_nodelay(true);
        let mut b = [0u8; 1];
        if s.write_all(b"x").and_then(|()| s.read_exact(&mut b)).is_ok() {
            ttfb.push(t0.elapsed().as_micros() as u64);
            count += 1;
        }
    }
    println!("{}", json!({"connections": count, "millis": millis, "ttfb_micros": ttfb}));
}

fn hold(to: SocketAddr, n: usize, seconds: usize) {
    let mut held = Vec::with_capacity(n);
    let mut reset = 0;
    for i in 0..n {
        match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
            Ok(s) => held.push(s),
            // Refused at once by the agent (over a limit): its reset can beat the end of the
            // app's own connect() under load. Counted, not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
            Err(e) => fail(&format!("connection {i}: {e}")),
        }
    }
    println!("{}", json!({"open": held.len(), "reset_at_connect": reset}));
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(seconds as u64));
}

/// Through an echo server: send `n` bytes, read them back, say so, keep the connection
/// open for `ms` milliseconds, then reset it (SO_LINGER 0) instead of closing it.
fn reset_after(to: SocketAddr, n: usize, ms: usize) {
    let mut s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let data = payload(n);
    let mut got = vec![0u8; n];
    if let Err(e) = s.write_all(&data).and_then(|()| s.read_exact(&mut got)) {
        fail(&format!("echo: {e}"));
    }
    println!("{}", json!({"echoed": n, "exact": got == data}));
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_millis(ms as u64));
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads `linger` (of the size given) on a socket we own.
    unsafe {
        use std::os::fd::AsRawFd;
        let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const linger).cast(), len);
    }
}

fn refusal_time(to: SocketAddr, n: usize) {
    let mut times = Vec::with_capacity(n);
    let mut how = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
            Err(_) => how.push("connect"),
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut [0u8; 1]);
                how.push("read");
            }
        }
        times.push(t0.elapsed().as_micros() as u64);
    }
    println!("{}", json!({"micros": times, "refused_at": how}));
}

fn http(to: SocketAddr, method: &str, path: &str) {
    let mut s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        fail(&format!("write: {e}"));
    }
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    println!("{}", json!({"status": status, "body": body}));
}

fn respond(mut s: TcpStream) {
    let mut head = [0u8; 8];
    if s.read_exact(&mut head).is_err() {
        return;
    }
    let down = u64::from_be_bytes(head);
    let chunk = vec![7u8; 64 * 1024];
    let mut left = down;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if s.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = read_all(&mut s);
}

fn exchange(to: SocketAddr, up: usize, down: usize) {
    if up < 8 {
        usage();
    }
    let s = connect(to);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut data = payload(up);
    data[..8].copy_from_slice(&(down as u64).to_be_bytes());
    let mut w = s.try_clone().unwrap_or_else(|e| fail(&format!("clone: {e}")));
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
        r.map_err(|e| e.to_string())
    });
    let mut r = s;
    let (received, end) = read_all(&mut r);
    let wrote = writer.join().unwrap_or_else(|_| Err("writer panicked".into()));
    let sent = if wrote.is_ok() { up } else { 0 };
    println!("{}", json!({"sent": sent, "received": received, "end": end, "write_error": wrote.err()}));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn seccomp_exec(args: &[String]) -> ! {
    use std::os::unix::process::CommandExt;
    let (profile, rest) = args.split_first().unwrap_or_else(|| usage());
    let (log, rest) = match rest.split_first() {
        Some((flag, rest)) if flag == "--log" => (true, rest),
        _ => (false, rest),
    };
    let Some(("--", [cmd, cmd_args @ ..])) = rest.split_first().map(|(d, r)| (d.as_str(), r)) else { usage() };
    let text = std::fs::read_to_string(profile).unwrap_or_else(|e| panic!("read {profile}: {e}"));
    let filter = selvedge_tests::seccomp::Filter::compile(&text, log.then_some("SCMP_ACT_LOG"))
        .unwrap_or_else(|e| panic!("{profile}: {e}"));
    filter.install().unwrap_or_else(|e| panic!("install the seccomp filter: {e}"));
    let e = std::process::Command::new(cmd).args(cmd_args).exec();
    eprintln!("execute {cmd}: {e}");
    std::process::exit(127)
}
