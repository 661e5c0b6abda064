//! The shared test vectors (`writers/vectors/`): the Rust writer, the SQL functions, and through
//! them the Go and Python writers (which read the same files), write the same row for every event
//! or refuse it with the same error; and the relay publishes the records `records.json` lists.
//!
//! The database and Kafka tests need the services: `eval "$(bash scripts/services.sh up)"`, and
//! the relay binary (`POSTHORN_BIN`, default `target/debug/posthorn`). With
//! `BLESS_WRITER_VECTORS=1` the tests write what the writer and the relay do today into the
//! files instead of comparing (review the diff: that is a contract change).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use posthorn_writer::{Event, WriteError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row as _};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cases<C> {
    cases: Vec<C>,
}

/// One event as the writers' inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventInput {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: PayloadInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    /// Name/value pairs in the order they are added (a later one replaces an earlier one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PayloadInput {
    Json(serde_json::Value),
    Bytes { hex: String, content_type: String },
    Tombstone,
}

/// The outbox row as `ROW_QUERY` reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Row {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Option<String>,
    payload_bytes_hex: Option<String>,
    content_type: Option<String>,
    topic: Option<String>,
    headers: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InvalidEvent {
    field: String,
    message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SqlError {
    sqlstate: String,
    message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventCase {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    event: EventInput,
    /// The row every writer writes, or else `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    row: Option<Row>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<InvalidEvent>,
    /// For a refused event: what the SQL function raises for the same arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sql_error: Option<SqlError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    key: String,
    /// Hex; `None` is no value (a tombstone).
    value_hex: Option<String>,
    /// In order; `{event_id}` and `{outbox_id}` stand for the row's.
    headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordCase {
    name: String,
    event: EventInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<Record>,
}

/// How every writer's tests read a row back, so that they compare the same text.
const ROW_QUERY: &str =
    "SELECT aggregate_type, aggregate_id, event_type, payload::text AS payload, \
     encode(payload_bytes, 'hex') AS payload_bytes_hex, content_type, topic, \
     headers::text AS headers FROM outbox ORDER BY id";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../writers/vectors")
}

fn read_cases<C: serde::de::DeserializeOwned>(file: &str) -> Vec<C> {
    let path = vectors_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let cases: Cases<C> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    cases.cases
}

fn bless() -> bool {
    std::env::var_os("BLESS_WRITER_VECTORS").is_some()
}

fn write_cases<C: Serialize>(file: &str, cases: Vec<C>) {
    let mut text = serde_json::to_string_pretty(&Cases { cases }).expect("serialize");
    text.push('\n');
    std::fs::write(vectors_dir().join(file), text).expect("write vectors");
}

fn hex_decode(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn build(input: &EventInput) -> Result<Event, WriteError> {
    let mut builder = Event::builder(
        input.aggregate_type.as_str(),
        input.aggregate_id.as_str(),
        input.event_type.as_str(),
    );
    builder = match &input.payload {
        PayloadInput::Json(value) => builder.json(value),
        PayloadInput::Bytes { hex, content_type } => {
            builder.bytes(hex_decode(hex), content_type.as_str())
        }
        PayloadInput::Tombstone => builder.tombstone(),
    };
    if let Some(topic) = &input.topic {
        builder = builder.topic(topic.as_str());
    }
    for (name, value) in &input.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.build()
}

fn invalid_event(err: WriteError) -> InvalidEvent {
    match err {
        WriteError::InvalidEvent { field, message } => InvalidEvent {
            field: field.to_owned(),
            message,
        },
        other => panic!("not an InvalidEvent: {other:?}"),
    }
}

#[test]
fn every_event_builds_or_is_refused_as_its_vector_says() {
    let cases: Vec<EventCase> = read_cases("events.json");
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for case in &cases {
        match build(&case.event) {
            Ok(_) => assert!(
                case.error.is_none() && (bless() || case.row.is_some()),
                "{}: built, but the vector expects {:?}",
                case.name,
                case.error
            ),
            Err(err) => {
                let got = invalid_event(err);
                if !bless() {
                    assert_eq!(case.error.as_ref(), Some(&got), "{}", case.name);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_and_enqueue_batch_write_exactly_the_vectors_rows() {
    let db = TestDatabase::create("vectors_rows").await;
    let mut conn = db.connect().await;
    let mut cases: Vec<EventCase> = read_cases("events.json");
    let mut valid = Vec::new();
    for case in &mut cases {
        let event = match build(&case.event) {
            Ok(event) => event,
            Err(err) => {
                case.error = Some(invalid_event(err));
                case.row = None;
                continue;
            }
        };
        let mut tx = conn.begin().await.expect("begin");
        posthorn_writer::enqueue(&mut tx, &event)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let rows = read_rows(&mut tx).await;
        tx.rollback().await.expect("rollback");
        assert_eq!(rows.len(), 1, "{}", case.name);
        if bless() {
            case.row = Some(rows[0].clone());
        } else {
            assert_eq!(case.row.as_ref(), Some(&rows[0]), "{}", case.name);
        }
        valid.push(event);
    }

    // All of them in one statement: the same rows, in input order.
    let mut tx = conn.begin().await.expect("begin");
    posthorn_writer::enqueue_batch(&mut tx, &valid)
        .await
        .expect("enqueue_batch");
    let rows = read_rows(&mut tx).await;
    tx.rollback().await.expect("rollback");
    let expected: Vec<Row> = cases.iter().filter_map(|c| c.row.clone()).collect();
    assert_eq!(rows, expected);
    if bless() {
        write_cases("events.json", cases);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_functions_write_the_same_rows_and_refuse_the_same_events() {
    let db = TestDatabase::create("vectors_sql").await;
    let mut conn = db.connect().await;
    let mut cases: Vec<EventCase> = read_cases("events.json");
    for case in &mut cases {
        let mut tx = conn.begin().await.expect("begin");
        let called = call_sql_function(&mut tx, &case.event).await;
        let outcome = match called {
            Ok(()) => Ok(read_rows(&mut tx).await),
            Err(err) => Err(err),
        };
        tx.rollback().await.expect("rollback");
        match (outcome, &case.error) {
            (Ok(rows), None) => {
                assert_eq!(rows.len(), 1, "{}", case.name);
                assert_eq!(case.row.as_ref(), Some(&rows[0]), "{}", case.name);
            }
            (Err(err), Some(_)) if bless() => case.sql_error = Some(err),
            (Err(err), Some(_)) => {
                assert_eq!(case.sql_error.as_ref(), Some(&err), "{}", case.name)
            }
            (outcome, error) => panic!(
                "{}: the SQL function and the Rust writer disagree: SQL {outcome:?}, writer {error:?}",
                case.name
            ),
        }
    }
    if bless() {
        write_cases("events.json", cases);
    }
}

/// The event through `outbox_enqueue`, `outbox_enqueue_bytes` or `outbox_enqueue_tombstone`, with
/// the JSON text serde_json makes of the payload and of the headers (NULL when there are none).
async fn call_sql_function(conn: &mut PgConnection, event: &EventInput) -> Result<(), SqlError> {
    let headers: serde_json::Map<String, serde_json::Value> = event
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::Value::String(value.clone())))
        .collect();
    let headers = (!headers.is_empty()).then(|| serde_json::Value::Object(headers).to_string());
    let (at, aid, et) = (
        &event.aggregate_type,
        &event.aggregate_id,
        &event.event_type,
    );
    let result = match &event.payload {
        PayloadInput::Json(value) => {
            sqlx::query("SELECT outbox_enqueue($1, $2, $3, $4::text::jsonb, $5, $6::text::jsonb)")
                .bind(at)
                .bind(aid)
                .bind(et)
                .bind(value.to_string())
                .bind(&event.topic)
                .bind(headers)
                .execute(&mut *conn)
                .await
        }
        PayloadInput::Bytes { hex, content_type } => {
            sqlx::query("SELECT outbox_enqueue_bytes($1, $2, $3, $4, $5, $6, $7::text::jsonb)")
                .bind(at)
                .bind(aid)
                .bind(et)
                .bind(hex_decode(hex))
                .bind(content_type)
                .bind(&event.topic)
                .bind(headers)
                .execute(&mut *conn)
                .await
        }
        PayloadInput::Tombstone => {
            sqlx::query("SELECT outbox_enqueue_tombstone($1, $2, $3, $4, $5::text::jsonb)")
                .bind(at)
                .bind(aid)
                .bind(et)
                .bind(&event.topic)
                .bind(headers)
                .execute(&mut *conn)
                .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db)) => Err(SqlError {
            sqlstate: db.code().map(|c| c.into_owned()).unwrap_or_default(),
            message: db.message().to_owned(),
        }),
        Err(other) => panic!("not a database error: {other}"),
    }
}

async fn read_rows(conn: &mut PgConnection) -> Vec<Row> {
    let rows = sqlx::query(ROW_QUERY)
        .fetch_all(&mut *conn)
        .await
        .expect("read rows");
    rows.iter()
        .map(|r| Row {
            aggregate_type: r.get("aggregate_type"),
            aggregate_id: r.get("aggregate_id"),
            event_type: r.get("event_type"),
            payload: r.get("payload"),
            payload_bytes_hex: r.get("payload_bytes_hex"),
            content_type: r.get("content_type"),
            topic: r.get("topic"),
            headers: r.get("headers"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_exactly_the_vectors_records() {
    let db = TestDatabase::create("vectors_records").await;
    let topic = unique("vectors-records");
    let brokers = service("POSTHORN_TEST_KAFKA_BROKERS");
    let relay = Relay::start(&db.url, &brokers, &topic);
    let mut cases: Vec<RecordCase> = read_cases("records.json");
    let events: Vec<Event> = cases
        .iter()
        .map(|c| build(&c.event).unwrap_or_else(|e| panic!("{}: {e}", c.name)))
        .collect();
    let mut conn = db.connect().await;
    let mut tx = conn.begin().await.expect("begin");
    let event_ids = posthorn_writer::enqueue_batch(&mut tx, &events)
        .await
        .expect("enqueue_batch");
    tx.commit().await.expect("commit");

    let records = tokio::task::spawn_blocking({
        let n = cases.len();
        move || read_records(&brokers, &topic, n)
    })
    .await
    .expect("consumer thread");
    drop(relay);
    let outbox_ids: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT event_id::text, id FROM outbox")
            .fetch_all(&mut conn)
            .await
            .expect("ids")
            .into_iter()
            .collect();
    for ((case, event_id), mut record) in cases.iter_mut().zip(&event_ids).zip(records) {
        let event_id = event_id.to_string();
        let outbox_id = outbox_ids[&event_id].to_string();
        for (name, value) in &mut record.headers {
            if name == "event-id" && *value == event_id {
                *value = "{event_id}".to_owned();
            } else if name == "outbox-id" && *value == outbox_id {
                *value = "{outbox_id}".to_owned();
            }
        }
        if bless() {
            case.record = Some(record);
        } else {
            assert_eq!(case.record.as_ref(), Some(&record), "{}", case.name);
        }
    }
    if bless() {
        write_cases("records.json", cases);
    }
}

/// The first `n` records of `topic`'s only partition; panics after 60 s.
fn read_records(brokers: &str, topic: &str, n: usize) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("posthorn-writer-vectors"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut records = Vec::new();
    while records.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} records within 60 s",
            records.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            // The relay has not created the topic yet.
            Err(rdkafka::error::KafkaError::MessageConsumption(_)) => continue,
            Err(err) => panic!("consumer: {err}"),
        };
        let headers = message
            .headers()
            .iter()
            .flat_map(|hs| hs.iter())
            .map(|h| {
                let value = String::from_utf8(h.value.unwrap_or_default().to_vec());
                (h.key.to_owned(), value.expect("UTF-8 header"))
            })
            .collect();
        records.push(Record {
            key: String::from_utf8(message.key().expect("a key").to_vec()).expect("UTF-8 key"),
            value_hex: message.payload().map(hex_encode),
            headers,
        });
    }
    records
}

/// A database of the test's own, migrated with `posthorn migrate`.
struct TestDatabase {
    url: String,
}

impl TestDatabase {
    async fn create(test: &str) -> TestDatabase {
        let admin_url = service("POSTHORN_TEST_DATABASE_URL");
        let name = unique(&format!("posthorn_t_{test}"));
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("admin connection");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create database");
        let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
        let url = format!("{base}/{name}");
        let status = Command::new(posthorn_bin())
            .arg("migrate")
            .env_clear()
            .envs(relay_env(&url, "127.0.0.1:9092", "unused"))
            .stdout(Stdio::null())
            .status()
            .expect("posthorn migrate");
        assert!(status.success(), "posthorn migrate: {status}");
        TestDatabase { url }
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("connect")
    }
}

/// `posthorn run` as a child process, killed when dropped.
struct Relay(Child);

impl Relay {
    fn start(url: &str, brokers: &str, topic: &str) -> Relay {
        let child = Command::new(posthorn_bin())
            .arg("run")
            .env_clear()
            .envs(relay_env(url, brokers, topic))
            .stdout(Stdio::null())
            .spawn()
            .expect("posthorn run");
        Relay(child)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay_env(url: &str, brokers: &str, topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("POSTHORN_DATABASE_URL", url.to_owned()),
        ("POSTHORN_KAFKA_BROKERS", brokers.to_owned()),
        ("POSTHORN_TOPIC_TEMPLATE", topic.to_owned()),
        ("POSTHORN_POLL_INTERVAL_MS", "100".to_owned()),
        ("POSTHORN_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("POSTHORN_LOG", "warn".to_owned()),
    ]
}

fn posthorn_bin() -> PathBuf {
    std::env::var_os("POSTHORN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/posthorn"))
}

/// `<prefix>_<nanoseconds>`: a name no other run uses.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}_{:x}", nanos & 0xffff_ffff_ffff)
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `eval \"$(bash scripts/services.sh up)\"` first")
    })
}
