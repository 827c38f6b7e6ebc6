//! Exponential backoff with full jitter, the one retry-timing rule of every stage
//! (the warehouse loader and the destination workers).
//!
//! Invariants: pure — the randomness comes in as `unit` in `[0, 1)` (anything else,
//! NaN included, reads as 0), so the rule is tested without clocks or RNGs; the
//! ceiling doubles per attempt from `min` and never exceeds `max`; a delay is always
//! within `[min, ceiling]` (and so within `[min, max]` when `min <= max`).

use std::time::Duration;

/// The exponential ceiling for the `attempt`-th retry (1-based; 0 reads as 1):
/// `min · 2^(attempt-1)`, capped at `max`.
pub fn ceiling(attempt: u32, min: Duration, max: Duration) -> Duration {
    let shift = attempt.saturating_sub(1).min(31);
    min.checked_mul(1u32 << shift)
        .unwrap_or(max)
        .min(max)
        .max(min.min(max))
}

/// The delay before the `attempt`-th retry: full jitter, uniform in
/// `[min, ceiling(attempt)]` with `unit` in `[0, 1)`.
pub fn delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let ceiling = ceiling(attempt, min, max);
    let floor = min.min(ceiling);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    floor + (ceiling - floor).mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn the_ceiling_doubles_and_caps() {
        assert_eq!(ceiling(0, S, MAX), S);
        assert_eq!(ceiling(1, S, MAX), S);
        assert_eq!(ceiling(2, S, MAX), 2 * S);
        assert_eq!(ceiling(9, S, MAX), 256 * S);
        assert_eq!(ceiling(10, S, MAX), MAX);
        assert_eq!(ceiling(u32::MAX, S, MAX), MAX);
    }

    #[test]
    fn the_delay_spans_min_to_the_ceiling() {
        assert_eq!(delay(3, S, MAX, 0.0), S);
        assert_eq!(delay(3, S, MAX, 1.0), 4 * S);
        assert_eq!(delay(3, S, MAX, 0.5), Duration::from_millis(2500));
        assert_eq!(delay(3, S, MAX, f64::NAN), S);
        assert_eq!(delay(3, S, MAX, -4.0), S);
        for attempt in [1, 7, 20, 63, u32::MAX] {
            for unit in [0.0, 0.3, 0.999] {
                let d = delay(attempt, S, MAX, unit);
                assert!((S..=MAX).contains(&d), "{attempt} {unit}: {d:?}");
            }
        }
    }
}
