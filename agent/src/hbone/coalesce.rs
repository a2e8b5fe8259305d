//! An HBONE connection's TLS stream as h2 sees it: what h2 writes is sealed into TLS
//! records at once, and written to the socket about once per turn of the connection's task.
//!
//! h2 keeps a DATA frame of 256 bytes or more apart from its write buffer (to write it
//! without a copy) and flushes before it takes the next one, and tokio-rustls writes to the
//! socket on every write. So a turn that sent the responses of nine streams made nine
//! `writev`s of one record each, where the frames of small requests left together: under
//! wrk with 16 kept-alive connections and 1 KiB responses, the destination's agent made
//! one `writev` per request, the source's one per three (ARCHITECTURE.md, "Performance").
//!
//! [`Coalesced`] seals every write into rustls's send buffer without writing it. The first
//! flush in a turn of the connection's task writes the records out, so a lone frame (a
//! ping-pong's, a new connection's) is not delayed. Once h2's connection runs
//! ([`Turns::arm`]), a second flush in the same turn holds them instead and wakes the task,
//! which runs again behind the tasks ready now (other streams, whose frames join them); h2
//! ends every turn with a flush, so the next turn's first one writes them all in one
//! `writev`. Bulk transfers are not held (past [`HOLD_AT_MOST`] a flush writes); a full
//! send buffer ([`super::TLS_SEND_BUFFER`]) is written out at once, as before, and so is
//! every flush during the handshakes.

