//! A one-shot "stop now" for an open connection, as small as the connection's task can
//! carry: a policy change that now denies an open connection cancels it, and the task
//! waiting on it resets both sides.
//!
//! Each open connection's task waits on one of these for its whole life. Waiting is a
//! borrowed reference (8 bytes in the task); `tokio::sync::Notify`'s waiter took about 70
//! bytes of every such task, which for an idle connection is most of what it holds beyond
//! its sockets and streams.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
};

use futures::task::AtomicWaker;

#[derive(Debug, Default)]
pub struct Cancel {
    cancelled: AtomicBool,
    waiter: AtomicWaker,
}

impl Cancel {
    /// Cancel: the waiter (now or later) sees it.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waiter.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Resolves once cancelled (at once if it already was). One waiter at a time.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled(self)
    }
}

/// See [`Cancel::cancelled`].
#[derive(Debug)]
pub struct Cancelled<'a>(&'a Cancel);

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.is_cancelled() {
            return Poll::Ready(());
        }
        self.0.waiter.register(cx.waker());
        // Checked again after registering: a cancel in between woke no one.
        if self.0.is_cancelled() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    #[tokio::test]
    async fn a_waiting_task_wakes_on_cancel_and_a_late_one_sees_it_at_once() {
        let c = Arc::new(Cancel::default());
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "not cancelled yet");
        c.cancel();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        // Cancelled before anyone waits: the wait ends at once.
        tokio::time::timeout(Duration::from_secs(5), c.cancelled()).await.expect("already cancelled");
    }

    #[test]
    fn waiting_costs_a_reference() {
        let c = Cancel::default();
        assert_eq!(std::mem::size_of_val(&c.cancelled()), std::mem::size_of::<usize>());
    }
}
