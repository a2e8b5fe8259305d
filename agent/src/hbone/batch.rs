//! An HTTP/2 connection's task, run one scheduler turn after it is woken, so that the
//! frames several streams hand it in one turn leave in one TLS record and one write.
//!
//! A stream that hands its connection a frame wakes the connection's task. tokio's
//! current-thread scheduler queues that task behind the tasks already ready (the other
//! streams with bytes to send), and its one flush carries all their frames. The
//! multi-thread scheduler runs a task woken by the running task next (its LIFO slot): the
//! connection's task ran right after the first stream and flushed its frame alone, then
//! again for the next stream. With one worker, the current-thread scheduler took TLS writes
//! per request from 1.93 to 1.30 under 16 kept-alive connections (ARCHITECTURE.md,
//! "Performance"); with several, [`spawn`] gives the connection's task the same place in
//! the queue by having it yield once (to the back of the queue) before each poll.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::runtime::{Handle, RuntimeFlavor};

/// Spawn a connection's task: as is on the current-thread scheduler, yielding once before
/// each poll on the multi-thread one.
pub fn spawn<F>(connection: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        tokio::spawn(connection);
    } else {
        // Boxed: the yield's flag beside a pinned future; one per HBONE connection, not
        // per stream.
        tokio::spawn(Batched { inner: Box::pin(connection), yielded: false });
    }
}

/// See [`spawn`].
struct Batched<F> {
    inner: Pin<Box<F>>,
    yielded: bool,
}

impl<F: Future> Future for Batched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.yielded {
            // Woken while running, a task is rescheduled as a yield: to the back of the
            // worker's queue, behind the streams that are ready now.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// On the multi-thread scheduler, the connection's task runs after the tasks that were
    /// ready when it was woken, not right after the one that woke it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_woken_connection_runs_after_the_streams_ready_before_it() {
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Spawned from a worker task, so everything below runs on the one worker.
        tokio::spawn({
            let order = order.clone();
            async move {
                spawn({
                    let order = order.clone();
                    async move {
                        let _ = rx.await;
                        order.lock().push("connection");
                    }
                });
                // Let the connection's task start and wait on the channel.
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                // "Streams": the first wakes the connection; the others were ready before.
                let mut streams = Vec::new();
                for i in 0..3 {
                    let order = order.clone();
                    streams.push(tokio::spawn(async move { order.lock().push(["s0", "s1", "s2"][i]) }));
                }
                tx.send(()).unwrap();
                for s in streams {
                    s.await.unwrap();
                }
            }
        })
        .await
        .unwrap();
        while order.lock().len() < 4 {
            tokio::task::yield_now().await;
        }
        let order = order.lock().clone();
        assert_eq!(order.last(), Some(&"connection"), "{order:?}");
    }
}
