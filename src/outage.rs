//! Dependency health as state changes, so that an outage costs an operator's log pipeline a few
//! lines instead of thousands.
//!
//! While a broker is unreachable librdkafka reports an error many times a second, and every
//! retried query fails while Postgres is down; logging each one wrote ~28 lines a second,
//! forever. Here each dependency's errors become transitions: one line when it becomes
//! unavailable (with the reason), a reminder at most every [`REMINDER_INTERVAL`] while errors go
//! on (how long, how many were not logged), and one line when it is back. Metrics still count
//! every error (`events.rs` does both).
//!
//! Pure bookkeeping: the caller passes the time, and `events.rs` writes the lines. The two
//! watches are process-wide, like the metrics, because librdkafka's callbacks have no relay to
//! ask.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a continuing outage is logged again.
pub const REMINDER_INTERVAL: Duration = Duration::from_secs(60);
/// How long errors must have stopped before a success counts as recovery. Longer than
/// librdkafka's longest reconnect backoff (`reconnect.backoff.max.ms`, 10 s): with one broker
/// of three down, the producer fails to reconnect to it every few seconds while the others
/// answer, and that is one continuing outage, not one per reconnect.
pub const RECOVERY_QUIET: Duration = Duration::from_secs(15);

/// A service posthorn depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Kafka,
    Postgres,
}

impl Dependency {
    /// The name in log fields and metric labels (`service="kafka"`).
    pub fn label(self) -> &'static str {
        match self {
            Dependency::Kafka => "kafka",
            Dependency::Postgres => "postgres",
        }
    }

    /// The name in sentences.
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Kafka => "Kafka",
            Dependency::Postgres => "Postgres",
        }
    }
}

/// What to log after an error or a success; nothing when the state did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The first error after the dependency was last seen working.
    WentDown,
    /// Errors go on; `n_unlogged` were not logged since the last line.
    StillDown { down_for: Duration, n_unlogged: u64 },
    /// It works again after `n_errors` errors over `down_for`.
    CameBack { down_for: Duration, n_errors: u64 },
}

/// One dependency's state. Starts up: the first error is news.
#[derive(Debug, Default)]
pub struct Health {
    down: Option<Down>,
}

#[derive(Debug)]
struct Down {
    since: Instant,
    last_logged: Instant,
    last_error: Instant,
    n_errors: u64,
    n_unlogged: u64,
}

impl Health {
    /// An error at `now`.
    pub fn error(&mut self, now: Instant) -> Option<Transition> {
        let Some(down) = &mut self.down else {
            self.down = Some(Down {
                since: now,
                last_logged: now,
                last_error: now,
                n_errors: 1,
                n_unlogged: 0,
            });
            return Some(Transition::WentDown);
        };
        down.n_errors += 1;
        down.last_error = now;
        if now.saturating_duration_since(down.last_logged) < REMINDER_INTERVAL {
            down.n_unlogged += 1;
            return None;
        }
        let transition = Transition::StillDown {
            down_for: now.saturating_duration_since(down.since),
            n_unlogged: down.n_unlogged,
        };
        down.last_logged = now;
        down.n_unlogged = 0;
        Some(transition)
    }

    /// A success at `now`: a request answered. It ends an outage once no error came for
    /// [`RECOVERY_QUIET`].
    pub fn recovered(&mut self, now: Instant) -> Option<Transition> {
        let down = self.down.as_ref()?;
        if now.saturating_duration_since(down.last_error) < RECOVERY_QUIET {
            return None;
        }
        let down = self.down.take()?;
        Some(Transition::CameBack {
            down_for: now.saturating_duration_since(down.since),
            n_errors: down.n_errors,
        })
    }

    pub fn is_down(&self) -> bool {
        self.down.is_some()
    }
}

/// A dependency's [`Health`], shared by every task and librdkafka thread that reports on it.
pub struct Watch {
    pub dependency: Dependency,
    /// A std mutex: held for a few integer updates, never across an await.
    health: Mutex<Health>,
}

impl Watch {
    const fn new(dependency: Dependency) -> Watch {
        Watch {
            dependency,
            health: Mutex::new(Health { down: None }),
        }
    }

    pub fn error(&self, now: Instant) -> Option<Transition> {
        self.with_health(|h| h.error(now))
    }

    pub fn recovered(&self, now: Instant) -> Option<Transition> {
        self.with_health(|h| h.recovered(now))
    }

    fn with_health<T>(&self, f: impl FnOnce(&mut Health) -> T) -> T {
        let mut health = match self.health.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut health)
    }
}

pub static KAFKA: Watch = Watch::new(Dependency::Kafka);
pub static POSTGRES: Watch = Watch::new(Dependency::Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_line_down_a_reminder_a_minute_and_one_line_back() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut health = Health::default();
        assert_eq!(health.recovered(at(0)), None, "up stays quiet");
        assert_eq!(health.error(at(0)), Some(Transition::WentDown));
        // 22 errors a second for a minute (1,333 of them): none logged.
        let mut logged = Vec::new();
        for ms in (45..60_000).step_by(45) {
            logged.extend(health.error(at(ms)));
        }
        assert_eq!(logged, vec![]);
        assert_eq!(
            health.error(at(60_000)),
            Some(Transition::StillDown {
                down_for: Duration::from_secs(60),
                n_unlogged: 1333,
            })
        );
        assert_eq!(health.error(at(60_010)), None);
        assert_eq!(
            health.recovered(at(70_000)),
            None,
            "a success soon after an error is not yet recovery"
        );
        assert_eq!(
            health.recovered(at(75_010)),
            Some(Transition::CameBack {
                down_for: Duration::from_millis(75_010),
                n_errors: 1336,
            })
        );
        assert!(!health.is_down());
        assert_eq!(health.recovered(at(76_000)), None, "up stays quiet");
        assert_eq!(
            health.error(at(80_000)),
            Some(Transition::WentDown),
            "a new outage is news again"
        );
    }

    #[test]
    fn errors_every_few_seconds_among_successes_are_one_outage_not_many() {
        // One broker of three down: its reconnects fail every ~10 s, the others answer.
        let t0 = Instant::now();
        let mut health = Health::default();
        let mut lines = vec![health.error(t0)];
        for s in 1..=120u64 {
            let now = t0 + Duration::from_secs(s);
            lines.push(health.recovered(now));
            if s % 10 == 0 {
                lines.push(health.error(now));
            }
        }
        let lines: Vec<Transition> = lines.into_iter().flatten().collect();
        assert_eq!(
            lines.len(),
            3,
            "down, then a reminder at 60 s and 120 s: {lines:?}"
        );
        assert!(matches!(
            lines[1],
            Transition::StillDown { n_unlogged: 5, .. }
        ));
    }

    #[test]
    fn a_reminder_needs_errors_a_quiet_outage_logs_nothing_more() {
        let t0 = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.error(t0), Some(Transition::WentDown));
        assert_eq!(
            health.error(t0 + Duration::from_secs(300)),
            Some(Transition::StillDown {
                down_for: Duration::from_secs(300),
                n_unlogged: 0,
            })
        );
    }
}
