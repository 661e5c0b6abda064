//! Capped exponential backoff with jitter (the `backoff` crate) for reconnects and retries.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

/// First delay after a failure.
const INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between attempts: an outage is noticed within this long after it ends.
const MAX: Duration = Duration::from_secs(30);

/// Delays between attempts at something that must eventually succeed. Never gives up: a relay
/// retries until it is stopped.
pub struct Backoff {
    inner: ExponentialBackoff,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff::with_bounds(INITIAL, MAX)
    }

    pub fn with_bounds(initial: Duration, max: Duration) -> Backoff {
        let inner = ExponentialBackoff {
            initial_interval: initial,
            current_interval: initial,
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Backoff { inner }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // With max_elapsed_time = None the crate always returns Some.
        self.inner.next_backoff().unwrap_or(MAX)
    }

    /// Call after a success: the next failure starts from the initial delay again.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::with_bounds(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(150));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_millis(1500));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}
