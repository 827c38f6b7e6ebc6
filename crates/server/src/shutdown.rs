//! One shutdown token for the whole server (modelled on mini-redis' `Shutdown`): a
//! `watch` channel that flips once from running to stopping.
//!
//! Invariants:
//! - Every long-running part of the server (the accept loop, the control flusher,
//!   the warehouse loader and the destination engine, see `serve`) stops on this one
//!   token; there is no second mechanism (no `abort`, no separate flag).
//! - Triggering is idempotent and never blocks; waiting after the trigger returns at
//!   once, so a part that starts late still stops.
//! - Order is the owner's business, not the token's: `serve` waits for the accept
//!   loop (in-flight requests finish their appends) and for every consumer before it
//!   closes the log, so nothing writes to a closed log.

use std::sync::Arc;

use tokio::sync::watch;

/// A cloneable shutdown token.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A token that has not been triggered.
    pub fn new() -> Self {
        Shutdown {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Asks every holder to stop.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`Shutdown::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the token is triggered (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// [`Shutdown::wait`] as an owned future (for `with_graceful_shutdown`).
    pub async fn wait_owned(self) {
        self.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_one_trigger_even_when_waiting_late() {
        let s = Shutdown::new();
        let early = tokio::spawn({
            let s = s.clone();
            async move { s.wait().await }
        });
        assert!(!s.is_triggered());
        s.clone().trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), early)
            .await
            .expect("early waiter woke")
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), s.wait())
            .await
            .expect("late waiter returns at once");
        s.trigger();
        assert!(s.is_triggered());
    }
}
