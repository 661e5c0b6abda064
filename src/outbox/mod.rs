//! The only SQL on the outbox table: read undelivered rows, mark delivered rows, record failed
//! attempts, and the LISTEN task that wakes the relay.
//!
//! There is deliberately no cursor (`WHERE id > last_seen`) here: ids are assigned at INSERT but
//! become visible at COMMIT, so a smaller id can appear after a larger one was read. Every read
//! takes the oldest undelivered rows again, which is what makes a late-committing row impossible
//! to skip.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::acks::Deliverable;
use crate::config::{Config, DatabaseConfig, OutboxTable, PoisonPolicy};
use crate::events;
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("invalid Postgres connection settings in POSTHORN_DATABASE_URL: {0}")]
    Settings(sqlx::Error),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
}

impl OutboxError {
    fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> OutboxError {
        move |source| OutboxError::Query { what, source }
    }

    /// Whether the outbox table (or its schema, or a column a later migration adds) is missing:
    /// the database is reachable but not migrated.
    pub fn is_undefined_table(&self) -> bool {
        matches!(self.sqlstate().as_deref(), Some("42P01") | Some("3F000"))
    }

    /// Whether a column posthorn needs is missing: the table predates a migration.
    pub fn is_undefined_column(&self) -> bool {
        self.sqlstate().as_deref() == Some("42703")
    }

    /// Whether Postgres itself answered (with an error), as opposed to not being reached.
    pub fn is_from_server(&self) -> bool {
        self.sqlstate().is_some()
    }

