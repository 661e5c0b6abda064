//! Every log line and metric update posthorn emits, one struct per event, so what posthorn
//! reports is listed in one place: an event's `emit()` writes its log line and updates its
//! metrics (`metrics::METRICS`); some events are metrics only. Messages are sentences; fields are
//! key/values; no event carries a secret (database URLs are always the redacted form).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tracing::{debug, error, info, warn};

use crate::metrics::METRICS;
use crate::outage::{Transition, Watch};

pub struct RelayStarted<'a> {
    pub database: &'a str,
    pub brokers: &'a str,
    pub table: &'a str,
    pub batch_size: usize,
    pub tracking: crate::config::Tracking,
    pub delivery: crate::config::Delivery,
}
impl RelayStarted<'_> {
    pub fn emit(self) {
        info!(
            database = self.database,
            brokers = self.brokers,
            table = self.table,
            batch_size = self.batch_size,
            tracking = self.tracking.as_str(),
            delivery = self.delivery.as_str(),
            "Relay started."
        );
        // A standby until the lease is acquired.
        METRICS.leader.set(0);
    }
}

pub struct UnknownVariable<'a> {
    pub name: &'a str,
}
impl UnknownVariable<'_> {
    pub fn emit(self) {
        warn!(
            variable = self.name,
            "Ignoring an environment variable posthorn does not know; check its spelling."
        );
    }
}

pub struct BatchPublished {
    pub n_rows: usize,
    pub n_marked: u64,
    pub n_failed: usize,
    pub n_held: usize,
    /// Records Kafka failed for reasons that may pass.
    pub n_transient: usize,
    /// Records failed with their whole record batch: sent again one at a time.
    pub n_suspect: usize,
    /// Rows Kafka will never accept.
    pub n_poisoned: usize,
    /// Reading the batch from Postgres.
    pub read: Duration,
    /// Sending it and waiting for every acknowledgement.
    pub publish: Duration,
    /// Marking the acknowledged rows delivered.
    pub mark: Duration,
    /// From sending the first record to marking the rows (a batch acknowledged in full is
    /// marked while the next one is published).
    pub elapsed: Duration,
}
impl BatchPublished {
    pub fn emit(self) {
        debug!(
            n_rows = self.n_rows,
            n_marked = self.n_marked,
            n_failed = self.n_failed,
            n_held = self.n_held,
            read_us = self.read.as_micros() as u64,
            publish_us = self.publish.as_micros() as u64,
            mark_us = self.mark.as_micros() as u64,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "Batch published."
        );
        if self.n_marked > 0 {
            // Kafka acknowledged and Postgres marked: both work.
            DependencyAnswered {
                watch: &crate::outage::KAFKA,
            }
            .emit();
            DependencyAnswered {
                watch: &crate::outage::POSTGRES,
            }
            .emit();
        }
        METRICS.batch_rows.observe(self.n_rows as f64);
        METRICS.batch_duration.observe(self.elapsed.as_secs_f64());
        METRICS.rows_delivered.inc_by(self.n_marked);
        for (kind, n) in [
            ("transient", self.n_transient),
            ("suspect", self.n_suspect),
            ("poison", self.n_poisoned),
        ] {
            if n > 0 {
                METRICS
                    .publish_failures
                    .with_label_values(&[kind])
                    .inc_by(n as u64);
            }
        }
    }
}

/// Kafka acknowledged one record (metrics only: a log line per record would drown the rest).
pub struct RecordAcknowledged<'a> {
    pub topic: &'a str,
    /// The row's `created_at`, microseconds since the Unix epoch by Postgres' clock.
    pub created_at_us: i64,
}
impl RecordAcknowledged<'_> {
    pub fn emit(self) {
        METRICS
            .rows_published
            .with_label_values(&[self.topic])
            .inc();
        let now_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // Clocks of two hosts: a row can seem acknowledged before it was written.
        let latency_us = now_us.saturating_sub(self.created_at_us).max(0);
        METRICS.commit_to_ack.observe(latency_us as f64 / 1e6);
    }
}

