//! `deploy/sql/relay-role.sql`, the least-privilege roles, against the real server: the real
//! binary migrates as `posthorn_migrator` and relays as `posthorn_relay`, and the relay role is
//! refused everything beyond reading, marking and deleting outbox rows (and keeping the lease).
//!
//! Roles belong to the whole PostgreSQL cluster, not to a test's database: the file is applied
//! under one lock, and the roles are left in place (with the test passwords below).

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;
use tokio::sync::Mutex;

use crate::support::{
    create_topic, env_vars, posthorn_command, read_topic, services, unique, wait_until,
    RelayProcess, TestDb, DELIVERED,
};

const RELAY: (&str, &str) = ("posthorn_relay", "posthorn-relay-test-password");
const MIGRATOR: (&str, &str) = ("posthorn_migrator", "posthorn-migrator-test-password");

/// Concurrent `CREATE ROLE`/`ALTER ROLE` of the same role fail ("tuple concurrently updated").
static ROLES: Mutex<()> = Mutex::const_new(());

fn role_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/relay-role.sql");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The URL of `database` for `user`, on the test server.
fn url_as(database_url: &str, (user, password): (&str, &str)) -> String {
    let mut url = url::Url::parse(database_url).expect("database url");
    url.set_username(user).expect("user");
    url.set_password(Some(password)).expect("password");
    url.to_string()
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Applies deploy/sql/relay-role.sql as the admin, as an operator would with psql (the file is
/// plain SQL: one simple-query batch), then sets the test passwords.
async fn apply_role_sql(admin_db: &PgPool) {
    let _roles = ROLES.lock().await;
    sqlx::raw_sql(AssertSqlSafe(role_sql()))
        .execute(admin_db)
        .await
        .expect("applying deploy/sql/relay-role.sql");
    for (role, password) in [RELAY, MIGRATOR] {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER ROLE {role} PASSWORD '{password}'"
        )))
        .execute(admin_db)
        .await
        .expect("setting a test password");
    }
}

/// A new, empty database (not migrated) and its admin URL.
async fn create_empty_database(test: &str) -> (String, PgPool) {
    let name = unique(&format!("posthorn_t_{test}"));
    let admin = connect(&services().admin_url).await;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("creating the test database");
    admin.close().await;
    let mut url = url::Url::parse(&services().admin_url).expect("admin url");
    url.set_path(&format!("/{name}"));
    let url = url.to_string();
    let pool = connect(&url).await;
    (url, pool)
}

