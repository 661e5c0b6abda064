//! Exactly-once delivery in the loop: a batch's Kafka transaction is begun before its first
//! record and ended once every delivery report is in. It commits only if every row was
//! acknowledged, this instance still leads and the producer is healthy; its checkpoint record
//! names the batch's rows and those of the batch before it whose Postgres record may not have
//! returned yet. Anything else aborts it: then no row of the batch counts as acknowledged (a
//! read_committed consumer sees none of them), and the loop settles it as an unclean batch.
//!
//! A producer that can write no more (fenced, fatal, or a commit whose outcome is unknown) ends
//! the leadership: the next one starts with [`begin_leading`], which fences, reads the
//! checkpoint topic and records its last committed transaction before any row is read.

use std::time::Duration;

use crate::acks::{Deliverable, Settled, Tracker};
use crate::config::PoisonPolicy;
use crate::events;
use crate::outbox::Outbox;
use crate::publisher::{PublishReport, Publisher, TxnError};
use crate::row::{Failure, OutboxRow};

use super::pipeline::Transaction;
use super::producer::{LeadError, ProducerSlot};

/// A batch whose transaction could not begin: every row failed with that error, none sent.
pub(super) fn not_begun(
    rows: &[OutboxRow],
    policy: PoisonPolicy,
    error: TxnError,
) -> (Settled, PublishReport, Transaction) {
    let mut tracker = Tracker::new(rows, policy);
    for i in 0..rows.len() {
        if tracker.may_send(i) {
            tracker.fail(
                i,
                Failure::Kafka(format!("beginning a transaction: {error}")),
            );
        } else {
            tracker.withhold(i);
        }
    }
    let report = PublishReport {
        n_transient: rows.len(),
        n_suspect: 0,
    };
    let transaction = match error {
        TxnError::Abortable(_) | TxnError::Retriable(_) => Transaction::Aborted,
        lost => Transaction::ProducerLost(lost),
    };
    (tracker.finish(), report, transaction)
}

/// Ends the batch's transaction: commits it if the batch is clean, else aborts it. `unmarked`:
/// rows of earlier transactions whose Postgres record may still be running.
pub(super) async fn end(
    producer: &Publisher,
    mut settled: Settled,
    mut report: PublishReport,
    n_rows: usize,
    unmarked: &[i64],
    still_leader: &(dyn Fn() -> bool + Sync),
) -> (Settled, PublishReport, Transaction) {
    let clean = settled.deliverable.len() == n_rows
        && report.n_transient == 0
        && report.n_suspect == 0
        && producer.fatal_error().is_none()
        && still_leader();
    let commit_failed = if clean {
        let mut published = settled.deliverable.ids().to_vec();
        published.extend_from_slice(unmarked);
        match producer.commit_transaction(&published, Vec::new()).await {
            Ok(_) => {
                events::TransactionCommitted {
                    n_records: n_rows + 1,
                }
                .emit();
                return (settled, report, Transaction::Committed);
            }
            Err(err @ TxnError::Abortable(_)) => Some(err),
            Err(lost) => {
                void(&mut settled);
                match &lost {
                    // The next leader's init aborted it.
                    TxnError::Fenced(reason) => events::TransactionAborted {
                        reason,
                        producer_lost: true,
                    }
                    .emit(),
                    // Committed or not, only the checkpoint topic can tell: lead afresh.
                    other => events::TransactionOutcomeUnknown {
                        error: &other.to_string(),
                    }
                    .emit(),
                }
                return (settled, report, Transaction::ProducerLost(lost));
            }
        }
    } else {
        None
    };
    let reason = match &commit_failed {
        Some(err) => err.to_string(),
        None => "not every record of the batch was acknowledged".to_owned(),
    };
    let aborted = producer.abort_transaction().await;
    events::TransactionAborted {
        reason: &reason,
        producer_lost: aborted.is_err(),
    }
    .emit();
    if let Some(err) = commit_failed {
        // Every row was acknowledged: the failure is the transaction's.
        let failure = Failure::TransactionAborted(err.to_string());
        let ids: Vec<i64> = settled.deliverable.ids().to_vec();
        report.n_transient += ids.len();
        settled
            .failed
            .extend(ids.into_iter().map(|id| (id, failure.clone())));
        settled.deliverable = Deliverable::default();
    } else {
        void(&mut settled);
    }
    let transaction = match aborted {
        Ok(()) => Transaction::Aborted,
        Err(lost) => Transaction::ProducerLost(lost),
    };
    (settled, report, transaction)
}

/// The batch's acknowledgements no longer count: its transaction did not commit.
fn void(settled: &mut Settled) {
    settled.n_held += settled.deliverable.len();
    settled.deliverable = Deliverable::default();
}

/// Starts a leadership with exactly-once delivery: fences older producers, reads the
/// checkpoint topic and records in Postgres what its last committed transaction published, so
/// that no row it names is read again. (The caller retries it with a backoff.)
pub(super) async fn begin_leading(
    producer: &mut ProducerSlot,
    outbox: &Outbox,
    epoch: i64,
) -> Result<(), LeadError> {
    let Some(record) = producer.lead(outbox, epoch).await? else {
        return Ok(());
    };
    let n_recorded = outbox.record_committed(&record, epoch).await?;
    events::CheckpointRecovered {
        epoch: record.epoch,
        transaction: record.transaction,
        n_published: record.published_ids().len(),
        n_set_aside: record.set_aside.len(),
        n_recorded,
    }
    .emit();
    Ok(())
}

/// How long a leader whose producer was fenced while it held the lease waits before leading
/// again: another relay uses the same transactional.id, and each would fence the other.
pub(super) const AFTER_FENCED: Duration = Duration::from_secs(5);
