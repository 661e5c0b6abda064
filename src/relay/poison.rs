//! `POSTHORN_ON_POISON` applied to rows Kafka will never accept: mark them failed, after
//! publishing them to the dead-letter topic when one is set.

use crate::config::{Config, PoisonPolicy};
use crate::events;
use crate::publisher::{DeadLetterError, DeadLetterPayload};
use crate::row::{Failure, OutboxRow, Poison, Poisoned};

use super::producer::ProducerSlot;

/// Returns the rows to mark failed, with the reason. With a dead-letter topic, a row is marked
/// failed only once the dead-letter topic has it (without its payload if that is what made it
/// too large); a row that could not be dead-lettered joins `retry` instead.
pub(crate) async fn settle(
    rows: &[OutboxRow],
    poisoned: Vec<(i64, Poison)>,
    producer: &mut ProducerSlot,
    config: &Config,
    retry: &mut Vec<(i64, Failure)>,
) -> Vec<(i64, Poisoned)> {
    let dead_letter_topic = match (&config.dead_letter_topic, config.on_poison) {
        (Some(topic), PoisonPolicy::DeadLetter) if !poisoned.is_empty() => topic.as_str(),
        _ => {
            return poisoned
                .into_iter()
                .map(|(outbox_id, reason)| {
                    events::RowPoisoned {
                        outbox_id,
                        reason: &reason.to_string(),
                        policy: config.on_poison,
                        dead_letter_topic: None,
                    }
                    .emit();
                    let poisoned = Poisoned {
                        reason,
                        dead_letter_topic: None,
                    };
                    (outbox_id, poisoned)
                })
                .collect();
        }
    };
    let mut pending: Vec<(&OutboxRow, Poison)> = poisoned
        .into_iter()
        .filter_map(|(id, reason)| rows.iter().find(|r| r.id == id).map(|r| (r, reason)))
        .collect();
    let mut failed = Vec::new();
    for payload in [DeadLetterPayload::Keep, DeadLetterPayload::Omit] {
        if pending.is_empty() {
            break;
        }
        let publisher = match producer.usable() {
            Ok(publisher) => publisher,
            Err(error) => {
                events::ProducerCreateFailed {
                    error: &error,
                    retry_in: std::time::Duration::ZERO,
                }
                .emit();
                break;
            }
        };
        let results = publisher
            .dead_letter(&pending, dead_letter_topic, payload)
            .await;
        let mut too_large = Vec::new();
        for ((row, reason), result) in pending.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    events::RowPoisoned {
                        outbox_id: row.id,
                        reason: &reason.to_string(),
                        policy: config.on_poison,
                        dead_letter_topic: Some(dead_letter_topic),
                    }
                    .emit();
                    let poisoned = Poisoned {
                        reason,
                        dead_letter_topic: Some(dead_letter_topic.to_owned()),
                    };
                    failed.push((row.id, poisoned));
                }
                Err(DeadLetterError::TooLarge(_)) if payload == DeadLetterPayload::Keep => {
                    too_large.push((row, reason));
                }
                Err(DeadLetterError::TooLarge(kafka) | DeadLetterError::Refused(kafka)) => {
                    retry.push((row.id, Failure::DeadLetterFailed { reason, kafka }));
                }
            }
        }
        pending = too_large;
    }
    retry.extend(
        pending
            .into_iter()
            .map(|(row, reason)| (row.id, Failure::NoProducerForDeadLetter { reason })),
    );
    failed
}
