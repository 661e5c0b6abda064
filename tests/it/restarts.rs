//! The real binary through real restarts: the broker killed (SIGKILL) and restarted mid-stream,
//! and PostgreSQL stopped (immediate) and started mid-stream. No row is lost, each key's order
//! holds, and the relay process survives both.

use std::time::Duration;

use crate::support::{
    assert_complete_and_ordered, create_aggregates, create_topic_at, delivered, in_both_modes,
    read_topic_at, relay_log_path, spawn_writers, unique, wait_until, KafkaCluster, RelayProcess,
    TestDb, Tracking, Wipe,
};

// Each of these runs twice, as rows_mode::<name> and checkpoint_mode::<name>.
in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    a_broker_killed_and_restarted_mid_stream_loses_no_row_and_keeps_key_order,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    postgres_restarted_mid_stream_loses_no_row_and_the_relay_listens_again,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_broker_that_restarts_empty_is_recovered_from_by_replacing_the_producer,
}

async fn a_broker_killed_and_restarted_mid_stream_loses_no_row_and_keeps_key_order(
    tracking: Tracking,
) {
    const N_KEYS: usize = 20;
    const N_PER_KEY: usize = 150;
    let db = TestDb::create("broker_restart").await;
    let mut broker = KafkaCluster::start(1).await;
    let topic = unique("it-broker-restart");
    create_topic_at(&broker.brokers(), &topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;

    let vars = tracking.env_vars(
        &db.url,
        &[
            ("POSTHORN_KAFKA_BROKERS", &broker.brokers()),
            ("POSTHORN_BATCH_SIZE", "100"),
        ],
    );
    let log = relay_log_path("broker-restart");
    let mut relay = RelayProcess::spawn(&vars, &log);
    let writers = spawn_writers(&db.pool, &topic, &keys, N_KEYS * N_PER_KEY, 4);
    wait_until(
        Duration::from_secs(60),
        "the relay makes progress",
        || async { delivered(&db).await >= (N_KEYS * N_PER_KEY / 4) as i64 },
    )
    .await;
    broker.kill(0);
    // Survival means something only once the relay has met the outage.
    wait_until(
        Duration::from_secs(30),
        "the relay sees the broker gone",
        || std::future::ready(log_says(&log, "Kafka is failing")),
    )
    .await;
    assert!(
        relay.child.try_wait().expect("poll").is_none(),
        "the relay survives the outage"
    );
    broker.restart(0).await;

    writers.await.expect("writers");
    db.wait_all_delivered(Duration::from_secs(120), "every row is delivered")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    let records = read_topic_at(
        &broker.brokers(),
        &topic,
        N_KEYS * N_PER_KEY,
        Duration::from_secs(60),
    )
    .await;
    let duplicates = assert_complete_and_ordered(&records, N_KEYS, N_PER_KEY);
    println!("broker SIGKILL + restart: 0 lost, order kept, {duplicates} duplicates");
}

/// The PostgreSQL of `POSTHORN_TEST_RESTARTABLE_DATABASE_URL`, which a test stops and starts.
static RESTARTABLE_POSTGRES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn postgres_restarted_mid_stream_loses_no_row_and_the_relay_listens_again(
    tracking: Tracking,
) {
    // The twins restart one server: one at a time, or one's outage breaks the other's queries.
    let _server = RESTARTABLE_POSTGRES.lock().await;
    let admin_url = std::env::var("POSTHORN_TEST_RESTARTABLE_DATABASE_URL").expect(
        "POSTHORN_TEST_RESTARTABLE_DATABASE_URL: a PostgreSQL this test may restart \
         (scripts/services.sh env prints it)",
    );
    let restart = std::env::var("POSTHORN_TEST_RESTART_POSTGRES")
        .expect("POSTHORN_TEST_RESTART_POSTGRES: the command that stops/starts that server");
    let db = TestDb::create_on(&admin_url, "pg_restart", &[]).await;
    let topic = unique("it-pg-restart");
    crate::support::create_topic(&topic, 3).await;
    // A backlog: 20 keys, versions 1..=1000 each, in id order.
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'k' || (g % 20), 'E', jsonb_build_object('version', g / 20 + 1) \
         FROM generate_series(0, 19999) g",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .expect("backlog");

    // Polling every 10 minutes: after the restart only a re-established LISTEN can wake the
    // relay for rows inserted while it idles.
    let vars = tracking.env_vars(
        &db.url,
        &[
            ("POSTHORN_BATCH_SIZE", "200"),
            ("POSTHORN_POLL_INTERVAL_MS", "600000"),
        ],
    );
    let log = relay_log_path("pg-restart");
    let mut relay = RelayProcess::spawn(&vars, &log);
    wait_until(
        Duration::from_secs(60),
        "the relay makes progress",
        || async { delivered(&db).await >= 3000 },
    )
    .await;
    let run = |action: &str| {
        let mut parts = restart.split_whitespace();
        let status = std::process::Command::new(parts.next().expect("command"))
            .args(parts)
            .args(action.split_whitespace())
            .status()
            .expect("running the restart command");
        assert!(status.success(), "{restart} {action} failed");
    };
    run("stop -m immediate");
    // Survival means something only once the relay has met the outage.
    wait_until(
        Duration::from_secs(30),
        "the relay sees Postgres gone",
        || std::future::ready(log_says(&log, "Postgres is failing")),
    )
    .await;
    assert!(
        relay.child.try_wait().expect("poll").is_none(),
        "the relay survives the outage"
    );
    run("start");

    db.wait_all_delivered(Duration::from_secs(120), "the backlog is delivered")
        .await;
    // The relay now idles; this insert reaches it only through NOTIFY on a re-LISTENed
    // connection (the next poll is 10 minutes away).
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'k' || (g % 20), 'E', jsonb_build_object('version', g / 20 + 1) \
         FROM generate_series(20000, 20399) g",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .expect("rows after the restart");
    db.wait_all_delivered(
        Duration::from_secs(30),
        "rows inserted after the restart are delivered",
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    let records = crate::support::read_topic(&topic, 20_400, Duration::from_secs(60)).await;
    let duplicates = assert_complete_and_ordered(&records, 20, 1020);
    let log = std::fs::read_to_string(&log).expect("relay log");
    // The LISTEN connection saw the outage (queries may simply have waited it out in the pool).
    assert!(
        log.contains("LISTEN connection"),
        "the outage was seen: {log}"
    );
    println!("postgres stop -m immediate + start: 0 lost, order kept, {duplicates} duplicates");
}

async fn a_broker_that_restarts_empty_is_recovered_from_by_replacing_the_producer(
    tracking: Tracking,
) {
    let db = TestDb::create("broker_empty").await;
    let mut broker = KafkaCluster::start(1).await;
    let topic = unique("it-broker-empty");
    create_topic_at(&broker.brokers(), &topic, 1).await;
    let vars = tracking.env_vars(
        &db.url,
        &[
            ("POSTHORN_KAFKA_BROKERS", &broker.brokers()),
            ("POSTHORN_ACK_STALL_MS", "3000"),
        ],
    );
    let log = relay_log_path("broker-empty");
    let mut relay = RelayProcess::spawn(&vars, &log);
    let insert = |from: i32, to: i32| {
        let (pool, topic) = (db.pool.clone(), topic.clone());
        async move {
            sqlx::query(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT $1, 'k' || (g % 5), 'E', jsonb_build_object('n', g) FROM generate_series($2, $3) g",
            )
            .bind(&topic)
            .bind(from)
            .bind(to)
            .execute(&pool)
            .await
            .expect("insert");
        }
    };
    insert(1, 200).await;
    db.wait_all_delivered(Duration::from_secs(30), "the first rows are delivered")
        .await;
    // The broker comes back with nothing: no topic, no record of the producer's id.
    broker.kill(0);
    broker.wipe(0, Wipe::Everything);
    broker.restart(0).await;
    create_topic_at(&broker.brokers(), &topic, 1).await;
    insert(201, 400).await;
    db.wait_all_delivered(
        Duration::from_secs(60),
        "rows written after the restart are delivered",
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    let records = read_topic_at(&broker.brokers(), &topic, 200, Duration::from_secs(30)).await;
    let ns: std::collections::BTreeSet<i64> = records
        .iter()
        .map(|r| r.value_json()["n"].as_i64().expect("n"))
        .collect();
    assert_eq!(
        ns,
        (201..=400).collect(),
        "the new broker has every row written after it came back"
    );
}

/// Whether the relay's log has a line containing `text` yet.
fn log_says(log: &std::path::Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|log| log.contains(text))
}