use std::{
    io::{self, IoSlice, Write},
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::batch::Turns;

/// A TLS stream whose sealed records can be held: tokio-rustls's client or server stream.
pub trait Seal: AsyncRead + AsyncWrite + Unpin {
    /// Seal plaintext into records without writing them; 0 when the send buffer is full.
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Whether sealed records wait to be written.
    fn holds_records(&self) -> bool;
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Seal for tokio_rustls::client::TlsStream<IO> {
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.get_mut().1.writer().write_vectored(bufs)
    }
    fn holds_records(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Seal for tokio_rustls::server::TlsStream<IO> {
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.get_mut().1.writer().write_vectored(bufs)
    }
    fn holds_records(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

/// See the module documentation.
pub struct Coalesced<S> {
    tls: S,
    turns: Turns,
    /// The last turn whose flush wrote: records sealed after it in that turn are held.
    wrote: Option<u64>,
    /// Plaintext sealed since the last write.
    sealed: usize,
}

/// More sealed bytes than this are written at the next flush, held or not: they fill whole
/// segments already, and holding them would only leave the socket idle for a turn.
const HOLD_AT_MOST: usize = 64 * 1024;

impl<S: Seal> Coalesced<S> {
    /// `turns`: those of the task that will drive this stream ([`super::batch::spawn`]).
    pub fn new(tls: S, turns: Turns) -> Self {
        Self { tls, turns, wrote: None, sealed: 0 }
    }

    fn write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.tls).poll_flush(cx))?;
        self.sealed = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: Seal> AsyncRead for Coalesced<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (room, before) = (buf.remaining(), buf.filled().len());
        let read = ready!(Pin::new(&mut this.tls).poll_read(cx, buf));
        // The peer's end of the stream (or an error) can reach h2 before the flush that
        // would write what an earlier flush held, and h2 may then drop the connection
        // without flushing: write it now, as it would have been written without holding.
        // Best effort: what the socket cannot take at once stays sealed.
        if (read.is_err() || (room > 0 && buf.filled().len() == before)) && this.tls.holds_records() {
            let _ = this.write_all(cx);
        }
        Poll::Ready(read)
    }
}

impl<S: Seal> AsyncWrite for Coalesced<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            let n = this.tls.seal(bufs)?;
            if n > 0 {
                this.sealed += n;
                return Poll::Ready(Ok(n));
            }
            // The send buffer is full: write it out to make room.
            ready!(this.write_all(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(now) = this.turns.holding() else { return this.write_all(cx) };
        if !this.tls.holds_records() {
            return Poll::Ready(Ok(()));
        }
        // The first flush of a turn writes at once (with what an earlier turn held): a lone
        // frame, a ping-pong's, is not delayed. Past the bound, write: held or not.
        if this.wrote != Some(now) || this.sealed > HOLD_AT_MOST {
            ready!(this.write_all(cx))?;
            this.wrote = Some(now);
        } else {
            // A later flush this turn: h2 has more frames than it buffers. Hold them and run
            // again behind the tasks ready now, whose frames join them (waking a task that
            // is running, again or not, schedules it once).
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::poll_fn,
        sync::{
            atomic::{AtomicUsize, Ordering::SeqCst},
            Arc,
        },
    };

    use rustls::pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{client, TlsAcceptor, TlsConnector};

    use super::*;
    use crate::{
        hbone::{
            batch,
            tests::{id, manager, shared_ca},
        },
        tls,
    };

    /// A TCP stream that counts the writes that reached the socket.
    struct Counted(TcpStream, Arc<AtomicUsize>);

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.0).poll_write_vectored(cx, bufs);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.1.fetch_add(1, SeqCst);
            }
            r
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A real TLS 1.3 connection on loopback: the client side counted, and a task that
    /// reads everything the server side receives.
    /// The client side wrapped, with the turns it counts by (not armed).
    async fn pair() -> (Coalesced<client::TlsStream<Counted>>, Turns, Arc<AtomicUsize>, tokio::task::JoinHandle<Vec<u8>>)
    {
        pair_served_by(|mut tls| async move {
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            got
        })
        .await
    }

    /// [`pair`], with `serve` run on the server side's stream.
    async fn pair_served_by<F, Fut>(
        serve: F,
    ) -> (Coalesced<client::TlsStream<Counted>>, Turns, Arc<AtomicUsize>, tokio::task::JoinHandle<Vec<u8>>)
    where
        F: FnOnce(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Vec<u8>> + Send,
    {
        let (ca, _) = shared_ca();
        let ids = manager(ca);
        let (src, dst) = (id("shop", "web"), id("shop", "db"));
        ids.acquire(&src).await.unwrap();
        ids.acquire(&dst).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(tls::server_config(&ids, &dst).unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve(acceptor.accept(tcp).await.unwrap()).await
        });
        let writes = Arc::new(AtomicUsize::new(0));
        let tcp = Counted(TcpStream::connect(at).await.unwrap(), writes.clone());
        let cfg = tls::client_config(&ids, &src, &dst, 0).unwrap();
        let mut tls = TlsConnector::from(cfg).connect(ServerName::IpAddress(at.ip().into()), tcp).await.unwrap();
        tls.get_mut().1.set_buffer_limit(Some(crate::hbone::TLS_SEND_BUFFER));
        let turns = Turns::default();
        (Coalesced::new(tls, turns.clone()), turns, writes, server)
    }

    /// Hand `frames` over as h2 does with large DATA frames: each written, then flushed.
    async fn write_and_flush_each<S: Seal>(io: &mut Coalesced<S>, frames: &[Vec<u8>]) {
        poll_fn(|cx| {
            for f in frames {
                let mut at = 0;
                while at < f.len() {
                    match Pin::new(&mut *io).poll_write(cx, &f[at..]) {
                        Poll::Ready(Ok(n)) if n > 0 => at += n,
                        other => panic!("write: {other:?}"),
                    }
                }
                assert!(matches!(Pin::new(&mut *io).poll_flush(cx), Poll::Ready(Ok(()))));
            }
            Poll::Ready(())
        })
        .await
    }

    fn frames(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![b'a' + i as u8; len]).collect()
    }

    /// Frames flushed one by one in a turn: the first leaves at once, the others are held
    /// and leave together in the next turn. The peer gets every byte, in order.
    #[tokio::test]
    async fn frames_flushed_again_in_a_turn_leave_together_in_the_next() {
        let (mut io, turns, writes, server) = pair().await;
        turns.arm();
        let sent = frames(4, 1200);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_frames = sent.clone();
        batch::spawn(turns, async move {
            let before = writes.load(SeqCst);
            write_and_flush_each(&mut io, &task_frames).await;
            let first_turn = writes.load(SeqCst) - before;
            // The held records asked for another turn; h2 ends each turn with a flush.
            tokio::task::yield_now().await;
            poll_fn(|cx| Pin::new(&mut io).poll_flush(cx)).await.unwrap();
            let both_turns = writes.load(SeqCst) - before;
            io.shutdown().await.unwrap();
            tx.send((first_turn, both_turns)).unwrap();
        });
        assert_eq!(rx.await.unwrap(), (1, 2), "writes after the first turn, after the second");
        assert_eq!(server.await.unwrap(), sent.concat());
    }

    /// Records held in a turn leave with a shutdown in the same turn (h2's GOAWAY and
    /// close), and when the peer's end of the stream is read before the next turn's flush
    /// (a peer that half-closes TCP without TLS close_notify, after which h2 may drop the
    /// connection without flushing).
    #[tokio::test]
    async fn held_records_leave_with_a_shutdown_or_at_the_peers_end() {
        let (mut io, turns, _, server) = pair().await;
        turns.arm();
        let sent = frames(3, 1200);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_frames = sent.clone();
        batch::spawn(turns, async move {
            write_and_flush_each(&mut io, &task_frames).await;
            let held = io.tls.holds_records();
            io.shutdown().await.unwrap();
            tx.send(held).unwrap();
        });
        assert!(rx.await.unwrap(), "the second and third frames were held");
        assert_eq!(server.await.unwrap(), sent.concat());

        // The peer half-closes TCP (no close_notify), then reads the three frames.
        let (mut io, turns, _, peer) = pair_served_by(|mut tls| async move {
            tls.get_mut().0.shutdown().await.unwrap();
            let mut got = vec![0u8; 3 * 1200];
            tls.read_exact(&mut got).await.unwrap();
            got
        })
        .await;
        turns.arm();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_frames = sent.clone();
        batch::spawn(turns, async move {
            write_and_flush_each(&mut io, &task_frames).await;
            let held = io.tls.holds_records();
            let mut rest = Vec::new();
            let end = io.read_to_end(&mut rest).await;
            tx.send((held, end.is_err(), io)).ok().unwrap();
        });
        let (held, eof_error, _io) = rx.await.unwrap();
        assert!(held && eof_error, "held: {held}, end of stream without close_notify is an error: {eof_error}");
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), peer).await;
        assert_eq!(got.expect("the held frames never reached the peer").unwrap(), sent.concat());
    }

    /// Before h2's handshake is done, and outside the connection's task, every flush
    /// writes.
    #[tokio::test]
    async fn flushes_before_arming_or_outside_a_turn_write_at_once() {
        let (mut io, turns, writes, server) = pair().await;
        let sent = frames(6, 1200);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_frames = sent[..3].to_vec();
        batch::spawn(turns.clone(), async move {
            let before = writes.load(SeqCst);
            write_and_flush_each(&mut io, &task_frames).await;
            tx.send((writes.load(SeqCst) - before, io, writes)).ok().unwrap();
        });
        let (unarmed, mut io, writes) = rx.await.unwrap();
        assert_eq!(unarmed, 3);
        turns.arm();
        let before = writes.load(SeqCst);
        write_and_flush_each(&mut io, &sent[3..]).await;
        assert_eq!(writes.load(SeqCst) - before, 3);
        io.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), sent.concat());
    }

    /// Past [`HOLD_AT_MOST`] sealed bytes, a second flush in the turn writes: bulk
    /// transfers are not held.
    #[tokio::test]
    async fn bulk_is_not_held() {
        let (mut io, turns, _, server) = pair().await;
        turns.arm();
        let sent = frames(3, HOLD_AT_MOST / 2 + 1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_frames = sent.clone();
        batch::spawn(turns, async move {
            write_and_flush_each(&mut io, &task_frames[..2]).await;
            let small_held = io.tls.holds_records();
            write_and_flush_each(&mut io, &task_frames[2..]).await;
            let bulk_held = io.tls.holds_records();
            io.shutdown().await.unwrap();
            tx.send((small_held, bulk_held)).unwrap();
        });
        assert_eq!(rx.await.unwrap(), (true, false), "held after 2 frames (under the bound), after 3 (over it)");
        assert_eq!(server.await.unwrap(), sent.concat());
    }
}
