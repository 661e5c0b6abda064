//! Readiness: what `/readyz` answers, kept current in the background so that a probe never
//! waits for Postgres or Kafka. Every few seconds a task reads zero rows of the outbox table
//! (Postgres answers, the table and its columns exist) and asks a broker for metadata (Kafka
//! answers), each with a short timeout, on connections of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::events;
use crate::metrics::METRICS;
use crate::outbox::Outbox;
use crate::publisher::KafkaProbe;
use crate::shutdown::Shutdown;

/// How often readiness is checked.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long one readiness check waits for each service.
const READINESS_TIMEOUT: Duration = Duration::from_secs(3);
/// A readiness result older than this is not trusted: the probe task itself is stuck.
const READINESS_STALE: Duration = Duration::from_secs(30);
/// Records in flight and none acknowledged for this long: Kafka is not ready even if a broker
/// answers metadata. Two brokers of three down is such a case: the survivor answers, and lists
/// all three (the controller quorum went down with them, so nobody fences them), but cannot have
/// a record acknowledged by `min.insync.replicas` replicas. Longer than a leader failover after
/// one broker's crash (its session times out after 9 s by default, then a leader is elected).
const NOT_ACKNOWLEDGING_AFTER: Duration = Duration::from_secs(15);

/// The latest readiness check. Clones share it.
#[derive(Clone, Default)]
pub struct Readiness {
    /// A std mutex: held only to copy a few strings, never across an await.
    latest: Arc<Mutex<Option<Checked>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Checks {
    postgres: String,
    kafka: String,
    schema: String,
}

impl Checks {
    fn ready(&self) -> bool {
        [&self.postgres, &self.kafka, &self.schema]
            .iter()
            .all(|c| *c == OK)
    }
}

#[derive(Debug, Clone)]
struct Checked {
    checks: Checks,
    at: Instant,
}

const OK: &str = "ok";

/// `/readyz`'s answer: `"ok"` or what is wrong, per dependency.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub postgres: String,
    pub kafka: String,
    pub schema: String,
    /// Seconds since the check (absent before the first one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_seconds_ago: Option<f64>,
}

impl Readiness {
    pub fn report(&self) -> ReadinessReport {
        let latest = match self.latest.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(Checked { checks, at }) = latest else {
            let unknown = "unknown: not checked yet".to_owned();
            return ReadinessReport {
                ready: false,
                postgres: unknown.clone(),
                kafka: unknown.clone(),
                schema: unknown,
                checked_seconds_ago: None,
            };
        };
        let age = at.elapsed();
        let checked_seconds_ago = Some((age.as_secs_f64() * 10.0).round() / 10.0);
        if age > READINESS_STALE {
            let stale = format!("unknown: the last check is {}s old", age.as_secs());
            return ReadinessReport {
                ready: false,
                postgres: stale.clone(),
                kafka: stale.clone(),
                schema: stale,
                checked_seconds_ago,
            };
        }
        ReadinessReport {
            ready: checks.ready(),
            postgres: checks.postgres,
            kafka: checks.kafka,
            schema: checks.schema,
            checked_seconds_ago,
        }
    }

    /// Stores a check; returns whether readiness (or a reason) changed.
    fn store(&self, checks: Checks) -> bool {
        let mut latest = match self.latest.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let changed = latest.as_ref().is_none_or(|l| l.checks != checks);
        *latest = Some(Checked {
            checks,
            at: Instant::now(),
        });
        changed
    }
}

/// Whether the producer's records are being acknowledged, from the metrics (records in flight,
/// records acknowledged) sampled at each readiness check.
#[derive(Debug)]
struct AckProgress {
    n_acknowledged: u64,
    /// The last check that saw an acknowledgement, or nothing in flight.
    since: Instant,
}

impl AckProgress {
    fn new(now: Instant) -> AckProgress {
        AckProgress {
            n_acknowledged: 0,
            since: now,
        }
    }

