//! Every committed row reaches Kafka once, in per-aggregate commit order, as the contract says;
//! rolled-back rows never do; commit order different from id order loses nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use posthorn::config::PoisonPolicy;
use posthorn::outbox::{Outbox, ReadPast};
use posthorn::relay::RelayStats;
use sqlx::Row;
use uuid::Uuid;

use crate::support::{
    check_key_order, config, create_aggregates, create_topic, delivered, in_both_modes, read_topic,
    spawn_writers, unique, wait_until, RunningRelay, TestDb, Tracking,
};

// Each of these runs twice, as rows_mode::<name> and checkpoint_mode::<name>.
in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    concurrent_writers_rows_all_arrive_once_in_per_key_commit_order,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    records_follow_the_contract_for_key_value_headers_and_topic,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    rolled_back_rows_are_never_published,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_row_committed_after_a_later_row_is_still_published,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_transaction_held_open_does_not_stall_other_transactions_rows,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    late_commits_during_a_backlog_keep_per_key_order,
}

async fn concurrent_writers_rows_all_arrive_once_in_per_key_commit_order(tracking: Tracking) {
    const N_KEYS: usize = 100;
    const N_EVENTS: usize = 10_000;
    const N_WRITERS: usize = 8;
    let db = TestDb::create("order").await;
    let topic = unique("it-order");
    create_topic(&topic, 4).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("agg-{k}")).collect();
    create_aggregates(&db.pool, &keys).await;

    let relay = RunningRelay::start(tracking.config(&db.url, &[("POSTHORN_BATCH_SIZE", "500")]));
    // Writers take events from a shared counter, so every aggregate is written by several
    // writers at once and its row lock decides the order.
    spawn_writers(&db.pool, &topic, &keys, N_EVENTS, N_WRITERS)
        .await
        .expect("writers");
    let (records, _) = drain_and_read(&db, relay, &topic, N_EVENTS).await;

    // The contract: key = aggregate_id, value = payload, headers from the row.
    let rows: HashMap<i64, (Uuid, String, i32)> = sqlx::query(
        "SELECT id, event_id, aggregate_id, (payload->>'version')::int AS version FROM outbox",
    )
    .fetch_all(&db.pool)
    .await
    .expect("outbox rows")
    .into_iter()
    .map(|r| {
        (
            r.get("id"),
            (r.get("event_id"), r.get("aggregate_id"), r.get("version")),
        )
    })
    .collect();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    for r in &records {
        let key = r.key.clone().expect("a key");
        let outbox_id: i64 = r.header("outbox-id").parse().expect("numeric outbox-id");
        let (event_id, aggregate_id, version) = &rows[&outbox_id];
        assert_eq!(&key, aggregate_id);
        assert_eq!(r.header("event-id"), event_id.to_string());
        assert_eq!(r.header("event-type"), "Incremented");
        assert_eq!(r.header("aggregate-type"), topic);
        assert!(r.header("writer").starts_with('w'));
        assert_eq!(r.value_json()["version"], *version);
        let p = *partition_of_key.entry(key.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition, "one key, one partition");
        per_key.entry(key).or_default().push(i64::from(*version));
    }
    // Records of one key are in one partition, so consumption order there is Kafka's order.
    assert_eq!(per_key.len(), N_KEYS);
    for (key, versions) in &per_key {
        let expected: Vec<i64> = (1..=(N_EVENTS / N_KEYS) as i64).collect();
        assert_eq!(
            versions, &expected,
            "key {key}: commit order, no gaps, no repeats"
        );
        assert_eq!(check_key_order(versions), Ok(0));
    }
}

