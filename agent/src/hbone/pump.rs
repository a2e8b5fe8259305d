//! The byte pumps between a TCP socket and an HTTP/2 stream, both directions in one
//! hand-written future.
//!
//! Written by hand rather than as two `async fn`s joined because an idle tunnel is mostly
//! this state, held for the connection's whole life: the joined `async` version took 544 B
//! (each await point's future, each argument kept beside what it was moved into, and a
//! shared handle to split the socket); this one holds the three handles, one buffer
//! reference per direction and two counters.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::PumpError;
use crate::publish::metrics::ByteCount;

/// Read buffers start small (an idle connection costs little) and double while reads fill
/// them, up to this size (bulk transfers move big chunks).
const BUF_START: usize = 16 * 1024;
const BUF_MAX: usize = 1024 * 1024;

/// Carry bytes both ways between `socket` and one stream until both directions have ended,
/// or until the first error, which ends both (the stream is reset, and so is the socket
/// when it is dropped: it was armed with `sys::arm_reset`; a clean end disarms it). Bytes are counted into
/// `up` (socket → stream) and `down` (stream → socket) as they move, so the counts hold
/// whatever way the splice ends, even when it is dropped.
///
/// Socket → stream: a buffer is allocated only once the socket is readable, filled, and
/// handed to h2 whole (h2 frees it once written), within the peer's flow-control window;
/// end of file becomes END_STREAM (a half-close). Stream → socket: capacity is released as
/// bytes are written, so the window only moves as fast as the socket; END_STREAM shuts the
/// socket's write side.
pub fn splice<'c>(
    socket: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: &'c ByteCount,
    down: &'c ByteCount,
) -> Splice<'c> {
    Splice {
        socket,
        send,
        recv,
        read_size: BUF_START,
        up: Bytes::new(),
        down: Bytes::new(),
        sent: up,
        received: down,
        up_done: false,
        down_done: false,
    }
}

