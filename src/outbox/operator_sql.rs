//! The operators' statements: `check`'s counts, the backlog gauges, the readiness probe's
//! schema check, `status`, `redeliver` and retention's deletes. None runs on the relay's path:
//! the background tasks and the CLI use a pool of their own.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::{Outbox, OutboxError};

impl Outbox {
    /// Counts for `check`: (pending, delivered, failed) rows.
    pub(crate) async fn counts(&self) -> Result<(i64, i64, i64), OutboxError> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL), \
                    count(*) FILTER (WHERE delivered_at IS NOT NULL), \
                    count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NOT NULL) FROM {}",
            self.table.qualified()
        );
        sqlx::query_as(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(OutboxError::query("counting outbox rows"))
    }

    /// The server's version string, for `check`.
    pub(crate) async fn server_version(&self) -> Result<String, OutboxError> {
        sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .map_err(OutboxError::query("connecting to Postgres"))
    }

    /// The numbers behind the backlog gauges. Each probe reads a partial index: the pending
    /// ones `outbox_pending_idx` (so they cost the pending rows, not the table), the failed
    /// count `outbox_failed_idx`.
    pub(crate) async fn backlog(&self) -> Result<Backlog, OutboxError> {
        let t = self.table.qualified();
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t} WHERE delivered_at IS NULL AND failed_at IS NULL), \
                    (SELECT greatest(extract(epoch FROM now() - created_at), 0)::float8 FROM {t} \
                      WHERE delivered_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT 1), \
                    (SELECT count(*) FROM {t} WHERE failed_at IS NOT NULL AND delivered_at IS NULL)"
        );
        let (n_pending, oldest_age, n_failed): (i64, Option<f64>, i64) =
            sqlx::query_as(AssertSqlSafe(sql))
                .fetch_one(&self.pool)
                .await
                .map_err(OutboxError::query("measuring the backlog"))?;
        Ok(Backlog {
            n_pending,
            oldest_pending_age: seconds(oldest_age.unwrap_or(0.0)),
            n_failed,
        })
    }

    /// Proves Postgres answers and the table has every column posthorn uses, reading no row:
    /// the readiness probe.
    pub(crate) async fn probe_schema(&self) -> Result<(), OutboxError> {
        let sql = format!(
            "SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload, topic, \
                    headers, created_at, delivered_at, attempts, last_error, last_attempt_at, \
                    failed_at \
             FROM {} LIMIT 0",
            self.table.qualified()
        );
        sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the outbox table"))?;
        Ok(())
    }

    /// What `posthorn status` shows. The counts scan the table once; the rest reads indexes.
    pub(crate) async fn status(&self, n_top_errors: i64) -> Result<Status, OutboxError> {
        let t = self.table.qualified();
        let counts = format!(
            "SELECT count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL), \
                    count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL \
                                       AND attempts > 0), \
                    count(*) FILTER (WHERE delivered_at IS NOT NULL), \
                    count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NOT NULL) \
             FROM {t}"
        );
        let (n_pending, n_retrying, n_delivered, n_failed): (i64, i64, i64, i64) =
            sqlx::query_as(AssertSqlSafe(counts))
                .fetch_one(&self.pool)
                .await
                .map_err(OutboxError::query("counting outbox rows"))?;
        let oldest = format!(
            "SELECT id, greatest(extract(epoch FROM now() - created_at), 0)::float8, attempts, \
                    last_error \
             FROM {t} WHERE delivered_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT 1"
        );
        let oldest_pending = sqlx::query_as(AssertSqlSafe(oldest))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the oldest pending row"))?
            .map(
                |(id, age, attempts, last_error): (i64, f64, i32, Option<String>)| OldestPending {
                    id,
                    age: seconds(age),
                    attempts,
                    last_error,
                },
            );
        let last = format!(
            "SELECT id, (extract(epoch FROM delivered_at) * 1000000)::bigint, \
                    greatest(extract(epoch FROM now() - delivered_at), 0)::float8 \
             FROM {t} WHERE delivered_at IS NOT NULL ORDER BY delivered_at DESC LIMIT 1"
        );
        let last_delivered = sqlx::query_as(AssertSqlSafe(last))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the last delivered row"))?
            .map(
                |(id, delivered_at_us, age): (i64, i64, f64)| LastDelivered {
                    id,
                    delivered_at_us,
                    age: seconds(age),
                },
            );
        let errors = format!(
            "SELECT coalesce(last_error, ''), count(*) FROM {t} \
             WHERE failed_at IS NOT NULL AND delivered_at IS NULL \
             GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $1"
        );
        let failed_by_error = sqlx::query_as(AssertSqlSafe(errors))
            .bind(n_top_errors)
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::query("grouping failed rows by error"))?
            .into_iter()
            .map(|(error, n_rows)| ErrorCount { error, n_rows })
            .collect();
        Ok(Status {
            n_pending,
            n_retrying,
            n_delivered,
            n_failed,
            oldest_pending,
            last_delivered,
            failed_by_error,
        })
    }

    /// How many rows [`Outbox::redeliver`] would re-queue, changing nothing.
    pub(crate) async fn count_redeliverable(
        &self,
        which: &Redelivery,
    ) -> Result<Requeued, OutboxError> {
        let sql = format!(
            "SELECT count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NOT NULL), \
                    count(*) FILTER (WHERE delivered_at IS NOT NULL), \
                    count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL) \
             FROM {} WHERE {}",
            self.table.qualified(),
            which.condition()
        );
        let (n_failed, n_delivered, n_already_pending) = which
            .bind(sqlx::query_as(AssertSqlSafe(sql)))
            .fetch_one(&self.pool)
            .await
            .map_err(OutboxError::query("counting rows to re-queue"))?;
        Ok(Requeued {
            n_failed,
            n_delivered,
            n_already_pending,
        })
    }

    /// Re-queues the selected rows: failed rows get `failed_at = NULL` (their `attempts` and
    /// `last_error` are kept, as history), delivered rows get `delivered_at = NULL`, so they are
    /// published again (duplicates, by design). Pending rows are left as they are. Wakes the
    /// relay in the same transaction.
    pub(crate) async fn redeliver(&self, which: &Redelivery) -> Result<Requeued, OutboxError> {
        let t = self.table.qualified();
        let sql = format!(
            "WITH selected AS ( \
                 SELECT id, delivered_at IS NOT NULL AS was_delivered, \
                        failed_at IS NOT NULL AS was_failed \
                 FROM {t} WHERE {} ORDER BY id FOR UPDATE), \
             requeued AS ( \
                 UPDATE {t} AS o SET delivered_at = NULL, failed_at = NULL \
                 FROM selected AS s \
                 WHERE o.id = s.id AND (s.was_delivered OR s.was_failed) \
                 RETURNING s.was_delivered) \
             SELECT (SELECT count(*) FROM requeued WHERE NOT was_delivered), \
                    (SELECT count(*) FROM requeued WHERE was_delivered), \
                    (SELECT count(*) FROM selected WHERE NOT was_delivered AND NOT was_failed)",
            which.condition()
        );
        let what = "re-queueing rows";
        let mut tx = self.pool.begin().await.map_err(OutboxError::query(what))?;
        let (n_failed, n_delivered, n_already_pending) = which
            .bind(sqlx::query_as(AssertSqlSafe(sql)))
            .fetch_one(&mut *tx)
            .await
            .map_err(OutboxError::query(what))?;
        // An UPDATE fires no INSERT trigger: notify as the trigger would, at commit.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(self.table.channel())
            .execute(&mut *tx)
            .await
            .map_err(OutboxError::query(what))?;
        tx.commit().await.map_err(OutboxError::query(what))?;
        Ok(Requeued {
            n_failed,
            n_delivered,
            n_already_pending,
        })
    }

    /// Deletes up to `limit` rows delivered more than `older_than` ago, oldest delivery first,
    /// in one short transaction that waits at most 5 s for a lock. Failed rows are never
    /// deleted. Returns how many rows it deleted.
    pub(crate) async fn delete_delivered(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, OutboxError> {
        // An interval of more than a century is "keep everything" and would overflow.
        const CENTURY_US: u128 = 100 * 366 * 24 * 3600 * 1_000_000;
        let older_than_us = older_than.as_micros().min(CENTURY_US) as i64;
        let t = self.table.qualified();
        // The outer condition repeats the inner one: a row re-queued (delivered_at = NULL) by
        // `redeliver` after the subquery saw it is re-checked on its new version, and kept.
        let sql = format!(
            "DELETE FROM {t} WHERE id IN ( \
                 SELECT id FROM {t} \
                 WHERE delivered_at < now() - $1 * interval '1 microsecond' AND failed_at IS NULL \
                 ORDER BY delivered_at LIMIT $2) \
             AND delivered_at < now() - $1 * interval '1 microsecond' AND failed_at IS NULL"
        );
        let what = "deleting delivered rows after the retention period";
        let mut tx = self.pool.begin().await.map_err(OutboxError::query(what))?;
        sqlx::raw_sql("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '60s'")
            .execute(&mut *tx)
            .await
            .map_err(OutboxError::query(what))?;
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(older_than_us)
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(OutboxError::query(what))?;
        tx.commit().await.map_err(OutboxError::query(what))?;
        Ok(done.rows_affected())
    }
}

