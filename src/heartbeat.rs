//! Liveness: the relay loop's sign of life, and what `/healthz` answers.
//!
//! The relay loop beats at every event and while it waits (for rows, for acknowledgements
//! during a broker outage, out a backoff). A loop stuck anywhere else, e.g. in a query that never
//! returns, stops beating, and `/healthz` fails once the last beat is older than
//! `POSTHORN_HEALTH_STALL_SECONDS`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How often a waiting relay loop beats.
const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The relay loop's sign of life. Clones share it.
#[derive(Clone)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_beat_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat {
            origin: Instant::now(),
            last_beat_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The loop is alive and checking.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Runs `wait`, beating every second while it is pending. Only for waits that are
    /// progress checks in themselves (an idle wait, a backoff, a batch waiting for a broker):
    /// a query that never returns must not be wrapped, so that it shows as a stall. A blocked
    /// thread stops the beats too, since they run in the same task.
    pub async fn during<F: Future>(&self, wait: F) -> F::Output {
        tokio::pin!(wait);
        let mut beats = tokio::time::interval(BEAT_INTERVAL);
        loop {
            tokio::select! {
                output = &mut wait => {
                    self.beat();
                    return output;
                }
                _ = beats.tick() => self.beat(),
            }
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

/// `/healthz`'s answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Liveness {
    pub alive: bool,
    pub last_progress_seconds_ago: f64,
    pub stall_seconds: u64,
}

impl Liveness {
    pub fn of(heartbeat: &Heartbeat, stall: Duration) -> Liveness {
        let since = heartbeat.since_last_beat();
        Liveness {
            alive: since <= stall,
            last_progress_seconds_ago: (since.as_secs_f64() * 10.0).round() / 10.0,
            stall_seconds: stall.as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_once_the_last_beat_is_older_than_the_stall_time() {
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        let stall = Duration::from_secs(60);
        assert!(Liveness::of(&heartbeat, stall).alive);
        tokio::time::advance(Duration::from_secs(61)).await;
        let liveness = Liveness::of(&heartbeat, stall);
        assert!(!liveness.alive);
        assert!(liveness.last_progress_seconds_ago >= 61.0);
        heartbeat.beat();
        assert!(Liveness::of(&heartbeat, stall).alive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_legitimate_wait_keeps_beating() {
        let heartbeat = Heartbeat::new();
        let waited = heartbeat.during(tokio::time::sleep(Duration::from_secs(600)));
        let probe = async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            heartbeat.since_last_beat()
        };
        let ((), since) = tokio::join!(waited, probe);
        assert!(since <= BEAT_INTERVAL, "{since:?}");
    }
}
