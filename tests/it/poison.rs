//! Rows Kafka will never accept, under both `POSTHORN_ON_POISON` policies: the poison row is
//! marked failed (and dead-lettered), other aggregates always go on, and the policy decides
//! whether the poison row's own aggregate goes on or waits.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{
    create_topic, in_both_modes, read_topic, run_posthorn, unique, wait_until, Record,
    RunningRelay, TestDb, Tracking, DELIVERED,
};

/// With exactly-once delivery (checkpoint tracking): a poison row found on the relay's side
/// (an invalid topic name) and one Kafka refuses (a missing topic, which fails its record in
/// the batch's transaction, so the transaction is aborted). Either way the dead-letter topic and
/// the main topic hold each record once for a read_committed consumer.
mod exactly_once {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_an_invalid_topic_name() {
        check_dead_letter_delivered(
            Kind::InvalidTopicName,
            Tracking::Checkpoint,
            Delivery::ExactlyOnce,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_a_topic_that_does_not_exist() {
        check_dead_letter_delivered(
            Kind::TopicMissing,
            Tracking::Checkpoint,
            Delivery::ExactlyOnce,
        )
        .await
    }
}

// Each of these runs twice, as rows_mode::<name> and checkpoint_mode::<name>.
in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    dead_letter_an_invalid_topic_name,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    dead_letter_headers_that_are_not_strings,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    dead_letter_a_payload_the_broker_refuses_as_too_large,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    dead_letter_a_topic_that_does_not_exist,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    halt_key_headers_that_are_not_strings,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    halt_key_a_payload_the_broker_refuses_as_too_large,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    halt_key_a_topic_that_does_not_exist,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    halt_key_an_invalid_topic_name_then_an_operator_fixes_and_requeues_it,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The topic template renders a name Kafka does not allow (posthorn's own check).
    InvalidTopicName,
    /// `headers` is not an object of strings (a table without posthorn's CHECK constraint).
    HeadersNotStrings,
    /// The payload is over the broker's message.max.bytes (librdkafka's own limit raised, so
    /// the broker is what refuses it, for a whole record batch).
    PayloadTooLargeForBroker,
    /// The row routes to a topic that does not exist, and auto-creation is off.
    TopicMissing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    DeadLetter,
    HaltKey,
}

struct Outcome {
    db: TestDb,
    topic: String,
    ids: BTreeMap<&'static str, i64>,
    main: Vec<Record>,
    dead_letters: Vec<Record>,
}

fn seq(r: &Record) -> String {
    r.value_json()["seq"].as_str().expect("seq").to_owned()
}

/// (delivered, failed, last_error), delivered in either tracking mode.
async fn row_state(db: &TestDb, id: i64) -> (bool, bool, Option<String>) {
    let sql = format!(
        "SELECT {DELIVERED}, o.failed_at IS NOT NULL, o.last_error FROM outbox o WHERE o.id = $1"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("row state")
}

/// Rows A1, B1, A2 (poison), B2, A3, A4 in one transaction, then a sentinel C1 once the poison
/// row is settled, so that everything the relay was going to publish has been published.
async fn run(kind: Kind, policy: Policy, tracking: Tracking) -> Outcome {
    run_delivered(kind, policy, tracking, Delivery::AtLeastOnce).await
}

/// How the relay under test delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    AtLeastOnce,
    /// In Kafka transactions: a batch with a poison row is aborted, the poison row is
    /// dead-lettered in a transaction of its own, the rest published again.
    ExactlyOnce,
}

async fn run_delivered(
    kind: Kind,
    policy: Policy,
    tracking: Tracking,
    delivery: Delivery,
) -> Outcome {
    let db = TestDb::create(&format!("poison_{:?}_{:?}", kind, policy).to_lowercase()).await;
    let topic = unique("it-poison");
    create_topic(&topic, 1).await;
    let dlq = format!("{topic}.dlq");
    let mut vars: Vec<(&str, String)> = vec![("POSTHORN_BATCH_SIZE", "100".into())];
    if delivery == Delivery::ExactlyOnce {
        vars.push(("POSTHORN_DELIVERY", "exactly-once".into()));
        vars.push(("POSTHORN_CHECKPOINT_TOPIC", format!("{topic}.checkpoint")));
    }
    match policy {
        Policy::DeadLetter => {
            create_topic(&dlq, 1).await;
            vars.push(("POSTHORN_ON_POISON", "dead-letter".into()));
            vars.push(("POSTHORN_DEAD_LETTER_TOPIC", dlq.clone()));
        }
        Policy::HaltKey => vars.push(("POSTHORN_ON_POISON", "halt-key".into())),
    }
    // Every good row names its topic; only the poison row differs.
    let (poison_topic, poison_payload, poison_headers) = match kind {
        Kind::InvalidTopicName => (None, "jsonb_build_object('seq', 'A2')".to_owned(), "NULL"),
        Kind::HeadersNotStrings => {
            sqlx::query("ALTER TABLE outbox DROP CONSTRAINT outbox_headers_check")
                .execute(&db.pool)
                .await
                .expect("drop the headers check");
            (
                Some(topic.clone()),
                "jsonb_build_object('seq', 'A2')".to_owned(),
                "'{\"n\": 1}'::jsonb",
            )
        }
        Kind::PayloadTooLargeForBroker => {
            vars.push(("POSTHORN_KAFKA_MESSAGE_MAX_BYTES", "5000000".into()));
            (
                Some(topic.clone()),
                "jsonb_build_object('seq', 'A2', 'blob', repeat('x', 1200000))".to_owned(),
                "NULL",
            )
        }
        Kind::TopicMissing => {
            vars.push(("POSTHORN_KAFKA_ALLOW_AUTO_CREATE_TOPICS", "false".into()));
            vars.push((
                "POSTHORN_KAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS",
                "1000".into(),
            ));
            (
                Some(format!("{topic}.missing")),
                "jsonb_build_object('seq', 'A2')".to_owned(),
                "NULL",
            )
        }
    };
    let insert = format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, topic, payload, headers) VALUES \
         ('order x', 'A', 'E', $1, '{{\"seq\": \"A1\"}}', NULL), \
         ('order x', 'B', 'E', $1, '{{\"seq\": \"B1\"}}', NULL), \
         ('order x', 'A', 'E', $2, {poison_payload}, {poison_headers}), \
         ('order x', 'B', 'E', $1, '{{\"seq\": \"B2\"}}', NULL), \
         ('order x', 'A', 'E', $1, '{{\"seq\": \"A3\"}}', NULL), \
         ('order x', 'A', 'E', $1, '{{\"seq\": \"A4\"}}', NULL) RETURNING id"
    );
    let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(insert))
        .bind(&topic)
        .bind(poison_topic)
        .fetch_all(&db.pool)
        .await
        .expect("insert rows");
    let ids: BTreeMap<&'static str, i64> = ["A1", "B1", "A2", "B2", "A3", "A4"]
        .into_iter()
        .zip(ids)
        .collect();

    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let relay = RunningRelay::start(tracking.config(&db.url, &extra));
    wait_until(
        Duration::from_secs(60),
        "the poison row is marked failed",
        || async { row_state(&db, ids["A2"]).await.1 },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "the other aggregate is delivered",
        || async { row_state(&db, ids["B2"]).await.0 },
    )
    .await;
    let sentinel: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, topic, payload) \
         VALUES ('order x', 'C', 'E', $1, '{\"seq\": \"C1\"}') RETURNING id",
    )
    .bind(&topic)
    .fetch_one(&db.pool)
    .await
    .expect("sentinel");
    wait_until(
        Duration::from_secs(60),
        "the sentinel is delivered",
        || async { row_state(&db, sentinel).await.0 },
    )
    .await;
    relay.stop().await;

    let expected_main = match policy {
        Policy::DeadLetter => 6,
        Policy::HaltKey => 4,
    };
    let main = read_topic(&topic, expected_main, Duration::from_secs(30)).await;
    let dead_letters = match policy {
        Policy::DeadLetter => read_topic(&dlq, 1, Duration::from_secs(30)).await,
        Policy::HaltKey => Vec::new(),
    };
    Outcome {
        db,
        topic,
        ids,
        main,
        dead_letters,
    }
}