async fn records_follow_the_contract_for_key_value_headers_and_topic(tracking: Tracking) {
    let db = TestDb::create("contract").await;
    let base = unique("it-contract");
    let routed = format!("{base}.routed");
    let template_topic = format!("{base}.order.OrderShipped");
    create_topic(&routed, 1).await;
    create_topic(&template_topic, 1).await;
    let relay = RunningRelay::start(tracking.config(
        &db.url,
        &[(
            "POSTHORN_TOPIC_TEMPLATE",
            &format!("{base}.{{aggregate_type}}.{{event_type}}"),
        )],
    ));
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic, headers) VALUES \
         ('order', 'o-1', 'OrderShipped', '{\"b\": [1, 2], \"a\": \"x\"}', NULL, '{\"traceparent\": \"00-abc-def-01\"}'), \
         ('order', 'o-2', 'OrderShipped', NULL, NULL, NULL), \
         ('order', 'o-3', 'OrderShipped', '{\"n\": 3}', $1, NULL)",
    )
    .bind(&routed)
    .execute(&db.pool)
    .await
    .expect("insert");
    db.wait_all_delivered(Duration::from_secs(30), "rows are delivered")
        .await;
    relay.stop().await;

    let templated = read_topic(&template_topic, 2, Duration::from_secs(30)).await;
    assert_eq!(templated.len(), 2);
    let first = &templated[0];
    assert_eq!(first.key.as_deref(), Some("o-1"));
    assert_eq!(
        first.value_json(),
        serde_json::json!({"a": "x", "b": [1, 2]})
    );
    assert_eq!(first.header("traceparent"), "00-abc-def-01");
    assert_eq!(first.header("aggregate-type"), "order");
    assert_eq!(first.header("event-type"), "OrderShipped");
    Uuid::parse_str(first.header("event-id")).expect("event-id is a UUID");
    assert_eq!(first.header("content-type"), "application/json");
    assert_eq!(
        first.headers.len(),
        6,
        "five posthorn headers and one of the row's"
    );
    let tombstone = &templated[1];
    assert_eq!(tombstone.key.as_deref(), Some("o-2"));
    assert_eq!(
        tombstone.value, None,
        "a NULL payload is a null value (tombstone)"
    );
    assert!(
        !tombstone.headers.contains_key("content-type"),
        "a tombstone has no content"
    );

    let routed_records = read_topic(&routed, 1, Duration::from_secs(30)).await;
    assert_eq!(routed_records.len(), 1);
    assert_eq!(routed_records[0].key.as_deref(), Some("o-3"));
    assert_eq!(routed_records[0].value_json()["n"], 3);
}

async fn rolled_back_rows_are_never_published(tracking: Tracking) {
    let db = TestDb::create("rollback").await;
    let topic = unique("it-rollback");
    create_topic(&topic, 2).await;
    let relay = RunningRelay::start(tracking.config(&db.url, &[]));
    let mut committed = HashSet::new();
    for n in 0..300i32 {
        let mut tx = db.pool.begin().await.expect("begin");
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, $2, 'Tried', jsonb_build_object('n', $3::int))",
        )
        .bind(&topic)
        .bind(format!("k{}", n % 7))
        .bind(n)
        .execute(&mut *tx)
        .await
        .expect("insert");
        match n % 3 {
            0 => tx.rollback().await.expect("rollback"),
            1 => {
                // A statement error aborts the transaction; its commit is a rollback.
                let failed = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
                assert!(failed.is_err());
                drop(tx);
            }
            _ => {
                tx.commit().await.expect("commit");
                committed.insert(n);
            }
        }
    }
    db.wait_all_delivered(Duration::from_secs(60), "committed rows are delivered")
        .await;
    relay.stop().await;

    let records = read_topic(&topic, committed.len(), Duration::from_secs(30)).await;
    let published: Vec<i32> = records
        .iter()
        .map(|r| r.value_json()["n"].as_i64().expect("n") as i32)
        .collect();
    let published_set: HashSet<i32> = published.iter().copied().collect();
    assert_eq!(
        published.len(),
        committed.len(),
        "no duplicates, nothing extra"
    );
    assert_eq!(published_set, committed, "exactly the committed rows");
}

