//! The contract's rules hold the same in SQL and in Rust: on one table of cases, the outbox
//! table's CHECK constraints and the enqueue functions accept what `posthorn::contract` accepts
//! and refuse what it refuses (where they differ, the case says so, with a FIXME).

use posthorn::contract;
use sqlx::postgres::PgPool;

use crate::support::TestDb;

/// What one layer does with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepts,
    Refuses,
}

use Verdict::{Accepts, Refuses};

fn verdict(ok: bool) -> Verdict {
    if ok {
        Accepts
    } else {
        Refuses
    }
}

/// Inserts one row (a savepoint's worth) and says whether Postgres took it.
async fn insert(pool: &PgPool, topic: Option<&str>, headers: Option<serde_json::Value>) -> Verdict {
    let mut tx = pool.begin().await.expect("begin");
    let inserted = sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, topic, headers) \
         VALUES ('t', 'k', 'e', $1, $2)",
    )
    .bind(topic)
    .bind(headers)
    .execute(&mut *tx)
    .await;
    tx.rollback().await.expect("rollback");
    verdict(inserted.is_ok())
}

async fn enqueue(
    pool: &PgPool,
    topic: Option<&str>,
    headers: Option<serde_json::Value>,
) -> Verdict {
    let mut tx = pool.begin().await.expect("begin");
    let enqueued = sqlx::query("SELECT outbox_enqueue('t', 'k', 'e', '{}'::jsonb, $1, $2)")
        .bind(topic)
        .bind(headers)
        .execute(&mut *tx)
        .await;
    tx.rollback().await.expect("rollback");
    verdict(enqueued.is_ok())
}

#[tokio::test]
async fn the_tables_checks_and_the_rust_rules_agree_on_topic_names() {
    let db = TestDb::create("contract_topics").await;
    let long_ok = "x".repeat(contract::MAX_TOPIC_LEN);
    let too_long = "x".repeat(contract::MAX_TOPIC_LEN + 1);
    // (topic, what the table's CHECK does where it differs from the rule)
    let cases: Vec<(&str, Option<Verdict>)> = vec![
        ("orders", None),
        ("a.B_c-9", None),
        (&long_ok, None),
        ("", None),
        (&too_long, None),
        ("a b", None),
        ("a/b", None),
        ("ordres-é", None),
        // Migration 1's CHECK let these two in; migration 6 refuses them, as the rest do.
        (".", None),
        ("..", None),
    ];
    for (topic, check_differs) in cases {
        let rule = verdict(contract::topic_name_problem(topic).is_none());
        let shown = &topic[..topic.len().min(20)];
        assert_eq!(
            insert(&db.pool, Some(topic), None).await,
            check_differs.unwrap_or(rule),
            "the table's CHECK on topic '{shown}'"
        );
        assert_eq!(
            enqueue(&db.pool, Some(topic), None).await,
            rule,
            "outbox_enqueue with topic '{shown}'"
        );
        let writer = posthorn_writer::Event::builder("t", "k", "e")
            .tombstone()
            .topic(topic)
            .build();
        assert_eq!(
            verdict(writer.is_ok()),
            rule,
            "posthorn-writer, topic '{shown}'"
        );
    }
}

#[tokio::test]
async fn the_tables_checks_and_the_rust_rules_agree_on_header_names() {
    let db = TestDb::create("contract_headers").await;
    let mut names: Vec<&str> = contract::RESERVED_HEADERS.to_vec();
    names.extend([
        "traceparent",
        "x-tenant",
        contract::header::POSTHORN_ERROR,
        contract::header::POSTHORN_ORIGINAL_TOPIC,
        contract::header::POSTHORN_PAYLOAD_OMITTED,
        "Event-Id",
    ]);
    for name in names {
        let rule = verdict(!contract::is_reserved_header(name));
        let headers = serde_json::json!({ name: "v" });
        assert_eq!(
            insert(&db.pool, None, Some(headers.clone())).await,
            rule,
            "the table's CHECK on header '{name}'"
        );
        assert_eq!(
            enqueue(&db.pool, None, Some(headers)).await,
            rule,
            "outbox_enqueue with header '{name}'"
        );
        let writer = posthorn_writer::Event::builder("t", "k", "e")
            .tombstone()
            .header(name, "v")
            .build();
        assert_eq!(
            verdict(writer.is_ok()),
            rule,
            "posthorn-writer, header '{name}'"
        );
    }
}
