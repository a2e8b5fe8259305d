//! A bound on the HTTP/2 control frames a peer may send an HBONE server.
//!
//! h2 answers every PING and acknowledges every SETTINGS it reads, one at a time, on the
//! connection's task; a peer that sends them without end keeps that task (and the runtime
//! thread it shares with every other connection) busy: a flood pushed a legitimate
//! connection's round trips to about a second. [`FloodGuard`] reads the decrypted byte
//! stream as h2 will, frame header by frame header, and counts the PING and SETTINGS frames
//! that need an answer; past [`MAX_CONTROL_FRAMES`] in one [`WINDOW`] the read fails with
//! [`FLOOD`], and the connection is closed (and logged as over a limit).

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// PING and SETTINGS frames (not acknowledgements) a peer may send in one [`WINDOW`].
/// A client sends one SETTINGS at the start and the odd PING (keepalive, a window size
/// estimate once per round trip); a flood sends tens of thousands a second.
pub const MAX_CONTROL_FRAMES: u32 = 1000;
/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// What the failed read says (and what the server looks for to log the reason).
pub const FLOOD: &str = "HTTP/2 control-frame flood";

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Counts the peer's control frames as its bytes pass (pure: fed byte slices).
#[derive(Debug)]
pub struct FrameCounter {
    /// Client preface bytes still to pass before the first frame.
    preface: usize,
    header: [u8; HEADER_LEN],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    window_start: Instant,
    in_window: u32,
    max: u32,
}

impl FrameCounter {
    /// For a server's side: the stream starts with the client preface.
    pub fn new(max: u32) -> Self {
        Self {
            preface: PREFACE_LEN,
            header: [0; HEADER_LEN],
            have: 0,
            payload: 0,
            window_start: Instant::now(),
            in_window: 0,
            max,
        }
    }

    /// Take in bytes read at `now`; Err once the peer is over the limit.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), String> {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < HEADER_LEN {
                break;
            }
            self.have = 0;
            let h = self.header;
            self.payload = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if matches!(h[3], SETTINGS | PING) && h[4] & ACK == 0 {
                self.count(now)?;
            }
        }
        Ok(())
    }

    fn count(&mut self, now: Instant) -> Result<(), String> {
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window > self.max {
            return Err(format!("{FLOOD}: more than {} PING/SETTINGS frames in {} s", self.max, WINDOW.as_secs_f32()));
        }
        Ok(())
    }
}

/// A server connection's stream with its peer's control frames counted.
#[derive(Debug)]
pub struct FloodGuard<S> {
    inner: S,
    frames: FrameCounter,
}

impl<S> FloodGuard<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, frames: FrameCounter::new(MAX_CONTROL_FRAMES) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FloodGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.frames.feed(read, Instant::now()).map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FloodGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let len = u32::try_from(payload).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.resize(HEADER_LEN + payload, 0xab);
        f
    }

    #[test]
    fn counts_pings_and_settings_but_not_acks_or_data_across_any_split() {
        let mut stream = vec![b'P'; PREFACE_LEN];
        stream.extend(frame(SETTINGS, 0, 6));
        stream.extend(frame(0x0, 0, 20_000)); // DATA whose payload holds PING-like bytes
        stream.extend(frame(PING, ACK, 8));
        stream.extend(frame(PING, 0, 8));
        stream.extend(frame(SETTINGS, ACK, 0));
        for chunk in [1, 5, 9, 4096, stream.len()] {
            let mut c = FrameCounter::new(2);
            let now = Instant::now();
            for piece in stream.chunks(chunk) {
                c.feed(piece, now).unwrap();
            }
            assert_eq!(c.in_window, 2, "SETTINGS and PING counted, acks and DATA not (chunks of {chunk})");
            assert!(c.feed(&frame(PING, 0, 8), now).unwrap_err().contains(FLOOD), "a third one is over");
        }
    }

    #[test]
    fn the_count_starts_again_each_window() {
        let mut c = FrameCounter::new(1);
        let t0 = Instant::now();
        c.feed(&[0; PREFACE_LEN], t0).unwrap();
        c.feed(&frame(PING, 0, 8), t0).unwrap();
        c.feed(&frame(PING, 0, 8), t0 + WINDOW).unwrap();
        assert!(c.feed(&frame(PING, 0, 8), t0 + WINDOW).is_err());
    }
}