async fn a_row_committed_after_a_later_row_is_still_published(tracking: Tracking) {
    let db = TestDb::create("late_commit").await;
    let topic = unique("it-late");
    create_topic(&topic, 1).await;
    let relay = RunningRelay::start(tracking.config(&db.url, &[]));
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                  VALUES ($1, $2, 'Happened', '{}') RETURNING id";

    // A inserts first (smaller id) and stays open; B inserts later and commits first.
    let mut tx_a = db.pool.begin().await.expect("begin A");
    let id_a: i64 = sqlx::query_scalar(insert)
        .bind(&topic)
        .bind("a")
        .fetch_one(&mut *tx_a)
        .await
        .expect("insert A");
    let mut tx_b = db.pool.begin().await.expect("begin B");
    let id_b: i64 = sqlx::query_scalar(insert)
        .bind(&topic)
        .bind("b")
        .fetch_one(&mut *tx_b)
        .await
        .expect("insert B");
    assert!(id_a < id_b);
    tx_b.commit().await.expect("commit B");

    // The relay publishes B while A's smaller id is still invisible to it...
    wait_until(Duration::from_secs(30), "B is delivered", || {
        db.is_delivered(id_b)
    })
    .await;
    // ...and still finds A when it commits.
    tx_a.commit().await.expect("commit A");
    wait_until(Duration::from_secs(30), "A is delivered", || {
        db.is_delivered(id_a)
    })
    .await;
    relay.stop().await;

    let records = read_topic(&topic, 2, Duration::from_secs(30)).await;
    let keys: Vec<_> = records
        .iter()
        .map(|r| r.key.clone().expect("key"))
        .collect();
    assert_eq!(
        keys,
        vec!["b".to_owned(), "a".to_owned()],
        "commit order: B, then A"
    );
}

async fn a_transaction_held_open_does_not_stall_other_transactions_rows(tracking: Tracking) {
    let db = TestDb::create("long_tx").await;
    let topic = unique("it-long-tx");
    create_topic(&topic, 2).await;
    let relay = RunningRelay::start(tracking.config(&db.url, &[]));
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                  VALUES ($1, $2, 'E', jsonb_build_object('n', $3::int))";
    // Open for the whole test, holding an outbox row of its own (the smallest id).
    let mut long = db.pool.begin().await.expect("begin");
    sqlx::query(insert)
        .bind(&topic)
        .bind("slow")
        .bind(-1)
        .execute(&mut *long)
        .await
        .expect("insert in the long transaction");
    for n in 0..500i32 {
        sqlx::query(insert)
            .bind(&topic)
            .bind(format!("k{}", n % 10))
            .bind(n)
            .execute(&db.pool)
            .await
            .expect("insert");
    }
    db.wait_all_delivered(Duration::from_secs(60), "the other 500 rows are delivered")
        .await;
    let records = read_topic(&topic, 500, Duration::from_secs(30)).await;
    assert_eq!(
        records.len(),
        500,
        "all of them, while the long transaction is still open"
    );
    long.commit().await.expect("commit the long transaction");
    db.wait_all_delivered(Duration::from_secs(30), "its row is delivered too")
        .await;
    relay.stop().await;
    let records = read_topic(&topic, 501, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 501);
}

