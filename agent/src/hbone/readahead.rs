//! An HBONE connection's socket, read in large pieces.
//!
//! rustls asks its transport for one TLS record at a time (a read of 4 to 18 KiB), so a
//! bulk transfer cost the receiving agent one `recvfrom` per 14 KiB: 67,000 per GB.
//! [`ReadAhead`] reads up to [`READ_AHEAD`] at once and serves rustls's reads from memory
//! (8,700 `recvfrom` per GB); copying the records out again costs less than the system
//! calls did (figures: `ARCHITECTURE.md`, Performance).
//!
//! The buffer exists only while bytes flow: it is given back each time the socket is found
//! empty, so an idle connection holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::pump::read_draining;

/// The most one read takes from the socket.
pub const READ_AHEAD: usize = 256 * 1024;

/// A TCP stream whose reads are buffered up to [`READ_AHEAD`]; writes go straight through.
#[derive(Debug)]
pub struct ReadAhead {
    io: TcpStream,
    /// Read from the socket, not yet asked for.
    buf: BytesMut,
}

impl ReadAhead {
    pub fn new(io: TcpStream) -> Self {
        Self { io, buf: BytesMut::new() }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.io.poll_read_ready(cx)?.is_pending() {
                // Nothing to read until woken: hold no buffer meanwhile.
                this.buf = BytesMut::new();
                return Poll::Pending;
            }
            // Empty here: reserving reuses the buffer's whole allocation when it has one.
            this.buf.reserve(READ_AHEAD);
            match read_draining(&this.io, &mut this.buf) {
                // End of file: returned with nothing put in `out`.
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => {}
                // Readiness was stale; poll_read_ready registers for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (TcpStream, ReadAhead) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let b = l.accept().await.unwrap().0;
        (a, ReadAhead::new(b))
    }

    /// Megabytes through small reads arrive whole and in order, the end of file after
    /// them; the buffer is gone once the socket is drained; writes pass through.
    #[tokio::test]
    async fn small_reads_see_every_byte_then_the_end_and_no_buffer_is_kept() {
        let (mut far, mut near) = pair().await;
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                far.write_all(&sent).await.unwrap();
                far.shutdown().await.unwrap();
                let mut back = Vec::new();
                far.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = near.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(near.buf.capacity() <= READ_AHEAD, "one read takes at most READ_AHEAD");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == sent, "bytes differ: got {} of {}", got.len(), sent.len());
        near.write_all(b"reply").await.unwrap();
        near.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");

        // Drained and waiting: nothing held.
        let (mut far, mut near) = pair().await;
        far.write_all(b"one").await.unwrap();
        let mut three = [0u8; 3];
        near.read_exact(&mut three).await.unwrap();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), near.read(&mut chunk)).await;
        assert!(waiting.is_err(), "nothing more was sent");
        assert_eq!(near.buf.capacity(), 0, "an idle connection holds no read buffer");
    }
}