/// Runs `posthorn <command>` with `database_url`; returns (success, stdout + stderr).
fn posthorn(command: &str, database_url: &str) -> (bool, String) {
    let out = posthorn_command(&env_vars(database_url, &[]))
        .arg(command)
        .output()
        .unwrap_or_else(|e| panic!("running posthorn {command}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn owner_of(db: &PgPool, table: &str) -> String {
    sqlx::query_scalar(
        "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'public' AND tablename = $1",
    )
    .bind(table)
    .fetch_one(db)
    .await
    .expect("the table's owner")
}

async fn relay_may(db: &PgPool, table: &str, privilege: &str) -> bool {
    sqlx::query_scalar("SELECT has_table_privilege('posthorn_relay', $1, $2)")
        .bind(format!("public.{table}"))
        .bind(privilege)
        .fetch_one(db)
        .await
        .expect("has_table_privilege")
}

/// Runs `sql` as the relay role and wants it refused for lack of privilege (SQLSTATE 42501,
/// which is also "must be owner").
async fn assert_refused(relay: &PgPool, sql: &str) {
    match sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(relay)
        .await
    {
        Ok(_) => panic!("posthorn_relay may run {sql:?}"),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {}
        Err(other) => panic!("{sql:?} failed, but not for lack of privilege: {other}"),
    }
}

async fn insert_rows(db: &PgPool, aggregate_type: &str, n_rows: i32) {
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'order-' || (n % 3), 'OrderPlaced', jsonb_build_object('n', n) \
         FROM generate_series(1, $2) AS n",
    )
    .bind(aggregate_type)
    .bind(n_rows)
    .execute(db)
    .await
    .expect("inserting outbox rows");
}

/// `posthorn run` connected as `relay_url`, tracking as `tracking` says, delivers 5 rows the
/// service (here the admin) commits: delivered in Postgres (marked, or covered by the
/// checkpoint), consumed from Kafka; SIGTERM stops it with status 0.
async fn relay_delivers_rows(admin_db: &PgPool, relay_url: &str, tracking: &str) {
    relay_delivers_rows_with(admin_db, relay_url, &[("POSTHORN_TRACKING", tracking)]).await
}

/// [`relay_delivers_rows`] with the relay's variables given.
async fn relay_delivers_rows_with(admin_db: &PgPool, relay_url: &str, vars: &[(&str, &str)]) {
    let topic = unique("it-role");
    create_topic(&topic, 1).await;
    let before = n_delivered(admin_db).await;
    insert_rows(admin_db, &topic, 5).await;
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{topic}.log"));
    let mut relay = RelayProcess::spawn(&env_vars(relay_url, vars), &log);
    wait_until(Duration::from_secs(30), "5 rows are delivered", || async {
        n_delivered(admin_db).await == before + 5
    })
    .await;
    relay.signal("TERM");
    let status = relay.wait(Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "SIGTERM exits 0, got {status}:\n{log}");
    assert!(!log.contains("permission denied"), "{log}");
    let records = read_topic(&topic, 5, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 5, "{records:?}");
}

/// Rows delivered in either tracking mode.
async fn n_delivered(db: &PgPool) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox AS o WHERE {DELIVERED}"
    )))
    .fetch_one(db)
    .await
    .expect("counting delivered rows")
}

/// The documented order on a new database: the role file, `posthorn migrate` as the migrator,
/// the role file again; then `check` and `run` as the relay role deliver rows, and the relay
/// role can change nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_role_relays_rows_but_cannot_change_the_schema() {
    let (url, admin_db) = create_empty_database("role").await;
    apply_role_sql(&admin_db).await;
    let (ok, out) = posthorn("migrate", &url_as(&url, MIGRATOR));
    assert!(ok, "posthorn migrate as posthorn_migrator:\n{out}");
    assert!(out.contains("applied migration 1"), "{out}");
    apply_role_sql(&admin_db).await;
    assert_eq!(owner_of(&admin_db, "outbox").await, "posthorn_migrator");

    let relay_url = url_as(&url, RELAY);
    let (ok, out) = posthorn("check", &relay_url);
    assert!(ok, "posthorn check as posthorn_relay:\n{out}");
    assert!(out.contains("outbox    ok:"), "{out}");

    relay_delivers_rows(&admin_db, &relay_url, "rows").await;
    // Checkpoint tracking as the relay role: it creates and moves the checkpoint row.
    relay_delivers_rows(&admin_db, &relay_url, "checkpoint").await;
    // Exactly once as the relay role: it reads the outbox's identity.
    let checkpoint_topic = unique("it-role-checkpoint");
    relay_delivers_rows_with(
        &admin_db,
        &relay_url,
        &[
            ("POSTHORN_TRACKING", "checkpoint"),
            ("POSTHORN_DELIVERY", "exactly-once"),
            ("POSTHORN_CHECKPOINT_TOPIC", &checkpoint_topic),
        ],
    )
    .await;

    let relay_db = connect(&relay_url).await;
    // Retention may delete delivered rows.
    let deleted = sqlx::query("DELETE FROM outbox WHERE delivered_at IS NOT NULL")
        .execute(&relay_db)
        .await
        .expect("the relay role deletes delivered rows");
    assert_eq!(deleted.rows_affected(), 5);
    for sql in [
        "CREATE TABLE relay_scratch (id int)",
        "DROP TABLE outbox",
        "ALTER TABLE outbox ADD COLUMN extra int",
        "TRUNCATE outbox",
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('a', 'b', 'c')",
        "CREATE INDEX relay_scratch_idx ON outbox (created_at)",
        "CREATE SCHEMA relay_scratch",
        "SELECT * FROM posthorn_outbox_migrations",
        "UPDATE outbox_identity SET id = gen_random_uuid()",
    ] {
        assert_refused(&relay_db, sql).await;
    }
    relay_db.close().await;

    let (ok, out) = posthorn("migrate", &url_as(&url, MIGRATOR));
    assert!(ok && out.contains("is up to date"), "migrate again:\n{out}");
}

