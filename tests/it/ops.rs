//! Operating posthorn: `/metrics` (parsed as Prometheus text), `/healthz` and `/readyz` of the
//! real binary against real services, `status` and `redeliver`, and retention.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use posthorn::outbox::Outbox;
use posthorn::shutdown::Shutdown;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use crate::support::{
    config, create_topic, env_vars, http_get, read_topic, relay_log_path, run_posthorn, unique,
    wait_until, KafkaCluster, RelayProcess, Scrape, TestDb, Wipe,
};

/// Scrapes `/metrics` until `condition` holds; panics with the last scrape after a minute.
async fn scrape_until(addr: SocketAddr, what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = Scrape::from(addr).await;
        if condition(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn json_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(addr, path).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, json)
}

async fn count(db: &TestDb, condition: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox WHERE {condition}"
    )))
    .fetch_one(&db.pool)
    .await
    .expect("counting rows")
}

/// `n` rows of aggregate `aggregate_id` for `topic`, with payload `{"n": 1..n}`.
async fn insert_rows(db: &TestDb, topic: &str, aggregate_id: &str, n: i64) {
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
         SELECT 'order', $2, 'Placed', jsonb_build_object('n', g), $1 \
         FROM generate_series(1, $3) g",
    )
    .bind(topic)
    .bind(aggregate_id)
    .bind(n)
    .execute(&db.pool)
    .await
    .expect("inserting rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_published_rows_and_the_backlog_gauges_fall_to_zero() {
    let db = TestDb::create("metrics").await;
    let topic = unique("it-metrics");
    create_topic(&topic, 2).await;
    // Under halt-key, rows behind a failed row of their aggregate stay pending until an operator
    // re-queues it: a backlog that holds still long enough to be measured.
    insert_rows(&db, &topic, "held", 51).await;
    sqlx::query(
        "UPDATE outbox SET failed_at = now(), last_error = 'held by the test' \
         WHERE id = (SELECT min(id) FROM outbox)",
    )
    .execute(&db.pool)
    .await
    .expect("fail the first held row");
    for k in 0..10 {
        insert_rows(&db, &topic, &format!("free-{k}"), 10).await;
    }
    let vars = env_vars(&db.url, &[("POSTHORN_ON_POISON", "halt-key")]);
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("metrics"));
    let addr = relay.http_addr().await;
    let published = |s: &Scrape| {
        s.value("posthorn_rows_published_total", &[("topic", &topic)])
            .unwrap_or(0.0)
    };

    let s = scrape_until(addr, "100 rows are published and 50 wait", |s| {
        published(s) == 100.0 && s.value("posthorn_backlog_rows", &[]) == Some(50.0)
    })
    .await;
    assert_eq!(s.value("posthorn_rows_delivered_total", &[]), Some(100.0));
    assert_eq!(s.value("posthorn_failed_rows", &[]), Some(1.0));
    assert!(s.value("posthorn_oldest_pending_age_seconds", &[]) > Some(0.0));
    assert_eq!(
        s.histogram_count("posthorn_commit_to_ack_seconds"),
        Some(100.0)
    );
    assert!(s.histogram_count("posthorn_batch_rows") >= Some(1.0));
    assert!(s.histogram_count("posthorn_batch_duration_seconds") >= Some(1.0));
    assert_eq!(s.value("posthorn_leader", &[]), Some(1.0));
    for kind in ["transient", "suspect", "poison"] {
        assert_eq!(
            s.value("posthorn_publish_failures_total", &[("kind", kind)]),
            Some(0.0),
            "{kind}"
        );
    }
    for service in ["postgres", "kafka"] {
        assert!(
            s.value("posthorn_reconnects_total", &[("service", service)])
                .is_some(),
            "{service}"
        );
    }
    let (status, health) = json_get(addr, "/healthz").await;
    assert_eq!((status, &health["alive"]), (200, &Value::Bool(true)));

    let (code, stdout, stderr) = run_posthorn(&["redeliver", "--failed"], &vars);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let s = scrape_until(addr, "every row is published and none waits", |s| {
        published(s) == 151.0
            && s.value("posthorn_backlog_rows", &[]) == Some(0.0)
            && s.value("posthorn_failed_rows", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        s.value("posthorn_oldest_pending_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(s.value("posthorn_rows_delivered_total", &[]), Some(151.0));
    assert_eq!(
        s.histogram_count("posthorn_commit_to_ack_seconds"),
        Some(151.0)
    );
    assert_eq!(
        s.value("posthorn_producer_in_flight_records", &[]),
        Some(0.0)
    );
    assert_eq!(
        read_topic(&topic, 151, Duration::from_secs(30)).await.len(),
        151
    );

    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_broker_is_away_and_200_when_it_returns() {
    let mut broker = KafkaCluster::start(1).await;
    let db = TestDb::create("readyz").await;
    let vars = env_vars(&db.url, &[("POSTHORN_KAFKA_BROKERS", &broker.brokers())]);
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("readyz"));
    let addr = relay.http_addr().await;

    let ready = |want: u16| {
        move |answer: &(u16, Value)| answer.0 == want && answer.1["ready"] == (want == 200)
    };
    let answer = json_until(addr, "/readyz", "ready with the broker up", ready(200)).await;
    assert_eq!(answer.1["postgres"], "ok");
    assert_eq!(answer.1["kafka"], "ok");
    assert_eq!(answer.1["schema"], "ok");

    broker.kill(0);
    let answer = json_until(addr, "/readyz", "not ready without the broker", ready(503)).await;
    assert_eq!(answer.1["postgres"], "ok", "{}", answer.1);
    assert_eq!(answer.1["schema"], "ok", "{}", answer.1);
    let kafka = answer.1["kafka"].as_str().expect("a reason");
    assert!(kafka.starts_with("unreachable: "), "{kafka}");
    // Waiting for a broker is not being stuck.
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);

    // The same port, an empty broker: readiness asks "does a broker answer", nothing more.
    broker.wipe(0, Wipe::Everything);
    broker.restart(0).await;
    json_until(addr, "/readyz", "ready again", ready(200)).await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
}

/// GETs `path` until `condition` holds; panics with the last answer after a minute.
async fn json_until(
    addr: SocketAddr,
    path: &str,
    what: &str,
    condition: impl Fn(&(u16, Value)) -> bool,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = json_get(addr, path).await;
        if condition(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last answer: {} {}",
            answer.0,
            answer.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_relay_loop_is_stuck_and_passes_again_after() {
    let db = TestDb::create("healthz").await;
    let topic = unique("it-healthz");
    create_topic(&topic, 1).await;
    let vars = env_vars(&db.url, &[("POSTHORN_HEALTH_STALL_SECONDS", "2")]);
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("healthz"));
    let addr = relay.http_addr().await;
    let alive = |want: u16| move |answer: &(u16, Value)| answer.0 == want;
    let (_, health) = json_until(addr, "/healthz", "alive", alive(200)).await;
    assert_eq!(health["alive"], true);
    assert_eq!(health["stall_seconds"], 2);

    // Another session holds the table: the relay's next read waits for its lock, and the loop is
    // stuck in a query.
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the table");
    let (_, health) = json_until(addr, "/healthz", "stuck", alive(503)).await;
    assert_eq!(health["alive"], false);
    assert!(health["last_progress_seconds_ago"].as_f64() >= Some(2.0));

    lock.rollback().await.expect("release the table");
    json_until(addr, "/healthz", "alive again", alive(200)).await;
    insert_rows(&db, &topic, "k", 1).await;
    db.wait_all_delivered(Duration::from_secs(30), "a new row is delivered")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_backlog_and_redeliver_requeues_failed_and_delivered_rows() {
    let db = TestDb::create("status").await;
    let topic = unique("it-status");
    create_topic(&topic, 1).await;
    let vars = env_vars(&db.url, &[]);

    // 5 delivered rows, and 2 rows Kafka will never accept (a topic name with a space).
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("status"));
    insert_rows(&db, &topic, "d", 5).await;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('bad topic', 'f', 'Placed', '{\"n\": 6}'), ('bad topic', 'f', 'Placed', '{\"n\": 7}')",
    )
    .execute(&db.pool)
    .await
    .expect("insert poison rows");
    wait_until(
        Duration::from_secs(30),
        "5 rows are delivered and 2 failed",
        || async {
            count(&db, "delivered_at IS NOT NULL").await == 5
                && count(&db, "failed_at IS NOT NULL").await == 2
        },
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    insert_rows(&db, &topic, "p", 3).await;
    let ids: BTreeMap<i64, (Uuid, String)> =
        sqlx::query("SELECT id, event_id, aggregate_id FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("ids")
            .into_iter()
            .map(|r| (r.get("id"), (r.get("event_id"), r.get("aggregate_id"))))
            .collect();
    let id_of = |aggregate: &str| -> Vec<i64> {
        ids.iter()
            .filter(|(_, (_, a))| a == aggregate)
            .map(|(id, _)| *id)
            .collect()
    };
    let (delivered, failed, pending) = (id_of("d"), id_of("f"), id_of("p"));

    let (code, stdout, stderr) = run_posthorn(&["status", "--json"], &vars);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("JSON status");
    assert_eq!(status["pending"], 3, "{status}");
    assert_eq!(status["delivered"], 5, "{status}");
    assert_eq!(status["failed"], 2, "{status}");
    assert_eq!(status["retrying"], 0, "{status}");
    assert_eq!(status["oldest_pending"]["id"], pending[0], "{status}");
    assert!(status["oldest_pending"]["age_seconds"].as_f64() >= Some(0.0));
    // The relay that ran held the lease and released it on SIGTERM.
    let instance = vars
        .iter()
        .find(|(k, _)| k == "POSTHORN_INSTANCE_ID")
        .map(|(_, v)| v.clone())
        .expect("instance id");
    assert_eq!(status["leader"]["owner"], instance.as_str(), "{status}");
    assert_eq!(
        status["leader"]["live"], false,
        "released on SIGTERM: {status}"
    );
    let last = status["last_delivered"]["id"].as_i64().expect("an id");
    assert!(delivered.contains(&last), "{status}");
    let errors = status["failed_by_error"].as_array().expect("a list");
    assert_eq!(errors.len(), 1, "{status}");
    assert_eq!(errors[0]["rows"], 2);
    let error = errors[0]["error"].as_str().expect("an error");
    assert!(error.contains("'bad topic'"), "{error}");

    let (code, table, _) = run_posthorn(&["status"], &vars);
    assert_eq!(code, 0);
    assert!(table.contains("pending          3 rows"), "{table}");
    assert!(table.contains("failed           2 rows"), "{table}");
    assert!(
        !table.contains("postgres:postgres@"),
        "no password: {table}"
    );

    // A dry run changes nothing.
    let range = [
        "redeliver",
        "--from-id",
        &delivered[0].to_string(),
        "--to-id",
        &delivered[4].to_string(),
    ];
    let (code, stdout, _) = run_posthorn(&[&range[..], &["--dry-run"]].concat(), &vars);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("Dry run: would re-queue 5 rows") && stdout.contains("5 delivered"),
        "{stdout}"
    );
    assert_eq!(count(&db, "delivered_at IS NOT NULL").await, 5);

    // The operator fixes the failed rows' topic, then re-queues them.
    sqlx::query("UPDATE outbox SET topic = $1 WHERE failed_at IS NOT NULL")
        .bind(&topic)
        .execute(&db.pool)
        .await
        .expect("fix the failed rows");
    let (code, stdout, _) = run_posthorn(&["redeliver", "--failed"], &vars);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("Re-queued 2 rows") && stdout.contains(": 2 failed"),
        "{stdout}"
    );
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM outbox WHERE id = ANY($1)")
        .bind(&failed)
        .fetch_all(&db.pool)
        .await
        .expect("attempts");
    assert_eq!(attempts, vec![1, 1], "attempts are kept");

    let (code, stdout, _) = run_posthorn(&range, &vars);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("Re-queued 5 rows")
            && stdout.contains(": 0 failed")
            && stdout.contains(", 5 delivered"),
        "{stdout}"
    );
    let pending_event = ids[&pending[0]].0.to_string();
    let unknown_event = Uuid::new_v4().to_string();
    let (code, stdout, _) = run_posthorn(
        &[
            "redeliver",
            "--event-id",
            &pending_event,
            "--event-id",
            &unknown_event,
        ],
        &vars,
    );
    assert_eq!(code, 0);
    assert!(stdout.starts_with("Re-queued 0 rows"), "{stdout}");
    assert!(
        stdout.contains("1 selected rows were pending already"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 of the 2 event ids match no row"),
        "{stdout}"
    );
    assert_eq!(count(&db, "delivered_at IS NULL").await, 10);

    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("status"));
    db.wait_all_delivered(Duration::from_secs(60), "every row is delivered")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    // The delivered rows twice (redelivered: duplicates by design), the rest once.
    let records = read_topic(&topic, 15, Duration::from_secs(30)).await;
    let mut per_row: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &records {
        *per_row
            .entry(r.header("outbox-id").parse().expect("numeric"))
            .or_default() += 1;
    }
    for id in &delivered {
        assert_eq!(per_row.get(id), Some(&2), "row {id}: {per_row:?}");
    }
    for id in failed.iter().chain(&pending) {
        assert_eq!(per_row.get(id), Some(&1), "row {id}: {per_row:?}");
    }
    assert_eq!(records.len(), 15);

    let (_, stdout, _) = run_posthorn(&["status", "--json"], &vars);
    let status: Value = serde_json::from_str(&stdout).expect("JSON status");
    assert_eq!(
        (&status["pending"], &status["failed"], &status["delivered"]),
        (&Value::from(0), &Value::from(0), &Value::from(10)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_delivered_rows_older_than_the_period() {
    let db = TestDb::create("retention").await;
    let topic = unique("it-retention");
    create_topic(&topic, 1).await;
    insert_rows(&db, &topic, "old", 7).await;
    sqlx::query("UPDATE outbox SET delivered_at = now() - interval '2 hours'")
        .execute(&db.pool)
        .await
        .expect("old deliveries");
    insert_rows(&db, &topic, "recent", 3).await;
    insert_rows(&db, &topic, "failed", 2).await;
    insert_rows(&db, &topic, "pending", 2).await;
    sqlx::raw_sql(
        "UPDATE outbox SET delivered_at = now() - interval '10 minutes' \
         WHERE aggregate_id = 'recent'; \
         UPDATE outbox SET failed_at = now() - interval '3 hours', \
                created_at = now() - interval '3 hours', last_error = 'x' \
         WHERE aggregate_id = 'failed'",
    )
    .execute(&db.pool)
    .await
    .expect("recent deliveries and old failures");

    let vars = env_vars(&db.url, &[("POSTHORN_RETENTION", "1h")]);
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("retention"));
    let addr = relay.http_addr().await;
    wait_until(
        Duration::from_secs(60),
        "the old deliveries are deleted and the pending rows delivered",
        || async {
            count(&db, "aggregate_id = 'old'").await == 0
                && count(&db, "aggregate_id = 'pending' AND delivered_at IS NOT NULL").await == 2
        },
    )
    .await;
    // The failed-rows gauge comes from the 5 s backlog measurement: wait for one after the
    // sweep rather than read it once.
    scrape_until(
        addr,
        "the deletions are counted and 2 rows show as failed",
        |s| {
            s.value("posthorn_retention_deleted_rows_total", &[]) == Some(7.0)
                && s.value("posthorn_failed_rows", &[]) == Some(2.0)
        },
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());

    let left: BTreeMap<String, i64> =
        sqlx::query_as("SELECT aggregate_id, count(*) FROM outbox GROUP BY aggregate_id")
            .fetch_all(&db.pool)
            .await
            .expect("rows left")
            .into_iter()
            .collect();
    let expected: BTreeMap<String, i64> = [("recent", 3), ("failed", 2), ("pending", 2)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(left, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_sweep_deletes_in_chunks_until_no_old_row_is_left() {
    let db = TestDb::create("sweep").await;
    insert_rows(&db, "t", "k", 10).await;
    insert_rows(&db, "t", "pending", 1).await;
    sqlx::query("UPDATE outbox SET delivered_at = now() WHERE aggregate_id = 'k'")
        .execute(&db.pool)
        .await
        .expect("delivered");
    let config = config(&db.url, &[]);
    let outbox =
        Outbox::connect_lazy_background(&config.database, &config.outbox, config.on_poison)
            .expect("pool");
    let (_trigger, mut shutdown) = Shutdown::new();
    // Delivered just now: kept for an hour, deleted at once with a retention of 0.
    let n = posthorn::retention::sweep(
        &outbox,
        Duration::from_secs(3600),
        3,
        Duration::from_millis(1),
        &mut shutdown,
    )
    .await
    .expect("sweep");
    assert_eq!(n, 0);
    let n = posthorn::retention::sweep(
        &outbox,
        Duration::ZERO,
        3,
        Duration::from_millis(1),
        &mut shutdown,
    )
    .await
    .expect("sweep");
    assert_eq!(n, 10, "four chunks of at most 3");
    assert_eq!(count(&db, "true").await, 1, "the pending row stays");
}

#[test]
fn run_exits_1_naming_the_http_address_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let vars = env_vars(
        "postgres://u:hunter2@127.0.0.1:1/db",
        &[("POSTHORN_HTTP_ADDR", &addr)],
    );
    let (code, _, stderr) = run_posthorn(&["run"], &vars);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("listening on POSTHORN_HTTP_ADDR={addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