/// The producer's queue, sampled by its polling thread after each poll (metrics only).
pub struct ProducerQueue {
    pub n_in_flight: i32,
}
impl ProducerQueue {
    pub fn emit(self) {
        METRICS.producer_in_flight.set(i64::from(self.n_in_flight));
    }
}

/// librdkafka reported an error for the relay's producer; it reconnects by itself.
pub struct ProducerClientError<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub reason: &'a str,
    /// A connection to a broker failed or was lost.
    pub connection_lost: bool,
}
impl ProducerClientError<'_> {
    pub fn emit(self) {
        if self.connection_lost {
            METRICS.reconnects.with_label_values(&["kafka"]).inc();
        }
        DependencyFailed {
            watch: &crate::outage::KAFKA,
            during: "the producer's connections",
            error: &format_args!("{}: {}", self.error, self.reason),
        }
        .emit();
    }
}

/// A line librdkafka logged for one of posthorn's clients. The producer's connection failures
/// (`FAIL`) also arrive as errors ([`ProducerClientError`]), which are logged as state changes,
/// so they are at debug here; the probe's and `posthorn check`'s clients log at debug only.
pub struct LibrdkafkaLog<'a> {
    pub level: rdkafka::config::RDKafkaLogLevel,
    pub facility: &'a str,
    pub message: &'a str,
    pub volume: LogVolume,
}

/// How much of a Kafka client's own logging reaches the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVolume {
    /// librdkafka's levels, but connection failures at debug (the producer).
    AsLibrdkafkaSays,
    /// Everything at debug (a client whose outcome is reported otherwise).
    Debug,
}

impl LibrdkafkaLog<'_> {
    pub fn emit(self) {
        use rdkafka::config::RDKafkaLogLevel as L;
        let (facility, message) = (self.facility, self.message);
        // posthorn sets `enable.gapless.guarantee` on purpose (publisher::DEFAULTS says why);
        // librdkafka's warning that it is experimental would greet every producer.
        let expected_warning =
            facility == "CONFWARN" && message.contains("enable.gapless.guarantee");
        if self.volume == LogVolume::Debug || facility == "FAIL" || expected_warning {
            debug!(target: "librdkafka", facility, "librdkafka: {message}");
            return;
        }
        match self.level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                error!(target: "librdkafka", facility, "librdkafka: {message}")
            }
            L::Warning => warn!(target: "librdkafka", facility, "librdkafka: {message}"),
            L::Notice | L::Info => info!(target: "librdkafka", facility, "librdkafka: {message}"),
            L::Debug => debug!(target: "librdkafka", facility, "librdkafka: {message}"),
        }
    }
}

/// A dependency failed: counted every time; logged when it is news ([`crate::outage`]): the
/// first error, then a reminder at most once a minute while errors go on.
pub struct DependencyFailed<'a> {
    pub watch: &'static Watch,
    /// What was being done, e.g. "marking delivered rows".
    pub during: &'a str,
    pub error: &'a dyn std::fmt::Display,
}
impl DependencyFailed<'_> {
    pub fn emit(self) {
        let service = self.watch.dependency.label();
        METRICS
            .dependency_errors
            .with_label_values(&[service])
            .inc();
        let (during, name) = (self.during, self.watch.dependency.name());
        match self.watch.error(std::time::Instant::now()) {
            Some(Transition::WentDown) => error!(service, during, error = %self.error,
                "{name} is failing; posthorn retries and loses nothing. Further errors are counted \
                 (posthorn_dependency_errors_total), not logged, until it works again; a reminder \
                 comes every minute."),
            Some(Transition::StillDown {
                down_for,
                n_unlogged,
            }) => error!(service, during,
                error = %self.error, down_for_s = down_for.as_secs(), n_unlogged,
                "{name} is still failing."),
            _ => debug!(service, during, error = %self.error, "{name} failed again."),
        }
    }
}

