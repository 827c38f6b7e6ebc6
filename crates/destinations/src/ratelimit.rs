//! Request pacing shared by every destination that talks to the same account.
//!
//! ActiveCampaign allows 5 requests per second per account, shared by all API keys
//! of that account, so the limiter is keyed by the account's API URL and lives for
//! the whole process: two destinations on one account share one budget. The
//! limiter spaces requests evenly (no bursts), which never exceeds the limit in any
//! one-second window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// Spaces acquisitions at least `interval` apart.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` acquisitions per second.
    pub(crate) fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
            next: Mutex::new(None),
        }
    }

    /// Waits for the next free slot.
    pub(crate) async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// The process-wide limiter for an account (keyed by its API URL).
pub(crate) fn for_account(key: &str, per_second: f64) -> Arc<RateLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<RateLimiter>>>> = OnceLock::new();
    let mut map = LIMITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(format!("{key}#{per_second}"))
        .or_insert_with(|| Arc::new(RateLimiter::new(per_second)))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_evenly() {
        let l = RateLimiter::new(5.0);
        let start = Instant::now();
        for _ in 0..6 {
            l.acquire().await;
        }
        // Six acquisitions at 5/s: the sixth waits a full second.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn same_account_shares_a_limiter() {
        let a = for_account("https://acct.api-us1.com", 5.0);
        let b = for_account("https://acct.api-us1.com", 5.0);
        let c = for_account("https://other.api-us1.com", 5.0);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
