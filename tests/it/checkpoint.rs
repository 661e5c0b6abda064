//! The promises of snapshot-window tracking (`POSTHORN_TRACKING=checkpoint`), against real
//! PostgreSQL and real Kafka: a late commit is published in a later window, a long transaction
//! stalls nobody and is published once it commits, rolled-back rows and rolled-back savepoints
//! never reach Kafka, transaction ids past the 32-bit boundary keep counting (a private cluster
//! whose xid counter wraps while the relay runs), SIGKILL between Kafka's acknowledgement and
//! the checkpoint update loses nothing, and `posthorn status`, the backlog gauges and retention
//! say the same in both modes on the same workload (retention with one documented difference:
//! checkpoint mode counts the period from `created_at`).
//!
//! "Delivered" is counted with the SQL both modes share ([`DELIVERED`]): `delivered_at`, or
//! covered by the checkpoint row.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::AssertSqlSafe;

use crate::support::{
    assert_complete_and_ordered, create_aggregates, create_topic, env_vars, free_port,
    insert_versioned_event, read_topic, relay_log_path, run_posthorn, spawn_writers, unique,
    versions_per_key, wait_until, write_versioned_event, Record, RelayProcess, RunningRelay,
    Scrape, TestDb, Tracking, DELIVERED,
};

async fn count_where(pool: &PgPool, condition: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox o WHERE {condition}"
    )))
    .fetch_one(pool)
    .await
    .expect("counting outbox rows")
}

async fn n_delivered(pool: &PgPool) -> i64 {
    count_where(pool, DELIVERED).await
}

/// Not delivered and not failed.
async fn n_pending(pool: &PgPool) -> i64 {
    count_where(pool, &format!("o.failed_at IS NULL AND NOT {DELIVERED}")).await
}

/// Ids of the delivered rows.
async fn delivered_ids(pool: &PgPool) -> BTreeSet<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT o.id FROM outbox o WHERE {DELIVERED}"
    )))
    .fetch_all(pool)
    .await
    .expect("delivered ids")
    .into_iter()
    .collect()
}

/// Waits until exactly `n` rows are delivered and none is pending.
async fn wait_delivered(pool: &PgPool, n: i64, within: Duration, what: &str) {
    wait_until(within, what, || async {
        n_delivered(pool).await == n && n_pending(pool).await == 0
    })
    .await;
}

async fn wait_for_checkpoint_row(pool: &PgPool) {
    wait_until(
        Duration::from_secs(60),
        "the relay creates its checkpoint row",
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_checkpoint")
                .fetch_one(pool)
                .await
                .is_ok_and(|n| n == 1)
        },
    )
    .await;
}

/// The checkpoint row's snapshot, as text.
async fn checkpoint_snapshot(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT snapshot::text FROM outbox_checkpoint")
        .fetch_one(pool)
        .await
        .expect("the checkpoint row")
}

/// Whether transaction `txid` (text) is visible in the checkpoint row's snapshot.
async fn checkpoint_covers(pool: &PgPool, txid: &str) -> bool {
    sqlx::query_scalar(
        "SELECT pg_visible_in_snapshot($1::text::xid8, snapshot) FROM outbox_checkpoint",
    )
    .bind(txid)
    .fetch_one(pool)
    .await
    .expect("the checkpoint row")
}

/// The current transaction's id (assigning one), as text.
async fn txid_of(conn: &mut PgConnection) -> String {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(conn)
        .await
        .expect("the transaction's id")
}

/// One row of aggregate `key` on `topic` with payload `{"n": n}`; its id.
async fn insert_event<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    topic: &str,
    key: &str,
    n: i64,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, $2, 'E', jsonb_build_object('n', $3::bigint)) RETURNING id",
    )
    .bind(topic)
    .bind(key)
    .bind(n)
    .fetch_one(executor)
    .await
    .expect("inserting an outbox row")
}

fn outbox_id(record: &Record) -> i64 {
    record
        .header("outbox-id")
        .parse()
        .expect("a numeric outbox-id")
}

fn ids_of(records: &[Record]) -> Vec<i64> {
    records.iter().map(outbox_id).collect()
}

/// How often each outbox id is in `records`.
fn copies(records: &[Record]) -> BTreeMap<i64, usize> {
    let mut per_id = BTreeMap::new();
    for r in records {
        *per_id.entry(outbox_id(r)).or_default() += 1;
    }
    per_id
}

/// Each key's outbox ids in consumption order.
fn ids_per_key(records: &[Record]) -> BTreeMap<String, Vec<i64>> {
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in records {
        per_key
            .entry(r.key.clone().expect("a key"))
            .or_default()
            .push(outbox_id(r));
    }
    per_key
}

