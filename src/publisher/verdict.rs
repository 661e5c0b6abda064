//! What a delivery report means: acknowledged, a failure that may pass, a rejection of a whole
//! record batch (one of its rows is poison, but which is known only once each is sent alone), or
//! a verdict about this row (poison). Pure functions over librdkafka's error codes.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::oneshot;

use crate::acks::Tracker;
use crate::events;
use crate::row::{Failure, OutboxRow, Poison};

/// A record's delivery report: `Err(RecvError)` if the producer went away without one.
pub(super) type Report = Result<Result<(), KafkaError>, oneshot::error::RecvError>;

/// A sent record: the row's index in the batch, its topic, and its delivery report.
pub(super) type Sent = (usize, String, Report);

/// What went wrong in a batch, beyond each row's outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublishReport {
    /// Records Kafka failed for reasons that may pass (including a fatal producer error): the
    /// producer must be replaced before the next batch.
    pub(crate) n_transient: usize,
    /// Records failed by a rejection of their whole record batch (too large, invalid): one of
    /// the batch's rows is poison, but which is known only once each is sent alone.
    pub(crate) n_suspect: usize,
}

impl PublishReport {
    pub(super) fn add(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Acked | Verdict::Poison => {}
            Verdict::Transient => self.n_transient += 1,
            Verdict::Suspect => self.n_suspect += 1,
        }
    }
}

/// How one record's delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Acked,
    Transient,
    Suspect,
    Poison,
}

/// What a batch-level rejection says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// The error is about this record alone: it was refused locally, or sent alone.
    ThisRecord,
    /// The record shared its record batch with others: a rejection may be about any of them.
    ItsRecordBatch,
}

impl Scope {
    /// A batch-level rejection names the row only when the row was sent alone.
    pub(super) fn of_batch(n_rows: usize) -> Scope {
        if n_rows == 1 {
            Scope::ThisRecord
        } else {
            Scope::ItsRecordBatch
        }
    }
}

/// Records a delivery report in the tracker.
pub(super) fn settle(
    tracker: &mut Tracker<'_>,
    rows: &[OutboxRow],
    sent: Sent,
    scope: Scope,
) -> Verdict {
    let (i, topic, report) = sent;
    match report {
        Ok(Ok(())) => {
            tracker.ack(i);
            events::RecordAcknowledged {
                topic: &topic,
                created_at_us: rows[i].created_at_us,
            }
            .emit();
            Verdict::Acked
        }
        Ok(Err(err)) => record_failure(tracker, i, &err, scope),
        Err(_canceled) => {
            tracker.fail(i, Failure::NoDeliveryReport);
            Verdict::Transient
        }
    }
}

/// Classifies a failed record and records it in the tracker.
pub(super) fn record_failure(
    tracker: &mut Tracker<'_>,
    i: usize,
    err: &KafkaError,
    scope: Scope,
) -> Verdict {
    let verdict = classify(err.rdkafka_error_code(), scope);
    match verdict {
        Verdict::Poison => tracker.poison(i, Poison::Kafka(err.to_string())),
        _ => tracker.fail(i, Failure::Kafka(err.to_string())),
    }
    verdict
}

fn classify(code: Option<RDKafkaErrorCode>, scope: Scope) -> Verdict {
    use RDKafkaErrorCode as C;
    match code {
        // Decided per topic: every record for that topic would fail the same way.
        Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::InvalidTopic) => Verdict::Poison,
        // Decided per record batch: poison only when the batch held this record alone.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidMessage,
        ) => match scope {
            Scope::ThisRecord => Verdict::Poison,
            Scope::ItsRecordBatch => Verdict::Suspect,
        },
        _ => Verdict::Transient,
    }
}

/// Why a row did not reach the dead-letter topic; librdkafka's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeadLetterError {
    /// The record was refused as too large: try again without the payload.
    TooLarge(String),
    Refused(String),
}

impl DeadLetterError {
    pub(super) fn of(err: &KafkaError) -> DeadLetterError {
        let too_large = matches!(
            err.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::MessageBatchTooLarge
                    | RDKafkaErrorCode::InvalidMessageSize
            )
        );
        if too_large {
            DeadLetterError::TooLarge(err.to_string())
        } else {
            DeadLetterError::Refused(err.to_string())
        }
    }
}

/// The fatal error that stopped a producer: it must be replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FatalError {
    code: RDKafkaErrorCode,
    reason: String,
}

impl FatalError {
    pub(super) fn new(code: RDKafkaErrorCode, reason: String) -> FatalError {
        FatalError { code, reason }
    }
}

impl std::fmt::Display for FatalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_level_rejections_are_poison_only_for_a_record_sent_alone() {
        use RDKafkaErrorCode as C;
        use Scope::{ItsRecordBatch, ThisRecord};
        assert_eq!(
            classify(Some(C::MessageSizeTooLarge), ItsRecordBatch),
            Verdict::Suspect
        );
        assert_eq!(
            classify(Some(C::MessageSizeTooLarge), ThisRecord),
            Verdict::Poison
        );
        assert_eq!(
            classify(Some(C::UnknownTopicOrPartition), ItsRecordBatch),
            Verdict::Poison
        );
        assert_eq!(
            classify(Some(C::NotEnoughReplicas), ThisRecord),
            Verdict::Transient
        );
        assert_eq!(
            classify(Some(C::OutOfOrderSequenceNumber), ThisRecord),
            Verdict::Transient
        );
        assert_eq!(
            classify(Some(C::TopicAuthorizationFailed), ThisRecord),
            Verdict::Transient
        );
        assert_eq!(classify(None, ThisRecord), Verdict::Transient);
    }
}
