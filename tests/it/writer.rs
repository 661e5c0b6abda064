//! The writer side: migration 5's SQL functions and the posthorn-writer library, on real Postgres
//! with the relay publishing to the real broker. Also runs the documented examples
//! (`examples/writer/*`, `posthorn-writer/examples/*`) and checks `docs/writing-events.md` quotes
//! them verbatim.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use posthorn_writer::{Event, Outbox, Payload, WriteError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

use crate::support::{
    config, create_topic, read_topic, services, unique, wait_until, Record, RunningRelay, TestDb,
};

// The Rust examples of the docs, compiled into this test crate and run below. Their `main`s only
// connect to DATABASE_URL and call what the tests call.
#[allow(dead_code)]
#[path = "../../posthorn-writer/examples/order_shipped.rs"]
mod order_shipped;
#[allow(dead_code)]
#[path = "../../posthorn-writer/examples/protobuf.rs"]
mod protobuf;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A relay publishing `db`'s outbox to `<base>.<aggregate_type>`.
fn start_relay(db: &TestDb, base: &str, extra: &[(&str, &str)]) -> RunningRelay {
    let template = format!("{base}.{{aggregate_type}}");
    let mut vars = vec![("POSTHORN_TOPIC_TEMPLATE", template.as_str())];
    vars.extend_from_slice(extra);
    RunningRelay::start(config(&db.url, &vars))
}

/// Waits until no row of `table` is pending (neither delivered nor failed).
async fn wait_settled(db: &TestDb, table: &str) {
    let sql =
        format!("SELECT count(*) FROM {table} WHERE delivered_at IS NULL AND failed_at IS NULL");
    wait_until(
        Duration::from_secs(60),
        "every row is delivered",
        || async {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.clone()))
                .fetch_one(&db.pool)
                .await
                .expect("counting pending rows")
                == 0
        },
    )
    .await;
}

/// The record's contract: key, event-id, event-type, aggregate-type and content-type (`None`:
/// no such header, as on a tombstone).
fn assert_record(
    record: &Record,
    key: &str,
    event_id: Uuid,
    event_type: &str,
    content_type: Option<&str>,
) {
    assert_eq!(record.key.as_deref(), Some(key), "{record:?}");
    assert_eq!(record.header("event-id"), event_id.to_string());
    assert_eq!(record.header("event-type"), event_type);
    assert_eq!(record.header("aggregate-type"), "order");
    assert_eq!(
        record.headers.get("content-type").map(String::as_str),
        content_type,
        "{record:?}"
    );
}

fn by_event_id(records: &[Record], event_id: Uuid) -> &Record {
    records
        .iter()
        .find(|r| r.headers.get("event-id") == Some(&event_id.to_string()))
        .unwrap_or_else(|| panic!("no record with event-id {event_id} in {records:?}"))
}

/// Counts the statements sqlx executes while `future` runs: sqlx logs one `sqlx::query` event per
/// statement it sends (at DEBUG), which a subscriber scoped to this future sees.
async fn count_sqlx_statements<F: Future>(future: F) -> (F::Output, usize) {
    struct Counter(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if event.metadata().target() == "sqlx::query" {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let n = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(Counter(n.clone()));
    let output = future.with_subscriber(subscriber).await;
    (output, n.load(Ordering::SeqCst))
}

/// A statement-level trigger counting INSERT statements on the outbox table, as the server sees
/// them (an INSERT per row, even from one client statement, counts once per row).
async fn count_insert_statements_on_outbox(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE outbox_insert_statements (n int NOT NULL); \
         INSERT INTO outbox_insert_statements VALUES (0); \
         CREATE FUNCTION count_outbox_insert() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN UPDATE outbox_insert_statements SET n = n + 1; RETURN NULL; END $$; \
         CREATE TRIGGER count_outbox_inserts AFTER INSERT ON outbox \
             FOR EACH STATEMENT EXECUTE FUNCTION count_outbox_insert();",
    )
    .execute(pool)
    .await
    .expect("the statement counter");
}

async fn insert_statements(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT n FROM outbox_insert_statements")
        .fetch_one(conn)
        .await
        .expect("reading the statement counter")
}

async fn create_topic_with_max_message_bytes(topic: &str, max_message_bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .create()
        .expect("admin client");
    let limit = max_message_bytes.to_string();
    let topics =
        [NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &limit)];
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.expect("creating the topic");
    }
}

fn sql_state(err: &sqlx::Error) -> (String, String) {
    let db = err
        .as_database_error()
        .unwrap_or_else(|| panic!("not a database error: {err:?}"));
    (
        db.code().map(|c| c.into_owned()).unwrap_or_default(),
        db.message().to_owned(),
    )
}

