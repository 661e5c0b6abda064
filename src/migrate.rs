//! `posthorn migrate`: applies `migrations/*.sql` to the configured schema and table.
//!
//! The SQL files are plain and unqualified so a service's own migration tool can run them. Here
//! they run with `search_path` set to `POSTHORN_SCHEMA`, with the table's name substituted when
//! `POSTHORN_TABLE` is not `outbox`, and posthorn records what it applied in its own table
//! (`posthorn_<table>_migrations` in the same schema), never in the service's `_sqlx_migrations`.

use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, SqlSafeStr};

use crate::config::{DatabaseConfig, OutboxTable};

/// The migrations as written in `migrations/`, for table `outbox`.
static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("connecting to Postgres at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("creating schema {schema}: {source}")]
    CreateSchema { schema: String, source: sqlx::Error },
    #[error("applying migrations: {0}")]
    Apply(#[from] sqlx::migrate::MigrateError),
}

/// Versions and descriptions of the migrations this build carries.
pub fn known() -> impl Iterator<Item = (i64, &'static str)> {
    MIGRATIONS
        .iter()
        .map(|m| (m.version, m.description.as_ref()))
}

/// The migrations rewritten for `outbox`'s table name.
pub fn migrator_for(outbox: &OutboxTable) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|m| {
            let sql = sql_for_table(m.sql.as_str(), &outbox.table);
            Migration::new(
                m.version,
                m.description.clone(),
                m.migration_type,
                AssertSqlSafe(sql).into_sql_str(),
                m.no_tx,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!(
        "\"{}\".\"posthorn_{}_migrations\"",
        outbox.schema, outbox.table
    ));
    migrator
}

/// Replaces the word `outbox` (the table's name in the SQL files) with `table`.
fn sql_for_table(sql: &str, table: &str) -> String {
    if table == "outbox" {
        return sql.to_owned();
    }
    sql.replace("outbox", table)
}

/// Creates the schema if needed and applies every pending migration. Returns the versions that
/// were applied by this call.
pub async fn run(
    database: &DatabaseConfig,
    outbox: &OutboxTable,
) -> Result<Vec<i64>, MigrateError> {
    let connect_err = |source| MigrateError::Connect {
        url: database.redacted().to_owned(),
        source,
    };
    let options: PgConnectOptions = database.url().parse().map_err(connect_err)?;
    let options = options.options([("search_path", outbox.schema.as_str())]);
    let mut conn: PgConnection = options.connect().await.map_err(connect_err)?;

    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", outbox.schema);
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(&mut conn)
        .await
        .map_err(|source| MigrateError::CreateSchema {
            schema: outbox.schema.clone(),
            source,
        })?;

    let migrator = migrator_for(outbox);
    let before = applied_versions(&mut conn, outbox).await;
    migrator.run(&mut conn).await?;
    let after = applied_versions(&mut conn, outbox).await;
    let _ = conn.close().await;
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

/// The versions already recorded (empty when the bookkeeping table does not exist yet).
async fn applied_versions(conn: &mut PgConnection, outbox: &OutboxTable) -> Vec<i64> {
    let sql = format!(
        "SELECT version FROM \"{}\".\"posthorn_{}_migrations\" WHERE success ORDER BY version",
        outbox.schema, outbox.table
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_table_name_replaces_every_outbox_identifier() {
        let outbox = OutboxTable {
            schema: "sales".into(),
            table: "order_events".into(),
        };
        let all: String = migrator_for(&outbox)
            .iter()
            .map(|m| m.sql.as_str().to_owned())
            .collect();
        assert!(!all.contains("outbox"), "{all}");
        assert!(all.contains("CREATE TABLE order_events"));
        assert!(all.contains("ALTER TABLE order_events ADD COLUMN failed_at"));
        assert!(all.contains("order_events_pending_idx"));
        assert!(all.contains("CREATE INDEX IF NOT EXISTS order_events_delivered_idx"));
    }

    #[test]
    fn the_default_table_keeps_the_files_as_written() {
        let outbox = OutboxTable {
            schema: "public".into(),
            table: "outbox".into(),
        };
        let ours = migrator_for(&outbox);
        for (m, original) in ours.iter().zip(MIGRATIONS.iter()) {
            assert_eq!(m.checksum, original.checksum);
        }
    }
}