    fn sqlstate(&self) -> Option<String> {
        match self {
            OutboxError::Query {
                source: sqlx::Error::Database(db),
                ..
            } => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

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

    fn from_columns(
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

/// What [`Outbox::fetch_after`] found.
#[derive(Debug)]
pub enum ReadPast {
    /// The oldest undelivered rows after the ones sent, in id order.
    Rows(Vec<OutboxRow>),
    /// This undelivered row lies below the last row sent and was not sent.
    RowBelow(i64),
}

/// Handle on one outbox table.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    table: OutboxTable,
    fetch_sql: Arc<str>,
    fetch_after_sql: Arc<str>,
    pending_upto_sql: Arc<str>,
    mark_sql: Arc<str>,
    fail_sql: Arc<str>,
    poison_sql: Arc<str>,
}

impl Outbox {
    /// A lazily connecting pool: creating it never fails because Postgres is down.
    pub fn connect_lazy(config: &Config) -> Result<Outbox, OutboxError> {
        let (database, table, policy) = (&config.database, &config.outbox, config.on_poison);
        let options: PgConnectOptions = database.url().parse().map_err(OutboxError::Settings)?;
        let pool = crate::tcp_nodelay::pool_options(&options)
            // The listener holds one; the relay reads and marks at the same time (two); one
            // stays free for the lease keeper, whose renewal must never wait for a slow mark.
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            // Names this instance's sessions in pg_stat_activity (63 bytes at most).
            .connect_lazy_with(options.application_name(&application_name(&config.instance_id)));
        Ok(Outbox::with_pool(pool, table, policy))
    }

    /// A pool of its own for the background tasks (backlog gauges, readiness, retention), so
    /// they never take a connection the relay is waiting for.
    pub fn connect_lazy_background(
        database: &DatabaseConfig,
        table: &OutboxTable,
        policy: PoisonPolicy,
    ) -> Result<Outbox, OutboxError> {
        let options: PgConnectOptions = database.url().parse().map_err(OutboxError::Settings)?;
        let options = options.application_name("posthorn-background");
        let pool = crate::tcp_nodelay::pool_options(&options)
            // One each for the readiness probe, the backlog gauges and retention: none waits
            // for another's slow statement.
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Outbox::with_pool(pool, table, policy))
    }

    pub fn with_pool(pool: PgPool, table: &OutboxTable, policy: PoisonPolicy) -> Outbox {
        let t = table.qualified();
        let lease = crate::lease::lease_table(table);
        // Under halt-key, a row waits while an earlier row of its aggregate is failed. The probe
        // uses the (normally empty) partial index of failed rows.
        let halted = match policy {
            PoisonPolicy::DeadLetter => "",
            PoisonPolicy::HaltKey => {
                " AND NOT EXISTS (SELECT 1 FROM {t} AS h \
                   WHERE h.failed_at IS NOT NULL AND h.delivered_at IS NULL \
                     AND h.aggregate_type = o.aggregate_type \
                     AND h.aggregate_id = o.aggregate_id AND h.id < o.id)"
            }
        }
        .replace("{t}", &t);
        let select = format!(
            "SELECT id, event_id, aggregate_type, aggregate_id, event_type, \
                    payload::text AS payload, payload_bytes, content_type, topic, \
                    headers::text AS headers, \
                    (extract(epoch FROM created_at) * 1000000)::bigint AS created_at_us \
             FROM {t} AS o \
             WHERE delivered_at IS NULL AND failed_at IS NULL{halted}"
        );
        Outbox {
            pool,
            table: table.clone(),
            fetch_sql: format!("{select} ORDER BY id LIMIT $1").into(),
            // Both plain range scans of the pending index: an anti-join against the ids in
            // flight would depend on the planner's estimate of the pending rows, which is stale
            // exactly when a backlog builds (measured: a nested loop, ~90 ms a read).
            fetch_after_sql: format!("{select} AND id > $2 ORDER BY id LIMIT $1").into(),
            pending_upto_sql: format!(
                "SELECT id FROM {t} AS o \
                 WHERE delivered_at IS NULL AND failed_at IS NULL{halted} AND id <= $1 \
                 ORDER BY id LIMIT $2"
            )
            .into(),
            // Fenced by the epoch: a leader that lost the lease marks nothing.
            mark_sql: format!(
                "UPDATE {t} SET delivered_at = now(), delivered_epoch = $2 \
                 WHERE id = ANY($1) AND delivered_at IS NULL \
                   AND EXISTS (SELECT 1 FROM {lease} WHERE epoch = $2 AND expires_at > now())"
            )
            .into(),
            fail_sql: format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.error, \
                        last_attempt_at = now() \
                 FROM unnest($1::bigint[], $2::text[]) AS f(id, error) \
                 WHERE o.id = f.id AND o.delivered_at IS NULL"
            )
            .into(),
            poison_sql: format!(
                "UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.error, \
                        last_attempt_at = now(), failed_at = now(), delivered_epoch = $3 \
                 FROM unnest($1::bigint[], $2::text[]) AS f(id, error) \
                 WHERE o.id = f.id AND o.delivered_at IS NULL \
                   AND EXISTS (SELECT 1 FROM {lease} WHERE epoch = $3 AND expires_at > now())"
            )
            .into(),
        }
    }

    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The oldest `limit` undelivered rows, in id order.
    pub async fn fetch_batch(&self, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
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

    /// Marks the given rows delivered in one statement, if `epoch` still holds the lease.
    /// Returns how many rows changed (0 for a deposed leader).
    pub async fn mark_delivered(&self, rows: &Deliverable, epoch: i64) -> Result<u64, OutboxError> {
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
    /// pending and are read again.
    pub async fn record_failures(&self, failures: &[(i64, String)]) -> Result<(), OutboxError> {
        self.update_rows(
            &self.fail_sql,
            failures,
            None,
            "recording failed publish attempts",
        )
        .await
    }

    /// Marks rows Kafka will never accept as failed (`failed_at`), with the reason, in one
    /// statement, if `epoch` still holds the lease. They are not read again until an operator
    /// re-queues them.
    pub async fn mark_failed(&self, rows: &[(i64, String)], epoch: i64) -> Result<(), OutboxError> {
        self.update_rows(
            &self.poison_sql,
            rows,
            Some(epoch),
            "marking outbox rows failed",
        )
        .await
    }

    async fn update_rows(
        &self,
        sql: &Arc<str>,
        rows: &[(i64, String)],
        epoch: Option<i64>,
        what: &'static str,
    ) -> Result<(), OutboxError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (ids, errors): (Vec<i64>, Vec<&str>) =
            rows.iter().map(|(id, e)| (*id, e.as_str())).unzip();
        let mut query = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(ids)
            .bind(errors);
        if let Some(epoch) = epoch {
            query = query.bind(epoch);
        }
        query
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query(what))?;
        Ok(())
    }

    /// Counts for `check`: (pending, delivered, failed) rows.
    pub async fn counts(&self) -> Result<(i64, i64, i64), OutboxError> {
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
    pub async fn server_version(&self) -> Result<String, OutboxError> {
        sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .map_err(OutboxError::query("connecting to Postgres"))
    }

    /// The numbers behind the backlog gauges. Each probe reads a partial index: the pending
    /// ones `outbox_pending_idx` (so they cost the pending rows, not the table), the failed
    /// count `outbox_failed_idx`.
    pub async fn backlog(&self) -> Result<Backlog, OutboxError> {
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
    pub async fn probe_schema(&self) -> Result<(), OutboxError> {
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
    pub async fn status(&self, n_top_errors: i64) -> Result<Status, OutboxError> {
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
    pub async fn count_redeliverable(&self, which: &Redelivery) -> Result<Requeued, OutboxError> {
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
    pub async fn redeliver(&self, which: &Redelivery) -> Result<Requeued, OutboxError> {
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
    pub async fn delete_delivered(
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

    /// Starts the task that LISTENs on the outbox's channel and wakes the relay.
    pub fn spawn_listener(&self, shutdown: Shutdown) -> Wakeups {
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(listen(
            self.pool.clone(),
            self.table.channel(),
            notify.clone(),
            shutdown,
        ));
        Wakeups { notify, task }
    }
}

fn decode_rows(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<OutboxRow>, OutboxError> {
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

/// `posthorn <instance id>`, cut to Postgres' 63-byte limit on a character boundary.
fn application_name(instance_id: &str) -> String {
    let mut name = format!("posthorn {instance_id}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// What the backlog gauges show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Rows neither delivered nor failed.
    pub n_pending: i64,
    /// Age of the oldest pending row by Postgres' clock; zero when none is pending.
    pub oldest_pending_age: Duration,
    /// Rows set aside as failed, waiting for an operator.
    pub n_failed: i64,
}

/// What `posthorn status` shows.
#[derive(Debug, Clone)]
pub struct Status {
    pub n_pending: i64,
    /// Pending rows with at least one failed attempt.
    pub n_retrying: i64,
    /// Delivered rows still in the table (retention deletes older ones).
    pub n_delivered: i64,
    pub n_failed: i64,
    pub oldest_pending: Option<OldestPending>,
    pub last_delivered: Option<LastDelivered>,
    /// Failed rows per `last_error`, most frequent first.
    pub failed_by_error: Vec<ErrorCount>,
}

#[derive(Debug, Clone)]
pub struct OldestPending {
    pub id: i64,
    pub age: Duration,
    pub attempts: i32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LastDelivered {
    pub id: i64,
    /// Microseconds since the Unix epoch.
    pub delivered_at_us: i64,
    pub age: Duration,
}

#[derive(Debug, Clone)]
pub struct ErrorCount {
    pub error: String,
    pub n_rows: i64,
}

/// Which rows `posthorn redeliver` re-queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redelivery {
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
pub struct Requeued {
    /// Failed rows, now pending again.
    pub n_failed: i64,
    /// Delivered rows, now pending again: they are published a second time.
    pub n_delivered: i64,
    /// Selected rows that were pending already, left as they were.
    pub n_already_pending: i64,
}

impl Requeued {
    pub fn n_changed(&self) -> i64 {
        self.n_failed + self.n_delivered
    }
}

/// Seconds from Postgres as a `Duration`; negative or non-finite values become zero.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

/// Wake-ups from the listener task. Any number of notifications between two waits collapse into
/// one wake-up (`Notify` keeps at most one permit), so a burst of commits costs one read.
pub struct Wakeups {
    notify: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Wakeups {
    /// Resolves when a notification (or a listener reconnect) arrived since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns the LISTEN connection for the relay's lifetime. `PgListener::try_recv` is never
/// cancelled mid-message because only this task awaits it. After every (re)connect it wakes the
/// relay once, since notifications sent while it was disconnected are lost.
async fn listen(pool: PgPool, channel: String, notify: Arc<Notify>, mut shutdown: Shutdown) {
    let mut backoff = Backoff::new();
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.triggered() => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(err) => {
                    let delay = backoff.next_delay();
                    events::ListenFailed { error: &err, retry_in: delay }.emit();
                    tokio::select! {
                        _ = shutdown.triggered() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff.reset();
        events::Listening { channel: &channel }.emit();
        notify.notify_one();
        loop {
            let received = tokio::select! {
                _ = shutdown.triggered() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(_)) => notify.notify_one(),
                Ok(None) => {
                    // The connection was lost; try_recv re-connects and re-LISTENs on the next
                    // call. Anything sent meanwhile was missed, so read now.
                    events::ListenReconnecting.emit();
                    notify.notify_one();
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    events::ListenLost {
                        error: &err,
                        retry_in: delay,
                    }
                    .emit();
                    notify.notify_one();
                    tokio::select! {
                        _ = shutdown.triggered() => return,
                        _ = tokio::time::sleep(delay) => break,
                    }
                }
            }
        }
    }
}
