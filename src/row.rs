//! The ground floor: an outbox row as the relay reads it, its payload, and why a row was not
//! delivered. Every other room imports these; this one imports none of them.
//!
//! Reasons stay values ([`Failure`], [`Poison`], [`Poisoned`]) until they are logged or stored in
//! the row's `last_error`: their `Display` is the text an operator reads there.

use uuid::Uuid;

/// One outbox row as the relay reads it. JSON columns arrive as Postgres renders them and bytes
/// as stored, so the payload is never parsed or re-encoded on the way to Kafka.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// `None`: a tombstone (both payload columns NULL).
    pub payload: Option<Payload>,
    pub topic: Option<String>,
    pub headers: Option<String>,
    /// `created_at` in microseconds since the Unix epoch, by Postgres' clock: where the
    /// commit-to-ack latency starts.
    pub created_at_us: i64,
}

impl OutboxRow {
    /// Order is promised per aggregate, the unit whose writers serialize.
    pub(crate) fn aggregate(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }
}

/// A row's Kafka value: from the `payload` (jsonb) column or the `payload_bytes` (bytea) column;
/// the table's CHECK allows at most one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `payload` as JSON text.
    Json(String),
    /// `payload_bytes`, with the row's `content_type`.
    Bytes {
        bytes: Vec<u8>,
        content_type: String,
    },
}

impl Payload {
    /// The record's value.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Json(json) => json.as_bytes(),
            Payload::Bytes { bytes, .. } => bytes,
        }
    }

    /// The record's `content-type` header.
    pub fn content_type(&self) -> &str {
        match self {
            Payload::Json(_) => "application/json",
            Payload::Bytes { content_type, .. } => content_type,
        }
    }

    pub(crate) fn from_columns(
        json: Option<String>,
        bytes: Option<Vec<u8>>,
        content_type: Option<String>,
    ) -> Option<Payload> {
        match (json, bytes) {
            (Some(json), _) => Some(Payload::Json(json)),
            (None, Some(bytes)) => Some(Payload::Bytes {
                bytes,
                // The table's CHECK requires content_type on bytes rows. Were one missing, the
                // row is still published: failing the read would stall the whole relay.
                content_type: content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
            }),
            (None, None) => None,
        }
    }
}

/// Why an attempt to publish a row failed for a reason that may pass: recorded on the row
/// (`attempts`, `last_error`), which stays pending and is read again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Kafka failed the record; librdkafka's description.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// The producer went away (replaced, purged) before the record's delivery report.
    #[error("the producer closed before the record's delivery report")]
    NoDeliveryReport,
    /// A poison row that the dead-letter topic refused: it stays pending.
    #[error("{reason}; publishing to the dead-letter topic failed: Kafka: {kafka}")]
    DeadLetterFailed { reason: Poison, kafka: String },
    /// Exactly once: every record was acknowledged, but the transaction holding them could not
    /// commit and was aborted; the row is published again in a later transaction.
    #[error("Kafka transaction aborted: {0}")]
    TransactionAborted(String),
    /// A poison row that could not be dead-lettered for want of a producer.
    #[error("{reason}; not yet dead-lettered: no usable producer")]
    NoProducerForDeadLetter { reason: Poison },
}

/// Why Kafka will never accept a row: it is set aside (`failed_at`) until an operator re-queues
/// it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    /// The topic breaks Kafka's naming rule.
    #[error("{0}")]
    Topic(String),
    /// The row's `headers` are not an object of strings, or use a reserved name.
    #[error("{0}")]
    Headers(String),
    /// Kafka (or librdkafka, locally) refused this record; its description.
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// A poison row as it is stored: the reason, and where it went if it was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    pub reason: Poison,
    pub dead_letter_topic: Option<String>,
}

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.dead_letter_topic {
            None => write!(f, "{}", self.reason),
            Some(topic) => write!(f, "{} (dead-lettered to {topic})", self.reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_reasons_read_as_before() {
        let reason = Poison::Kafka("Message production error: MessageSizeTooLarge".into());
        assert_eq!(
            Poisoned {
                reason: reason.clone(),
                dead_letter_topic: Some("dlq".into())
            }
            .to_string(),
            "Kafka: Message production error: MessageSizeTooLarge (dead-lettered to dlq)"
        );
        assert_eq!(
            Failure::DeadLetterFailed {
                reason: Poison::Topic("the topic name is empty".into()),
                kafka: "x".into()
            }
            .to_string(),
            "the topic name is empty; publishing to the dead-letter topic failed: Kafka: x"
        );
        assert_eq!(
            Failure::NoProducerForDeadLetter { reason }.to_string(),
            "Kafka: Message production error: MessageSizeTooLarge; not yet dead-lettered: no \
             usable producer"
        );
    }
}