/// A dependency answered a request. Ends an outage (one line) once errors have stopped for
/// [`crate::outage::RECOVERY_QUIET`].
pub struct DependencyAnswered {
    pub watch: &'static Watch,
}
impl DependencyAnswered {
    pub fn emit(self) {
        let service = self.watch.dependency.label();
        let name = self.watch.dependency.name();
        if let Some(Transition::CameBack { down_for, n_errors }) =
            self.watch.recovered(std::time::Instant::now())
        {
            info!(
                service,
                down_for_s = down_for.as_secs(),
                n_errors,
                "{name} works again."
            );
        }
    }
}

/// librdkafka reported an error for the readiness probe's client: `/readyz` reports it, so it
/// is logged at debug only.
pub struct ProbeClientError<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub reason: &'a str,
}
impl ProbeClientError<'_> {
    pub fn emit(self) {
        debug!(error = %self.error, reason = self.reason, "The readiness probe's Kafka client reported an error.");
    }
}

/// A read past the rows already sent found an undelivered row below them: it committed after
/// they were read (ids are assigned at INSERT, visible at COMMIT) or an operator re-queued it.
pub struct ReadRestarted {
    pub outbox_id: i64,
}
impl ReadRestarted {
    pub fn emit(self) {
        debug!(
            outbox_id = self.outbox_id,
            "A row below the rows already sent became pending; reading again from the oldest."
        );
        METRICS.read_restarts.inc();
    }
}

/// Checkpoint mode's first start on this outbox (or the first after a switch from rows mode).
pub struct CheckpointCreated<'a> {
    pub table: &'a str,
    pub snapshot: &'a str,
}
impl CheckpointCreated<'_> {
    pub fn emit(self) {
        info!(
            table = self.table,
            snapshot = self.snapshot,
            "Tracking this outbox with a checkpoint; every row still pending is in a later window."
        );
    }
}

/// Exactly once: this producer called `init_transactions`, fencing any older one.
pub struct TransactionsInitialised<'a> {
    pub transactional_id: &'a str,
    pub epoch: i64,
}
impl TransactionsInitialised<'_> {
    pub fn emit(self) {
        info!(
            transactional_id = self.transactional_id,
            epoch = self.epoch,
            "Kafka transactions initialised; any older producer with this transactional.id is fenced."
        );
    }
}

/// Exactly once: a transaction committed (metric only: one per batch).
pub struct TransactionCommitted {
    pub n_records: usize,
}
impl TransactionCommitted {
    pub fn emit(self) {
        debug!(n_records = self.n_records, "Kafka transaction committed.");
        METRICS.transactions.with_label_values(&["committed"]).inc();
    }
}

/// Exactly once: a transaction was aborted (or could not be, and the producer is dropped).
pub struct TransactionAborted<'a> {
    pub reason: &'a str,
    /// The abort failed too: the producer is dropped and the relay leads afresh.
    pub producer_lost: bool,
}
impl TransactionAborted<'_> {
    pub fn emit(self) {
        warn!(
            reason = self.reason,
            producer_lost = self.producer_lost,
            "Kafka transaction aborted; its rows are published again."
        );
        METRICS.transactions.with_label_values(&["aborted"]).inc();
    }
}

/// Exactly once: a commit failed in a way that leaves its outcome unknown (a fatal error, or
/// retries used up); the next leadership learns it from the checkpoint topic.
pub struct TransactionOutcomeUnknown<'a> {
    pub error: &'a str,
}
impl TransactionOutcomeUnknown<'_> {
    pub fn emit(self) {
        warn!(
            error = self.error,
            "A Kafka commit failed and may or may not have committed; leading afresh, the checkpoint topic will tell."
        );
        METRICS.transactions.with_label_values(&["unknown"]).inc();
    }
}