/// Everything in `topic` right now (to its high watermarks).
async fn topic_now(topic: &str) -> Vec<Record> {
    read_topic(topic, 0, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_a_later_row_is_published_in_a_later_window() {
    let started = Instant::now();
    let db = TestDb::create("cp_late").await;
    let topic = unique("it-cp-late");
    create_topic(&topic, 1).await;
    let relay = RunningRelay::start(Tracking::Checkpoint.config(&db.url, &[]));
    wait_for_checkpoint_row(&db.pool).await;

    // A takes the lower id and stays open; B takes the next one and commits.
    let mut a = db.pool.begin().await.expect("begin A");
    let id_a = insert_event(&mut *a, &topic, "a", 1).await;
    let txid_a = txid_of(&mut a).await;
    let id_b = insert_event(&db.pool, &topic, "b", 1).await;
    assert!(id_a < id_b, "A took the lower id ({id_a} < {id_b})");
    wait_delivered(&db.pool, 1, Duration::from_secs(30), "B's row is delivered").await;
    // More windows pass while A is open: C commits and is published too.
    let id_c = insert_event(&db.pool, &topic, "c", 1).await;
    wait_delivered(&db.pool, 2, Duration::from_secs(30), "C's row is delivered").await;
    assert!(
        !checkpoint_covers(&db.pool, &txid_a).await,
        "A is still open: the checkpoint ({}) must not cover its transaction {txid_a}",
        checkpoint_snapshot(&db.pool).await
    );
    let before = topic_now(&topic).await;
    assert_eq!(
        ids_of(&before),
        vec![id_b, id_c],
        "B and C are published while A is open, A is not"
    );

    a.commit().await.expect("commit A");
    wait_delivered(&db.pool, 3, Duration::from_secs(30), "A's row is delivered").await;
    assert!(checkpoint_covers(&db.pool, &txid_a).await);
    let stats = relay.stop().await;
    let records = read_topic(&topic, 3, Duration::from_secs(30)).await;
    assert_eq!(
        ids_of(&records),
        vec![id_b, id_c, id_a],
        "A's row is published once, in the window after its commit; nothing skipped"
    );
    let marked = count_where(&db.pool, "o.delivered_at IS NOT NULL").await;
    assert_eq!(marked, 0, "checkpoint mode writes no delivered_at here");
    println!(
        "late commit: ids {id_b}, {id_c}, then {id_a} once it committed; 0 lost, 0 duplicates; \
         {stats:?}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_transaction_open_across_many_windows_stalls_no_one_and_arrives_after_its_commit() {
    const ROUNDS: usize = 8;
    const N_KEYS: usize = 10;
    const PER_ROUND: usize = 30;
    const PER_KEY: usize = ROUNDS * PER_ROUND / N_KEYS;
    const LONG_VERSIONS: usize = 5;
    let started = Instant::now();
    let db = TestDb::create("cp_long").await;
    let topic = unique("it-cp-long");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    let mut all_keys = keys.clone();
    all_keys.push("long".to_owned());
    create_aggregates(&db.pool, &all_keys).await;
    let relay =
        RunningRelay::start(Tracking::Checkpoint.config(&db.url, &[("POSTHORN_BATCH_SIZE", "50")]));
    wait_for_checkpoint_row(&db.pool).await;

    // The long transaction: versions 1..=5 of "long", one statement per round, the aggregate
    // locked from the first one on.
    let mut long = db.pool.begin().await.expect("begin the long transaction");
    let txid_long = txid_of(&mut long).await;
    let mut snapshots = Vec::new();
    for round in 0..ROUNDS {
        if round < LONG_VERSIONS {
            insert_versioned_event(&mut long, &topic, "long", 0).await;
        }
        spawn_writers(&db.pool, &topic, &keys, PER_ROUND, 3)
            .await
            .expect("writers");
        let n = ((round + 1) * PER_ROUND) as i64;
        wait_delivered(
            &db.pool,
            n,
            Duration::from_secs(60),
            &format!("round {round}'s rows are delivered while the long transaction is open"),
        )
        .await;
        let snapshot = checkpoint_snapshot(&db.pool).await;
        assert!(
            !checkpoint_covers(&db.pool, &txid_long).await,
            "round {round}: the checkpoint {snapshot} covers the open transaction {txid_long}"
        );
        snapshots.push(snapshot);
    }
    let distinct: BTreeSet<&String> = snapshots.iter().collect();
    assert_eq!(
        distinct.len(),
        ROUNDS,
        "the checkpoint moved every round: {snapshots:?}"
    );
    let while_open = topic_now(&topic).await;
    assert_eq!(
        while_open.len(),
        ROUNDS * PER_ROUND,
        "every other writer's row arrived while the long transaction was open"
    );
    assert!(
        while_open.iter().all(|r| r.key.as_deref() != Some("long")),
        "none of the open transaction's rows"
    );

    // A serialized writer of "long" waits for the long transaction's lock, and goes on after it.
    let follower = {
        let (pool, topic) = (db.pool.clone(), topic.clone());
        tokio::spawn(async move {
            for _ in LONG_VERSIONS..PER_KEY {
                write_versioned_event(&pool, &topic, "long", 9).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!follower.is_finished(), "the follower waits for the lock");
    long.commit().await.expect("commit the long transaction");
    follower.await.expect("the follower");
    let total = ((N_KEYS + 1) * PER_KEY) as i64;
    wait_delivered(
        &db.pool,
        total,
        Duration::from_secs(60),
        "the long transaction's rows and its follower's are delivered",
    )
    .await;
    assert!(checkpoint_covers(&db.pool, &txid_long).await);
    relay.stop().await;

    let records = read_topic(&topic, total as usize, Duration::from_secs(60)).await;
    let duplicates = assert_complete_and_ordered(&records, N_KEYS + 1, PER_KEY);
    assert_eq!(duplicates, 0, "no crash, no duplicate");
    assert_eq!(
        versions_per_key(&records)["long"],
        (1..=PER_KEY as i64).collect::<Vec<_>>()
    );
    println!(
        "long transaction: open across {} checkpoints while {} rows of others arrived; then its \
         {LONG_VERSIONS} rows and the follower's {} in order; 0 lost, 0 duplicates; {:.1} s",
        distinct.len(),
        while_open.len(),
        PER_KEY - LONG_VERSIONS,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolled_back_rows_never_reach_kafka_and_committed_ones_all_do() {
    const N_TASKS: usize = 4;
    const N_TX: usize = 60;
    let started = Instant::now();
    let db = TestDb::create("cp_rollback").await;
    let topic = unique("it-cp-rollback");
    create_topic(&topic, 2).await;
    let relay =
        RunningRelay::start(Tracking::Checkpoint.config(&db.url, &[("POSTHORN_BATCH_SIZE", "20")]));
    wait_for_checkpoint_row(&db.pool).await;

    let tasks: Vec<_> = (0..N_TASKS)
        .map(|t| {
            let (pool, topic) = (db.pool.clone(), topic.clone());
            tokio::spawn(async move {
                let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                for j in 0..N_TX {
                    let rollback = j % 4 == 1 || j % 7 == 0;
                    let mut tx = pool.begin().await.expect("begin");
                    let ids: Vec<i64> = sqlx::query_scalar(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                         SELECT $1, $2, 'E', jsonb_build_object('tx', $3::int, 'i', g, \
                                                                'rolled_back', $4::bool) \
                         FROM generate_series(1, $5::int) g RETURNING id",
                    )
                    .bind(&topic)
                    .bind(format!("t{t}"))
                    .bind(j as i32)
                    .bind(rollback)
                    .bind((j % 3 + 1) as i32)
                    .fetch_all(&mut *tx)
                    .await
                    .expect("insert");
                    if j % 5 == 0 {
                        // Open while the relay takes windows (others commit meanwhile).
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if rollback {
                        tx.rollback().await.expect("rollback");
                        rolled_back.extend(ids);
                    } else {
                        tx.commit().await.expect("commit");
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();
    let (mut committed, mut rolled_back) = (BTreeSet::new(), BTreeSet::new());
    for task in tasks {
        let (c, r) = task.await.expect("writer");
        committed.extend(c);
        rolled_back.extend(r);
    }
    // A last committed row: once it is delivered, every window before it was read.
    let last = insert_event(&db.pool, &topic, "end", 0).await;
    committed.insert(last);
    let n = committed.len() as i64;
    wait_delivered(
        &db.pool,
        n,
        Duration::from_secs(60),
        "every committed row is delivered",
    )
    .await;
    relay.stop().await;
    assert_eq!(
        count_where(&db.pool, "true").await,
        n,
        "only committed rows exist"
    );

    let records = read_topic(&topic, n as usize, Duration::from_secs(60)).await;
    assert_eq!(records.len() as i64, n, "each committed row exactly once");
    let published: BTreeSet<i64> = ids_of(&records).into_iter().collect();
    assert_eq!(published, committed, "exactly the committed rows");
    assert!(published.is_disjoint(&rolled_back), "no rolled-back row");
    assert!(records
        .iter()
        .filter(|r| r.key.as_deref() != Some("end"))
        .all(|r| r.value_json()["rolled_back"] == Value::Bool(false)));
    // Each task wrote serially: its key's rows arrive in its commit order, which is id order.
    for (key, ids) in ids_per_key(&records) {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {key} in commit order: {ids:?}"
        );
    }
    println!(
        "rollbacks: {} committed rows published exactly once, {} rolled-back rows never; {:.1} s",
        committed.len(),
        rolled_back.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A row of another transaction (the `n_other`th), committed and delivered with `n_kept`
/// rows of the transaction under test: a window passed.
async fn other_window(pool: &PgPool, topic: &str, n_other: &mut i64, n_kept: i64) {
    *n_other += 1;
    insert_event(pool, topic, "other", *n_other).await;
    wait_delivered(
        pool,
        *n_other + n_kept,
        Duration::from_secs(30),
        "another transaction's row is delivered",
    )
    .await;
}

async fn exec(conn: &mut PgConnection, sql: &'static str) {
    sqlx::raw_sql(sql)
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_several_statements_and_savepoints_publishes_exactly_its_committed_rows() {
    let started = Instant::now();
    let db = TestDb::create("cp_statements").await;
    let topic = unique("it-cp-statements");
    create_topic(&topic, 1).await;
    let relay = RunningRelay::start(Tracking::Checkpoint.config(&db.url, &[]));
    wait_for_checkpoint_row(&db.pool).await;
    let mut n_other = 0;
    let mut tx = db.pool.begin().await.expect("begin");
    let mut kept: Vec<i64> = Vec::new();
    let mut dropped: Vec<i64> = Vec::new();
    // Statement 1: three rows at once.
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'm', 'E', jsonb_build_object('n', g) FROM generate_series(1, 3) g \
         RETURNING id",
    )
    .bind(&topic)
    .fetch_all(&mut *tx)
    .await
    .expect("statement 1");
    kept.extend(ids);
    other_window(&db.pool, &topic, &mut n_other, 0).await;
    // Statements 2 and 3: one row each.
    kept.push(insert_event(&mut *tx, &topic, "m", 4).await);
    kept.push(insert_event(&mut *tx, &topic, "m", 5).await);
    // A savepoint rolled back.
    exec(&mut tx, "SAVEPOINT s1").await;
    dropped.push(insert_event(&mut *tx, &topic, "m", 6).await);
    dropped.push(insert_event(&mut *tx, &topic, "m", 7).await);
    exec(&mut tx, "ROLLBACK TO SAVEPOINT s1").await;
    other_window(&db.pool, &topic, &mut n_other, 0).await;
    // A savepoint released.
    exec(&mut tx, "SAVEPOINT s2").await;
    kept.push(insert_event(&mut *tx, &topic, "m", 8).await);
    exec(&mut tx, "RELEASE SAVEPOINT s2").await;
    // Nested: the inner one rolled back, the outer released.
    exec(&mut tx, "SAVEPOINT s3").await;
    kept.push(insert_event(&mut *tx, &topic, "m", 9).await);
    exec(&mut tx, "SAVEPOINT s4").await;
    dropped.push(insert_event(&mut *tx, &topic, "m", 10).await);
    exec(&mut tx, "ROLLBACK TO SAVEPOINT s4").await;
    exec(&mut tx, "RELEASE SAVEPOINT s3").await;
    // Through the writer's SQL function too.
    let event_id: String = sqlx::query_scalar(
        "SELECT outbox_enqueue($1, 'm', 'E', jsonb_build_object('n', 11))::text",
    )
    .bind(&topic)
    .fetch_one(&mut *tx)
    .await
    .expect("outbox_enqueue");
    let enqueued: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE event_id = $1::uuid")
        .bind(&event_id)
        .fetch_one(&mut *tx)
        .await
        .expect("the enqueued row");
    kept.push(enqueued);
    other_window(&db.pool, &topic, &mut n_other, 0).await;
    assert_eq!(
        topic_now(&topic).await.len() as i64,
        n_other,
        "nothing of the open transaction"
    );
    tx.commit().await.expect("commit");

    let n_kept = kept.len() as i64;
    wait_delivered(
        &db.pool,
        n_kept + n_other,
        Duration::from_secs(30),
        "the transaction's committed rows are delivered",
    )
    .await;
    other_window(&db.pool, &topic, &mut n_other, n_kept).await;
    relay.stop().await;
    let txids: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT txid) FROM outbox WHERE aggregate_id = 'm'")
            .fetch_one(&db.pool)
            .await
            .expect("txids");
    assert_eq!(
        txids, 1,
        "every row of the transaction has its top-level txid"
    );

    let records = read_topic(&topic, (n_kept + n_other) as usize, Duration::from_secs(30)).await;
    assert_eq!(
        records.len() as i64,
        n_kept + n_other,
        "each row exactly once"
    );
    let m: Vec<&Record> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("m"))
        .collect();
    let m_ids: Vec<i64> = m.iter().map(|r| outbox_id(r)).collect();
    let m_ns: Vec<i64> = m
        .iter()
        .map(|r| r.value_json()["n"].as_i64().expect("n"))
        .collect();
    assert_eq!(m_ids, kept, "exactly the committed rows, in id order");
    assert_eq!(m_ns, vec![1, 2, 3, 4, 5, 8, 9, 11]);
    assert!(m_ids.iter().all(|id| !dropped.contains(id)));
    println!(
        "statements and savepoints: {} rows kept of {} inserted, published once in id order \
         across {n_other} windows of others; {:.1} s",
        kept.len(),
        kept.len() + dropped.len(),
        started.elapsed().as_secs_f64()
    );
}

/// 2^32: where the 32-bit xid counter wraps (and `xid8` goes on, into epoch 1).
const WRAP: u64 = 1 << 32;

/// A PostgreSQL cluster of this test's own, in a temporary directory, its next transaction id
/// set just below the 32-bit boundary with `pg_resetwal -x` (after `VACUUM FREEZE`, so no tuple
/// looks like it is from the future, and with the `pg_xact` segment of that id created, as
/// pg_resetwal's documentation asks). Nothing shared is touched: the cluster on port 5433 that
/// restarts.rs stops and starts is not this one, so the two tests cannot trip over each other.
/// Stopped and deleted on drop.
struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the server's programs as `postgres` (initdb refuses to run as root).
    as_postgres: bool,
}

impl PrivateCluster {
    fn start_before_wrap(next_xid: u64) -> PrivateCluster {
        let bin = postgres_bin_dir();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(unique("posthorn-xid-cluster"));
        std::fs::create_dir(&dir).expect("cluster directory");
        let cluster = PrivateCluster {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(&cluster.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", cluster.dir.display());
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-N", "-A", "trust", "-U", "postgres"],
        );
        cluster.pg_ctl_start();
        cluster.run(
            "vacuumdb",
            &[
                "-h",
                &cluster.socket_dir(),
                "-p",
                &cluster.port.to_string(),
                "-U",
                "postgres",
                "--all",
                "--freeze",
                "-q",
            ],
        );
        cluster.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
        cluster.run("pg_resetwal", &["-x", &next_xid.to_string(), &data]);
        // The pg_xact segment of the new next xid (32 pages of 8 kB, 4 xids a byte).
        let segment = Path::new(&data)
            .join("pg_xact")
            .join(format!("{:04X}", next_xid % WRAP / (32 * 8192 * 4)));
        if !segment.exists() {
            cluster.run(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={}", segment.display()),
                    "bs=8192",
                    "count=32",
                    "status=none",
                ],
            );
        }
        cluster.pg_ctl_start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn socket_dir(&self) -> String {
        self.dir.display().to_string()
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.socket_dir()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &self.log().display().to_string(),
                "-w",
                "start",
            ],
        );
    }

    /// One of the server's programs (or a plain one, `dd`), as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let program = if path.exists() {
            path.display().to_string()
        } else {
            program.to_owned()
        };
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &program]);
            c
        } else {
            Command::new(&program)
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// Runs `program` to completion; panics with its output if it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Where initdb, pg_ctl and pg_resetwal are: `POSTHORN_TEST_PG_BIN`, else the newest Debian
/// `/usr/lib/postgresql/<version>/bin`, else the directory of `initdb` on the PATH.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("POSTHORN_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_resetwal").exists().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = debian {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_resetwal").exists())
        .expect(
            "initdb and pg_resetwal (PostgreSQL's server programs): set POSTHORN_TEST_PG_BIN \
             to their directory",
        )
}

async fn current_txid(pool: &PgPool) -> u64 {
    let text: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(pool)
        .await
        .expect("pg_current_xact_id");
    text.parse().expect("a number")
}

/// Spends transaction ids (one per statement) until the next is at least `target`.
async fn spend_txids_until(pool: &PgPool, target: u64) {
    while current_txid(pool).await < target {}
}

/// The checkpoint's snapshot bounds: (xmin, xmax).
async fn checkpoint_bounds(pool: &PgPool) -> (u64, u64) {
    let (xmin, xmax): (String, String) = sqlx::query_as(
        "SELECT pg_snapshot_xmin(snapshot)::text, pg_snapshot_xmax(snapshot)::text \
         FROM outbox_checkpoint",
    )
    .fetch_one(pool)
    .await
    .expect("the checkpoint row");
    (xmin.parse().expect("xmin"), xmax.parse().expect("xmax"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_past_the_32_bit_boundary_keep_counting_and_lose_no_row() {
    let started = Instant::now();
    // Room for the test database, its migrations and the first rows before the boundary.
    let cluster = PrivateCluster::start_before_wrap(WRAP - 5000);
    let db = TestDb::create_on(&cluster.admin_url(), "cp_xid", &[]).await;
    let topic = unique("it-cp-xid");
    create_topic(&topic, 1).await;
    let relay = RunningRelay::start(Tracking::Checkpoint.config(&db.url, &[]));
    wait_for_checkpoint_row(&db.pool).await;

    // Before the boundary: 10 rows of "before", each its own transaction.
    for n in 1..=10 {
        insert_event(&db.pool, &topic, "before", n).await;
    }
    wait_delivered(
        &db.pool,
        10,
        Duration::from_secs(30),
        "the rows before the wrap",
    )
    .await;
    let (_, xmax) = checkpoint_bounds(&db.pool).await;
    assert!(xmax < WRAP, "a checkpoint before the boundary: xmax {xmax}");
    let before_wrap = current_txid(&db.pool).await;
    assert!(
        before_wrap < WRAP - 100,
        "room left before the wrap: {before_wrap}"
    );

    // A opens just below the boundary and stays open while the counter wraps.
    spend_txids_until(&db.pool, WRAP - 20).await;
    let mut a = db.pool.begin().await.expect("begin A");
    insert_event(&mut *a, &topic, "straddling", 1).await;
    let txid_a: u64 = txid_of(&mut a).await.parse().expect("a number");
    assert!(txid_a < WRAP, "A's txid {txid_a} is below 2^32");
    spend_txids_until(&db.pool, WRAP + 20).await;
    // After the wrap: 10 rows of "after", published while A is still open.
    for n in 1..=10 {
        insert_event(&db.pool, &topic, "after", n).await;
    }
    wait_delivered(
        &db.pool,
        20,
        Duration::from_secs(30),
        "the rows after the wrap, while A is open",
    )
    .await;
    let (xmin, xmax) = checkpoint_bounds(&db.pool).await;
    assert!(
        xmin <= txid_a && txid_a < WRAP && xmax > WRAP,
        "a checkpoint straddling the boundary, with A in progress: {}",
        checkpoint_snapshot(&db.pool).await
    );
    assert!(!checkpoint_covers(&db.pool, &txid_a.to_string()).await);
    a.commit().await.expect("commit A");
    for n in 1..=10 {
        insert_event(&db.pool, &topic, "later", n).await;
    }
    wait_delivered(&db.pool, 31, Duration::from_secs(30), "every row").await;
    let (xmin, _) = checkpoint_bounds(&db.pool).await;
    assert!(
        xmin > WRAP,
        "the checkpoint is past the boundary: xmin {xmin}"
    );
    relay.stop().await;

    let (min_txid, max_txid): (String, String) =
        sqlx::query_as("SELECT min(txid)::text, max(txid)::text FROM outbox")
            .fetch_one(&db.pool)
            .await
            .expect("txids");
    let (min_txid, max_txid): (u64, u64) = (min_txid.parse().unwrap(), max_txid.parse().unwrap());
    assert!(
        min_txid < WRAP && max_txid > WRAP,
        "rows on both sides of 2^32: {min_txid}..{max_txid}"
    );
    let records = read_topic(&topic, 31, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 31, "each row exactly once");
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &records {
        per_key
            .entry(r.key.clone().expect("key"))
            .or_default()
            .push(r.value_json()["n"].as_i64().expect("n"));
    }
    let expected: BTreeMap<String, Vec<i64>> = [
        ("before", (1..=10).collect()),
        ("straddling", vec![1]),
        ("after", (1..=10).collect()),
        ("later", (1..=10).collect()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(per_key, expected, "every row, each key in order");
    db.pool.close().await;
    let log = std::fs::read_to_string(cluster.log()).unwrap_or_default();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PANIC") || l.contains("wraparound"))
        .collect();
    assert!(errors.is_empty(), "the cluster's log: {errors:?}");
    println!(
        "xid past 2^32: txids {min_txid}..{max_txid} (2^32 = {WRAP}), A {txid_a} open across \
         the wrap; 31 rows, 0 lost, 0 duplicates; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Terminates the relay's sessions (`application_name` "posthorn <instance>") waiting for a
/// lock: the killed relay's blocked checkpoint UPDATE. A session whose client died goes on
/// waiting, and would run its statement once the lock is free, as if the relay had lived.
/// Returns what they were running.
async fn terminate_relay_lock_waiters(pool: &PgPool, instance: &str) -> Vec<String> {
    let waiting = "datname = current_database() AND application_name = 'posthorn ' || $1 \
                   AND wait_event_type = 'Lock'";
    // First which, then terminate them: in one statement's WHERE, Postgres may call
    // pg_terminate_backend before the other conditions have filtered the row.
    let waiters: Vec<(i32, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT pid, left(regexp_replace(query, '\\s+', ' ', 'g'), 60) FROM pg_stat_activity \
         WHERE {waiting}"
    )))
    .bind(instance)
    .fetch_all(pool)
    .await
    .expect("the relay's lock waiters");
    let mut queries = Vec::new();
    for (pid, query) in waiters {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(pool)
            .await
            .expect("terminating a lock waiter");
        queries.push(query);
    }
    wait_until(
        Duration::from_secs(10),
        "the terminated sessions are gone",
        || async {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT count(*) FROM pg_stat_activity WHERE {waiting}"
            )))
            .bind(instance)
            .fetch_one(pool)
            .await
            .is_ok_and(|n| n == 0)
        },
    )
    .await;
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_between_publishing_and_the_checkpoint_update_loses_nothing() {
    const N_KEYS: usize = 20;
    const N_PER_KEY: usize = 150;
    const N_KILLS: usize = 6;
    let started = Instant::now();
    let db = TestDb::create("cp_sigkill").await;
    let topic = unique("it-cp-sigkill");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    let vars = Tracking::Checkpoint.env_vars(&db.url, &[("POSTHORN_BATCH_SIZE", "50")]);
    let instance = vars
        .iter()
        .find(|(k, _)| k == "POSTHORN_INSTANCE_ID")
        .map(|(_, v)| v.clone())
        .expect("an instance id");
    let mut relay = RelayProcess::spawn(&vars, &relay_log_path("cp-sigkill"));
    // Writers run through every kill: each round writes its share while the relay runs (a
    // single batch of writers can finish, and be drained, before the last kill on a fast
    // machine, leaving nothing to publish past a held checkpoint).
    let per_round = N_KEYS * N_PER_KEY / N_KILLS;
    let mut writers = spawn_writers(&db.pool, &topic, &keys, per_round, 4);
    wait_for_checkpoint_row(&db.pool).await;

    // Rows published and not covered by the checkpoint when the relay was killed.
    let mut ahead_at_kills: BTreeSet<i64> = BTreeSet::new();
    let mut report = Vec::new();
    let mut rng = rand::rng();
    for kill in 0..N_KILLS {
        if kill % 2 == 0 {
            // Hold the checkpoint row at once, while this round's writers have just started
            // (waiting for progress first could let the relay drain their rows before the
            // hold, leaving nothing to publish past it): the relay publishes, Kafka
            // acknowledges, and its UPDATE of the checkpoint waits. The kill lands exactly
            // between the two.
            let mut hold = db.pool.begin().await.expect("begin");
            sqlx::query("SELECT 1 FROM outbox_checkpoint FOR NO KEY UPDATE")
                .execute(&mut *hold)
                .await
                .expect("hold the checkpoint row");
            let covered = delivered_ids(&db.pool).await;
            let mut ahead = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while ahead.is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "kill {kill}: the relay published nothing past a held checkpoint in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
                let published: BTreeSet<i64> =
                    ids_of(&topic_now(&topic).await).into_iter().collect();
                ahead = published.difference(&covered).copied().collect();
            }
            relay.signal("KILL");
            relay.wait(Duration::from_secs(30)).await;
            let terminated = terminate_relay_lock_waiters(&db.pool, &instance).await;
            // Read again after the kill: everything the relay got out.
            let published: BTreeSet<i64> = ids_of(&topic_now(&topic).await).into_iter().collect();
            hold.rollback().await.expect("release the checkpoint row");
            let covered_now = delivered_ids(&db.pool).await;
            assert_eq!(
                covered_now, covered,
                "kill {kill}: the checkpoint did not move"
            );
            let ahead: BTreeSet<i64> = published.difference(&covered).copied().collect();
            report.push(format!(
                "kill {kill}: held checkpoint, {} rows published past it; terminated the relay's \
                 blocked {terminated:?}",
                ahead.len()
            ));
            ahead_at_kills.extend(ahead);
        } else {
            // This round's writers are running: at least 100 of their rows are yet to come.
            let progress = n_delivered(&db.pool).await + 100;
            wait_until(
                Duration::from_secs(120),
                "the relay makes progress",
                || async { n_delivered(&db.pool).await >= progress },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
            relay.signal("KILL");
            relay.wait(Duration::from_secs(30)).await;
            report.push(format!("kill {kill}: at a random moment"));
        }
        writers.await.expect("writers");
        relay = RelayProcess::spawn(&vars, &relay_log_path("cp-sigkill"));
        if kill + 1 < N_KILLS {
            writers = spawn_writers(&db.pool, &topic, &keys, per_round, 4);
        } else {
            writers = tokio::spawn(async {});
        }
    }
    writers.await.expect("writers");
    let n = (N_KEYS * N_PER_KEY) as i64;
    wait_delivered(
        &db.pool,
        n,
        Duration::from_secs(180),
        "every row is delivered after the kills",
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());

    let records = read_topic(&topic, n as usize, Duration::from_secs(120)).await;
    let duplicates = assert_complete_and_ordered(&records, N_KEYS, N_PER_KEY);
    let per_id = copies(&records);
    let not_resent: Vec<i64> = ahead_at_kills
        .iter()
        .copied()
        .filter(|id| per_id.get(id).copied().unwrap_or(0) < 2)
        .collect();
    assert!(
        not_resent.is_empty(),
        "rows published past the checkpoint at a kill are published again after it \
         (at-least-once from the checkpoint): not re-sent {not_resent:?}"
    );
    for line in &report {
        println!("{line}");
    }
    println!(
        "SIGKILL x{N_KILLS}: {n} rows, 0 lost, per-key order kept, {duplicates} duplicates \
         ({} of them rows published past a held checkpoint); {:.1} s",
        ahead_at_kills.len(),
        started.elapsed().as_secs_f64()
    );
}

/// `posthorn status --json` of both sides agrees, and shows (pending, delivered, failed).
fn assert_statuses_agree(sides: &[Side], when: &str, expected: (i64, i64, i64)) {
    let statuses = [sides[0].status(), sides[1].status()];
    assert_eq!(
        status_figures(&statuses[0]),
        status_figures(&statuses[1]),
        "status agrees {when}: {} | {}",
        statuses[0],
        statuses[1]
    );
    let (pending, delivered, failed) = expected;
    assert_eq!(
        (
            &statuses[1]["pending"],
            &statuses[1]["delivered"],
            &statuses[1]["failed"]
        ),
        (
            &Value::from(pending),
            &Value::from(delivered),
            &Value::from(failed)
        ),
        "{}",
        statuses[1]
    );
}

/// One mode's side of the comparison: its database, topic and variables.
struct Side {
    mode: &'static str,
    db: TestDb,
    topic: String,
    vars: Vec<(String, String)>,
}

impl Side {
    async fn new(mode: (&'static str, &'static str)) -> Side {
        let db = TestDb::create(&format!("cp_agree_{}", mode.1)).await;
        let topic = unique(&format!("it-cp-agree-{}", mode.1));
        create_topic(&topic, 1).await;
        let vars = env_vars(&db.url, &[mode]);
        Side {
            mode: mode.1,
            db,
            topic,
            vars,
        }
    }

    /// `n` rows of aggregate `key`, in one statement, for the side's topic, or (`poison`) for
    /// the topic `bad topic`, which Kafka never accepts: the rows fail.
    async fn insert(&self, key: &str, n: i64, poison: bool) {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT $3, $1, 'Placed', jsonb_build_object('n', g) \
             FROM generate_series(1, $2) g",
        )
        .bind(key)
        .bind(n)
        .bind(if poison { "bad topic" } else { &self.topic })
        .execute(&self.db.pool)
        .await
        .expect("inserting rows");
    }

    fn status(&self) -> Value {
        let (code, stdout, stderr) = run_posthorn(&["status", "--json"], &self.vars);
        assert_eq!(code, 0, "{}: status: {stdout}{stderr}", self.mode);
        serde_json::from_str(&stdout).expect("JSON status")
    }

    /// `posthorn status` as text, without the lines that name the database, the leader or ages.
    fn status_text(&self) -> Vec<String> {
        let (code, stdout, stderr) = run_posthorn(&["status"], &self.vars);
        assert_eq!(code, 0, "{}: status: {stdout}{stderr}", self.mode);
        stdout
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("pending") || l.starts_with("delivered") || l.starts_with("failed")
            })
            .map(str::to_owned)
            .collect()
    }

    async fn left(&self) -> BTreeMap<String, i64> {
        sqlx::query_as("SELECT aggregate_id, count(*) FROM outbox GROUP BY aggregate_id")
            .fetch_all(&self.db.pool)
            .await
            .expect("rows left")
            .into_iter()
            .collect()
    }
}

/// The figures of `status --json` both modes must agree on.
fn status_figures(status: &Value) -> Value {
    serde_json::json!({
        "pending": status["pending"],
        "retrying": status["retrying"],
        "delivered": status["delivered"],
        "failed": status["failed"],
        "failed_by_error": status["failed_by_error"],
        "oldest_pending_id": status["oldest_pending"]["id"],
        "has_last_delivered": !status["last_delivered"].is_null(),
    })
}

/// Unlabelled metrics both modes must agree on.
const GAUGES: [&str; 5] = [
    "posthorn_backlog_rows",
    "posthorn_failed_rows",
    "posthorn_retention_deleted_rows_total",
    "posthorn_rows_delivered_total",
    "posthorn_rows_dead_lettered_total",
];

/// Scrapes both relays until `condition` holds for each; returns the two scrapes.
async fn scrape_both_until(
    addrs: [SocketAddr; 2],
    what: &str,
    condition: impl Fn(&Scrape) -> bool,
) -> [Scrape; 2] {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let scrapes = [Scrape::from(addrs[0]).await, Scrape::from(addrs[1]).await];
        if scrapes.iter().all(&condition) {
            return scrapes;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last scrapes:\nrows:\n{}\ncheckpoint:\n{}",
            scrapes[0].text,
            scrapes[1].text
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn gauges(scrape: &Scrape, topic: &str) -> BTreeMap<String, Option<f64>> {
    let mut figures: BTreeMap<String, Option<f64>> = GAUGES
        .iter()
        .map(|g| ((*g).to_owned(), scrape.value(g, &[])))
        .collect();
    figures.insert(
        "posthorn_oldest_pending_age_seconds > 0".to_owned(),
        scrape
            .value("posthorn_oldest_pending_age_seconds", &[])
            .map(|age| f64::from(u8::from(age > 0.0))),
    );
    figures.insert(
        "posthorn_rows_published_total".to_owned(),
        scrape.value("posthorn_rows_published_total", &[("topic", topic)]),
    );
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_gauges_and_retention_agree_between_rows_and_checkpoint_mode() {
    let started = Instant::now();
    let sides = [
        Side::new(Tracking::Rows.var()).await,
        Side::new(Tracking::Checkpoint.var()).await,
    ];
    // The same workload, statement for statement (so the ids are the same too): delivered
    // rows, and rows Kafka never accepts (failed).
    for side in &sides {
        side.insert("d1", 10, false).await;
        side.insert("f", 1, true).await;
        side.insert("d2", 10, false).await;
        side.insert("f", 1, true).await;
    }
    let mut relays: Vec<RelayProcess> = sides
        .iter()
        .map(|s| RelayProcess::spawn(&s.vars, &relay_log_path(&format!("cp-agree-{}", s.mode))))
        .collect();
    let addrs = [relays[0].http_addr().await, relays[1].http_addr().await];
    for side in &sides {
        wait_until(
            Duration::from_secs(60),
            &format!("{}: 20 rows delivered and 2 failed", side.mode),
            || async {
                n_delivered(&side.db.pool).await == 20
                    && count_where(&side.db.pool, "o.failed_at IS NOT NULL").await == 2
            },
        )
        .await;
    }
    let scrapes = scrape_both_until(addrs, "no backlog and 2 failed rows", |s| {
        s.value("posthorn_backlog_rows", &[]) == Some(0.0)
            && s.value("posthorn_failed_rows", &[]) == Some(2.0)
    })
    .await;
    let running = [
        gauges(&scrapes[0], &sides[0].topic),
        gauges(&scrapes[1], &sides[1].topic),
    ];
    assert_eq!(
        running[0], running[1],
        "the gauges agree (rows, checkpoint)"
    );
    assert_eq!(running[1]["posthorn_rows_published_total"], Some(20.0));
    assert_statuses_agree(&sides, "while running", (0, 20, 2));
    for relay in &mut relays {
        relay.signal("TERM");
        assert!(relay.wait(Duration::from_secs(30)).await.success());
    }

    // Pending rows, with no relay running.
    for side in &sides {
        side.insert("p", 3, false).await;
    }
    assert_statuses_agree(&sides, "with rows pending", (3, 20, 2));
    let texts = [sides[0].status_text(), sides[1].status_text()];
    assert_eq!(texts[0], texts[1], "the status tables agree");

    // The gauges with rows pending: relays that cannot reach Kafka publish nothing, and measure.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut relays: Vec<RelayProcess> = sides
        .iter()
        .map(|s| {
            let mut vars = s.vars.clone();
            vars.retain(|(k, _)| k != "POSTHORN_KAFKA_BROKERS");
            vars.push(("POSTHORN_KAFKA_BROKERS".to_owned(), nowhere.clone()));
            RelayProcess::spawn(
                &vars,
                &relay_log_path(&format!("cp-agree-nokafka-{}", s.mode)),
            )
        })
        .collect();
    let addrs = [relays[0].http_addr().await, relays[1].http_addr().await];
    let scrapes = scrape_both_until(addrs, "3 pending and 2 failed rows measured", |s| {
        s.value("posthorn_backlog_rows", &[]) == Some(3.0)
            && s.value("posthorn_failed_rows", &[]) == Some(2.0)
    })
    .await;
    let pending = [
        gauges(&scrapes[0], &sides[0].topic),
        gauges(&scrapes[1], &sides[1].topic),
    ];
    assert_eq!(pending[0], pending[1], "the gauges agree with rows pending");
    assert_eq!(
        pending[1]["posthorn_oldest_pending_age_seconds > 0"],
        Some(1.0)
    );
    for relay in &mut relays {
        relay.signal("KILL");
        relay.wait(Duration::from_secs(30)).await;
    }

    // Retention: delivered rows go, pending rows are published and go once delivered, failed
    // rows stay. A 0 period deletes what is delivered at each sweep (one at start, then every
    // 30 s).
    let mut relays: Vec<RelayProcess> = sides
        .iter()
        .map(|s| {
            let mut vars = s.vars.clone();
            vars.push(("POSTHORN_RETENTION".to_owned(), "0".to_owned()));
            RelayProcess::spawn(
                &vars,
                &relay_log_path(&format!("cp-agree-retention-{}", s.mode)),
            )
        })
        .collect();
    let addrs = [relays[0].http_addr().await, relays[1].http_addr().await];
    for side in &sides {
        wait_until(
            Duration::from_secs(90),
            &format!("{}: retention leaves only the failed rows", side.mode),
            || async { side.left().await == BTreeMap::from([("f".to_owned(), 2)]) },
        )
        .await;
    }
    let scrapes = scrape_both_until(addrs, "23 rows deleted, 2 failed", |s| {
        s.value("posthorn_retention_deleted_rows_total", &[]) == Some(23.0)
            && s.value("posthorn_backlog_rows", &[]) == Some(0.0)
            && s.value("posthorn_failed_rows", &[]) == Some(2.0)
    })
    .await;
    let after = [
        gauges(&scrapes[0], &sides[0].topic),
        gauges(&scrapes[1], &sides[1].topic),
    ];
    assert_eq!(
        after[0]["posthorn_retention_deleted_rows_total"],
        after[1]["posthorn_retention_deleted_rows_total"]
    );
    let statuses = [sides[0].status(), sides[1].status()];
    assert_eq!(
        status_figures(&statuses[0])["failed"],
        status_figures(&statuses[1])["failed"]
    );
    assert_eq!(
        (&statuses[1]["pending"], &statuses[1]["failed"]),
        (&Value::from(0), &Value::from(2)),
        "{}",
        statuses[1]
    );
    for relay in &mut relays {
        relay.signal("TERM");
        assert!(relay.wait(Duration::from_secs(30)).await.success());
    }
    // Both topics hold the same records: every good row once.
    let mut published: Vec<BTreeMap<String, Vec<i64>>> = Vec::new();
    for side in &sides {
        let records = read_topic(&side.topic, 23, Duration::from_secs(30)).await;
        let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
        for r in &records {
            per_key
                .entry(r.key.clone().expect("key"))
                .or_default()
                .push(r.value_json()["n"].as_i64().expect("n"));
        }
        published.push(per_key.into_iter().collect());
    }
    assert_eq!(published[0], published[1], "the same records in both modes");
    assert_eq!(
        published[1].values().map(Vec::len).sum::<usize>(),
        23,
        "every good row once"
    );
    println!(
        "rows vs checkpoint: gauges {:?}; status {}; retention deleted 23 in each, kept the 2 \
         failed; {:.1} s",
        running[1],
        status_figures(&statuses[1]),
        started.elapsed().as_secs_f64()
    );
}

/// The relay variables of `side` with `extra` settings on top.
fn with_vars(side: &Side, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = side.vars.clone();
    for (k, v) in extra {
        vars.retain(|(existing, _)| existing != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    vars
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_with_a_period_keeps_undelivered_rows_in_both_modes_and_counts_age_from_creation_in_checkpoint_mode(
) {
    let started = Instant::now();
    let sides = [
        Side::new(Tracking::Rows.var()).await,
        Side::new(Tracking::Checkpoint.var()).await,
    ];
    for side in &sides {
        side.insert("old", 5, false).await;
        side.insert("old_pending", 5, false).await;
        side.insert("recent", 5, false).await;
        side.insert("f", 2, true).await;
        sqlx::raw_sql(
            "UPDATE outbox SET created_at = now() - interval '3 hours', \
                    delivered_at = now() - interval '2 hours' WHERE aggregate_id = 'old'; \
             UPDATE outbox SET created_at = now() - interval '2 hours' \
             WHERE aggregate_id = 'old_pending'; \
             UPDATE outbox SET created_at = now() - interval '3 hours', \
                    failed_at = now() - interval '3 hours', attempts = 1, last_error = 'x' \
             WHERE aggregate_id = 'f'",
        )
        .execute(&side.db.pool)
        .await
        .expect("ageing the rows");
    }
    let left = |old_pending: i64| {
        let mut left = BTreeMap::from([("recent".to_owned(), 5), ("f".to_owned(), 2)]);
        if old_pending > 0 {
            left.insert("old_pending".to_owned(), old_pending);
        }
        left
    };

    // Kafka unreachable: nothing is published. The sweep at start deletes the rows delivered
    // two hours ago, and no row that is not delivered, however old.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut relays: Vec<RelayProcess> = sides
        .iter()
        .map(|s| {
            let vars = with_vars(
                s,
                &[
                    ("POSTHORN_RETENTION", "1h"),
                    ("POSTHORN_KAFKA_BROKERS", &nowhere),
                ],
            );
            RelayProcess::spawn(
                &vars,
                &relay_log_path(&format!("cp-ret-nokafka-{}", s.mode)),
            )
        })
        .collect();
    let addrs = [relays[0].http_addr().await, relays[1].http_addr().await];
    scrape_both_until(addrs, "the sweep deleted the 5 old delivered rows", |s| {
        s.value("posthorn_retention_deleted_rows_total", &[]) == Some(5.0)
            && s.value("posthorn_backlog_rows", &[]) == Some(10.0)
    })
    .await;
    for side in &sides {
        assert_eq!(
            side.left().await,
            left(5),
            "{}: only the old delivered rows are deleted; old pending rows stay",
            side.mode
        );
    }
    for relay in &mut relays {
        relay.signal("KILL");
        relay.wait(Duration::from_secs(30)).await;
    }

    // With Kafka: the pending rows are published now. Rows mode keeps them an hour from their
    // delivered_at; checkpoint mode records no publication time, and (as the README says) counts
    // the period from created_at: the rows created two hours ago go at the next sweep.
    let mut relays: Vec<RelayProcess> = sides
        .iter()
        .map(|s| {
            let vars = with_vars(s, &[("POSTHORN_RETENTION", "1h")]);
            RelayProcess::spawn(&vars, &relay_log_path(&format!("cp-ret-{}", s.mode)))
        })
        .collect();
    let swept_after = Instant::now() + retention_sweep_interval();
    for side in &sides {
        wait_until(
            Duration::from_secs(60),
            &format!("{}: the pending rows are delivered", side.mode),
            || async { n_pending(&side.db.pool).await == 0 },
        )
        .await;
    }
    wait_until(
        Duration::from_secs(120),
        "checkpoint mode's next sweep deletes the old rows delivered late",
        || async { sides[1].left().await == left(0) },
    )
    .await;
    // Both relays started together: rows mode has had its next sweep too.
    tokio::time::sleep(swept_after.saturating_duration_since(Instant::now())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sides[0].left().await,
        left(5),
        "rows mode keeps rows delivered late for the period after delivered_at"
    );
    for relay in &mut relays {
        relay.signal("TERM");
        assert!(relay.wait(Duration::from_secs(30)).await.success());
    }
    // Nothing was deleted before it was published: both topics have the 10 rows once.
    for side in &sides {
        let records = read_topic(&side.topic, 10, Duration::from_secs(30)).await;
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for r in &records {
            *keys.entry(r.key.clone().expect("key")).or_default() += 1;
        }
        assert_eq!(
            keys,
            BTreeMap::from([("old_pending".to_owned(), 5), ("recent".to_owned(), 5)]),
            "{}: every pending row published once",
            side.mode
        );
    }
    println!(
        "retention 1h: both modes deleted the 5 rows delivered 2 h ago and kept every \
         undelivered row (however old) and the failed ones; 5 rows created 2 h ago and delivered \
         late: rows mode keeps them (delivered_at + 1h), checkpoint mode deleted them at its \
         next sweep (created_at + 1h); {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The time between retention sweeps, plus a margin.
fn retention_sweep_interval() -> Duration {
    posthorn::retention::SWEEP_INTERVAL + Duration::from_secs(3)
}
