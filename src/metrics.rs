//! The Prometheus metrics posthorn exports on `/metrics`, defined in one registry.
//!
//! Only `events.rs` updates them (an event's `emit()` writes its log line and its metrics), so
//! what posthorn reports is listed in one place. Names follow Prometheus conventions: the
//! `posthorn_` prefix, base units (seconds, rows), `_total` for counters. The README lists every
//! metric with its type, labels and meaning; keep the two in step.
//!
//! The registry is process-wide: one posthorn process relays one outbox table.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Every metric, registered in [`METRICS`]'s own registry (not the crate's global default, so
/// nothing else can add to what `/metrics` shows).
pub struct Metrics {
    registry: Registry,
    /// Records Kafka acknowledged, by topic.
    pub rows_published: IntCounterVec,
    /// Rows marked delivered in the outbox.
    pub rows_delivered: IntCounter,
    /// Records that failed, by kind: `transient`, `suspect`, `poison`.
    pub publish_failures: IntCounterVec,
    /// Rows set aside as failed (and copied to the dead-letter topic when one is set).
    pub rows_dead_lettered: IntCounter,
    pub batch_rows: Histogram,
    /// Reads that found a row committed (or re-queued) below the rows already sent.
    pub read_restarts: IntCounter,
    pub batch_duration: Histogram,
    /// From a row's `created_at` to Kafka's acknowledgement of its record.
    pub commit_to_ack: Histogram,
    pub backlog_rows: IntGauge,
    pub oldest_pending_age: Gauge,
    pub failed_rows: IntGauge,
    pub producer_in_flight: IntGauge,
    /// Connection attempts after a failure, by service: `postgres`, `kafka`.
    pub reconnects: IntCounterVec,
    /// Every error a dependency reported, by service (logged only as state changes).
    pub dependency_errors: IntCounterVec,
    pub leader: IntGauge,
    pub retention_deleted: IntCounter,
    /// Exactly once: Kafka transactions, by outcome: `committed`, `aborted`, `unknown`.
    pub transactions: IntCounterVec,
    /// Exactly once: times this instance's producer found itself fenced by a newer one.
    pub producer_fenced: IntCounter,
    build_info: IntGaugeVec,
}

/// Failure kinds, pre-set to 0 so that a rate() over them exists before the first failure.
pub const FAILURE_KINDS: [&str; 3] = ["transient", "suspect", "poison"];
/// Transaction outcomes, pre-set to 0.
pub const TRANSACTION_OUTCOMES: [&str; 3] = ["committed", "aborted", "unknown"];
/// Services posthorn reconnects to.
pub const SERVICES: [&str; 2] = ["postgres", "kafka"];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Seconds, from a few milliseconds (a healthy relay) to an hour (an outage).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
const BATCH_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const BATCH_ROWS_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 100000.0,
];