/// Read what `socket` holds into `buf`'s spare room. A read that returns less than that
/// room has emptied the socket, so the socket's readiness is cleared as a WouldBlock would
/// clear it: the next poll waits for new bytes instead of spending a `recvfrom` to learn
/// there are none (one per message each way; tokio clears the readiness only if no new
/// event came in since it was read, so bytes arriving meanwhile are never missed).
pub(super) fn read_draining(socket: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    let read = socket.try_io(tokio::io::Interest::READABLE, || {
        got = socket.try_read_buf(buf)?;
        if got > 0 && got < room {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match read {
        Ok(()) => Ok(got),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        Err(e) => Err(e),
    }
}

/// See [`splice`].
#[derive(Debug)]
pub struct Splice<'c> {
    socket: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Size of the next read buffer.
    read_size: usize,
    /// Read from the socket, not yet given to the stream.
    up: Bytes,
    /// From the stream, not yet written to the socket.
    down: Bytes,
    sent: &'c ByteCount,
    received: &'c ByteCount,
    up_done: bool,
    down_done: bool,
}

impl Splice<'_> {
    /// Socket → stream, as far as it can go now; Ok when done or waiting (woken later).
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Result<(), PumpError> {
        while !self.up_done {
            if !self.up.is_empty() {
                self.send.reserve_capacity(self.up.len());
                let Poll::Ready(granted) = self.send.poll_capacity(cx) else { return Ok(()) };
                let granted = granted.ok_or(PumpError::StreamClosed)??;
                let chunk = self.up.split_to(granted.min(self.up.len()));
                self.send.send_data(chunk, false)?;
                continue;
            }
            if self.socket.poll_read_ready(cx)?.is_pending() {
                return Ok(());
            }
            let mut buf = BytesMut::with_capacity(self.read_size);
            match read_draining(&self.socket, &mut buf) {
                Ok(0) => {
                    self.send.send_data(Bytes::new(), true)?;
                    self.up_done = true;
                }
                Ok(n) => {
                    self.sent.add(n as u64);
                    if n >= self.read_size && self.read_size < BUF_MAX {
                        self.read_size *= 2;
                    }
                    self.up = buf.freeze();
                }
                // Readiness was stale; the next poll_read_ready registers for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Stream → socket, as far as it can go now; Ok when done or waiting (woken later).
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Result<(), PumpError> {
        while !self.down_done {
            if !self.down.is_empty() {
                if self.socket.poll_write_ready(cx)?.is_pending() {
                    return Ok(());
                }
                match self.socket.try_write(&self.down) {
                    Ok(n) => {
                        self.down.advance(n);
                        self.received.add(n as u64);
                        self.recv.flow_control().release_capacity(n)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            let Poll::Ready(next) = self.recv.poll_data(cx) else { return Ok(()) };
            match next {
                Some(chunk) => self.down = chunk?,
                None => {
                    socket2::SockRef::from(&self.socket).shutdown(std::net::Shutdown::Write)?;
                    self.down_done = true;
                }
            }
        }
        Ok(())
    }
}

impl Future for Splice<'_> {
    type Output = Result<(), PumpError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Both directions are polled every time, so each has its wakeup registered.
        let result = this.poll_up(cx).and_then(|()| this.poll_down(cx));
        if let Err(e) = result {
            this.send.send_reset(h2::Reason::CANCEL);
            return Poll::Ready(Err(e));
        }
        if this.up_done && this.down_done {
            // A clean end: the app's socket closes with FIN after what is still queued (it
            // was armed to reset, see `sys::arm_reset`, for every other end).
            crate::sys::disarm_reset(&this.socket);
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::hbone::tests::read_stream;

    /// One end of the tunnel: the app's socket, the pump (running), and the far end of the
    /// pump's stream (its send and receive halves).
    struct Ends {
        app: TcpStream,
        pump: Pumped,
        far_send: SendStream<Bytes>,
        far_recv: RecvStream,
    }

    /// How the pump ended, and what it counted (socket → stream, stream → socket).
    type Pumped = tokio::task::JoinHandle<(Result<(), PumpError>, u64, u64)>;

    async fn ends() -> Ends {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let agent = l.accept().await.unwrap().0;
        let (c, s) = tokio::io::duplex(1 << 20);
        let far = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            (send, req.into_body())
        });
        let (sender, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder().method("CONNECT").uri("127.0.0.1:1").body(()).unwrap();
        let (response, send) = sender.ready().await.unwrap().send_request(req, false).unwrap();
        let (far_send, far_recv) = far.await.unwrap();
        let recv = response.await.unwrap().into_body();
        let pump = tokio::spawn(async move {
            let (up, down) = (ByteCount::default(), ByteCount::default());
            let r = splice(agent, send, recv, &up, &down).await;
            (r, up.get(), down.get())
        });
        Ends { app, pump, far_send, far_recv }
    }

    /// Megabytes both ways; `app_first`: which side half-closes first. The other direction
    /// keeps flowing after it, and each end sees the other's end only after its bytes.
    async fn both_ways(app_first: bool) {
        let Ends { app, pump: pumped, mut far_send, mut far_recv } = ends().await;
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (mut r, mut w) = app.into_split();
        let limit = std::time::Duration::from_secs(10);
        let app_to_far = async {
            let writer = {
                let up = up.clone();
                tokio::spawn(async move {
                    w.write_all(&up).await.unwrap();
                    w.shutdown().await.unwrap();
                    w
                })
            };
            let seen = tokio::time::timeout(limit, read_stream(&mut far_recv)).await;
            assert!(seen.expect("END_STREAM").unwrap() == up, "every byte, in order, then END_STREAM");
            writer.await.unwrap()
        };
        let far_to_app = async {
            far_send.send_data(Bytes::from(down.clone()), true).unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(limit, r.read_to_end(&mut got)).await.expect("end of file").unwrap();
            assert!(got == down, "every byte, in order, then the socket's end of file");
        };
        if app_first {
            let _w = app_to_far.await;
            far_to_app.await;
        } else {
            far_to_app.await;
            let _w = app_to_far.await;
        }
        let (result, up, down) = pumped.await.unwrap();
        assert!(result.is_ok());
        assert_eq!((up, down), (3_000_000, 1_000_000));
    }

    #[tokio::test]
    async fn carries_megabytes_both_ways_when_the_app_half_closes_first() {
        both_ways(true).await;
    }

    #[tokio::test]
    async fn carries_megabytes_both_ways_when_the_far_end_half_closes_first() {
        both_ways(false).await;
    }

    #[tokio::test]
    async fn a_reset_app_ends_the_pump_with_an_error_and_resets_the_stream() {
        let Ends { mut app, pump: pumped, mut far_send, mut far_recv } = ends().await;
        // Bytes both ways first: what moved before the reset stays counted.
        app.write_all(&[7; 5000]).await.unwrap();
        far_send.send_data(Bytes::from_static(&[9; 300]), false).unwrap();
        let mut got = [0; 300];
        app.read_exact(&mut got).await.unwrap();
        let mut seen = 0;
        while seen < 5000 {
            let chunk = far_recv.data().await.unwrap().unwrap();
            far_recv.flow_control().release_capacity(chunk.len()).unwrap();
            seen += chunk.len();
        }
        socket2::SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(app);
        let (result, up, down) = pumped.await.unwrap();
        assert!(result.is_err(), "a reset is not a clean end");
        assert_eq!((up, down), (5000, 300), "the bytes moved before the reset are counted");
        assert!(read_stream(&mut far_recv).await.is_err(), "the far end sees the stream reset, not END_STREAM");
    }
}
