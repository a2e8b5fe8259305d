//! An HTTP/2 connection's task, run so that the frames several streams hand it in one turn
//! leave in one `writev`.
//!
//! A stream that hands its connection a frame wakes the connection's task. tokio's
//! current-thread scheduler queues that task behind the tasks already ready (the other
//! streams with bytes to send). The multi-thread scheduler runs a task woken by the running
//! task next (its LIFO slot): the connection's task ran right after the first stream and
//! flushed its frame alone, then again for the next stream. With one worker, the
//! current-thread scheduler took TLS writes per request from 1.93 to 1.30 under 16
//! kept-alive connections (ARCHITECTURE.md, "Performance"); with several, [`spawn`] gives
//! the connection's task the same place in the queue by having it yield once (to the back
//! of the queue) before each poll.
//!
//! A turn's frames still left in one `writev` each when they were DATA frames of 256 bytes
//! or more: [`super::coalesce`] holds them to the end of the turn, by the [`Turns`] counted
//! here.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::runtime::{Handle, RuntimeFlavor};

/// The turns (polls) of a connection's task, shared with its [`super::coalesce::Coalesced`]
/// stream: which turn is running, if any, and whether h2's connection runs yet.
#[derive(Clone, Default)]
pub struct Turns(Arc<TurnState>);

#[derive(Default)]
struct TurnState {
    count: AtomicU64,
    within: AtomicBool,
    armed: AtomicBool,
}

impl Turns {
    /// From now on (h2's handshake is done, and its connection ends each turn with a flush),
    /// flushes within a turn may be held to the next.
    pub fn arm(&self) {
        self.0.armed.store(true, Relaxed);
    }

    /// The running turn, when its flushes may be held.
    pub fn holding(&self) -> Option<u64> {
        let s = &self.0;
        (s.armed.load(Relaxed) && s.within.load(Relaxed)).then(|| s.count.load(Relaxed))
    }
}

/// Spawn a connection's task, counting its turns; on the multi-thread scheduler it yields
/// once before each poll.
pub fn spawn<F>(turns: Turns, connection: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let yields = Handle::current().runtime_flavor() != RuntimeFlavor::CurrentThread;
    // Boxed: the counters beside a pinned future; one per HBONE connection, not per stream.
    tokio::spawn(Batched { inner: Box::pin(connection), turns, yields, yielded: false });
}

/// See [`spawn`].
struct Batched<F> {
    inner: Pin<Box<F>>,
    turns: Turns,
    yields: bool,
    yielded: bool,
}

impl<F: Future> Future for Batched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.yields && !this.yielded {
            // Woken while running, a task is rescheduled as a yield: to the back of the
            // worker's queue, behind the streams that are ready now.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        let turn = &this.turns.0;
        turn.count.fetch_add(1, Relaxed);
        turn.within.store(true, Relaxed);
        let out = this.inner.as_mut().poll(cx);
        turn.within.store(false, Relaxed);
        out
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
                spawn(Turns::default(), {
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
