//! Exactly-once delivery (`POSTHORN_DELIVERY=exactly-once`) on real Kafka: a read_committed
//! consumer sees every committed row once, in order, with writers running; a crash between the
//! Kafka commit and the Postgres record publishes nothing twice; a leader frozen past its lease
//! at its worst moment (its batch written, its commit not yet sent) is fenced by the next
//! leader's producer and its transaction never reaches a read_committed consumer. A
//! read_uncommitted consumer of the same topic is counted beside it, for comparison.

use std::time::Duration;

use crate::support::{
    assert_complete_and_ordered, create_aggregates, create_topic, delivered, read_topic_isolated,
    relay_log_path, run_posthorn, services, spawn_writers, unique, wait_until, Isolation, Record,
    RelayProcess, RunningRelay, TestDb, Tracking,
};

/// The variables of an exactly-once relay with a checkpoint topic of the test's own (a topic
/// shared between relays makes each leader's start wait for the others' open transactions).
fn exactly_once_vars(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let checkpoint_topic = unique("it-eo-checkpoint");
    let mut vars: Vec<(&str, &str)> = vec![
        ("POSTHORN_DELIVERY", "exactly-once"),
        ("POSTHORN_CHECKPOINT_TOPIC", &checkpoint_topic),
    ];
    vars.extend_from_slice(extra);
    Tracking::Checkpoint.env_vars(&db.url, &vars)
}