/// Reading past the rows in flight (what the relay does while a full batch waits for its acks)
/// stops at a row below them that committed late, and tolerates rows of its own being marked
/// meanwhile. Rows mode only: it drives rows mode's reads and marks (`fetch_after`,
/// `delivered_at`) directly; checkpoint mode reads windows (tests/it/checkpoint.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_past_rows_in_flight_stops_at_a_late_commit_below_them() {
    let db = TestDb::create("read_past").await;
    let cfg = config(&db.url, &[]);
    let outbox = Outbox::with_pool(db.pool.clone(), &cfg.outbox, PoisonPolicy::DeadLetter);
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) \
                  VALUES ('t', 'k', 'e') RETURNING id";
    // The late row takes the smallest id and commits last.
    let mut late_tx = db.pool.begin().await.expect("begin");
    let late: i64 = sqlx::query_scalar(insert)
        .fetch_one(&mut *late_tx)
        .await
        .expect("insert late row");
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id: i64 = sqlx::query_scalar(insert)
            .fetch_one(&db.pool)
            .await
            .expect("insert");
        ids.push(id);
    }
    let ids_of =
        |rows: &[posthorn::outbox::OutboxRow]| rows.iter().map(|r| r.id).collect::<Vec<_>>();
    let in_flight = ids_of(&outbox.fetch_batch(3).await.expect("fetch"));
    assert_eq!(in_flight, ids[..3], "the late row is not visible yet");
    match outbox.fetch_after(3, &in_flight).await.expect("read past") {
        ReadPast::Rows(rows) => assert_eq!(ids_of(&rows), ids[3..]),
        other => panic!("nothing below the rows in flight yet: {other:?}"),
    }

    late_tx.commit().await.expect("commit the late row");
    match outbox.fetch_after(3, &in_flight).await.expect("read past") {
        ReadPast::RowBelow(id) => assert_eq!(id, late),
        other => panic!("the late row is below the rows in flight: {other:?}"),
    }

    // Once it is delivered, rows in flight being marked meanwhile do not stop the read.
    sqlx::query("UPDATE outbox SET delivered_at = now() WHERE id = ANY($1)")
        .bind([late, in_flight[0]])
        .execute(&db.pool)
        .await
        .expect("mark");
    match outbox.fetch_after(3, &in_flight).await.expect("read past") {
        ReadPast::Rows(rows) => assert_eq!(ids_of(&rows), ids[3..]),
        other => panic!("only sent rows are below: {other:?}"),
    }
    // With nothing sent, it is a plain read from the oldest.
    match outbox.fetch_after(10, &[]).await.expect("read") {
        ReadPast::Rows(rows) => assert_eq!(ids_of(&rows), ids[1..]),
        other => panic!("{other:?}"),
    }
}