/// An outbox migrated by a superuser (as `TestDb` does), then the role file: the outbox is
/// handed to the migrator, the relay role gets exactly SELECT, UPDATE and DELETE on it, and
/// `check` and `run` work as the relay role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_migrated_by_another_role_is_handed_to_the_migrator() {
    let db = TestDb::create("role_adopt").await;
    apply_role_sql(&db.pool).await;
    for table in ["outbox", "posthorn_outbox_migrations"] {
        assert_eq!(
            owner_of(&db.pool, table).await,
            "posthorn_migrator",
            "{table}"
        );
    }
    for (privilege, granted) in [
        ("SELECT", true),
        ("UPDATE", true),
        ("DELETE", true),
        ("INSERT", false),
        ("TRUNCATE", false),
        ("REFERENCES", false),
        ("TRIGGER", false),
    ] {
        assert_eq!(
            relay_may(&db.pool, "outbox", privilege).await,
            granted,
            "{privilege} on outbox"
        );
    }
    let relay_url = url_as(&db.url, RELAY);
    let (ok, out) = posthorn("check", &relay_url);
    assert!(ok, "posthorn check as posthorn_relay:\n{out}");
    relay_delivers_rows(&db.pool, &relay_url, "rows").await;
    let relay_db = connect(&relay_url).await;
    assert_refused(&relay_db, "CREATE TABLE relay_scratch (id int)").await;
    assert_refused(&relay_db, "DROP TABLE outbox").await;
    relay_db.close().await;
    let (ok, out) = posthorn("migrate", &url_as(&db.url, MIGRATOR));
    assert!(ok && out.contains("is up to date"), "{out}");
}

/// The leader election's lease table (`<table>_lease`, created by migration 3) is granted once
/// the role SQL runs after the migration: the relay role may take, renew and read the lease,
/// not delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_table_is_granted_once_it_exists() {
    let db = TestDb::create("role_lease").await;
    // TestDb::create migrated the table, lease included; the role SQL has not run yet.
    apply_role_sql(&db.pool).await;

    assert_eq!(
        owner_of(&db.pool, "outbox_lease").await,
        "posthorn_migrator"
    );
    for (privilege, granted) in [
        ("SELECT", true),
        ("INSERT", true),
        ("UPDATE", true),
        ("DELETE", false),
        ("TRUNCATE", false),
    ] {
        assert_eq!(
            relay_may(&db.pool, "outbox_lease", privilege).await,
            granted,
            "{privilege} on outbox_lease"
        );
    }

    let relay_db = connect(&url_as(&db.url, RELAY)).await;
    let take = "INSERT INTO outbox_lease AS l (owner, epoch, acquired_at, expires_at) \
                VALUES ($1, 1, now(), now() + interval '10 seconds') \
                ON CONFLICT (singleton) DO UPDATE \
                  SET owner = EXCLUDED.owner, epoch = l.epoch + 1, \
                      acquired_at = now(), expires_at = EXCLUDED.expires_at \
                  WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner \
                RETURNING epoch";
    for (owner, epoch) in [("a", 1), ("a", 2)] {
        let got: i64 = sqlx::query_scalar(take)
            .bind(owner)
            .fetch_one(&relay_db)
            .await
            .expect("the relay role takes the lease");
        assert_eq!(got, epoch);
    }
    assert_refused(&relay_db, "DELETE FROM outbox_lease").await;
    relay_db.close().await;
}
