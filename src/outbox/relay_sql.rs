//! The relay's statements: read the oldest undelivered rows (or the rows past those in flight,
//! with the check that nothing was left below them), mark rows delivered, record failed
//! attempts and mark poison rows failed. Each is one statement per batch.

use std::fmt::Display;

use sqlx::{AssertSqlSafe, Row};

use std::sync::atomic::Ordering;

use crate::acks::Deliverable;
use crate::config::Tracking;
use crate::events;
use crate::row::{Failure, OutboxRow, Payload, Poisoned};

use super::checkpoint::Done;
use super::{Outbox, OutboxError};

/// What [`Outbox::fetch_after`] found.
#[derive(Debug)]
pub enum ReadPast {
    /// The oldest undelivered rows after the ones sent, in id order.
    Rows(Vec<OutboxRow>),
    /// This undelivered row lies below the last row sent and was not sent.
    RowBelow(i64),
}

impl Outbox {
    /// The oldest `limit` undelivered rows, in id order. In checkpoint mode: the next rows from
    /// the checkpoint on.
    pub async fn fetch_batch(&self, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        if self.tracking == Tracking::Checkpoint {
            return self.fetch_window(limit, &[]).await;
        }
        if !self.handed_back.load(Ordering::Relaxed) {
            self.take_over_from_checkpoint().await?;
            self.handed_back.store(true, Ordering::Relaxed);
        }
        let rows = sqlx::query(AssertSqlSafe(self.fetch_sql.clone()))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::query("reading undelivered outbox rows"))?;
        decode_rows(&rows)
    }

    /// The oldest `limit` undelivered rows apart from `sent` (rows already sent, in flight or
    /// acknowledged and not yet marked; in id order), unless an undelivered row other than those
    /// lies below the last of them (it committed late, or was re-queued): then the caller must
    /// mark `sent` and read from the oldest row.
    ///
    /// Two statements, in this order: the rows above the last sent id, then the check that
    /// nothing but sent rows is undelivered below it. A row the check misses committed after
    /// the first statement's snapshot, so after every row it returned: publishing it later
    /// keeps commit order.
    pub async fn fetch_after(&self, limit: usize, sent: &[i64]) -> Result<ReadPast, OutboxError> {
        if self.tracking == Tracking::Checkpoint {
            // Windows need no check below: a window's rows are all committed when it is read.
            return self.fetch_window(limit, sent).await.map(ReadPast::Rows);
        }
        let Some(&last) = sent.last() else {
            return self.fetch_batch(limit).await.map(ReadPast::Rows);
        };
        debug_assert!(sent.windows(2).all(|w| w[0] < w[1]));
        let rows = sqlx::query(AssertSqlSafe(self.fetch_after_sql.clone()))
            .bind(limit as i64)
            .bind(last)
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::query("reading undelivered outbox rows"))?;
        let below: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(self.pending_upto_sql.clone()))
            .bind(last)
            .bind(sent.len() as i64 + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::query("reading undelivered outbox rows"))?;
        // Rows of `sent` may already be marked (the relay marks while it reads), so `below` is
        // a subset of `sent`, not necessarily all of it.
        if let Some(&id) = below.iter().find(|id| sent.binary_search(id).is_err()) {
            return Ok(ReadPast::RowBelow(id));
        }
        decode_rows(&rows).map(ReadPast::Rows)
    }

    /// Marks the given rows delivered, if `epoch` still holds the lease: in rows mode in one
    /// statement, in checkpoint mode by moving the checkpoint. Returns how many rows it
    /// recorded (0 for a deposed leader).
    pub async fn mark_delivered(&self, rows: &Deliverable, epoch: i64) -> Result<u64, OutboxError> {
        match self.tracking {
            Tracking::Rows => self.mark_rows_delivered(rows, epoch).await,
            Tracking::Checkpoint => self.record_done(rows.ids(), Done::Published, epoch).await,
        }
    }

    /// Rows mode's start: a checkpoint row left by checkpoint mode is handed back (what it
    /// covers marked delivered), so rows mode publishes none of it again. An outbox migrated
    /// before version 7 has no checkpoint table, and nothing to hand back.
    async fn take_over_from_checkpoint(&self) -> Result<(), OutboxError> {
        match self.hand_back_checkpoint().await {
            Ok(Some(n_marked)) => {
                events::CheckpointHandedBack {
                    table: &self.table.qualified(),
                    n_marked,
                }
                .emit();
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(err) if err.is_undefined_table() => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// `delivered_at` on each of `rows`, in one statement, if `epoch` still holds the lease.
    pub(super) async fn mark_rows_delivered(
        &self,
        rows: &Deliverable,
        epoch: i64,
    ) -> Result<u64, OutboxError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(AssertSqlSafe(self.mark_sql.clone()))
            .bind(rows.ids())
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query("marking outbox rows delivered"))?;
        Ok(done.rows_affected())
    }

    /// Records one failed attempt per row, with its error, in one statement. The rows stay
    /// Records one failed attempt per row, with its error, in one statement. The rows stay
    /// pending and are read again.
    pub(crate) async fn record_failures(
        &self,
        failures: &[(i64, Failure)],
    ) -> Result<(), OutboxError> {
        if failures.is_empty() {
            return Ok(());
        }
        let (ids, errors) = ids_and_errors(failures);
        sqlx::query(AssertSqlSafe(self.fail_sql.clone()))
            .bind(ids)
            .bind(errors)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query("recording failed publish attempts"))?;
        Ok(())
    }

    /// Marks rows Kafka will never accept as failed (`failed_at`), with the reason, in one
    /// statement, if `epoch` still holds the lease. They are not read again until an operator
    /// re-queues them.
    pub(crate) async fn mark_failed(
        &self,
        rows: &[(i64, Poisoned)],
        epoch: i64,
    ) -> Result<(), OutboxError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (ids, errors) = ids_and_errors(rows);
        sqlx::query(AssertSqlSafe(self.poison_sql.clone()))
            .bind(ids)
            .bind(errors)
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query("marking outbox rows failed"))?;
        if self.tracking == Tracking::Checkpoint {
            // Set aside: the checkpoint may pass them.
            let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
            self.record_done(&ids, Done::SetAside, epoch).await?;
        }
        Ok(())
    }
}

/// The ids and, as stored in `last_error`, the reasons.
fn ids_and_errors<E: Display>(rows: &[(i64, E)]) -> (Vec<i64>, Vec<String>) {
    rows.iter().map(|(id, e)| (*id, e.to_string())).unzip()
}

pub(super) fn decode_rows(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<OutboxRow>, OutboxError> {
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                event_type: r.try_get("event_type")?,
                payload: Payload::from_columns(
                    r.try_get("payload")?,
                    r.try_get("payload_bytes")?,
                    r.try_get("content_type")?,
                ),
                topic: r.try_get("topic")?,
                headers: r.try_get("headers")?,
                created_at_us: r.try_get("created_at_us")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(OutboxError::query("decoding an outbox row"))
}
