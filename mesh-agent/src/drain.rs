//! Draining: after handing its pods to a successor, the old agent finishes what it has.
//!
//! Plain TCP relays simply run to their end. HTTP connections are nudged to move: HTTP/1.1
//! responses carry `Connection: close` (the client reconnects, and its next connection lands
//! on the new agent; closing only after a response avoids the race of closing an idle
//! keep-alive connection while the client sends on it), and HTTP/2 connections get a GOAWAY
//! (streams in flight complete, new ones go to a new connection).
use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::sync::Notify;

/// Whether this agent is draining, and a way to wait for it to start.
#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    pub fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_draining(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }

    /// Runs a server connection to its end; when draining starts, `nudge` is called once
    /// (e.g. a graceful shutdown) and the connection still runs to its end.
    pub async fn run<C, T>(&self, conn: C, nudge: impl FnOnce(Pin<&mut C>)) -> T
    where
        C: Future<Output = T>,
    {
        tokio::pin!(conn);
        tokio::select! {
            out = conn.as_mut() => return out,
            _ = self.started() => {}
        }
        nudge(conn.as_mut());
        conn.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn run_nudges_once_when_draining_starts() {
        let drain = std::sync::Arc::new(Drain::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let d = drain.clone();
        let task = tokio::spawn(async move {
            let mut nudged = false;
            let out = d
                .run(async move { rx.await.unwrap_or(0) }, |_| nudged = true)
                .await;
            (out, nudged)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain.start();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !task.is_finished(),
            "the connection keeps running after the nudge"
        );
        tx.send(7).unwrap();
        assert_eq!(task.await.unwrap(), (7, true));
    }

    #[tokio::test]
    async fn started_returns_at_once_when_already_draining() {
        let drain = Drain::default();
        drain.start();
        tokio::time::timeout(Duration::from_secs(5), drain.started())
            .await
            .expect("already draining");
    }
}