/// What the backlog gauges show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backlog {
    /// Rows neither delivered nor failed.
    pub(crate) n_pending: i64,
    /// Age of the oldest pending row by Postgres' clock; zero when none is pending.
    pub(crate) oldest_pending_age: Duration,
    /// Rows set aside as failed, waiting for an operator.
    pub(crate) n_failed: i64,
}

/// What `posthorn status` shows.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) n_pending: i64,
    /// Pending rows with at least one failed attempt.
    pub(crate) n_retrying: i64,
    /// Delivered rows still in the table (retention deletes older ones).
    pub(crate) n_delivered: i64,
    pub(crate) n_failed: i64,
    pub(crate) oldest_pending: Option<OldestPending>,
    pub(crate) last_delivered: Option<LastDelivered>,
    /// Failed rows per `last_error`, most frequent first.
    pub(crate) failed_by_error: Vec<ErrorCount>,
}

#[derive(Debug, Clone)]
pub(crate) struct OldestPending {
    pub(crate) id: i64,
    pub(crate) age: Duration,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct LastDelivered {
    pub(crate) id: i64,
    /// Microseconds since the Unix epoch.
    pub(crate) delivered_at_us: i64,
    pub(crate) age: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct ErrorCount {
    pub(crate) error: String,
    pub(crate) n_rows: i64,
}

/// Which rows `posthorn redeliver` re-queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Redelivery {
    /// Every failed row.
    Failed,
    /// Rows with ids `from..=to`: the failed and the delivered ones.
    IdRange { from: i64, to: i64 },
    /// Rows with these event ids: the failed and the delivered ones.
    EventIds(Vec<Uuid>),
}

impl Redelivery {
    /// The SQL condition selecting the rows, with `$1` (and `$2`) bound by [`Redelivery::bind`].
    fn condition(&self) -> &'static str {
        match self {
            Redelivery::Failed => "failed_at IS NOT NULL AND delivered_at IS NULL",
            Redelivery::IdRange { .. } => "id BETWEEN $1 AND $2",
            Redelivery::EventIds(_) => "event_id = ANY($1)",
        }
    }

    fn bind<'q, O>(
        &self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        match self {
            Redelivery::Failed => query,
            Redelivery::IdRange { from, to } => query.bind(*from).bind(*to),
            Redelivery::EventIds(ids) => query.bind(ids.clone()),
        }
    }
}

/// Rows a re-queue changed (or would change), by what they were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Requeued {
    /// Failed rows, now pending again.
    pub(crate) n_failed: i64,
    /// Delivered rows, now pending again: they are published a second time.
    pub(crate) n_delivered: i64,
    /// Selected rows that were pending already, left as they were.
    pub(crate) n_already_pending: i64,
}

impl Requeued {
    pub(crate) fn n_changed(&self) -> i64 {
        self.n_failed + self.n_delivered
    }
}

/// Seconds from Postgres as a `Duration`; negative or non-finite values become zero.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}