fn per_key(records: &[Record]) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in records {
        keys.entry(r.key.clone().expect("key"))
            .or_default()
            .push(seq(r));
    }
    keys
}

async fn check_dead_letter(kind: Kind, tracking: Tracking) {
    check_dead_letter_delivered(kind, tracking, Delivery::AtLeastOnce).await
}

async fn check_dead_letter_delivered(kind: Kind, tracking: Tracking, delivery: Delivery) {
    let out = run_delivered(kind, Policy::DeadLetter, tracking, delivery).await;
    let keys = per_key(&out.main);
    assert_eq!(
        keys["A"],
        ["A1", "A3", "A4"],
        "A goes on past its poison row, in order"
    );
    assert_eq!(keys["B"], ["B1", "B2"]);
    assert_eq!(keys["C"], ["C1"]);
    assert_eq!(out.main.len(), 6, "nothing else, no duplicates: {:?}", keys);

    assert_eq!(out.dead_letters.len(), 1);
    let dl = &out.dead_letters[0];
    assert_eq!(dl.key.as_deref(), Some("A"));
    assert_eq!(dl.header("outbox-id"), out.ids["A2"].to_string());
    assert!(!dl.header("posthorn-error").is_empty());
    if kind == Kind::PayloadTooLargeForBroker {
        assert_eq!(dl.header("posthorn-payload-omitted"), "true");
        assert_eq!(dl.value, None);
    } else {
        assert_eq!(seq(dl), "A2");
    }

    let (delivered, failed, error) = row_state(&out.db, out.ids["A2"]).await;
    assert!(!delivered && failed);
    let error = error.expect("error recorded");
    assert!(error.contains("dead-lettered to"), "{error}");
}