impl Metrics {
    fn new() -> Metrics {
        // The definitions below are constants: registering them fails only for a programming
        // error (an invalid or duplicate name), which the unit test below catches.
        let m = Metrics {
            registry: Registry::new(),
            rows_published: IntCounterVec::new(
                Opts::new(
                    "posthorn_rows_published_total",
                    "Records Kafka acknowledged, by topic (a row published again counts again).",
                ),
                &["topic"],
            )
            .expect("valid metric"),
            rows_delivered: IntCounter::new(
                "posthorn_rows_delivered_total",
                "Rows marked delivered in the outbox table.",
            )
            .expect("valid metric"),
            publish_failures: IntCounterVec::new(
                Opts::new(
                    "posthorn_publish_failures_total",
                    "Records that failed, by kind: transient (retried), suspect (its record batch was rejected; sent again alone), poison (Kafka will never accept it).",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            rows_dead_lettered: IntCounter::new(
                "posthorn_rows_dead_lettered_total",
                "Poison rows set aside as failed (and published to POSTHORN_DEAD_LETTER_TOPIC when set).",
            )
            .expect("valid metric"),
            batch_rows: Histogram::with_opts(
                HistogramOpts::new("posthorn_batch_rows", "Rows read per batch.")
                    .buckets(BATCH_ROWS_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            read_restarts: IntCounter::new(
                "posthorn_read_restarts_total",
                "Reads past the rows already sent that found a pending row below them (committed late, or re-queued) and read again from the oldest.",
            )
            .expect("valid metric"),
            batch_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "posthorn_batch_duration_seconds",
                    "Time from sending a batch's first record to marking its rows.",
                )
                .buckets(BATCH_DURATION_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            commit_to_ack: Histogram::with_opts(
                HistogramOpts::new(
                    "posthorn_commit_to_ack_seconds",
                    "Time from a row's created_at (Postgres' clock) to Kafka's acknowledgement of its record (posthorn's clock).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            backlog_rows: IntGauge::new(
                "posthorn_backlog_rows",
                "Pending rows: not delivered and not failed (refreshed every 5 s).",
            )
            .expect("valid metric"),
            oldest_pending_age: Gauge::new(
                "posthorn_oldest_pending_age_seconds",
                "Age of the oldest pending row, 0 when none is pending (refreshed every 5 s).",
            )
            .expect("valid metric"),
            failed_rows: IntGauge::new(
                "posthorn_failed_rows",
                "Rows set aside as failed, waiting for an operator (refreshed every 5 s).",
            )
            .expect("valid metric"),
            producer_in_flight: IntGauge::new(
                "posthorn_producer_in_flight_records",
                "Records handed to the Kafka producer and not yet acknowledged.",
            )
            .expect("valid metric"),
            reconnects: IntCounterVec::new(
                Opts::new(
                    "posthorn_reconnects_total",
                    "Connection attempts after a failure, by service (postgres, kafka).",
                ),
                &["service"],
            )
            .expect("valid metric"),
            dependency_errors: IntCounterVec::new(
                Opts::new(
                    "posthorn_dependency_errors_total",
                    "Errors reported by or about a service (postgres, kafka), each one; the log \
                     shows only when a service fails, fails on, and works again.",
                ),
                &["service"],
            )
            .expect("valid metric"),
            leader: IntGauge::new(
                "posthorn_leader",
                "1 while this instance is the active publisher for its table, else 0.",
            )
            .expect("valid metric"),
            retention_deleted: IntCounter::new(
                "posthorn_retention_deleted_rows_total",
                "Delivered rows deleted after POSTHORN_RETENTION.",
            )
            .expect("valid metric"),
            transactions: IntCounterVec::new(
                Opts::new(
                    "posthorn_kafka_transactions_total",
                    "Exactly once: Kafka transactions by outcome: committed (their rows are published), aborted (published again later), unknown (a failed commit; the next leadership reads the outcome from the checkpoint topic).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            producer_fenced: IntCounter::new(
                "posthorn_kafka_producer_fenced_total",
                "Exactly once: times a newer producer with this outbox's transactional.id fenced this instance's.",
            )
            .expect("valid metric"),
            build_info: IntGaugeVec::new(
                Opts::new("posthorn_build_info", "Always 1; the label says the version."),
                &["version"],
            )
            .expect("valid metric"),
        };
        for kind in FAILURE_KINDS {
            m.publish_failures.with_label_values(&[kind]);
        }
        for outcome in TRANSACTION_OUTCOMES {
            m.transactions.with_label_values(&[outcome]);
        }
        for service in SERVICES {
            m.reconnects.with_label_values(&[service]);
            m.dependency_errors.with_label_values(&[service]);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: [Box<dyn prometheus::core::Collector>; 19] = [
            Box::new(m.rows_published.clone()),
            Box::new(m.rows_delivered.clone()),
            Box::new(m.publish_failures.clone()),
            Box::new(m.rows_dead_lettered.clone()),
            Box::new(m.batch_rows.clone()),
            Box::new(m.read_restarts.clone()),
            Box::new(m.batch_duration.clone()),
            Box::new(m.commit_to_ack.clone()),
            Box::new(m.backlog_rows.clone()),
            Box::new(m.oldest_pending_age.clone()),
            Box::new(m.failed_rows.clone()),
            Box::new(m.producer_in_flight.clone()),
            Box::new(m.reconnects.clone()),
            Box::new(m.dependency_errors.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.retention_deleted.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.producer_fenced.clone()),
            Box::new(m.build_info.clone()),
        ];
        for collector in collectors {
            m.registry.register(collector).expect("unique metric names");
        }
        m
    }
}

/// The registry in Prometheus' text exposition format.
pub fn encode() -> Result<String, prometheus::Error> {
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&METRICS.registry.gather(), &mut buffer)?;
    String::from_utf8(buffer).map_err(|err| prometheus::Error::Msg(err.to_string()))
}

/// Rows marked delivered since the process started (for the periodic summary).
pub fn rows_delivered_total() -> u64 {
    METRICS.rows_delivered.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes_with_the_posthorn_prefix() {
        METRICS.backlog_rows.set(3);
        let text = encode().expect("encodes");
        for name in [
            "posthorn_rows_delivered_total",
            "posthorn_read_restarts_total 0",
            "posthorn_publish_failures_total{kind=\"poison\"} 0",
            "posthorn_reconnects_total{service=\"kafka\"} 0",
            "posthorn_backlog_rows 3",
            "posthorn_commit_to_ack_seconds_bucket",
            "posthorn_leader",
            "posthorn_kafka_transactions_total{outcome=\"aborted\"} 0",
            "posthorn_kafka_producer_fenced_total 0",
            "posthorn_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("posthorn_"), "{line}");
        }
    }
}
