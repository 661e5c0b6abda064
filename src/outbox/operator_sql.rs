//! The operators' statements: `check`'s counts, the backlog gauges, the readiness probe's
//! schema check, `status`, `redeliver` and retention's deletes. None runs on the relay's path:
//! the background tasks and the CLI use a pool of their own.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::config::{PoisonPolicy, Tracking};

use super::{checkpoint_table, Outbox, OutboxError};

/// A row's states as SQL conditions on alias `o`, as this outbox's tracking defines them. In
/// rows mode they read `delivered_at` and `failed_at`; in checkpoint mode "delivered" also means
/// covered by the checkpoint row (read with scalar subqueries, evaluated once a statement), and
/// the pending rows are found from the checkpoint's oldest unpublished transaction on, over the
/// txid index.
struct States {
    delivered: String,
    pending: String,
}

const FAILED: &str = "o.delivered_at IS NULL AND o.failed_at IS NOT NULL";

impl Outbox {
    fn states(&self) -> States {
        match self.tracking {
            Tracking::Rows => States {
                delivered: "o.delivered_at IS NOT NULL".to_owned(),
                pending: "o.delivered_at IS NULL AND o.failed_at IS NULL".to_owned(),
            },
            Tracking::Checkpoint => {
                let cp = checkpoint_table(&self.table);
                let covered = format!(
                    "coalesce(pg_visible_in_snapshot(o.txid, (SELECT snapshot FROM {cp})) \
                       OR (pg_visible_in_snapshot(o.txid, (SELECT window_end FROM {cp})) \
                           AND o.id <= (SELECT position FROM {cp})), false)"
                );
                States {
                    delivered: format!(
                        "(o.delivered_at IS NOT NULL OR (o.failed_at IS NULL AND {covered}))"
                    ),
                    pending: format!(
                        "o.delivered_at IS NULL AND o.failed_at IS NULL \
                         AND o.txid >= coalesce(pg_snapshot_xmin((SELECT snapshot FROM {cp})), \
                                                '0'::xid8) \
                         AND NOT {covered}"
                    ),
                }
            }
        }
    }
}