async fn create_orders(pool: &PgPool, placed: &[&str]) {
    order_shipped::create_orders(pool, placed[0])
        .await
        .expect("orders table");
    for id in &placed[1..] {
        order_shipped::create_orders(pool, id)
            .await
            .expect("an order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_function_events_reach_kafka_only_when_their_transaction_commits() {
    let db = TestDb::create("writer_sql").await;
    let base = unique("it-writer-sql");
    let (topic, routed) = (format!("{base}.order"), format!("{base}.routed"));
    create_topic(&topic, 1).await;
    create_topic(&routed, 1).await;
    let relay = start_relay(&db, &base, &[]);

    let mut tx = db.pool.begin().await.expect("begin");
    let json_id: Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('order', 'o-1', 'OrderShipped', '{\"carrier\": \"DHL\"}', \
                               headers => jsonb_build_object('traceparent', $1::text))",
    )
    .bind(TRACEPARENT)
    .fetch_one(&mut *tx)
    .await
    .expect("outbox_enqueue");
    let bytes_id: Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue_bytes('order', 'o-1', 'LabelPrinted', $1, 'image/png')",
    )
    .bind(&b"\x89PNG\r\n\x1a\n\xff\x00"[..])
    .fetch_one(&mut *tx)
    .await
    .expect("outbox_enqueue_bytes");
    let tombstone_id: Uuid =
        sqlx::query_scalar("SELECT outbox_enqueue_tombstone('order', 'o-1', 'OrderForgotten')")
            .fetch_one(&mut *tx)
            .await
            .expect("outbox_enqueue_tombstone");
    let routed_id: Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('order', 'o-2', 'OrderShipped', '{\"n\": 2}', topic => $1)",
    )
    .bind(&routed)
    .fetch_one(&mut *tx)
    .await
    .expect("outbox_enqueue with a topic");
    tx.commit().await.expect("commit");

    // Rolled back explicitly, and dropped without a commit (sqlx rolls it back).
    for rolled_back in ["o-rolled-back", "o-dropped"] {
        let mut tx = db.pool.begin().await.expect("begin");
        sqlx::query("SELECT outbox_enqueue('order', $1, 'OrderShipped', '{}')")
            .bind(rolled_back)
            .execute(&mut *tx)
            .await
            .expect("outbox_enqueue");
        if rolled_back == "o-rolled-back" {
            tx.rollback().await.expect("rollback");
        }
    }

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let records = read_topic(&topic, 3, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 3, "the committed events only: {records:?}");
    assert_record(
        &records[0],
        "o-1",
        json_id,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(
        records[0].value_json(),
        serde_json::json!({"carrier": "DHL"})
    );
    assert_eq!(records[0].header("traceparent"), TRACEPARENT);
    assert_record(
        &records[1],
        "o-1",
        bytes_id,
        "LabelPrinted",
        Some("image/png"),
    );
    assert_eq!(
        records[1].value.as_deref(),
        Some(&b"\x89PNG\r\n\x1a\n\xff\x00"[..])
    );
    assert_record(&records[2], "o-1", tombstone_id, "OrderForgotten", None);
    assert_eq!(records[2].value, None, "a tombstone has no value");
    let routed_records = read_topic(&routed, 1, Duration::from_secs(30)).await;
    assert_eq!(routed_records.len(), 1);
    assert_record(
        &routed_records[0],
        "o-2",
        routed_id,
        "OrderShipped",
        Some("application/json"),
    );
    let n_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(n_rows, 4, "rolled-back events never became rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_events_reach_kafka_only_when_their_transaction_commits() {
    let db = TestDb::create("writer_lib").await;
    let base = unique("it-writer-lib");
    let (topic, routed) = (format!("{base}.order"), format!("{base}.routed"));
    create_topic(&topic, 1).await;
    create_topic(&routed, 1).await;
    let relay = start_relay(&db, &base, &[]);

    let shipped = Event::builder("order", "o-1", "OrderShipped")
        .json(&serde_json::json!({"carrier": "DHL", "parcels": 2}))
        .header("traceparent", TRACEPARENT)
        .build()
        .expect("valid");
    let label = Event::builder("order", "o-1", "LabelPrinted")
        .bytes(vec![0xff, 0x00, 0xfe], "application/octet-stream")
        .build()
        .expect("valid");
    let forgotten = Event::builder("order", "o-1", "OrderForgotten")
        .tombstone()
        .build()
        .expect("valid");
    let elsewhere = Event::builder("order", "o-2", "OrderShipped")
        .json(&serde_json::json!({"n": 2}))
        .topic(&routed)
        .build()
        .expect("valid");

    let mut tx = db.pool.begin().await.expect("begin");
    let shipped_id = posthorn_writer::enqueue(&mut tx, &shipped)
        .await
        .expect("enqueue");
    let ids = posthorn_writer::enqueue_batch(&mut tx, &[label, forgotten, elsewhere])
        .await
        .expect("enqueue_batch");
    tx.commit().await.expect("commit");

    let never = Event::builder("order", "o-never", "OrderShipped")
        .json(&serde_json::json!({}))
        .build()
        .expect("valid");
    let mut tx = db.pool.begin().await.expect("begin");
    posthorn_writer::enqueue(&mut tx, &never)
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    // A later statement fails: the transaction is aborted and its commit is a rollback.
    let mut tx = db.pool.begin().await.expect("begin");
    posthorn_writer::enqueue(&mut tx, &never)
        .await
        .expect("enqueue");
    assert!(sqlx::query("SELECT 1 / 0").execute(&mut *tx).await.is_err());
    // Postgres answers the COMMIT of an aborted transaction with a ROLLBACK.
    let _ = tx.commit().await;

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let records = read_topic(&topic, 3, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 3, "the committed events only: {records:?}");
    assert_record(
        &records[0],
        "o-1",
        shipped_id,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(
        records[0].value_json(),
        serde_json::json!({"carrier": "DHL", "parcels": 2})
    );
    assert_eq!(records[0].header("traceparent"), TRACEPARENT);
    assert_eq!(
        records[0].headers.len(),
        6,
        "five posthorn headers and ours"
    );
    assert_record(
        &records[1],
        "o-1",
        ids[0],
        "LabelPrinted",
        Some("application/octet-stream"),
    );
    assert_eq!(records[1].value.as_deref(), Some(&[0xff, 0x00, 0xfe][..]));
    assert_record(&records[2], "o-1", ids[1], "OrderForgotten", None);
    assert_eq!(records[2].value, None);
    let routed_records = read_topic(&routed, 1, Duration::from_secs(30)).await;
    assert_eq!(routed_records.len(), 1);
    assert_record(
        &routed_records[0],
        "o-2",
        ids[2],
        "OrderShipped",
        Some("application/json"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_events_is_one_statement_and_keeps_input_order() {
    const N_EVENTS: usize = 1000;
    const N_KEYS: usize = 10;
    let db = TestDb::create("writer_batch").await;
    let base = unique("it-writer-batch");
    let topic = format!("{base}.order");
    create_topic(&topic, 3).await;
    count_insert_statements_on_outbox(&db.pool).await;
    let events: Vec<Event> = (0..N_EVENTS)
        .map(|i| {
            Event::builder("order", format!("o-{}", i % N_KEYS), "Numbered")
                .json(&serde_json::json!({"i": i}))
                .build()
                .expect("valid")
        })
        .collect();

    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    // The counter sees statements: one for one.
    let (_, n_calibration) = count_sqlx_statements(sqlx::query("SELECT 1").execute(&mut *tx)).await;
    assert_eq!(n_calibration, 1, "the sqlx statement counter works");
    let (ids, n_client_statements) =
        count_sqlx_statements(posthorn_writer::enqueue_batch(&mut tx, &events)).await;
    let ids = ids.expect("enqueue_batch");
    assert_eq!(n_client_statements, 1, "the library sent one statement");
    assert_eq!(
        insert_statements(&mut tx).await,
        1,
        "the server ran one INSERT statement"
    );
    // The counter counts INSERT statements, not client statements: the SQL function inserts
    // once per call.
    sqlx::query("SELECT outbox_enqueue('control', 'c', 'E', '{}') FROM generate_series(1, 3)")
        .execute(&mut *tx)
        .await
        .expect("three calls in one statement");
    assert_eq!(insert_statements(&mut tx).await, 4);
    sqlx::query("DELETE FROM outbox WHERE aggregate_type = 'control'")
        .execute(&mut *tx)
        .await
        .expect("remove the control rows");
    tx.commit().await.expect("commit");

    // Every row of the batch carries the same command id (cmin): they came from one command.
    let n_commands: i64 = sqlx::query_scalar("SELECT count(DISTINCT cmin::text) FROM outbox")
        .fetch_one(&mut conn)
        .await
        .expect("cmin");
    assert_eq!(n_commands, 1);
    // The returned ids are in input order, and so are the rows' ids (the publishing order).
    let by_row_id: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("rows");
    assert_eq!(ids.len(), N_EVENTS);
    assert_eq!(by_row_id, ids, "row order = returned order = input order");

    let relay = start_relay(&db, &base, &[]);
    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let records = read_topic(&topic, N_EVENTS, Duration::from_secs(60)).await;
    assert_eq!(records.len(), N_EVENTS);
    for key in 0..N_KEYS {
        let key = format!("o-{key}");
        let consumed: Vec<(i64, String)> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .map(|r| {
                let i = r.value_json()["i"].as_i64().expect("i");
                (i, r.header("event-id").to_owned())
            })
            .collect();
        let written: Vec<(i64, String)> = (0..N_EVENTS)
            .filter(|i| format!("o-{}", i % N_KEYS) == key)
            .map(|i| (i as i64, ids[i].to_string()))
            .collect();
        assert_eq!(consumed, written, "key {key}: Kafka order is input order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_1000_events_are_written_at_a_measured_rate() {
    const N_EVENTS: usize = 1000;
    const N_RUNS: usize = 9;
    let db = TestDb::create("writer_rate").await;
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    // As docs/writing-events.md advises on sqlx 0.9.0 (the relay's own pools, in this process,
    // would set it on this connection too, at a moment of their choosing).
    let port = url::Url::parse(&db.url)
        .expect("url")
        .port()
        .unwrap_or(5432);
    posthorn_writer::tcp_nodelay::set_on_connections_to(port).expect("TCP_NODELAY");
    // Events per second: everything (build + enqueue_batch + commit), and the write alone.
    let (mut overall, mut writes) = (Vec::new(), Vec::new());
    // One warm-up run (statement preparation, caches), then the measured ones.
    for run in 0..=N_RUNS {
        let started = Instant::now();
        let events: Vec<Event> = (0..N_EVENTS)
            .map(|i| {
                Event::builder("order", format!("order-{}", i % 100), "OrderShipped")
                    .json(&serde_json::json!({"order_id": i, "carrier": "DHL", "run": run}))
                    .header("traceparent", TRACEPARENT)
                    .build()
                    .expect("valid")
            })
            .collect();
        let built = Instant::now();
        let mut tx = conn.begin().await.expect("begin");
        posthorn_writer::enqueue_batch(&mut tx, &events)
            .await
            .expect("enqueue_batch");
        tx.commit().await.expect("commit");
        if run > 0 {
            overall.push(N_EVENTS as f64 / started.elapsed().as_secs_f64());
            writes.push(N_EVENTS as f64 / built.elapsed().as_secs_f64());
        }
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (median_overall, median_write) = (median(&mut overall), median(&mut writes));
    println!(
        "writer: {N_RUNS} transactions of {N_EVENTS} events: median {median_overall:.0} events/s \
         (build + enqueue_batch + commit; min {:.0}, max {:.0}), median {median_write:.0} events/s \
         (enqueue_batch + commit; min {:.0}, max {:.0})",
        overall[0],
        overall[N_RUNS - 1],
        writes[0],
        writes[N_RUNS - 1],
    );
    let n_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(n_rows, ((N_RUNS + 1) * N_EVENTS) as i64);
    // A floor far below what one statement per batch gives, to catch a per-event round trip.
    assert!(
        median_overall > 2_000.0,
        "median {median_overall:.0} events/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_exactly_as_written_including_empty_non_utf8_and_one_mebibyte() {
    // nisshi, like Kafka, refuses record batches over the topic's max.message.bytes (by default
    // 1 MiB + 12 bytes, less than a 1 MiB value with its key and headers); librdkafka's own
    // message.max.bytes (1,000,000 by default) is raised to match.
    const LIMIT: usize = 2 * 1024 * 1024;
    let db = TestDb::create("writer_bytes").await;
    let base = unique("it-writer-bytes");
    let topic = format!("{base}.order");
    create_topic_with_max_message_bytes(&topic, LIMIT).await;
    let limit = LIMIT.to_string();
    let relay = start_relay(&db, &base, &[("POSTHORN_KAFKA_MESSAGE_MAX_BYTES", &limit)]);

    let every_byte: Vec<u8> = (0..=255u8).rev().collect();
    assert!(std::str::from_utf8(&every_byte).is_err());
    let mebibyte: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let bytes_event = |id: &str, bytes: &[u8]| {
        Event::builder("order", id, "Blob")
            .bytes(bytes.to_vec(), "application/octet-stream")
            .build()
            .expect("valid")
    };
    let events = [
        bytes_event("every-byte", &every_byte),
        bytes_event("empty", &[]),
        bytes_event("mebibyte", &mebibyte),
        Event::builder("order", "tombstone", "Blob")
            .tombstone()
            .build()
            .expect("valid"),
    ];
    let mut tx = db.pool.begin().await.expect("begin");
    let library_ids = posthorn_writer::enqueue_batch(&mut tx, &events)
        .await
        .expect("enqueue_batch");
    let mut sql_ids = Vec::new();
    for (id, bytes) in [
        ("sql-every-byte", &every_byte[..]),
        ("sql-empty", &[][..]),
        ("sql-mebibyte", &mebibyte[..]),
    ] {
        let event_id: Uuid = sqlx::query_scalar(
            "SELECT outbox_enqueue_bytes('order', $1, 'Blob', $2, 'application/octet-stream')",
        )
        .bind(id)
        .bind(bytes)
        .fetch_one(&mut *tx)
        .await
        .expect("outbox_enqueue_bytes");
        sql_ids.push(event_id);
    }
    tx.commit().await.expect("commit");

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let failed: Vec<String> =
        sqlx::query_scalar("SELECT last_error FROM outbox WHERE failed_at IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .expect("failed rows");
    assert!(failed.is_empty(), "no row failed: {failed:?}");
    let records = read_topic(&topic, 7, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 7);
    let expected: [(&str, Uuid, Option<&[u8]>); 7] = [
        ("every-byte", library_ids[0], Some(&every_byte)),
        ("empty", library_ids[1], Some(&[])),
        ("mebibyte", library_ids[2], Some(&mebibyte)),
        ("tombstone", library_ids[3], None),
        ("sql-every-byte", sql_ids[0], Some(&every_byte)),
        ("sql-empty", sql_ids[1], Some(&[])),
        ("sql-mebibyte", sql_ids[2], Some(&mebibyte)),
    ];
    for (key, event_id, value) in expected {
        let record = by_event_id(&records, event_id);
        let content_type = value.map(|_| "application/octet-stream");
        assert_record(record, key, event_id, "Blob", content_type);
        assert_eq!(
            record.value.as_deref(),
            value,
            "{key}: the value is the bytes as written"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_the_sql_function_is_a_clear_error_and_a_savepoint_saves_the_transaction() {
    let db = TestDb::create("writer_sql_errors").await;
    create_orders(&db.pool, &["order-42"]).await;
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("UPDATE orders SET status = 'shipped' WHERE id = 'order-42'")
        .execute(&mut *tx)
        .await
        .expect("the business change");

    let mut cases: Vec<(String, &str, String)> = vec![
        (
            "outbox_enqueue('order', '', 'E', '{}')".into(),
            "22023",
            "outbox_enqueue: aggregate_id must not be empty".into(),
        ),
        (
            "outbox_enqueue(NULL, 'o', 'E', '{}')".into(),
            "22004",
            "outbox_enqueue: aggregate_type must not be NULL".into(),
        ),
        (
            "outbox_enqueue('order', 'o', '', '{}')".into(),
            "22023",
            "outbox_enqueue: event_type must not be empty".into(),
        ),
        (
            "outbox_enqueue('order', 'o', 'E', NULL)".into(),
            "22004",
            "outbox_enqueue: payload must not be NULL".into(),
        ),
        (
            "outbox_enqueue('order', 'o', 'E', '{}', topic => 'not a topic')".into(),
            "22023",
            "outbox_enqueue: topic 'not a topic' is not a Kafka topic name".into(),
        ),
        (
            "outbox_enqueue('order', 'o', 'E', '{}', headers => '[\"x\"]')".into(),
            "22023",
            "outbox_enqueue: headers must be a JSON object of strings, not an array".into(),
        ),
        (
            "outbox_enqueue('order', 'o', 'E', '{}', headers => '{\"retries\": 3}')".into(),
            "22023",
            "outbox_enqueue: header 'retries' must be a string, not a number".into(),
        ),
        (
            "outbox_enqueue_bytes('order', 'o', 'E', '\\x00', 'protobuf')".into(),
            "22023",
            "outbox_enqueue_bytes: content_type 'protobuf' is not a media type".into(),
        ),
        (
            "outbox_enqueue_bytes('order', 'o', 'E', '\\x00', NULL)".into(),
            "22004",
            "outbox_enqueue_bytes: content_type NULL is not a media type".into(),
        ),
        (
            "outbox_enqueue_bytes('order', 'o', 'E', NULL, 'application/x-protobuf')".into(),
            "22004",
            "outbox_enqueue_bytes: payload must not be NULL (an empty payload is ''::bytea)".into(),
        ),
        (
            "outbox_enqueue_tombstone('order', 'o', 'E', headers => '{\"a\": null}')".into(),
            "22023",
            "outbox_enqueue_tombstone: header 'a' must be a string, not a null".into(),
        ),
    ];
    for name in posthorn_writer::RESERVED_HEADERS {
        cases.push((
            format!("outbox_enqueue('order', 'o', 'E', '{{}}', headers => '{{\"{name}\": \"x\"}}')"),
            "22023",
            format!("outbox_enqueue: header name '{name}' is reserved: posthorn sets it on every record"),
        ));
    }
    for (call, code, message) in &cases {
        sqlx::query("SAVEPOINT before_event")
            .execute(&mut *tx)
            .await
            .expect("savepoint");
        let err = sqlx::query(AssertSqlSafe(format!("SELECT {call}")))
            .execute(&mut *tx)
            .await
            .expect_err(call);
        assert_eq!(
            sql_state(&err),
            ((*code).to_owned(), message.clone()),
            "{call}"
        );
        // Postgres semantics: the failed statement aborted the transaction...
        let aborted = sqlx::query("SELECT 1")
            .execute(&mut *tx)
            .await
            .expect_err("the transaction is aborted");
        assert_eq!(sql_state(&aborted).0, "25P02", "in_failed_sql_transaction");
        // ... until the caller rolls back to the savepoint.
        sqlx::query("ROLLBACK TO SAVEPOINT before_event")
            .execute(&mut *tx)
            .await
            .expect("rollback to savepoint");
    }
    let event_id: Uuid = sqlx::query_scalar(
        "SELECT outbox_enqueue('order', 'order-42', 'OrderShipped', '{\"order_id\": \"order-42\"}')",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("a valid event after the errors");
    tx.commit().await.expect("commit");

    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = 'order-42'")
        .fetch_one(&db.pool)
        .await
        .expect("order");
    assert_eq!(status, "shipped", "the business change committed");
    let rows: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    assert_eq!(rows, vec![event_id], "only the valid event was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_the_library_is_refused_before_anything_reaches_the_transaction() {
    let db = TestDb::create("writer_lib_errors").await;
    create_orders(&db.pool, &["order-42"]).await;
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("UPDATE orders SET status = 'shipped' WHERE id = 'order-42'")
        .execute(&mut *tx)
        .await
        .expect("the business change");

    let invalid = [
        (
            Event::builder("order", "", "OrderShipped").tombstone(),
            "aggregate_id",
            "invalid event: aggregate_id must not be empty",
        ),
        (
            Event::builder("order", "o", "OrderShipped"),
            "payload",
            "invalid event: no payload: call .json(..), .bytes(..) or .tombstone() before .build()",
        ),
        (
            Event::builder("order", "o", "E").tombstone().topic("not a topic"),
            "topic",
            "invalid event: topic 'not a topic' is not a Kafka topic name (use 1 to 249 of a-z, \
             A-Z, 0-9, '.', '_' and '-', not '.' or '..')",
        ),
        (
            Event::builder("order", "o", "E")
                .tombstone()
                .header("content-type", "text/plain"),
            "headers",
            "invalid event: header name 'content-type' is reserved: posthorn sets it on every record",
        ),
        (
            Event::builder("order", "o", "E").bytes(vec![1, 2], "protobuf"),
            "content_type",
            "invalid event: content_type 'protobuf' is not a media type (for example \
             'application/x-protobuf' or 'text/plain; charset=utf-8')",
        ),
        (
            Event::builder("order", "o", "E").json("\0"),
            "payload",
            "invalid event: the JSON payload contains the character U+0000, which Postgres' \
             jsonb cannot store",
        ),
    ];
    let (results, n_statements) = count_sqlx_statements(async {
        invalid
            .into_iter()
            .map(|(builder, field, message)| (builder.build(), field, message))
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(n_statements, 0, "nothing was sent to Postgres");
    for (result, field, message) in results {
        let err = result.expect_err(message);
        assert!(
            matches!(&err, WriteError::InvalidEvent { field: f, .. } if *f == field),
            "{field}: {err:?}"
        );
        assert_eq!(err.to_string(), message);
    }
    // The transaction is untouched: it goes on and commits its change and a valid event.
    let event = Event::builder("order", "order-42", "OrderShipped")
        .json(&serde_json::json!({"order_id": "order-42"}))
        .build()
        .expect("valid");
    let event_id = posthorn_writer::enqueue(&mut tx, &event)
        .await
        .expect("enqueue");

    // A database error (here: a table that was never migrated) does abort the transaction, as
    // any failed statement does; a savepoint keeps the rest.
    sqlx::query("SAVEPOINT before_event")
        .execute(&mut *tx)
        .await
        .expect("savepoint");
    let missing = Outbox::new("public", "not_migrated").expect("valid names");
    let err = missing
        .enqueue(&mut tx, &event)
        .await
        .expect_err("no such table");
    assert!(matches!(err, WriteError::Database { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("writing events to public.not_migrated: ")
            && message.ends_with(
                "(the table needs posthorn's migration 5 or later: run `posthorn migrate`)"
            ),
        "{message}"
    );
    assert!(sqlx::query("SELECT 1").execute(&mut *tx).await.is_err());
    sqlx::query("ROLLBACK TO SAVEPOINT before_event")
        .execute(&mut *tx)
        .await
        .expect("rollback to savepoint");
    tx.commit().await.expect("commit");

    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = 'order-42'")
        .fetch_one(&db.pool)
        .await
        .expect("order");
    assert_eq!(status, "shipped");
    let rows: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    assert_eq!(rows, vec![event_id]);
    let err = Outbox::new("Sales", "outbox").expect_err("not lowercase");
    assert!(matches!(err, WriteError::InvalidName(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_schema_and_table_get_their_own_functions_and_library_handle() {
    let vars = [
        ("POSTHORN_SCHEMA", "sales"),
        ("POSTHORN_TABLE", "order_events"),
    ];
    let db = TestDb::create_with("writer_custom", &vars).await;
    let base = unique("it-writer-custom");
    let topic = format!("{base}.order");
    create_topic(&topic, 1).await;

    // The substitution renamed the functions with the table.
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'sales' AND p.proname LIKE '%enqueue%' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("functions");
    assert_eq!(
        names,
        [
            "order_events_enqueue",
            "order_events_enqueue_bytes",
            "order_events_enqueue_tombstone"
        ]
    );
    // A decoy table of the same name where the caller's search_path looks first: the function
    // still writes to its own table (it pins the search_path it was created with).
    sqlx::query("CREATE TABLE public.order_events (aggregate_id text)")
        .execute(&db.pool)
        .await
        .expect("decoy");

    let relay = start_relay(&db, &base, &vars);
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL search_path = public")
        .execute(&mut *tx)
        .await
        .expect("search_path");
    let sql_id: Uuid = sqlx::query_scalar(
        "SELECT sales.order_events_enqueue('order', 'o-sql', 'OrderShipped', '{\"via\": \"sql\"}')",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("sales.order_events_enqueue");
    let reserved = sqlx::query(
        "SELECT sales.order_events_enqueue('order', 'o', 'E', '{}', headers => '{\"outbox-id\": \"1\"}')",
    )
    .execute(&mut *tx)
    .await
    .expect_err("outbox-id stays reserved whatever the table's name");
    assert_eq!(
        sql_state(&reserved).1,
        "order_events_enqueue: header name 'outbox-id' is reserved: posthorn sets it on every record"
    );
    tx.rollback().await.expect("rollback");
    let mut tx = db.pool.begin().await.expect("begin");
    let sql_id_committed: Uuid = sqlx::query_scalar(
        "SELECT sales.order_events_enqueue('order', 'o-sql', 'OrderShipped', '{\"via\": \"sql\"}')",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("sales.order_events_enqueue");
    assert_ne!(sql_id, sql_id_committed);
    let outbox = Outbox::new("sales", "order_events").expect("valid names");
    let event = Event::builder("order", "o-lib", "OrderShipped")
        .json(&serde_json::json!({"via": "library"}))
        .build()
        .expect("valid");
    let lib_id = outbox.enqueue(&mut tx, &event).await.expect("enqueue");
    tx.commit().await.expect("commit");

    wait_settled(&db, "sales.order_events").await;
    relay.stop().await;
    let decoy: i64 = sqlx::query_scalar("SELECT count(*) FROM public.order_events")
        .fetch_one(&db.pool)
        .await
        .expect("decoy");
    assert_eq!(decoy, 0, "nothing went to the decoy");
    let records = read_topic(&topic, 2, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 2);
    assert_record(
        &records[0],
        "o-sql",
        sql_id_committed,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(records[0].value_json(), serde_json::json!({"via": "sql"}));
    assert_record(
        &records[1],
        "o-lib",
        lib_id,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(
        records[1].value_json(),
        serde_json::json!({"via": "library"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_from_migration_4_upgrades_and_its_pending_rows_still_publish() {
    let db = TestDb::create_empty("writer_upgrade").await;
    let base = unique("it-writer-upgrade");
    let topic = format!("{base}.order");
    create_topic(&topic, 1).await;
    let cfg = config(&db.url, &[]);

    // The table as migrations 1 to 4 left it, recorded where `posthorn migrate` looks.
    let earlier: Vec<_> = posthorn::migrate::migrator_for(&cfg.outbox)
        .iter()
        .filter(|m| m.version <= 4)
        .cloned()
        .collect();
    let mut migrator = Migrator::with_migrations(earlier);
    migrator.dangerous_set_table_name("\"public\".\"posthorn_outbox_migrations\"");
    migrator.run(&db.pool).await.expect("migrations 1 to 4");
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES \
         ('order', 'o-json', 'OrderShipped', '{\"n\": 1}', NULL), \
         ('order', 'o-tombstone', 'OrderForgotten', NULL, NULL), \
         ('order', 'o-header', 'OrderShipped', '{\"n\": 3}', '{\"content-type\": \"text/plain\"}')",
    )
    .execute(&db.pool)
    .await
    .expect("rows written before the upgrade");

    let applied = posthorn::migrate::run(&cfg.database, &cfg.outbox)
        .await
        .expect("posthorn migrate");
    assert_eq!(applied, vec![5, 6, 7, 8], "the forward migrations");

    // A pending row written before content-type was reserved cannot keep its own: the migration
    // marked it failed (the relay could not mark it under the new check), saying what to do.
    let error: String = sqlx::query_scalar(
        "SELECT last_error FROM outbox WHERE aggregate_id = 'o-header' AND failed_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the old row with a content-type header failed");
    assert!(error.contains("reserved name 'content-type'"), "{error}");
    // What the message says to do works under the new check.
    sqlx::query(
        "UPDATE outbox SET headers = headers - 'content-type', failed_at = NULL \
         WHERE aggregate_id = 'o-header'",
    )
    .execute(&db.pool)
    .await
    .expect("the operator's fix");

    let relay = start_relay(&db, &base, &[]);
    let mut tx = db.pool.begin().await.expect("begin");
    let new_id: Uuid =
        sqlx::query_scalar("SELECT outbox_enqueue('order', 'o-new', 'OrderShipped', '{\"n\": 4}')")
            .fetch_one(&mut *tx)
            .await
            .expect("the new function");
    tx.commit().await.expect("commit");
    wait_settled(&db, "outbox").await;
    relay.stop().await;

    let records = read_topic(&topic, 4, Duration::from_secs(30)).await;
    let keys: Vec<&str> = records.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, ["o-json", "o-tombstone", "o-header", "o-new"]);
    assert_eq!(records[0].header("content-type"), "application/json");
    assert_eq!(records[0].value_json(), serde_json::json!({"n": 1}));
    assert!(!records[1].headers.contains_key("content-type"));
    assert_eq!(records[1].value, None);
    assert_eq!(records[2].header("content-type"), "application/json");
    assert_eq!(records[3].header("event-id"), new_id.to_string());
}

/// Runs a SQL file's statements one at a time (they end with `;` at the end of a line), so that
/// a statement that fails can be told from the others. Returns each statement's error, if any.
async fn run_statements(conn: &mut PgConnection, sql: &str) -> Vec<(String, Option<sqlx::Error>)> {
    let mut results = Vec::new();
    let mut statement = String::new();
    for line in sql.lines() {
        if line.trim_start().starts_with("--") {
            continue;
        }
        statement.push_str(line);
        statement.push('\n');
        if line.trim_end().ends_with(';') {
            let result = sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                .execute(&mut *conn)
                .await;
            results.push((std::mem::take(&mut statement), result.err()));
        }
    }
    results
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read_repo_file(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_examples_run_and_their_events_reach_kafka() {
    let db = TestDb::create("writer_sql_examples").await;
    let base = unique("it-writer-sql-examples");
    let topic = format!("{base}.order");
    create_topic(&topic, 1).await;
    create_orders(&db.pool, &["order-42"]).await;
    let relay = start_relay(&db, &base, &[]);

    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    for file in [
        "examples/writer/order_shipped.sql",
        "examples/writer/bytes_and_tombstone.sql",
    ] {
        sqlx::raw_sql(AssertSqlSafe(read_repo_file(file)))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let results = run_statements(&mut conn, &read_repo_file("examples/writer/savepoint.sql")).await;
    let failed: Vec<(&str, (String, String))> = results
        .iter()
        .filter_map(|(s, e)| e.as_ref().map(|e| (s.as_str(), sql_state(e))))
        .collect();
    assert_eq!(failed.len(), 1, "exactly the bad call fails: {failed:?}");
    assert!(
        failed[0].0.contains("outbox_enqueue('order', ''"),
        "{failed:?}"
    );
    assert_eq!(
        failed[0].1,
        (
            "22023".to_owned(),
            "outbox_enqueue: aggregate_id must not be empty".to_owned()
        )
    );

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let version: i32 = sqlx::query_scalar("SELECT version FROM orders WHERE id = 'order-42'")
        .fetch_one(&db.pool)
        .await
        .expect("order");
    assert_eq!(
        version, 2,
        "both UPDATEs committed, the one before the savepoint too"
    );
    let records = read_topic(&topic, 4, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 4);
    let types: Vec<&str> = records.iter().map(|r| r.header("event-type")).collect();
    assert_eq!(
        types,
        [
            "OrderShipped",
            "LabelPrinted",
            "OrderForgotten",
            "OrderShipped"
        ]
    );
    assert!(records.iter().all(|r| r.key.as_deref() == Some("order-42")));
    assert_eq!(
        records[0].value_json(),
        serde_json::json!({"order_id": "order-42", "carrier": "DHL"})
    );
    assert_eq!(records[0].header("traceparent"), TRACEPARENT);
    assert_eq!(records[1].header("content-type"), "image/png");
    assert_eq!(records[1].value.as_deref(), Some(&b"\x89PNG\r\n\x1a\n"[..]));
    assert_eq!(records[2].value, None);
    assert_eq!(
        records[3].value_json(),
        serde_json::json!({"order_id": "order-42"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_examples_run_and_their_events_reach_kafka() {
    use prost::Message as _;

    let db = TestDb::create("writer_rust_examples").await;
    let base = unique("it-writer-rust-examples");
    let topic = format!("{base}.order");
    create_topic(&topic, 1).await;
    let relay = start_relay(&db, &base, &[]);

    // posthorn-writer/examples/order_shipped.rs: a request that ships, one that cannot.
    order_shipped::create_orders(&db.pool, "order-42")
        .await
        .expect("orders");
    let shipped_id = order_shipped::handle_ship_request(&db.pool, "order-42", "DHL")
        .await
        .expect("ship order-42");
    let again = order_shipped::handle_ship_request(&db.pool, "order-42", "UPS").await;
    assert_eq!(
        again.expect_err("already shipped").to_string(),
        "order order-42 is not waiting to be shipped"
    );
    // posthorn-writer/examples/protobuf.rs
    let message = protobuf::OrderShipped {
        order_id: "order-43".into(),
        carrier: "DHL".into(),
        parcels: 2,
    };
    let protobuf_id = protobuf::write_order_shipped(&db.pool, &message)
        .await
        .expect("protobuf event");

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let records = read_topic(&topic, 2, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_record(
        &records[0],
        "order-42",
        shipped_id,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(
        records[0].value_json(),
        serde_json::json!({"order_id": "order-42", "carrier": "DHL"})
    );
    assert_record(
        &records[1],
        "order-43",
        protobuf_id,
        "OrderShipped",
        Some("application/x-protobuf"),
    );
    let decoded = protobuf::OrderShipped::decode(records[1].value.as_deref().expect("a value"))
        .expect("protobuf");
    assert_eq!(decoded, message);
    let event = protobuf::order_shipped_event(&message).expect("valid");
    assert!(
        matches!(event.payload(), Payload::Bytes { content_type, .. } if content_type == protobuf::CONTENT_TYPE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_runs_and_its_event_reaches_kafka() {
    let db = TestDb::create("writer_python").await;
    let base = unique("it-writer-python");
    let topic = format!("{base}.order");
    create_topic(&topic, 1).await;
    create_orders(&db.pool, &["order-py"]).await;
    crate::support::pip_install("examples/writer/requirements.txt");
    let relay = start_relay(&db, &base, &[]);

    let run = |order_id: &str| {
        Command::new("python3")
            .arg(repo_file("examples/writer/order_shipped.py"))
            .args([order_id, "UPS"])
            .env("DATABASE_URL", &db.url)
            .env("TRACEPARENT", TRACEPARENT)
            .stdin(Stdio::null())
            .output()
            .expect("running examples/writer/order_shipped.py")
    };
    let shipped = tokio::task::block_in_place(|| run("order-py"));
    let stdout = String::from_utf8_lossy(&shipped.stdout);
    assert!(
        shipped.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&shipped.stderr)
    );
    let event_id = stdout
        .trim()
        .strip_prefix("order-py shipped; event ")
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| panic!("unexpected output: {stdout}"));
    // Shipping again fails in the transaction: nothing is written.
    let again = tokio::task::block_in_place(|| run("order-py"));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not waiting to be shipped"));

    wait_settled(&db, "outbox").await;
    relay.stop().await;
    let records = read_topic(&topic, 1, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_record(
        &records[0],
        "order-py",
        event_id,
        "OrderShipped",
        Some("application/json"),
    );
    assert_eq!(
        records[0].value_json(),
        serde_json::json!({"order_id": "order-py", "carrier": "UPS"})
    );
    assert_eq!(records[0].header("traceparent"), TRACEPARENT);
}

#[test]
fn the_docs_quote_every_writer_example_verbatim() {
    let docs = read_repo_file("docs/writing-events.md");
    for file in [
        "examples/writer/order_shipped.sql",
        "examples/writer/bytes_and_tombstone.sql",
        "examples/writer/savepoint.sql",
        "examples/writer/order_shipped.py",
        "posthorn-writer/examples/order_shipped.rs",
        "posthorn-writer/examples/protobuf.rs",
    ] {
        let example = read_repo_file(file);
        assert!(
            docs.contains(example.trim_end()),
            "docs/writing-events.md does not quote {file} as it is"
        );
    }
}
