//! HBONE: each proxied TCP connection is one HTTP/2 `CONNECT` stream over TLS 1.3 mTLS to
//! the destination pod's IP on port 15008 (docs/hbone.md).
//!
//! # Layout
//! * `server.rs` — the listener in each pod: verify the client, check the target is this
//!   pod, connect to the app, answer 200, copy;
//! * `client.rs` — connections pooled per (source identity, destination identity,
//!   destination IP), one stream per proxied connection;
//! * `pump.rs` — the byte pumps between a TCP socket and a stream, half-close carried both
//!   ways;
//! * `readahead.rs` — the connection's socket read in large pieces under rustls;
//! * `batch.rs` — how a connection's task is spawned, so one write carries the frames of
//!   every stream ready in the same turn;
//! * `coalesce.rs` — the connection's TLS stream, whose records wait for the end of the turn;
//! * `headers.rs` — `forwarded`, `baggage`, `traceparent` on a CONNECT, as ztunnel has them;
//! * `keepalive.rs` — HTTP/2 PINGs that drop a connection whose peer stopped answering;
//! * this file — flow-control settings and limits.

mod batch;
pub mod client;
mod coalesce;
mod flood;
pub mod headers;
pub mod keepalive;
mod pump;
mod readahead;
pub mod server;
#[cfg(test)]
mod tests;

pub use pump::{splice, Splice};

/// HTTP/2 settings: windows large enough for bulk throughput (the sender is never idle
/// waiting for WINDOW_UPDATE on a fast link), frames up to 1 MiB.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// TLS records sealed but not yet written that a connection holds before it writes them
/// out (rustls's default is 64 KiB): one `writev` carries this much.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;
/// Streams per connection; more wait (client) or are refused (server).
pub const MAX_STREAMS: u32 = 100;
/// A TLS handshake that has not finished by then is dropped with everything it holds.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A pooled connection that has carried no stream for this long is closed (ztunnel's
/// default `POOL_UNUSED_RELEASE_TIMEOUT`); PINGs keep it alive until then.
pub const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// An inbound HBONE connection with no open stream for this long is closed by the server:
/// longer than the clients' [`POOL_IDLE`], so a client normally closes its idle connection
/// first.
pub const SERVER_IDLE: std::time::Duration = std::time::Duration::from_secs(6 * 60);
/// `SETTINGS_MAX_HEADER_LIST_SIZE` advertised, as ztunnel does: what a peer may send in one
/// header block (a CONNECT's or its answer's).
pub const MAX_HEADER_LIST_CLIENT: u32 = 16 * 1024;
pub const MAX_HEADER_LIST_SERVER: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("tcp: {0}")]
    Io(#[from] std::io::Error),
    #[error("http/2: {0}")]
    H2(#[from] h2::Error),
    #[error("http/2 stream closed by the peer")]
    StreamClosed,
}
