//! The one accept loop step every listener of the agent uses (in-pod proxies, HBONE, the
//! admin endpoints, the CNI socket).

use std::{future::Future, io, time::Duration};

/// How long to wait after a failed accept before the next.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// The next accepted connection. A failed accept (most often: out of file descriptors) is
/// logged with `what` and retried after [`BACKOFF`]: never spun on, never fatal, so the
/// listener serves again as soon as descriptors free up.
pub async fn next<S, A, F, Fut>(what: &str, mut accept: F) -> (S, A)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(S, A)>>,
{
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_failed_accept_is_retried_until_one_succeeds_once_per_failure() {
        let tries = AtomicU32::new(0);
        let got = next("test", || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(io::Error::from_raw_os_error(libc::EMFILE)),
                n => Ok((n, ())),
            }
        })
        .await;
        assert_eq!(got.0, 2);
        assert_eq!(tries.load(Ordering::SeqCst), 3, "each failure retried once, after its pause");
    }
}