    /// Records the sample; returns whether records have waited [`NOT_ACKNOWLEDGING_AFTER`] or
    /// more with no acknowledgement at all.
    fn stalled(&mut self, n_in_flight: i64, n_acknowledged: u64, now: Instant) -> bool {
        if n_in_flight <= 0 || n_acknowledged != self.n_acknowledged {
            self.n_acknowledged = n_acknowledged;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= NOT_ACKNOWLEDGING_AFTER
    }
}

/// `"kafka"` in `/readyz`: a broker must answer, and records in flight must be acknowledged.
/// The reason stays the same while the stall lasts, so it is logged once.
fn kafka_state<E: std::fmt::Display>(metadata: Result<usize, E>, stalled: bool) -> String {
    match metadata {
        Err(err) => format!("unreachable: {err}"),
        Ok(_n_brokers) if stalled => format!(
            "not acknowledging: records in flight, none acknowledged for {}s or more, though a \
             broker answers (e.g. fewer in-sync replicas than min.insync.replicas for acks=all, \
             or partitions without a live leader)",
            NOT_ACKNOWLEDGING_AFTER.as_secs()
        ),
        Ok(_n_brokers) => OK.to_owned(),
    }
}

/// Checks Postgres, the schema and Kafka every [`READINESS_INTERVAL`] until `shutdown`, storing
/// the result in `readiness` and logging every change.
pub async fn probe_readiness(
    outbox: Outbox,
    kafka: KafkaProbe,
    readiness: Readiness,
    mut shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(READINESS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acks = AckProgress::new(Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = ticks.tick() => {}
        }
        let (database, broker) = tokio::join!(
            tokio::time::timeout(READINESS_TIMEOUT, outbox.probe_schema()),
            kafka.check(READINESS_TIMEOUT),
        );
        let (postgres, schema) = match database {
            Ok(Ok(())) => (OK.to_owned(), OK.to_owned()),
            Ok(Err(err)) if err.is_undefined_table() || err.is_undefined_column() => (
                OK.to_owned(),
                format!("missing: {err} (run `posthorn migrate`)"),
            ),
            Ok(Err(err)) if err.is_from_server() => (OK.to_owned(), format!("error: {err}")),
            Ok(Err(err)) => (format!("unreachable: {err}"), "unknown".to_owned()),
            Err(_) => (
                format!(
                    "unreachable: no answer within {}s",
                    READINESS_TIMEOUT.as_secs()
                ),
                "unknown".to_owned(),
            ),
        };
        let n_in_flight = METRICS.producer_in_flight.get();
        let stalled = acks.stalled(
            n_in_flight,
            METRICS.commit_to_ack.get_sample_count(),
            Instant::now(),
        );
        let kafka_state = kafka_state(broker, stalled);
        report_to_watches(&postgres, &kafka_state, n_in_flight);
        let checks = Checks {
            postgres,
            kafka: kafka_state,
            schema,
        };
        if readiness.store(checks.clone()) {
            events::ReadinessChanged {
                ready: checks.ready(),
                postgres: &checks.postgres,
                kafka: &checks.kafka,
                schema: &checks.schema,
            }
            .emit();
        }
    }
}

/// The probe's findings feed the outage log: an unreachable service is a failure, an answer
/// ends an outage once errors have stopped (see `outage`). While records are in flight, a
/// broker answering metadata shows nothing (two brokers of three down: the third answers, and
/// nothing is acknowledged); then only an acknowledgement (`BatchPublished`) ends a Kafka outage.
fn report_to_watches(postgres: &str, kafka: &str, n_in_flight: i64) {
    for (watch, state) in [
        (&crate::outage::POSTGRES, postgres),
        (&crate::outage::KAFKA, kafka),
    ] {
        let answer_proves_nothing =
            watch.dependency == crate::outage::Dependency::Kafka && n_in_flight > 0;
        if state == OK && answer_proves_nothing {
            continue;
        }
        if state == OK {
            events::DependencyAnswered { watch }.emit();
        } else {
            events::DependencyFailed {
                watch,
                during: "the readiness probe",
                error: &state,
            }
            .emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_flight_unacknowledged_for_a_while_make_kafka_not_ready() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut acks = AckProgress::new(start);
        // Acknowledgements arriving, or nothing in flight: ready, however long it lasts.
        assert!(!acks.stalled(100, 10, at(5)));
        assert!(!acks.stalled(100, 20, at(30)));
        assert!(!acks.stalled(0, 20, at(60)));
        // In flight and no acknowledgement: not yet, then not ready.
        assert!(!acks.stalled(7, 20, at(70)));
        assert!(acks.stalled(7, 20, at(75)));
        assert!(acks.stalled(7, 20, at(120)));
        // One acknowledgement ends it.
        assert!(!acks.stalled(6, 21, at(125)));
        assert!(!acks.stalled(6, 21, at(135)));

        assert_eq!(kafka_state::<String>(Ok(3), false), OK);
        let reason = kafka_state::<String>(Ok(3), true);
        assert!(reason.starts_with("not acknowledging: "), "{reason}");
        assert!(reason.contains("min.insync.replicas"), "{reason}");
        // A broker that does not answer is the first thing to say.
        assert_eq!(
            kafka_state(Err("timed out"), true),
            "unreachable: timed out"
        );
    }

    #[test]
    fn readiness_is_unknown_before_the_first_check_and_says_what_failed() {
        let readiness = Readiness::default();
        let report = readiness.report();
        assert!(!report.ready);
        assert!(report.kafka.starts_with("unknown"));
        let checks = Checks {
            postgres: OK.into(),
            kafka: "unreachable: timed out".into(),
            schema: OK.into(),
        };
        assert!(readiness.store(checks.clone()));
        assert!(!readiness.store(checks));
        let report = readiness.report();
        assert!(!report.ready);
        assert_eq!(report.kafka, "unreachable: timed out");
        assert!(readiness.store(Checks {
            postgres: OK.into(),
            kafka: OK.into(),
            schema: OK.into(),
        }));
        assert!(readiness.report().ready);
    }
}