/// A backlog read in full batches (so the relay reads each next batch while the current one is
/// in flight) while writers commit late: each transaction holds its aggregate's lock for a
/// while after taking its id, so rows with smaller ids keep committing after larger ones the
/// relay has already read. Every row arrives once, in per-key commit order.
async fn late_commits_during_a_backlog_keep_per_key_order(tracking: Tracking) {
    const N_KEYS: usize = 40;
    const N_BACKLOG_PER_KEY: usize = 100;
    const N_LIVE: usize = 1_500;
    const N_WRITERS: usize = 12;
    let db = TestDb::create("late_backlog").await;
    let topic = unique("it-late-backlog");
    create_topic(&topic, 4).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("agg-{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    // One row takes its id before the backlog and commits while the relay reads the backlog
    // past it, whatever the machine's speed: the writers' late commits below need the relay to
    // have caught up with them, which a slow or busy machine may not do.
    let mut late_tx = db.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, 'agg-late', 'Incremented', jsonb_build_object('version', 1))",
    )
    .bind(&topic)
    .execute(&mut *late_tx)
    .await
    .expect("the late row");
    let late_txid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *late_tx)
        .await
        .expect("the late row's txid");
    // The backlog: versions 1..=100 of every key, committed before the relay starts.
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, k, 'Incremented', jsonb_build_object('version', v) \
         FROM generate_series(1, $2) AS v, unnest($3::text[]) AS k ORDER BY v, k",
    )
    .bind(&topic)
    .bind(N_BACKLOG_PER_KEY as i32)
    .bind(&keys)
    .execute(&db.pool)
    .await
    .expect("backlog");
    sqlx::query("UPDATE aggregates SET version = $1")
        .bind(N_BACKLOG_PER_KEY as i32)
        .execute(&db.pool)
        .await
        .expect("versions");

    let relay = RunningRelay::start(tracking.config(&db.url, &[("POSTHORN_BATCH_SIZE", "50")]));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..N_WRITERS)
        .map(|w| {
            let (pool, next, keys, topic) =
                (db.pool.clone(), next.clone(), keys.clone(), topic.clone());
            tokio::spawn(async move {
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if j >= N_LIVE {
                        break;
                    }
                    let key = &keys[(j * 7 + w) % keys.len()];
                    let mut tx = pool.begin().await.expect("begin");
                    let version: i32 = sqlx::query_scalar(
                        "UPDATE aggregates SET version = version + 1 WHERE id = $1 \
                         RETURNING version",
                    )
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await
                    .expect("lock and bump");
                    sqlx::query(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                         VALUES ($1, $2, 'Incremented', jsonb_build_object('version', $3::int))",
                    )
                    .bind(&topic)
                    .bind(key)
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                    // Commit late: rows inserted after this one commit first meanwhile.
                    tokio::time::sleep(Duration::from_millis((j % 5) as u64 * 4)).await;
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "the relay is reading the backlog",
        || async { delivered(&db).await >= 200 },
    )
    .await;
    // Checkpoint mode's late commit: the newest snapshot published from (the window's end
    // inside a window) has the late row's transaction in progress below its xmax, while rows of
    // the backlog's later transaction are delivered.
    let skipped_by_a_window = tracking == Tracking::Checkpoint
        && sqlx::query_scalar::<_, bool>(
            "SELECT NOT pg_visible_in_snapshot($1::xid8, s) AND pg_snapshot_xmax(s) > $1::xid8 \
             FROM (SELECT coalesce(window_end, snapshot) AS s FROM outbox_checkpoint) c",
        )
        .bind(&late_txid)
        .fetch_one(&db.pool)
        .await
        .expect("the checkpoint");
    late_tx.commit().await.expect("commit the late row");
    for w in writers {
        w.await.expect("writer");
    }
    let n_total = N_KEYS * N_BACKLOG_PER_KEY + N_LIVE + 1;
    let (records, stats) = drain_and_read(&db, relay, &topic, n_total).await;
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &records {
        per_key
            .entry(r.key.clone().expect("a key"))
            .or_default()
            .push(r.value_json()["version"].as_i64().expect("version"));
    }
    for (key, versions) in &per_key {
        assert_eq!(check_key_order(versions), Ok(0), "key {key}");
        assert!(
            versions.windows(2).all(|w| w[1] == w[0] + 1),
            "key {key}: {versions:?}"
        );
    }
    // The late commits landed below rows this relay had already read, or this test did not
    // exercise what it is for.
    match tracking {
        // Reads past rows in flight met one at least once. (This relay's own count: the
        // process-wide metric moves with every relay the other tests run.)
        Tracking::Rows => assert!(
            stats.n_read_restarts > 0,
            "no read past rows in flight met a late commit"
        ),
        // Checkpoint mode has no read past rows in flight: windows skip open transactions.
        Tracking::Checkpoint => assert!(
            skipped_by_a_window,
            "no published window skipped the late row's open transaction"
        ),
    }
}

/// Waits until every row is marked delivered, stops the relay, and reads the topic: exactly one
/// record per committed row (`n`). Returns them with what the relay says it did.
async fn drain_and_read(
    db: &TestDb,
    relay: RunningRelay,
    topic: &str,
    n: usize,
) -> (Vec<crate::support::Record>, RelayStats) {
    db.wait_all_delivered(Duration::from_secs(120), "every row is marked delivered")
        .await;
    let stats = relay.stop().await;
    assert_eq!(stats.n_published, n as u64);
    let records = read_topic(topic, n, Duration::from_secs(60)).await;
    assert_eq!(records.len(), n, "exactly one record per committed row");
    (records, stats)
}