async fn check_halt_key(kind: Kind, tracking: Tracking) -> Outcome {
    let out = run(kind, Policy::HaltKey, tracking).await;
    let keys = per_key(&out.main);
    assert_eq!(keys["A"], ["A1"], "A stops at its poison row");
    assert_eq!(keys["B"], ["B1", "B2"], "other aggregates go on");
    assert_eq!(keys["C"], ["C1"]);
    assert_eq!(out.main.len(), 4, "{keys:?}");
    let (delivered, failed, error) = row_state(&out.db, out.ids["A2"]).await;
    assert!(!delivered && failed && error.is_some());
    for later in ["A3", "A4"] {
        let (delivered, failed, error) = row_state(&out.db, out.ids[later]).await;
        match tracking {
            Tracking::Rows => assert!(
                !delivered && !failed,
                "{later} waits, neither delivered nor failed"
            ),
            // Checkpoint mode sets a held row aside as failed, saying why (a redeliver of the
            // row it waits for re-queues it too): still not delivered, still not published.
            Tracking::Checkpoint => assert!(
                !delivered
                    && failed
                    && error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("held behind")),
                "{later} waits, not delivered, failed as held behind A2: {error:?}"
            ),
        }
    }
    out
}

async fn dead_letter_an_invalid_topic_name(tracking: Tracking) {
    check_dead_letter(Kind::InvalidTopicName, tracking).await;
}

async fn dead_letter_headers_that_are_not_strings(tracking: Tracking) {
    check_dead_letter(Kind::HeadersNotStrings, tracking).await;
}

async fn dead_letter_a_payload_the_broker_refuses_as_too_large(tracking: Tracking) {
    check_dead_letter(Kind::PayloadTooLargeForBroker, tracking).await;
}

async fn dead_letter_a_topic_that_does_not_exist(tracking: Tracking) {
    check_dead_letter(Kind::TopicMissing, tracking).await;
}

async fn halt_key_headers_that_are_not_strings(tracking: Tracking) {
    check_halt_key(Kind::HeadersNotStrings, tracking).await;
}

async fn halt_key_a_payload_the_broker_refuses_as_too_large(tracking: Tracking) {
    check_halt_key(Kind::PayloadTooLargeForBroker, tracking).await;
}

async fn halt_key_a_topic_that_does_not_exist(tracking: Tracking) {
    check_halt_key(Kind::TopicMissing, tracking).await;
}

async fn halt_key_an_invalid_topic_name_then_an_operator_fixes_and_requeues_it(tracking: Tracking) {
    let out = check_halt_key(Kind::InvalidTopicName, tracking).await;
    let vars = [("POSTHORN_ON_POISON", "halt-key")];
    match tracking {
        // The documented re-queue: fix the row, clear failed_at.
        Tracking::Rows => {
            sqlx::query("UPDATE outbox SET topic = $1, failed_at = NULL WHERE id = $2")
                .bind(&out.topic)
                .bind(out.ids["A2"])
                .execute(&out.db.pool)
                .await
                .expect("re-queue");
        }
        // A checkpoint already covers the failed row's transaction, so clearing failed_at
        // would read as delivered: fix the row, then `posthorn redeliver` re-queues it (and the
        // rows held behind it).
        Tracking::Checkpoint => {
            sqlx::query("UPDATE outbox SET topic = $1 WHERE id = $2")
                .bind(&out.topic)
                .bind(out.ids["A2"])
                .execute(&out.db.pool)
                .await
                .expect("fix the row");
            let (code, stdout, stderr) = run_posthorn(
                &["redeliver", "--failed"],
                &tracking.env_vars(&out.db.url, &vars),
            );
            assert_eq!(code, 0, "redeliver: {stdout}{stderr}");
        }
    }
    let relay = RunningRelay::start(tracking.config(&out.db.url, &vars));
    out.db
        .wait_all_delivered(Duration::from_secs(30), "the halted aggregate drains")
        .await;
    relay.stop().await;
    let records = read_topic(&out.topic, 7, Duration::from_secs(30)).await;
    assert_eq!(
        per_key(&records)["A"],
        ["A1", "A2", "A3", "A4"],
        "in order after the re-queue"
    );
    assert_eq!(records.len(), 7);
}