/// Exactly once: a newer producer with this outbox's transactional.id fenced ours.
pub struct ProducerFenced<'a> {
    pub transactional_id: &'a str,
    pub error: &'a str,
    /// Whether this instance still held the lease by its own clock: then another relay uses
    /// the same transactional.id (a configuration error).
    pub lease_held: bool,
}
impl ProducerFenced<'_> {
    pub fn emit(self) {
        if self.lease_held {
            error!(
                transactional_id = self.transactional_id,
                error = self.error,
                "Fenced by another producer with this transactional.id while holding the lease: another relay uses the same POSTHORN_TRANSACTIONAL_ID. Standing by."
            );
        } else {
            warn!(
                transactional_id = self.transactional_id,
                error = self.error,
                "Fenced by the next leader's producer; nothing more is written. Standing by."
            );
        }
        METRICS.producer_fenced.inc();
    }
}

/// Exactly once: a new leader recorded in Postgres what the last committed checkpoint names.
pub struct CheckpointRecovered {
    pub epoch: i64,
    pub transaction: u64,
    pub n_published: usize,
    pub n_set_aside: usize,
    /// Rows that were not yet recorded in Postgres, recorded now.
    pub n_recorded: u64,
}
impl CheckpointRecovered {
    pub fn emit(self) {
        if self.n_recorded > 0 {
            info!(
                epoch = self.epoch,
                transaction = self.transaction,
                n_published = self.n_published,
                n_set_aside = self.n_set_aside,
                n_recorded = self.n_recorded,
                "The last committed Kafka transaction was not yet recorded in Postgres; recorded it, so none of its rows is published again."
            );
        } else {
            debug!(
                epoch = self.epoch,
                transaction = self.transaction,
                "The last committed Kafka transaction is recorded in Postgres."
            );
        }
    }
}

/// Exactly once: the checkpoint topic's last record was committed by a newer epoch than this
/// leader's (the lease table was reset, e.g. by a restore).
pub struct CheckpointFromNewerEpoch {
    pub found: i64,
    pub epoch: i64,
}
impl CheckpointFromNewerEpoch {
    pub fn emit(self) {
        warn!(
            found = self.found,
            epoch = self.epoch,
            "The last checkpoint record was committed with a newer lease epoch than this leader's (was the lease table reset?); its producer is fenced, so it is recorded as final."
        );
    }
}

pub struct CheckpointTopicCreated<'a> {
    pub topic: &'a str,
}
impl CheckpointTopicCreated<'_> {
    pub fn emit(self) {
        info!(
            topic = self.topic,
            "Created the compacted checkpoint topic."
        );
    }
}

/// Exactly once: leading could not begin (Kafka or Postgres unavailable for init or recovery).
pub struct RecoveryFailed<'a> {
    pub error: &'a str,
    pub retry_in: Duration,
}
impl RecoveryFailed<'_> {
    pub fn emit(self) {
        warn!(
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "Could not start leading with exactly-once delivery (transactions or the checkpoint topic); retrying."
        );
        METRICS
            .dependency_errors
            .with_label_values(&["kafka"])
            .inc();
    }
}

/// A test-only fault point fired (`POSTHORN_TEST_FAULT`).
pub struct TestFaultFired<'a> {
    pub point: &'a str,
}
impl TestFaultFired<'_> {
    pub fn emit(self) {
        error!(point = self.point, "POSTHORN_TEST_FAULT fired.");
    }
}

/// A rows-mode start found checkpoint mode's checkpoint row and took over from it.
pub struct CheckpointHandedBack<'a> {
    pub table: &'a str,
    pub n_marked: u64,
}
impl CheckpointHandedBack<'_> {
    pub fn emit(self) {
        info!(
            table = self.table,
            n_marked = self.n_marked,
            "Tracking this outbox per row again: marked what the checkpoint covered delivered and \
             deleted the checkpoint."
        );
    }
}

/// Checkpoint mode, halt-key: a row behind a failed row of its aggregate was set aside.
pub struct RowHeld {
    pub outbox_id: i64,
}
impl RowHeld {
    pub fn emit(self) {
        warn!(
            outbox_id = self.outbox_id,
            "An earlier row of this row's aggregate failed; marked it failed too (held behind it): \
             re-queue the failed row to publish both."
        );
    }
}

