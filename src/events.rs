//! Every log line the relay emits, one struct per event, so what posthorn reports is listed in
//! one place (and metrics can join the logs here). Messages are sentences; fields are key/values;
//! no event carries a secret (database URLs are always the redacted form).

use std::time::Duration;

use tracing::{debug, error, info, warn};

pub struct RelayStarted<'a> {
    pub database: &'a str,
    pub brokers: &'a str,
    pub table: &'a str,
    pub batch_size: usize,
}
impl RelayStarted<'_> {
    pub fn emit(self) {
        info!(
            database = self.database,
            brokers = self.brokers,
            table = self.table,
            batch_size = self.batch_size,
            "Relay started."
        );
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
    pub elapsed: Duration,
}
impl BatchPublished {
    pub fn emit(self) {
        debug!(
            n_rows = self.n_rows,
            n_marked = self.n_marked,
            n_failed = self.n_failed,
            n_held = self.n_held,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "Batch published."
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
        error!(error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64,
            "Creating the Kafka producer failed; retrying.");
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
        if self.missing_table {
            error!(error = %self.error, retry_in_ms,
                "The outbox table does not exist; run `posthorn migrate`. Retrying.");
        } else {
            warn!(error = %self.error, retry_in_ms, "Postgres is unavailable; retrying.");
        }
    }
}

pub struct MarkFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub n_rows: usize,
    pub retry_in: Duration,
}
impl MarkFailed<'_> {
    pub fn emit(self) {
        warn!(error = %self.error, n_rows = self.n_rows, retry_in_ms = self.retry_in.as_millis() as u64,
            "Marking acknowledged rows failed; retrying (unmarked rows are published again).");
    }
}

pub struct ListenFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}
impl ListenFailed<'_> {
    pub fn emit(self) {
        warn!(error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64,
            "LISTEN connection failed; polling continues meanwhile.");
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

pub struct ListenReconnecting;
impl ListenReconnecting {
    pub fn emit(self) {
        warn!("LISTEN connection lost; reconnecting.");
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
    }
}

pub struct LeaseFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}
impl LeaseFailed<'_> {
    pub fn emit(self) {
        warn!(error = %self.error, "A lease statement failed; retrying.");
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