async fn read_both(topic: &str, at_least: usize) -> (Vec<Record>, Vec<Record>) {
    let brokers = &services().brokers;
    let timeout = Duration::from_secs(60);
    let committed =
        read_topic_isolated(brokers, topic, at_least, timeout, Isolation::ReadCommitted).await;
    let everything = read_topic_isolated(
        brokers,
        topic,
        at_least,
        timeout,
        Isolation::ReadUncommitted,
    )
    .await;
    (committed, everything)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_committed_consumer_sees_every_row_once_in_order_while_writers_run() {
    const N_KEYS: usize = 40;
    const N_EVENTS: usize = 6_000;
    let db = TestDb::create("eo_writers").await;
    let topic = unique("it-eo-writers");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    let vars = exactly_once_vars(&db, &[("POSTHORN_BATCH_SIZE", "250")]);
    let config = posthorn::config::Config::from_vars(vars.clone()).expect("valid configuration");
    let relay = RunningRelay::start(config);
    spawn_writers(&db.pool, &topic, &keys, N_EVENTS, 4)
        .await
        .expect("writers");
    db.wait_all_delivered(Duration::from_secs(120), "every row is published")
        .await;
    let stats = relay.stop().await;
    assert_eq!(stats.n_published, N_EVENTS as u64, "each row recorded once");

    // `status` says how the outbox is delivered and what the last transaction committed.
    let (code, stdout, stderr) = run_posthorn(&["status", "--json"], &vars);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(status["delivery"], "exactly-once", "{status}");
    assert_eq!(status["pending"], 0, "{status}");
    let last = &status["last_checkpoint"];
    assert!(last["transaction"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(
        last["published"].as_array().is_some_and(|r| !r.is_empty()),
        "it names the rows it published: {status}"
    );

    let (committed, everything) = read_both(&topic, N_EVENTS).await;
    let repeats = assert_complete_and_ordered(&committed, N_KEYS, N_EVENTS / N_KEYS);
    assert_eq!(repeats, 0, "no duplicates for a read_committed consumer");
    assert_eq!(committed.len(), N_EVENTS);
    // Nothing was aborted here, so a read_uncommitted consumer sees the same.
    assert_eq!(everything.len(), N_EVENTS);
    println!(
        "exactly-once with writers: {N_EVENTS} rows, read_committed {} records (0 duplicates), \
         read_uncommitted {}",
        committed.len(),
        everything.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_the_kafka_commit_and_the_postgres_record_publishes_no_row_twice() {
    const N_KEYS: usize = 20;
    const N_EVENTS: usize = 2_000;
    const BATCH: usize = 200;
    let db = TestDb::create("eo_crash").await;
    let topic = unique("it-eo-crash");
    create_topic(&topic, 2).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    spawn_writers(&db.pool, &topic, &keys, N_EVENTS, 4)
        .await
        .expect("writers");

    let batch = BATCH.to_string();
    let vars = exactly_once_vars(&db, &[("POSTHORN_BATCH_SIZE", &batch)]);
    // The third commit succeeds, then the process aborts before Postgres records it.
    let mut faulty = vars.clone();
    faulty.push(("POSTHORN_TEST_FAULT".into(), "crash-after-commit:3".into()));
    let crash_log = relay_log_path("eo-crash");
    let mut relay = RelayProcess::spawn(&faulty, &crash_log);
    let status = relay.wait(Duration::from_secs(60)).await;
    assert!(!status.success(), "the fault point ends the process");
    let log = std::fs::read_to_string(&crash_log).expect("log");
    assert!(log.contains("POSTHORN_TEST_FAULT fired."), "{log}");
    let recorded_at_crash = delivered(&db).await;
    // Three batches committed; Postgres records at most the first two (the second's record
    // ran beside the third transaction and may not have returned).
    assert!(
        recorded_at_crash <= 2 * BATCH as i64,
        "the third committed batch is not recorded in Postgres: {recorded_at_crash} recorded"
    );

    let log = relay_log_path("eo-crash-restart");
    let mut relay = RelayProcess::spawn(&vars, &log);
    db.wait_all_delivered(Duration::from_secs(120), "every row is published")
        .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    let log = std::fs::read_to_string(&log).expect("log");
    let recovered = log
        .lines()
        .find(|l| l.contains("The last committed Kafka transaction was not yet recorded"))
        .unwrap_or_else(|| panic!("the restarted relay recorded the crashed commit:\n{log}"));

    let (committed, everything) = read_both(&topic, N_EVENTS).await;
    let repeats = assert_complete_and_ordered(&committed, N_KEYS, N_EVENTS / N_KEYS);
    assert_eq!(repeats, 0, "read_committed: no row twice");
    assert_eq!(committed.len(), N_EVENTS);
    let uncommitted_repeats = assert_complete_and_ordered(&everything, N_KEYS, N_EVENTS / N_KEYS);
    println!(
        "crash after commit 3: {recorded_at_crash} rows recorded at the crash; restart: \
         {recovered}; read_committed {} records, 0 duplicates; read_uncommitted {} records, \
         {uncommitted_repeats} duplicates",
        committed.len(),
        everything.len()
    );
}

/// The process's state letter in /proc (`T`: stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_frozen_past_its_lease_before_its_commit_is_fenced_and_its_batch_never_committed()
{
    const N_KEYS: usize = 30;
    const N_EVENTS: usize = 4_200;
    let db = TestDb::create("eo_frozen").await;
    let topic = unique("it-eo-frozen");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    let vars = exactly_once_vars(
        &db,
        &[("POSTHORN_BATCH_SIZE", "100"), ("POSTHORN_LEASE_TTL", "3s")],
    );
    let with = |name: &str, fault: Option<&str>| {
        let mut v = vars.clone();
        v.push(("POSTHORN_INSTANCE_ID".into(), name.into()));
        if let Some(fault) = fault {
            v.push(("POSTHORN_TEST_FAULT".into(), fault.into()));
        }
        v
    };
    let writers = spawn_writers(&db.pool, &topic, &keys, N_EVENTS, 3);
    // The first replica leads, and stops itself before its fifth commit.
    let frozen_log = relay_log_path("eo-frozen-a");
    let mut a = RelayProcess::spawn(&with("a", Some("stop-before-commit:5")), &frozen_log);
    let pid = a.child.id();
    wait_until(
        Duration::from_secs(60),
        "the leader freezes before its fifth commit",
        || std::future::ready(process_state(pid) == Some('T')),
    )
    .await;
    let at_freeze = delivered(&db).await;
    let mut b = RelayProcess::spawn(&with("b", None), &relay_log_path("eo-frozen-b"));
    let mut c = RelayProcess::spawn(&with("c", None), &relay_log_path("eo-frozen-c"));
    wait_until(
        Duration::from_secs(60),
        "a standby takes over and publishes",
        || async { delivered(&db).await >= at_freeze + 300 },
    )
    .await;
    a.signal("CONT");
    wait_until(
        Duration::from_secs(60),
        "the frozen leader learns it is fenced",
        || {
            let log = std::fs::read_to_string(&frozen_log).unwrap_or_default();
            std::future::ready(log.contains("Fenced by the next leader's producer"))
        },
    )
    .await;
    writers.await.expect("writers");
    db.wait_all_delivered(Duration::from_secs(120), "every row is published")
        .await;
    for relay in [&mut a, &mut b, &mut c] {
        relay.signal("TERM");
        assert!(relay.wait(Duration::from_secs(30)).await.success());
    }
    let log = std::fs::read_to_string(&frozen_log).expect("log");
    let fenced = log
        .lines()
        .find(|l| l.contains("Fenced by the next leader's producer"))
        .expect("waited for it")
        .to_owned();
    assert!(
        !log.contains("Fenced by another producer with this transactional.id while holding"),
        "the frozen leader had lost its lease by its own clock: {log}"
    );

    let (committed, everything) = read_both(&topic, N_EVENTS).await;
    let repeats = assert_complete_and_ordered(&committed, N_KEYS, N_EVENTS / N_KEYS);
    assert_eq!(
        repeats, 0,
        "read_committed: no row twice, none out of order"
    );
    assert_eq!(committed.len(), N_EVENTS);
    let uncommitted_repeats = assert_complete_and_ordered(&everything, N_KEYS, N_EVENTS / N_KEYS);
    assert!(
        everything.len() > committed.len(),
        "the frozen leader's batch was written (and aborted): read_uncommitted sees it"
    );
    println!(
        "frozen leader: {at_freeze} rows recorded at the freeze; its log: {fenced}\n\
         read_committed {} records, 0 duplicates, 0 out of order; read_uncommitted {} records, \
         {uncommitted_repeats} duplicates",
        committed.len(),
        everything.len()
    );
}

#[tokio::test]
async fn exactly_once_delivery_needs_checkpoint_tracking_and_says_so() {
    let db = TestDb::create("eo_config").await;
    let vars = Tracking::Rows.env_vars(&db.url, &[("POSTHORN_DELIVERY", "exactly-once")]);
    let (code, _, stderr) = run_posthorn(&["run"], &vars);
    assert_eq!(code, 2, "a configuration error: {stderr}");
    assert!(
        stderr.contains("POSTHORN_DELIVERY") && stderr.contains("POSTHORN_TRACKING=checkpoint"),
        "{stderr}"
    );
    let vars = Tracking::Checkpoint.env_vars(&db.url, &[("POSTHORN_DELIVERY", "exactly-twice")]);
    let (code, _, stderr) = run_posthorn(&["run"], &vars);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("'exactly-twice'"), "{stderr}");
}