pub struct RowFailed<'a> {
    pub outbox_id: i64,
    pub error: &'a str,
}
impl RowFailed<'_> {
    pub fn emit(self) {
        warn!(
            outbox_id = self.outbox_id,
            error = self.error,
            "Publishing a row failed; it and later rows of its aggregate will be retried."
        );
    }
}

pub struct ProducerReplaced<'a> {
    pub reason: &'a str,
}
impl ProducerReplaced<'_> {
    pub fn emit(self) {
        warn!(
            reason = self.reason,
            "Replacing the Kafka producer; resuming from the oldest unacknowledged row."
        );
        METRICS.reconnects.with_label_values(&["kafka"]).inc();
    }
}

pub struct RowPoisoned<'a> {
    pub outbox_id: i64,
    pub reason: &'a str,
    pub policy: crate::config::PoisonPolicy,
    pub dead_letter_topic: Option<&'a str>,
}
impl RowPoisoned<'_> {
    pub fn emit(self) {
        let consequence = match self.policy {
            crate::config::PoisonPolicy::DeadLetter => "later rows of its aggregate go on",
            crate::config::PoisonPolicy::HaltKey => {
                "later rows of its aggregate wait until it is re-queued"
            }
        };
        warn!(
            outbox_id = self.outbox_id,
            reason = self.reason,
            dead_letter_topic = self.dead_letter_topic.unwrap_or(""),
            consequence,
            "Kafka will never accept this row; marked it failed."
        );
        METRICS.rows_dead_lettered.inc();
    }
}

pub struct IsolatingRows {
    pub n_rows: usize,
}
impl IsolatingRows {
    pub fn emit(self) {
        warn!(
            n_rows = self.n_rows,
            "Kafka rejected a record batch as a whole; sending its rows one at a time to find the one it cannot accept."
        );
    }
}

pub struct ProducerCreateFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}
impl ProducerCreateFailed<'_> {
    pub fn emit(self) {
        METRICS.reconnects.with_label_values(&["kafka"]).inc();
        debug!(
            retry_in_ms = self.retry_in.as_millis() as u64,
            "Retrying the producer's creation."
        );
        DependencyFailed {
            watch: &crate::outage::KAFKA,
            during: "creating the producer",
            error: self.error,
        }
        .emit();
    }
}

pub struct DatabaseFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
    pub missing_table: bool,
}
impl DatabaseFailed<'_> {
    pub fn emit(self) {
        let retry_in_ms = self.retry_in.as_millis() as u64;
        METRICS.reconnects.with_label_values(&["postgres"]).inc();
        if self.missing_table {
            error!(error = %self.error, retry_in_ms,
                "The outbox table does not exist; run `posthorn migrate`. Retrying.");
            return;
        }
        debug!(retry_in_ms, "Retrying the relay's query.");
        DependencyFailed {
            watch: &crate::outage::POSTGRES,
            during: "the relay's query",
            error: self.error,
        }
        .emit();
    }
}

pub struct MarkFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub n_rows: usize,
    pub retry_in: Duration,
}
impl MarkFailed<'_> {
    pub fn emit(self) {
        METRICS.reconnects.with_label_values(&["postgres"]).inc();
        debug!(
            n_rows = self.n_rows,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "Retrying the mark (unmarked rows are published again)."
        );
        DependencyFailed {
            watch: &crate::outage::POSTGRES,
            during: "marking acknowledged rows delivered",
            error: self.error,
        }
        .emit();
    }
}

pub struct ListenFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}
impl ListenFailed<'_> {
    pub fn emit(self) {
        METRICS.reconnects.with_label_values(&["postgres"]).inc();
        debug!(
            retry_in_ms = self.retry_in.as_millis() as u64,
            "Reconnecting the LISTEN connection; polling continues meanwhile."
        );
        DependencyFailed {
            watch: &crate::outage::POSTGRES,
            during: "the LISTEN connection",
            error: self.error,
        }
        .emit();
    }
}

