//! A one-way, lock-free signal (a session's close and drain signals).

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// A one-way signal that one task awaits. Unlike a `CancellationToken`
/// (a mutex on every check and every poll), checking and waiting are
/// lock-free: a session polls its signals on every wake-up, once or twice
/// per request.
#[derive(Debug, Default)]
pub struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn cancel(&self) {
        if !self.set.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once cancelled. Only one task may wait at a time (the last
    /// one to poll is the one woken).
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_cancelled() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.is_cancelled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}
