//! HBONE: each proxied TCP connection is one HTTP/2 `CONNECT` stream over TLS 1.3 mTLS to
//! the destination pod's IP on port 15008 (../shared/docs/hbone.md).
//!
//! # Layout
//! * `server.rs` — the listener in each pod: verify the client, check the target is this
//!   pod, connect to the app, answer 200, copy;
//! * `client.rs` — connections pooled per (source identity, destination identity,
//!   destination IP), one stream per proxied connection;
//! * this file — flow-control settings and the byte pumps between a TCP socket and a
//!   stream, half-close carried both ways.

pub mod client;
pub mod server;
#[cfg(test)]
mod tests;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::tcp::OwnedReadHalf,
};

/// HTTP/2 settings: windows large enough for bulk throughput (the sender is never idle
/// waiting for WINDOW_UPDATE on a fast link), frames up to 1 MiB.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per connection; more wait (client) or are refused (server).
pub const MAX_STREAMS: u32 = 100;
/// A TLS handshake that has not finished by then is dropped with everything it holds.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A pooled connection that has carried no stream for this long is closed.
pub const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Copy buffers start small (idle connections cost little) and double while reads fill
/// them, up to this size (bulk transfers move big chunks).
const BUF_START: usize = 16 * 1024;
const BUF_MAX: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("tcp: {0}")]
    Io(#[from] std::io::Error),
    #[error("http/2: {0}")]
    H2(#[from] h2::Error),
    #[error("http/2 stream closed by the peer")]
    StreamClosed,
}

/// Bytes from a socket into a stream, respecting the peer's flow-control window; EOF
/// becomes END_STREAM (a half-close). Returns the bytes sent.
///
/// No buffer is held while the socket is idle: one is allocated once the socket is
/// readable, filled, and handed to h2 whole (h2 frees it once written), so an idle
/// tunnelled connection costs no copy buffer at all.
pub async fn socket_to_stream(from: OwnedReadHalf, to: &mut SendStream<Bytes>) -> Result<u64, PumpError> {
    let mut size = BUF_START;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            to.send_data(Bytes::new(), true)?;
            return Ok(total);
        }
        total += n as u64;
        if n >= size && size < BUF_MAX {
            size *= 2;
        }
        let mut data = buf.freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| to.poll_capacity(cx)).await.ok_or(PumpError::StreamClosed)??;
            let chunk = data.split_to(granted.min(data.len()));
            to.send_data(chunk, false)?;
        }
    }
}

/// Bytes from a stream into a socket; END_STREAM shuts the socket's write side. Capacity
/// is released as bytes are written, so the window only moves as fast as the socket.
pub async fn stream_to_socket<W: AsyncWrite + Unpin>(from: &mut RecvStream, mut to: W) -> Result<u64, PumpError> {
    let mut total = 0u64;
    while let Some(chunk) = from.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        to.write_all(&chunk).await?;
        total += n as u64;
        from.flow_control().release_capacity(n)?;
    }
    to.shutdown().await?;
    Ok(total)
}

/// Run both pumps for one tunnelled connection; returns (bytes socket->stream,
/// bytes stream->socket) or the first error (which ends the whole connection).
pub async fn splice(
    socket: tokio::net::TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> Result<(u64, u64), PumpError> {
    let (r, w) = socket.into_split();
    let up = socket_to_stream(r, &mut send);
    let down = stream_to_socket(&mut recv, w);
    // The first error ends both directions (the other pump may be parked on a read).
    let result = tokio::try_join!(up, down);
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    result
}