pub struct Listening<'a> {
    pub channel: &'a str,
}
impl Listening<'_> {
    pub fn emit(self) {
        debug!(
            channel = self.channel,
            "Listening for outbox notifications."
        );
    }
}

/// The established LISTEN connection failed: logged each time (once per lost connection, not
/// per retry; failed reconnects are [`ListenFailed`], logged as Postgres' state changes).
pub struct ListenLost<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}
impl ListenLost<'_> {
    pub fn emit(self) {
        METRICS.reconnects.with_label_values(&["postgres"]).inc();
        METRICS
            .dependency_errors
            .with_label_values(&["postgres"])
            .inc();
        warn!(error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64,
            "LISTEN connection lost; reconnecting. Polling continues meanwhile.");
    }
}

pub struct ListenReconnecting;
impl ListenReconnecting {
    pub fn emit(self) {
        warn!("LISTEN connection lost; reconnecting.");
        METRICS.reconnects.with_label_values(&["postgres"]).inc();
    }
}

pub struct SignalReceived<'a> {
    pub signal: &'a str,
}
impl SignalReceived<'_> {
    pub fn emit(self) {
        info!(
            signal = self.signal,
            "Stopping: no new reads; waiting for in-flight acknowledgements."
        );
    }
}

pub struct RelayStopped {
    pub n_published: u64,
    pub n_unacknowledged: usize,
}
impl RelayStopped {
    pub fn emit(self) {
        info!(
            n_published = self.n_published,
            n_unacknowledged = self.n_unacknowledged,
            "Relay stopped."
        );
        METRICS.leader.set(0);
        METRICS.producer_in_flight.set(0);
    }
}

pub struct HttpListening {
    pub addr: SocketAddr,
}
impl HttpListening {
    pub fn emit(self) {
        info!(
            addr = %self.addr,
            "Serving /metrics, /healthz and /readyz."
        );
    }
}

pub struct HttpFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}
impl HttpFailed<'_> {
    pub fn emit(self) {
        error!(error = %self.error, "The HTTP server failed; /metrics, /healthz and /readyz are gone.");
    }
}

pub struct MetricsEncodeFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}
impl MetricsEncodeFailed<'_> {
    pub fn emit(self) {
        error!(error = %self.error, "Encoding the metrics failed.");
    }
}

/// The periodic backlog query's result (metrics only).
pub struct BacklogMeasured {
    pub n_pending: i64,
    pub oldest_pending_age: Duration,
    pub n_failed: i64,
}
impl BacklogMeasured {
    pub fn emit(self) {
        METRICS.backlog_rows.set(self.n_pending);
        METRICS
            .oldest_pending_age
            .set(self.oldest_pending_age.as_secs_f64());
        METRICS.failed_rows.set(self.n_failed);
    }
}

pub struct BacklogFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    /// The previous measurement failed too (and was logged).
    pub again: bool,
}
impl BacklogFailed<'_> {
    pub fn emit(self) {
        if self.again {
            debug!(error = %self.error, "Measuring the backlog failed again.");
        } else {
            warn!(error = %self.error,
                "Measuring the backlog failed; the backlog gauges keep their last values until it succeeds.");
        }
    }
}

/// The periodic summary at info: throughput and lag at a glance.
pub struct Summary {
    pub period: Duration,
    pub n_delivered: u64,
    /// The last backlog measurement, if one succeeded.
    pub n_pending: Option<i64>,
    pub oldest_pending_age: Option<Duration>,
    pub n_failed: Option<i64>,
}
impl Summary {
    pub fn emit(self) {
        let seconds = self.period.as_secs_f64().max(0.001);
        info!(
            rows_per_second = (self.n_delivered as f64 / seconds * 10.0).round() / 10.0,
            n_delivered = self.n_delivered,
            period_s = self.period.as_secs(),
            backlog = self
                .n_pending
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unknown".into()),
            oldest_pending_age_s = self
                .oldest_pending_age
                .map(|a| format!("{:.1}", a.as_secs_f64()))
                .unwrap_or_else(|| "unknown".into()),
            failed = self
                .n_failed
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unknown".into()),
            "Summary."
        );
    }
}

