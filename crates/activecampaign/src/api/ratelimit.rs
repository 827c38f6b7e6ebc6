//! Request pacing per ActiveCampaign account, shared by everything in the process
//! that calls that account's API: the ActiveCampaign destination and the API sync.
//!
//! ActiveCampaign allows 5 requests per second per account, shared by all API keys
//! of that account, so the limiter is keyed by the account's API URL (normalized by
//! [`account_key`]) and lives for the whole process: a destination and a sync on one
//! account share one budget. It is a token bucket of depth one: requests are spaced
//! evenly (no bursts), 5% slower than the limit ([`SAFETY_MARGIN`]), so that network
//! jitter cannot bring six requests into one second at ActiveCampaign's end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// ActiveCampaign's documented limit: requests per second per account.
pub const ACCOUNT_REQUESTS_PER_SECOND: f64 = 5.0;

/// Extra spacing over `1 / per_second`: a request that leaves late and the next one
/// that leaves on time still arrive a full second apart per `per_second` requests.
pub const SAFETY_MARGIN: f64 = 1.05;

/// Spaces acquisitions at least `interval` apart.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` acquisitions per second.
    pub fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: Duration::from_secs_f64(SAFETY_MARGIN / per_second.max(0.001)),
            next: Mutex::new(None),
        }
    }

    /// Waits for the next free slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Holds every later acquisition back until `wait` from now (a `Retry-After`
    /// applies to the whole account, not only to the request that got it).
    pub fn pause(&self, wait: Duration) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + wait;
        *next = Some(next.map_or(until, |n| n.max(until)));
    }
}

/// The account an API URL names: trimmed, lowercased, without a trailing `/` or
/// `/api/3`, so `https://Acct.api-us1.com/api/3/` and `https://acct.api-us1.com` share.
pub fn account_key(api_url: &str) -> String {
    let base = api_url.trim().trim_end_matches('/');
    let base = base.strip_suffix("/api/3").unwrap_or(base);
    base.trim_end_matches('/').to_ascii_lowercase()
}

/// The process-wide limiter for an account (keyed by [`account_key`] of its API URL).
pub fn for_account(api_url: &str, per_second: f64) -> Arc<RateLimiter> {
    static LIMITERS: OnceLock<Mutex<HashMap<String, Arc<RateLimiter>>>> = OnceLock::new();
    let mut map = LIMITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(format!("{}#{per_second}", account_key(api_url)))
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
        // Six acquisitions at 5/s: the sixth waits a full second (plus the margin).
        assert_eq!(start.elapsed(), Duration::from_millis(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_later_requests() {
        let l = RateLimiter::new(5.0);
        let start = Instant::now();
        l.acquire().await;
        l.pause(Duration::from_secs(3));
        l.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn same_account_shares_a_limiter() {
        let a = for_account("https://acct.api-us1.com", 5.0);
        let b = for_account("https://ACCT.api-us1.com/api/3/", 5.0);
        let c = for_account("https://other.api-us1.com", 5.0);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
