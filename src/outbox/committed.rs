//! Exactly-once delivery's Postgres side: the outbox's identity (`<table>_identity`), and, on
//! becoming leader, recording what the last committed Kafka transaction published (or set
//! aside) that Postgres had not recorded yet: the crash between Kafka's commit and the
//! checkpoint's advance.

use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::checkpoint_record::CheckpointRecord;

use super::checkpoint::{checkpoint_table, covered};
use super::{Outbox, OutboxError};

impl Outbox {
    /// The outbox's identity (migration 8): names it in Kafka.
    pub(crate) async fn identity(&self) -> Result<Uuid, OutboxError> {
        let sql = format!(
            "SELECT id FROM \"{}\".\"{}_identity\"",
            self.table.schema, self.table.table
        );
        let id: Option<Uuid> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the outbox identity"))?;
        id.ok_or_else(|| {
            OutboxError::Corrupt(format!(
                "{}_identity has no row; run `posthorn migrate` (migration 8 makes it)",
                self.table.table
            ))
        })
    }

    /// Records the rows `record` names that Postgres does not cover yet: published ones get
    /// `delivered_at`, set-aside ones `failed_at` with their reason; in one transaction, if
    /// `epoch` still holds the lease. Returns how many rows it recorded.
    pub(crate) async fn record_committed(
        &self,
        record: &CheckpointRecord,
        epoch: i64,
    ) -> Result<u64, OutboxError> {
        let t = self.table.qualified();
        let cp = checkpoint_table(&self.table);
        let lease = crate::lease::lease_table(&self.table);
        let uncovered = format!(
            "o.delivered_at IS NULL AND o.failed_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM {cp} AS c WHERE {}) \
             AND EXISTS (SELECT 1 FROM {lease} WHERE epoch = $2 AND expires_at > now())",
            covered("o", "c")
        );
        let what = "recording the last committed Kafka transaction";
        let mut tx = self.pool.begin().await.map_err(OutboxError::query(what))?;
        let published = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {t} AS o SET delivered_at = now(), delivered_epoch = $2 \
             WHERE o.id = ANY($1) AND {uncovered}"
        )))
        .bind(record.published_ids())
        .bind(epoch)
        .execute(&mut *tx)
        .await
        .map_err(OutboxError::query(what))?;
        let (ids, reasons): (Vec<i64>, Vec<String>) = record
            .set_aside
            .iter()
            .map(|s| (s.id, s.reason.clone()))
            .unzip();
        let set_aside = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.reason, \
                    last_attempt_at = now(), failed_at = now(), delivered_epoch = $2 \
             FROM unnest($1::bigint[], $3::text[]) AS f(id, reason) \
             WHERE o.id = f.id AND {uncovered}"
        )))
        .bind(ids)
        .bind(epoch)
        .bind(reasons)
        .execute(&mut *tx)
        .await
        .map_err(OutboxError::query(what))?;
        tx.commit().await.map_err(OutboxError::query(what))?;
        Ok(published.rows_affected() + set_aside.rows_affected())
    }
}
