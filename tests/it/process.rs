//! The real `posthorn` binary: killed and restarted mid-stream, stopped with SIGTERM, given bad
//! configuration, and its `migrate` and `check` commands.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sqlx::AssertSqlSafe;

use crate::support::{
    check_key_order, create_aggregates, create_topic, delivered, env_vars, in_both_modes,
    read_topic, relay_log_path, run_posthorn, spawn_writers, unique, wait_until, RelayProcess,
    TestDb, Tracking, DELIVERED,
};

// Each of these runs twice, as rows_mode::<name> and checkpoint_mode::<name>.
in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    a_relay_killed_mid_stream_and_restarted_loses_no_row_and_keeps_key_order,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    sigterm_stops_the_relay_with_status_0_and_every_marked_row_is_in_kafka,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    sigterm_marks_every_acknowledged_row_before_exiting,
}

async fn a_relay_killed_mid_stream_and_restarted_loses_no_row_and_keeps_key_order(
    tracking: Tracking,
) {
    const N_KEYS: usize = 50;
    const N_EVENTS: usize = 12_000;
    const N_KILLS: usize = 4;
    let db = TestDb::create("sigkill").await;
    let topic = unique("it-sigkill");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    let vars = tracking.env_vars(&db.url, &[("POSTHORN_BATCH_SIZE", "300")]);

    let writers = spawn_writers(&db.pool, &topic, &keys, N_EVENTS, 4);

    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("sigkill"));
    for kill in 0..N_KILLS {
        let before = delivered(&db).await;
        let step = (N_EVENTS / (N_KILLS + 2)) as i64;
        wait_until(
            Duration::from_secs(60),
            "the relay makes progress",
            || async { delivered(&db).await >= before + step },
        )
        .await;
        relay.signal("KILL");
        let status = relay.wait(Duration::from_secs(10)).await;
        assert!(!status.success(), "kill {kill}: SIGKILL ends the process");
        relay = RelayProcess::spawn(&vars, &relay_log_path("sigkill"));
    }
    writers.await.expect("writers");
    db.wait_all_delivered(Duration::from_secs(120), "every row is delivered")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());

    let records = read_topic(&topic, N_EVENTS, Duration::from_secs(60)).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &records {
        per_key
            .entry(r.key.clone().expect("key"))
            .or_default()
            .push(r.value_json()["version"].as_i64().expect("version"));
    }
    let mut duplicates = 0;
    for (key, versions) in &per_key {
        duplicates += check_key_order(versions).unwrap_or_else(|e| panic!("key {key}: {e}"));
        let distinct: HashSet<i64> = versions.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            N_EVENTS / N_KEYS,
            "key {key}: every version arrived"
        );
    }
    assert_eq!(per_key.len(), N_KEYS);
    assert_eq!(records.len(), N_EVENTS + duplicates);
    println!(
        "sigkill: {N_KILLS} kills, {} rows committed, {} records consumed, 0 lost, {duplicates} duplicates",
        N_EVENTS,
        records.len()
    );
}

async fn sigterm_stops_the_relay_with_status_0_and_every_marked_row_is_in_kafka(
    tracking: Tracking,
) {
    let db = TestDb::create("sigterm").await;
    let topic = unique("it-sigterm");
    create_topic(&topic, 2).await;
    let n: i64 = 5_000;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'k' || (g % 10), 'Bulk', jsonb_build_object('n', g) FROM generate_series(1, $2) g",
    )
    .bind(&topic)
    .bind(n)
    .execute(&db.pool)
    .await
    .expect("bulk insert");
    let log = relay_log_path("sigterm");
    let vars = tracking.env_vars(&db.url, &[("POSTHORN_BATCH_SIZE", "100")]);
    let mut relay = RelayProcess::spawn(&vars, &log);
    wait_until(
        Duration::from_secs(60),
        "some rows are delivered",
        || async { delivered(&db).await > 0 },
    )
    .await;
    relay.signal("TERM");
    let status = relay.wait(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "SIGTERM exits with status 0, got {status}"
    );
    let log = std::fs::read_to_string(&log).expect("relay log");
    assert!(log.contains("Relay stopped."), "{log}");

    let marked: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT (payload->>'n')::bigint FROM outbox o WHERE {DELIVERED}"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("marked rows");
    assert!(!marked.is_empty());
    let records = read_topic(&topic, marked.len(), Duration::from_secs(30)).await;
    let published: HashSet<i64> = records
        .iter()
        .map(|r| r.value_json()["n"].as_i64().expect("n"))
        .collect();
    for m in &marked {
        assert!(
            published.contains(m),
            "row n={m} is marked but not in Kafka"
        );
    }
}