/// `/readyz`'s answer changed.
pub struct ReadinessChanged<'a> {
    pub ready: bool,
    pub postgres: &'a str,
    pub kafka: &'a str,
    pub schema: &'a str,
}
impl ReadinessChanged<'_> {
    pub fn emit(self) {
        if self.ready {
            info!(
                postgres = self.postgres,
                kafka = self.kafka,
                schema = self.schema,
                "Ready: Postgres and Kafka answer and the outbox table is in place."
            );
        } else {
            warn!(
                postgres = self.postgres,
                kafka = self.kafka,
                schema = self.schema,
                "Not ready."
            );
        }
    }
}

pub struct RetentionSwept {
    pub n_deleted: u64,
    pub retention: Duration,
    pub elapsed: Duration,
}
impl RetentionSwept {
    pub fn emit(self) {
        if self.n_deleted > 0 {
            info!(
                n_deleted = self.n_deleted,
                retention = %humantime::format_duration(self.retention),
                elapsed_ms = self.elapsed.as_millis() as u64,
                "Deleted delivered rows older than the retention period."
            );
        }
        METRICS.retention_deleted.inc_by(self.n_deleted);
    }
}

pub struct RetentionFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub n_deleted: u64,
    pub retry_in: Duration,
}
impl RetentionFailed<'_> {
    pub fn emit(self) {
        warn!(error = %self.error, n_deleted = self.n_deleted,
            retry_in_s = self.retry_in.as_secs(),
            "Deleting delivered rows after the retention period failed; trying again later.");
        METRICS.retention_deleted.inc_by(self.n_deleted);
    }
}

pub struct LeadershipAcquired<'a> {
    pub owner: &'a str,
    pub epoch: i64,
}
impl LeadershipAcquired<'_> {
    pub fn emit(self) {
        info!(
            owner = self.owner,
            epoch = self.epoch,
            "Acquired the lease: this instance now publishes."
        );
        METRICS.leader.set(1);
    }
}

pub struct LeadershipLost<'a> {
    pub epoch: i64,
    pub reason: &'a str,
}
impl LeadershipLost<'_> {
    pub fn emit(self) {
        warn!(
            epoch = self.epoch,
            reason = self.reason,
            "Lost the lease: this instance stops publishing and stands by."
        );
        METRICS.leader.set(0);
    }
}

pub struct LeaseReleased {
    pub epoch: i64,
}
impl LeaseReleased {
    pub fn emit(self) {
        info!(
            epoch = self.epoch,
            "Released the lease: a standby takes over at its next poll."
        );
        METRICS.leader.set(0);
    }
}

pub struct LeaseFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}
impl LeaseFailed<'_> {
    pub fn emit(self) {
        DependencyFailed {
            watch: &crate::outage::POSTGRES,
            during: "a lease statement",
            error: self.error,
        }
        .emit();
    }
}

pub struct StandingBy<'a> {
    pub owner: &'a str,
}
impl StandingBy<'_> {
    pub fn emit(self) {
        info!(
            owner = self.owner,
            "Standing by: another instance holds the lease."
        );
    }
}

pub struct AcksStalled {
    pub n_records: usize,
    pub waited: Duration,
}
impl AcksStalled {
    pub fn emit(self) {
        warn!(
            n_records = self.n_records,
            waited_ms = self.waited.as_millis() as u64,
            "No acknowledgement from Kafka for a while; purging the producer to replace it."
        );
    }
}

pub struct ProducerCreated<'a> {
    pub brokers: &'a str,
}
impl ProducerCreated<'_> {
    pub fn emit(self) {
        debug!(brokers = self.brokers, "Kafka producer created.");
    }
}

pub struct ProducerClosed;
impl ProducerClosed {
    pub fn emit(self) {
        debug!("Kafka producer closed; what it still held is purged.");
    }
}
