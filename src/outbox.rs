//! The only SQL on the outbox table: read undelivered rows, mark delivered rows, record failed
//! attempts, and the LISTEN task that wakes the relay.
//!
//! There is deliberately no cursor (`WHERE id > last_seen`) here: ids are assigned at INSERT but
//! become visible at COMMIT, so a smaller id can appear after a larger one was read. Every read
//! takes the oldest undelivered rows again, which is what makes a late-committing row impossible
//! to skip.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::acks::Deliverable;
use crate::config::{DatabaseConfig, OutboxTable, PoisonPolicy};
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
        match self {
            OutboxError::Query {
                source: sqlx::Error::Database(db),
                ..
            } => matches!(
                db.code().as_deref(),
                Some("42P01") | Some("3F000") | Some("42703")
            ),
            _ => false,
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

/// Handle on one outbox table.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    table: OutboxTable,
    fetch_sql: Arc<str>,
    mark_sql: Arc<str>,
    fail_sql: Arc<str>,
    poison_sql: Arc<str>,
}

impl Outbox {
    /// A lazily connecting pool: creating it never fails because Postgres is down.
    pub fn connect_lazy(
        database: &DatabaseConfig,
        table: &OutboxTable,
        policy: PoisonPolicy,
        instance_id: &str,
    ) -> Result<Outbox, OutboxError> {
        let options: PgConnectOptions = database.url().parse().map_err(OutboxError::Settings)?;
        let pool = PgPoolOptions::new()
            // The relay reads and marks one batch at a time; the others serve the lease keeper
            // and the listener's re-connects without waiting.
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(5))
            // Names this instance's sessions in pg_stat_activity (63 bytes at most).
            .connect_lazy_with(options.application_name(&application_name(instance_id)));
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
        Outbox {
            pool,
            table: table.clone(),
            fetch_sql: format!(
                "SELECT id, event_id, aggregate_type, aggregate_id, event_type, \
                        payload::text AS payload, payload_bytes, content_type, topic, \
                        headers::text AS headers \
                 FROM {t} AS o \
                 WHERE delivered_at IS NULL AND failed_at IS NULL{halted} \
                 ORDER BY id LIMIT $1"
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
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(OutboxError::query("decoding an outbox row"))
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

/// `posthorn <instance id>`, cut to Postgres' 63-byte limit on a character boundary.
fn application_name(instance_id: &str) -> String {
    let mut name = format!("posthorn {instance_id}");
    while name.len() > 63 {
        name.pop();
    }
    name
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
                    events::ListenFailed {
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