/// SIGTERM drains: the relay stops reading, waits for the batches in flight and marks every
/// row Kafka acknowledged before it exits. Marks are held back (a transaction locks the rows, or
/// in checkpoint mode the checkpoint row; reads do not wait for it) until the signal has arrived,
/// so each acknowledged row is still unmarked then: only the drain can mark it.
async fn sigterm_marks_every_acknowledged_row_before_exiting(tracking: Tracking) {
    let db = TestDb::create("sigterm_drain").await;
    let topic = unique("it-sigterm-drain");
    create_topic(&topic, 2).await;
    let insert = || {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT $1, 'k' || (g % 10), 'Bulk', jsonb_build_object('n', g) \
             FROM generate_series(1, 500) g",
        )
        .bind(&topic)
        .execute(&db.pool)
    };
    let log = relay_log_path("sigterm-drain");
    let vars = tracking.env_vars(&db.url, &[("POSTHORN_BATCH_SIZE", "100")]);
    let mut locks = db.pool.begin().await.expect("begin");
    let mut relay = match tracking {
        Tracking::Rows => {
            insert().await.expect("bulk insert");
            sqlx::query("SELECT id FROM outbox FOR UPDATE")
                .fetch_all(&mut *locks)
                .await
                .expect("lock the rows");
            RelayProcess::spawn(&vars, &log)
        }
        // A mark is a write of the checkpoint row, which the relay makes when it starts
        // leading: lock that row, then write the rows.
        Tracking::Checkpoint => {
            let relay = RelayProcess::spawn(&vars, &log);
            wait_until(
                Duration::from_secs(30),
                "the relay makes its checkpoint",
                || async {
                    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_checkpoint")
                        .fetch_one(&db.pool)
                        .await
                        .expect("the checkpoint")
                        == 1
                },
            )
            .await;
            sqlx::query("SELECT 1 FROM outbox_checkpoint FOR UPDATE")
                .fetch_all(&mut *locks)
                .await
                .expect("lock the checkpoint");
            insert().await.expect("bulk insert");
            relay
        }
    };
    let in_kafka = read_topic(&topic, 100, Duration::from_secs(60)).await;
    assert_eq!(delivered(&db).await, 0, "the marks wait for the locks");

    relay.signal("TERM");
    wait_until(Duration::from_secs(30), "the relay has the signal", || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        std::future::ready(log.contains("Stopping: no new reads"))
    })
    .await;
    locks.commit().await.expect("release the rows");
    let status = relay.wait(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "SIGTERM exits with status 0, got {status}"
    );

    let in_kafka_at_exit = read_topic(&topic, in_kafka.len(), Duration::from_secs(30)).await;
    let marked: HashSet<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT (payload->>'n')::bigint FROM outbox o WHERE {DELIVERED}"
    )))
    .fetch_all(&db.pool)
    .await
    .expect("marked rows")
    .into_iter()
    .collect();
    for record in &in_kafka_at_exit {
        let n = record.value_json()["n"].as_i64().expect("n");
        assert!(
            marked.contains(&n),
            "row n={n} is in Kafka but was not marked before the relay exited \
             ({} of {} marked)",
            marked.len(),
            in_kafka_at_exit.len()
        );
    }
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_missing_variable_exits_2_with_one_line_naming_it_and_an_example() {
    let (code, _, stderr) = run_posthorn(&["run"], &vars(&[("POSTHORN_KAFKA_BROKERS", "k:9092")]));
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("POSTHORN_DATABASE_URL: not set")
            && stderr.contains("(example: POSTHORN_DATABASE_URL=postgres://"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_value_exits_2_naming_the_variable_without_echoing_secrets() {
    let base = [
        (
            "POSTHORN_DATABASE_URL",
            "postgres://u:hunter2@127.0.0.1:5432/db",
        ),
        ("POSTHORN_KAFKA_BROKERS", "127.0.0.1:9092"),
        // Not the default port: another relay on this machine may hold it, and `run` binds it
        // before librdkafka sees the properties.
        ("POSTHORN_HTTP_ADDR", "127.0.0.1:0"),
    ];
    let cases: [(&str, &str, &str); 4] = [
        (
            "POSTHORN_BATCH_SIZE",
            "abc",
            "POSTHORN_BATCH_SIZE: 'abc' is not a whole number",
        ),
        (
            "POSTHORN_DATABASE_URL",
            "postgres//u:hunter2@db",
            "POSTHORN_DATABASE_URL: not a valid URL",
        ),
        (
            "POSTHORN_DATABASE_URL",
            "mysql://u:hunter2@db/x",
            "POSTHORN_DATABASE_URL: scheme 'mysql'",
        ),
        (
            "POSTHORN_KAFKA_NO_SUCH_PROPERTY",
            "1",
            "POSTHORN_KAFKA_NO_SUCH_PROPERTY: librdkafka rejected it",
        ),
    ];
    for (var, value, expected) in cases {
        let mut vs = vars(&base);
        vs.retain(|(k, _)| k != var);
        vs.push((var.to_owned(), value.to_owned()));
        let (code, _, stderr) = run_posthorn(&["run"], &vs);
        assert_eq!(code, 2, "{var}={value}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
        assert!(stderr.contains("(example: "), "{stderr}");
        assert!(!stderr.contains("hunter2"), "a password leaked: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_a_custom_schema_and_table_once_and_the_relay_publishes_from_it() {
    let db = TestDb::create("custom_table").await;
    let topic = unique("it-custom");
    create_topic(&topic, 1).await;
    let custom = [
        ("POSTHORN_SCHEMA", "sales"),
        ("POSTHORN_TABLE", "order_events"),
    ];
    let vs = env_vars(&db.url, &custom);
    let (code, stdout, stderr) = run_posthorn(&["migrate"], &vs);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("\"sales\".\"order_events\": applied migration 1"),
        "{stdout}"
    );
    let (code, stdout, _) = run_posthorn(&["migrate"], &vs);
    assert_eq!(code, 0);
    assert!(stdout.contains("is up to date"), "{stdout}");

    let (code, stdout, stderr) = run_posthorn(&["check"], &vs);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("All checks passed."), "{stdout}");
    assert!(
        !stdout.contains("postgres:postgres@"),
        "check hides the password: {stdout}"
    );

    sqlx::query(
        "INSERT INTO sales.order_events (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, 'o-1', 'Placed', '{}')",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .expect("insert into the custom table");
    let mut relay = RelayProcess::spawn(&vs, &relay_log_path("custom"));
    let records = read_topic(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(records[0].key.as_deref(), Some("o-1"));
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_with_status_1_when_a_service_is_unreachable_or_unmigrated() {
    let db = TestDb::create("check").await;
    // An empty database: reachable, but no outbox table; and a broker port nobody listens on.
    let vs = env_vars(
        &db.url,
        &[
            ("POSTHORN_TABLE", "not_migrated"),
            ("POSTHORN_KAFKA_BROKERS", "127.0.0.1:1"),
        ],
    );
    let (code, stdout, stderr) = run_posthorn(&["check"], &vs);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("postgres  ok"), "{stdout}");
    assert!(
        stdout.contains("outbox    FAILED") && stdout.contains("posthorn migrate"),
        "{stdout}"
    );
    assert!(stdout.contains("kafka     FAILED"), "{stdout}");
    assert!(
        stderr.contains("check failed: 2 of 3 checks did not pass"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_when_asked_and_never_contain_a_secret() {
    let db = TestDb::create("logs").await;
    // A role whose password is distinctive enough to search the logs for.
    let role = unique("posthorn_secret");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'sekrit-db-7f3a'"
    )))
    .execute(&db.pool)
    .await
    .expect("create role");
    let mut url = url::Url::parse(&db.url).expect("url");
    url.set_username(&role).expect("user");
    url.set_password(Some("sekrit-db-7f3a")).expect("password");
    let topic = unique("it-logs");
    create_topic(&topic, 1).await;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ($1, 'k', 'E', '{}')",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .expect("insert");
    let vars = env_vars(
        url.as_str(),
        &[
            ("POSTHORN_LOG_FORMAT", "json"),
            ("POSTHORN_LOG", "debug"),
            ("POSTHORN_KAFKA_SASL_PASSWORD", "sekrit-kafka-91c2"),
            ("POSTHORN_KAFKA_SASL_USERNAME", "someone"),
        ],
    );
    let log = relay_log_path("json");
    let mut relay = RelayProcess::spawn(&vars, &log);
    db.wait_all_delivered(Duration::from_secs(30), "the row is delivered")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());

    let log = std::fs::read_to_string(&log).expect("log");
    let mut n_lines = 0;
    for line in log.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            parsed.get("level").is_some() && parsed.get("target").is_some(),
            "{line}"
        );
        n_lines += 1;
    }
    assert!(n_lines >= 3, "{log}");
    assert!(
        log.contains("Relay started.") && log.contains("Batch published."),
        "{log}"
    );
    assert!(
        !log.contains("sekrit-db-7f3a"),
        "the database password leaked: {log}"
    );
    assert!(
        !log.contains("sekrit-kafka-91c2"),
        "the Kafka password leaked: {log}"
    );
}
