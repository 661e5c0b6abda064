//! The only SQL on the outbox table, in three rooms: the relay's statements (`relay_sql`: read
//! undelivered rows, mark delivered rows, record failed attempts), the operators' (`operator_sql`:
//! status, redeliver, backlog, retention, the readiness probe's schema check), and the LISTEN
//! task that wakes the relay (`listen`). This file holds the handle and its pools.
//!
//! There is deliberately no cursor (`WHERE id > last_seen`) here: ids are assigned at INSERT but
//! become visible at COMMIT, so a smaller id can appear after a larger one was read. Every read
//! takes the oldest undelivered rows again, which is what makes a late-committing row impossible
//! to skip.

mod checkpoint;
mod committed;
mod listen;
mod operator_sql;
mod relay_sql;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool};

use crate::config::{Config, DatabaseConfig, OutboxTable, PoisonPolicy, Tracking};

/// The row type lives on the ground floor (`row`); re-exported here, where it is read.
pub use crate::row::{OutboxRow, Payload};
use checkpoint::checkpoint_table;
pub(crate) use listen::Wakeups;
pub(crate) use operator_sql::{Backlog, Redelivery, Requeued, Status};
use relay_sql::decode_rows;
pub use relay_sql::ReadPast;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("invalid Postgres connection settings in POSTHORN_DATABASE_URL: {0}")]
    Settings(sqlx::Error),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("the outbox checkpoint holds what posthorn cannot read: {0}")]
    Corrupt(String),
}

impl OutboxError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(sqlx::Error) -> OutboxError {
        move |source| OutboxError::Query { what, source }
    }

    /// Whether the outbox table (or its schema, or a column a later migration adds) is missing:
    /// the database is reachable but not migrated.
    pub(crate) fn is_undefined_table(&self) -> bool {
        matches!(self.sqlstate().as_deref(), Some("42P01") | Some("3F000"))
    }

    /// Whether a column posthorn needs is missing: the table predates a migration.
    pub(crate) fn is_undefined_column(&self) -> bool {
        self.sqlstate().as_deref() == Some("42703")
    }

    /// Whether Postgres itself answered (with an error), as opposed to not being reached.
    pub(crate) fn is_from_server(&self) -> bool {
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

/// Handle on one outbox table.
#[derive(Clone)]
pub struct Outbox {
    pool: PgPool,
    table: OutboxTable,
    tracking: Tracking,
    policy: PoisonPolicy,
    /// Checkpoint mode: the pages read and not yet recorded (see `checkpoint`).
    pages: Arc<Mutex<checkpoint::Pages>>,
    /// Rows mode: whether a checkpoint row left by checkpoint mode was looked for.
    handed_back: Arc<AtomicBool>,
    window_select: Arc<str>,
    window_from: Arc<str>,
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
        let tracking = config.tracking;
        let options: PgConnectOptions = database.url().parse().map_err(OutboxError::Settings)?;
        let pool = crate::tcp_nodelay::pool_options(&options)
            // The listener holds one; the relay reads and marks at the same time (two); one
            // stays free for the lease keeper, whose renewal must never wait for a slow mark.
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            // Names this instance's sessions in pg_stat_activity (63 bytes at most).
            .connect_lazy_with(options.application_name(&application_name(&config.instance_id)));
        Ok(Outbox::with_pool(pool, table, policy).tracked_by(tracking))
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

    /// This handle, tracking what is published the way `tracking` says (default: rows).
    pub fn tracked_by(mut self, tracking: Tracking) -> Outbox {
        self.tracking = tracking;
        self
    }

    /// A handle tracking rows (`POSTHORN_TRACKING=rows`); see [`Outbox::tracked_by`].
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
        let columns = "id, event_id, aggregate_type, aggregate_id, event_type, \
                       payload::text AS payload, payload_bytes, content_type, topic, \
                       headers::text AS headers, \
                       (extract(epoch FROM created_at) * 1000000)::bigint AS created_at_us";
        let select = format!(
            "SELECT {columns} FROM {t} AS o \
             WHERE delivered_at IS NULL AND failed_at IS NULL{halted}"
        );
        // Checkpoint mode reads held rows too (a window cannot leave them behind) and says
        // which they are.
        let held = match halted.strip_prefix(" AND NOT ") {
            Some(exists) => exists.to_owned(),
            None => "false".to_owned(),
        };
        Outbox {
            pool,
            table: table.clone(),
            tracking: Tracking::Rows,
            policy,
            pages: Arc::default(),
            handed_back: Arc::default(),
            window_select: format!("SELECT {columns}, {held} AS held").into(),
            window_from: format!("FROM {t} AS o WHERE delivered_at IS NULL AND failed_at IS NULL")
                .into(),
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

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
