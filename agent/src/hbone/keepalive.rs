//! HTTP/2 PINGs on every HBONE connection, both ends, on ztunnel's schedule: the first
//! after [`PING_INTERVAL`], then one each interval after the last answer. A peer that does
//! not answer within [`PING_TIMEOUT`] (gone, its node down, a middlebox that dropped the
//! flow) has its connection dropped, which resets the streams on it, instead of leaving
//! apps hanging until TCP gives up (many minutes); and a pooled connection's PINGs keep
//! NAT and load-balancer flow state alive while it waits for streams.

use std::time::Duration;

pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(2 * PING_INTERVAL.as_secs());

/// Ping until the peer stops answering; returns why. Cancelled (dropped) when the
/// connection ends first. Without a handle (h2 gives it once) it never returns.
pub async fn until_unanswered(ping_pong: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping_pong) = ping_pong else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no answer to a PING within {timeout:?}"),
        }
    }
}

/// Drive an HTTP/2 connection with its PINGs: returns when either ends, with why the
/// PINGs gave up (None: the connection ended by itself).
pub async fn drive<C>(conn: C, ping_pong: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> Option<String>
where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!("HBONE connection ended: {e}");
            }
            None
        }
        why = until_unanswered(ping_pong, interval, timeout) => Some(why),
    }
}