impl Outbox {
    /// Counts for `check`: (pending, delivered, failed) rows.
    pub(crate) async fn counts(&self) -> Result<(i64, i64, i64), OutboxError> {
        let States { delivered, pending } = self.states();
        let sql = format!(
            "SELECT count(*) FILTER (WHERE {pending}), count(*) FILTER (WHERE {delivered}), \
                    count(*) FILTER (WHERE {FAILED}) FROM {} AS o",
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

    /// The numbers behind the backlog gauges, measured every few seconds. Each reads an index
    /// range of pending rows, so it costs the pending rows, not the table: rows mode's pending
    /// index; in checkpoint mode the txid index, from the checkpoint's snapshot read first (a
    /// transaction left open would pin a bound taken from the snapshot's xmin, and the range
    /// would then hold every row written since). The failed count reads `outbox_failed_idx`.
    pub(crate) async fn backlog(&self) -> Result<Backlog, OutboxError> {
        let t = self.table.qualified();
        let States { pending, .. } = self.states();
        let pending = match self.tracking {
            Tracking::Rows => pending,
            Tracking::Checkpoint => match self.checkpoint_snapshot().await? {
                Some(since) => format!("{pending} AND {since}"),
                None => pending,
            },
        };
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t} AS o WHERE {pending}), \
                    (SELECT greatest(extract(epoch FROM now() - o.created_at), 0)::float8 \
                     FROM {t} AS o WHERE {pending} ORDER BY o.id LIMIT 1), \
                    (SELECT count(*) FROM {t} AS o WHERE {FAILED})"
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
        let txid = match self.tracking {
            Tracking::Rows => "",
            Tracking::Checkpoint => ", txid",
        };
        let sql = format!(
            "SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload, topic, \
                    headers, created_at, delivered_at, attempts, last_error, last_attempt_at, \
                    failed_at{txid} \
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
        let States { delivered, pending } = self.states();
        let counts = format!(
            "SELECT count(*) FILTER (WHERE {pending}), \
                    count(*) FILTER (WHERE {pending} AND o.attempts > 0), \
                    count(*) FILTER (WHERE {delivered}), \
                    count(*) FILTER (WHERE {FAILED}) \
             FROM {t} AS o"
        );
        let (n_pending, n_retrying, n_delivered, n_failed): (i64, i64, i64, i64) =
            sqlx::query_as(AssertSqlSafe(counts))
                .fetch_one(&self.pool)
                .await
                .map_err(OutboxError::query("counting outbox rows"))?;
        let oldest = format!(
            "SELECT o.id, greatest(extract(epoch FROM now() - o.created_at), 0)::float8, \
                    o.attempts, o.last_error \
             FROM {t} AS o WHERE {pending} ORDER BY o.id LIMIT 1"
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
        let last = match self.tracking {
            Tracking::Rows => last,
            // The checkpoint's last move, or (before its first) the rows mode's last mark.
            Tracking::Checkpoint => format!(
                "SELECT * FROM ( \
                     SELECT last_id, (extract(epoch FROM advanced_at) * 1000000)::bigint, \
                            greatest(extract(epoch FROM now() - advanced_at), 0)::float8 \
                     FROM {} WHERE last_id IS NOT NULL \
                     UNION ALL ({last})) AS l LIMIT 1",
                checkpoint_table(&self.table)
            ),
        };
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
            "SELECT coalesce(o.last_error, ''), count(*) FROM {t} AS o WHERE {FAILED} \
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
        let States { delivered, pending } = self.states();
        let sql = format!(
            "SELECT count(*) FILTER (WHERE {FAILED}), count(*) FILTER (WHERE {delivered}), \
                    count(*) FILTER (WHERE {pending}) \
             FROM {} AS o WHERE {}",
            self.table.qualified(),
            self.selection(which)
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

    /// The rows a re-queue selects. In checkpoint mode under halt-key it takes with each failed
    /// row the rows set aside behind it (failed rows of its aggregate with a larger id).
    fn selection(&self, which: &Redelivery) -> String {
        let condition = which.condition();
        match (self.tracking, self.policy, which) {
            (Tracking::Checkpoint, PoisonPolicy::HaltKey, Redelivery::IdRange { .. })
            | (Tracking::Checkpoint, PoisonPolicy::HaltKey, Redelivery::EventIds(_)) => format!(
                "(({condition}) OR ({FAILED} AND EXISTS ( \
                     SELECT 1 FROM {t} AS f WHERE f.failed_at IS NOT NULL \
                       AND f.delivered_at IS NULL AND f.aggregate_type = o.aggregate_type \
                       AND f.aggregate_id = o.aggregate_id AND f.id < o.id \
                       AND {f_condition})))",
                t = self.table.qualified(),
                f_condition = condition.replace("o.", "f.")
            ),
            _ => format!("({condition})"),
        }
    }

    /// Re-queues the selected rows, so they are published again: failed rows (their
    /// `attempts` and `last_error` kept, as history) and delivered rows (duplicates, by
    /// design). Pending rows are left as they are. Wakes the relay in the same transaction.
    ///
    /// Rows mode clears `failed_at` and `delivered_at`. Checkpoint mode cannot un-publish a row
    /// the checkpoint covers, so it moves each re-queued row to the end of the outbox: deleted
    /// and inserted again with a new id (and so a new transaction) and the same `event_id` and
    /// `created_at`, in id order. Either way a re-queued row goes out after what was delivered
    /// meanwhile.
    pub(crate) async fn redeliver(&self, which: &Redelivery) -> Result<Requeued, OutboxError> {
        let t = self.table.qualified();
        let States { delivered, .. } = self.states();
        let selected = format!(
            "selected AS ( \
                 SELECT o.id, {delivered} AS was_delivered, o.failed_at IS NOT NULL AS was_failed \
                 FROM {t} AS o WHERE {} ORDER BY o.id FOR UPDATE OF o)",
            self.selection(which)
        );
        let requeue = match self.tracking {
            Tracking::Rows => format!(
                "requeued AS ( \
                     UPDATE {t} AS o SET delivered_at = NULL, failed_at = NULL \
                     FROM selected AS s \
                     WHERE o.id = s.id AND (s.was_delivered OR s.was_failed) \
                     RETURNING s.was_delivered)"
            ),
            Tracking::Checkpoint => {
                let columns = "aggregate_type, aggregate_id, event_type, payload, payload_bytes, \
                               content_type, topic, headers, event_id, created_at, attempts, \
                               last_error, last_attempt_at";
                format!(
                    "moved AS ( \
                         DELETE FROM {t} AS o USING selected AS s \
                         WHERE o.id = s.id AND (s.was_delivered OR s.was_failed) \
                         RETURNING o.*, s.was_delivered), \
                     inserted AS ( \
                         INSERT INTO {t} ({columns}) \
                         SELECT {columns} FROM moved ORDER BY id RETURNING 1), \
                     requeued AS (SELECT was_delivered FROM moved)"
                )
            }
        };
        let sql = format!(
            "WITH {selected}, {requeue} \
             SELECT (SELECT count(*) FROM requeued WHERE NOT was_delivered), \
                    (SELECT count(*) FROM requeued WHERE was_delivered), \
                    (SELECT count(*) FROM selected WHERE NOT was_delivered AND NOT was_failed)"
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
        let sql = match self.tracking {
            // The outer condition repeats the inner one: a row re-queued (delivered_at = NULL)
            // by `redeliver` after the subquery saw it is re-checked on its new version, and
            // kept.
            Tracking::Rows => format!(
                "DELETE FROM {t} WHERE id IN ( \
                     SELECT id FROM {t} \
                     WHERE delivered_at < now() - $1 * interval '1 microsecond' \
                       AND failed_at IS NULL \
                     ORDER BY delivered_at LIMIT $2) \
                 AND delivered_at < now() - $1 * interval '1 microsecond' AND failed_at IS NULL"
            ),
            // No row records when it was published: rows created more than the period ago that
            // the checkpoint covers, oldest first. A re-queued row was deleted and inserted
            // again (`redeliver`), so a row the subquery saw is never re-queued in place.
            Tracking::Checkpoint => {
                let States { delivered, .. } = self.states();
                format!(
                    "DELETE FROM {t} WHERE id IN ( \
                         SELECT o.id FROM {t} AS o \
                         WHERE o.created_at < now() - $1 * interval '1 microsecond' \
                           AND o.failed_at IS NULL AND {delivered} \
                         ORDER BY o.id LIMIT $2)"
                )
            }
        };
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
            Redelivery::Failed => "o.failed_at IS NOT NULL AND o.delivered_at IS NULL",
            Redelivery::IdRange { .. } => "o.id BETWEEN $1 AND $2",
            Redelivery::EventIds(_) => "o.event_id = ANY($1)",
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
