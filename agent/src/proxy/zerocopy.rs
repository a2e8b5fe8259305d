//! Plaintext relays without copying through user space: `splice(2)` from one socket into
//! a pipe and from the pipe into the other socket moves page references, not bytes.
//!
//! Each direction makes its pipe when its first bytes arrive (an idle connection holds
//! no pipe) and keeps it for the connection's life. End of stream on one side becomes a
//! write shutdown on the other; the first error ends both directions.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::TcpStream,
};

use crate::publish::metrics::Count;

/// At most this much per `splice` call; the pipe is grown to hold it.
const CHUNK: usize = 256 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Bigger than the 64 KiB default: fewer calls per megabyte. A refusal (the
        // per-user pipe limit) leaves the default, which works, only slower.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Self { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets
    // mean "the file position", which sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Move bytes `from` → `to` until `from` ends; then shut `to`'s write side. Counts the
/// bytes into `count` as they arrive at `to`.
async fn pump(from: &TcpStream, to: &TcpStream, count: &impl Count) -> io::Result<()> {
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        let p = match &pipe {
            Some(p) => p,
            None => pipe.insert(Pipe::new()?),
        };
        let n = match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), p.write.as_raw_fd(), CHUNK)) {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(p.read.as_raw_fd(), to.as_raw_fd(), left)) {
                Ok(m) => {
                    left -= m;
                    count.add(m as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// [`pump`] through a user-space buffer, made on the first bytes.
async fn copy(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &impl Count,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        from.as_ref().readable().await?;
        if buf.is_empty() {
            buf.resize(COPY_BUF, 0);
        }
        let n = match from.read(&mut buf).await? {
            0 => return to.shutdown().await,
            n => n,
        };
        to.write_all(&buf[..n]).await?;
        count.add(n as u64);
    }
}

/// How a relay moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mover {
    /// `splice(2)` through pipes: no copy into user space.
    Splice,
    /// `read`/`write` through a buffer: needed when a socket is in the fast-path sockmap,
    /// whose redirected bytes only `read` returns.
    Copy,
}

/// Per-direction buffer of the copying mover.
const COPY_BUF: usize = 64 * 1024;

/// Relay both ways until both directions have ended, or until the first error. Bytes are
/// counted as they move (a → b into `a_to_b`, b → a into `b_to_a`), so the counts hold
/// however the relay ends.
pub async fn relay(
    a: &mut TcpStream,
    b: &mut TcpStream,
    mover: Mover,
    a_to_b: &impl Count,
    b_to_a: &impl Count,
) -> io::Result<()> {
    match mover {
        Mover::Splice => tokio::try_join!(pump(a, b, a_to_b), pump(b, a, b_to_a)).map(|_| ()),
        Mover::Copy => {
            let ((mut ar, mut aw), (mut br, mut bw)) = (a.split(), b.split());
            tokio::try_join!(copy(&mut ar, &mut bw, a_to_b), copy(&mut br, &mut aw, b_to_a)).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{proxy::tests::pair, publish::metrics::ByteCount};

    /// Relay `down` ↔ `up` in a task; it ends with the result and the counts (down → up,
    /// up → down).
    fn spawn_relay(
        mut down: TcpStream,
        mut up: TcpStream,
        mover: Mover,
    ) -> tokio::task::JoinHandle<(io::Result<()>, u64, u64)> {
        tokio::spawn(async move {
            let (to_up, to_down) = (ByteCount::default(), ByteCount::default());
            let r = relay(&mut down, &mut up, mover, &to_up, &to_down).await;
            (r, to_up.get(), to_down.get())
        })
    }

    async fn moves_every_byte_in_order_both_ways_with_half_close(mover: Mover) {
        let (mut app, down) = pair().await;
        let (up, mut server) = pair().await;
        let relayed = spawn_relay(down, up, mover);

        // More than a pipe holds, so the write side waits for the reader at least once.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            app
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "{} bytes arrived, in order: {}", got.len(), got.len() == data.len());
        let mut app = writer.await.unwrap();

        // The other direction still flows after the first one ended.
        server.write_all(b"back").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        let (result, to_up, to_down) = relayed.await.unwrap();
        assert!(result.is_ok());
        assert_eq!((to_up, to_down), (data.len() as u64, 4));
    }

    #[tokio::test]
    async fn splice_moves_every_byte_in_order_both_ways_with_half_close() {
        moves_every_byte_in_order_both_ways_with_half_close(Mover::Splice).await;
    }

    #[tokio::test]
    async fn copy_moves_every_byte_in_order_both_ways_with_half_close() {
        moves_every_byte_in_order_both_ways_with_half_close(Mover::Copy).await;
    }

    /// A reset is an error, not a clean end, and what moved before it stays counted.
    async fn a_reset_ends_the_relay_with_an_error_and_keeps_the_counts(mover: Mover) {
        let (mut app, down) = pair().await;
        let (up, mut server) = pair().await;
        let relayed = spawn_relay(down, up, mover);
        app.write_all(&[1; 7000]).await.unwrap();
        server.read_exact(&mut [0; 7000]).await.unwrap();
        server.write_all(&[2; 40]).await.unwrap();
        app.read_exact(&mut [0; 40]).await.unwrap();
        crate::sys::reset(app);
        let (result, to_up, to_down) = relayed.await.unwrap();
        assert!(result.is_err(), "a reset is an error, not a clean end");
        assert_eq!((to_up, to_down), (7000, 40));
    }

    #[tokio::test]
    async fn a_reset_ends_a_splice_relay_with_an_error_and_keeps_the_counts() {
        a_reset_ends_the_relay_with_an_error_and_keeps_the_counts(Mover::Splice).await;
    }

    #[tokio::test]
    async fn a_reset_ends_a_copy_relay_with_an_error_and_keeps_the_counts() {
        a_reset_ends_the_relay_with_an_error_and_keeps_the_counts(Mover::Copy).await;
    }
}
