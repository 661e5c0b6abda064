//! One publisher per outbox: the lease itself (expiry, renewal, fencing, a killed connection),
//! and three real `posthorn` processes on one outbox whose leader is killed again and again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use posthorn::acks::Tracker;
use posthorn::config::PoisonPolicy;
use posthorn::lease::Lease;
use posthorn::outbox::Outbox;

use crate::support::{
    assert_each_key_gapless_and_ordered, create_aggregates, create_topic, delivered, in_both_modes,
    read_topic, unique, wait_until, write_versioned_event, RelayProcess, TestDb, Tracking,
};

// Each of these runs twice, as rows_mode::<name> and checkpoint_mode::<name>.
in_both_modes! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_lease_expires_renews_fences_a_deposed_leader_and_survives_a_killed_connection,
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    three_instances_one_publisher_through_leader_kills_and_restarts,
}

async fn holder(db: &TestDb) -> Option<(String, i64)> {
    sqlx::query_as("SELECT owner, epoch FROM outbox_lease WHERE expires_at > now()")
        .fetch_optional(&db.pool)
        .await
        .expect("lease row")
}

async fn the_lease_expires_renews_fences_a_deposed_leader_and_survives_a_killed_connection(
    tracking: Tracking,
) {
    let db = TestDb::create("lease").await;
    let cfg = tracking.config(&db.url, &[]);
    let ttl = Duration::from_secs(2);
    let a = Lease::new(db.pool.clone(), &cfg.outbox, "a", ttl);
    let b = Lease::new(db.pool.clone(), &cfg.outbox, "b", ttl);

    let led_a = a
        .try_acquire()
        .await
        .expect("acquire")
        .expect("a free lease is taken");
    assert_eq!(led_a.epoch, 1);
    assert!(
        b.try_acquire().await.expect("acquire").is_none(),
        "a live lease is not"
    );
    assert!(
        a.renew(1).await.expect("renew").is_some(),
        "the holder renews"
    );

    // A stops renewing: once the lease expired on the database's clock, B takes it with the
    // next epoch, and A (by its own clock) had stopped leading before that.
    let expired_at = Instant::now() + a.timing().lease;
    wait_until(
        Duration::from_secs(10),
        "b takes the expired lease",
        || async { b.try_acquire().await.expect("acquire").is_some() },
    )
    .await;
    assert!(Instant::now() >= expired_at - Duration::from_millis(100));
    assert!(
        !led_a.is_valid(),
        "a stopped leading by its own clock before the expiry"
    );
    assert_eq!(holder(&db).await, Some(("b".to_owned(), 2)));
    assert!(
        a.renew(1).await.expect("renew").is_none(),
        "a learns it lost the lease"
    );
    // B renews as a leader does (every third of the TTL), so that each step below starts with
    // a live lease however busy the machine is: the steps are what is tested, not their speed.
    assert!(b.renew(2).await.expect("renew").is_some(), "b renews");

    // A deposed leader's marks are refused; the leader's are not.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('t', 'k', 'e') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("insert");
    // Each leader read the row, and Kafka acknowledged it, through its own handle (checkpoint
    // mode's handle keeps the pages it read, and forgets them once deposed).
    let read_and_ack = || async {
        let outbox = Outbox::with_pool(db.pool.clone(), &cfg.outbox, PoisonPolicy::DeadLetter)
            .tracked_by(cfg.tracking);
        let rows = outbox.fetch_batch(10).await.expect("fetch");
        let mut tracker = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        tracker.ack(0);
        (outbox, tracker.finish().deliverable)
    };
    let (deposed, deposed_acked) = read_and_ack().await;
    let (leader, leader_acked) = read_and_ack().await;
    assert_eq!(
        deposed
            .mark_delivered(&deposed_acked, 1)
            .await
            .expect("mark"),
        0
    );
    assert!(
        !db.is_delivered(id).await,
        "the deposed leader marked nothing"
    );
    assert_eq!(
        leader.mark_delivered(&leader_acked, 2).await.expect("mark"),
        1
    );
    assert!(db.is_delivered(id).await, "the leader's mark holds");
    // On the row, or on the checkpoint row that now covers it.
    let epoch: Option<i64> = match tracking {
        Tracking::Rows => sqlx::query_scalar("SELECT delivered_epoch FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .expect("row"),
        Tracking::Checkpoint => sqlx::query_scalar("SELECT epoch FROM outbox_checkpoint")
            .fetch_one(&db.pool)
            .await
            .expect("checkpoint row"),
    };
    assert_eq!(epoch, Some(2), "the mark carries the leader's epoch");
    assert!(b.renew(2).await.expect("renew").is_some(), "b renews");

    // The leader's database connections are killed: it reconnects and keeps its lease.
    let b_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            db.url
                .parse::<sqlx::postgres::PgConnectOptions>()
                .expect("url")
                .application_name("posthorn-lease-b"),
        )
        .await
        .expect("b's pool");
    let b = Lease::new(b_pool.clone(), &cfg.outbox, "b", ttl);
    assert!(b.renew(2).await.expect("renew").is_some());
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'posthorn-lease-b'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("terminate");
    assert_eq!(killed, vec![true]);
    let mut renewed = false;
    for _ in 0..3 {
        if let Ok(Some(_)) = b.renew(2).await {
            renewed = true;
            break;
        }
    }
    assert!(renewed, "b renews on a new connection");
    assert_eq!(holder(&db).await, Some(("b".to_owned(), 2)));

    // Released: a standby takes it at once, with the next epoch.
    b.release(2).await.expect("release");
    let c = Lease::new(db.pool.clone(), &cfg.outbox, "c", ttl);
    assert_eq!(
        c.try_acquire().await.expect("acquire").map(|l| l.epoch),
        Some(3)
    );
}

/// Records every write of the checkpoint row (its epoch, and when: the writing transaction's
/// start, as `delivered_at = now()` is a mark's) in `test_checkpoint_writes`: the history that
/// rows mode keeps in `delivered_epoch` and `delivered_at`, which one checkpoint row overwrites.
async fn record_checkpoint_writes(db: &TestDb) {
    sqlx::raw_sql(
        "CREATE TABLE test_checkpoint_writes (epoch bigint NOT NULL, at timestamptz NOT NULL);
         CREATE FUNCTION test_record_checkpoint_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO test_checkpoint_writes VALUES (NEW.epoch, now());
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_record_checkpoint_write AFTER INSERT OR UPDATE ON outbox_checkpoint
             FOR EACH ROW EXECUTE FUNCTION test_record_checkpoint_write();",
    )
    .execute(&db.pool)
    .await
    .expect("recording checkpoint writes");
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

async fn three_instances_one_publisher_through_leader_kills_and_restarts(tracking: Tracking) {
    const N_KEYS: usize = 30;
    const N_KILLS: usize = 10;
    const N_TERMS: usize = 3;
    const TTL: Duration = Duration::from_secs(2);
    let db = TestDb::create("failover").await;
    let topic = unique("it-failover");
    create_topic(&topic, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;

    let names = ["alpha", "beta", "gamma"].map(|n| format!("{n}-{}", unique("i")));
    record_checkpoint_writes(&db).await;
    let vars_for = |name: &str| {
        tracking.env_vars(
            &db.url,
            &[
                ("POSTHORN_LEASE_TTL", "2s"),
                ("POSTHORN_INSTANCE_ID", name),
                ("POSTHORN_BATCH_SIZE", "100"),
            ],
        )
    };
    let log_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("relay-logs");
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let spawn = |name: &str| {
        RelayProcess::spawn(
            &vars_for(name),
            &log_dir.join(format!("{}.log", unique(name))),
        )
    };
    let mut instances: BTreeMap<String, RelayProcess> =
        names.iter().map(|n| (n.clone(), spawn(n))).collect();

    // Writers keep committing, throttled, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (pool, keys, topic, stop, written) = (
                db.pool.clone(),
                keys.clone(),
                topic.clone(),
                stop.clone(),
                written.clone(),
            );
            tokio::spawn(async move {
                let mut j = w;
                while !stop.load(Ordering::Relaxed) {
                    write_versioned_event(&pool, &topic, &keys[j % keys.len()], w).await;
                    written.fetch_add(1, Ordering::Relaxed);
                    j += 3;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        })
        .collect();

    let mut failovers = Vec::new();
    let mut handovers = Vec::new();
    for round in 0..N_KILLS + N_TERMS {
        wait_until(Duration::from_secs(30), "an instance leads", || async {
            holder(&db).await.is_some()
        })
        .await;
        let (leader, epoch) = holder(&db).await.expect("a leader");
        // Let the leader publish for a while first.
        let delivered_before = delivered(&db).await;
        assert!(delivered_before >= 0, "counting delivered rows");
        wait_until(Duration::from_secs(30), "the leader publishes", || async {
            delivered(&db).await > delivered_before + 50
        })
        .await;
        let process = instances
            .get_mut(&leader)
            .expect("the leader is one of ours");
        let term = round >= N_KILLS;
        process.signal(if term { "TERM" } else { "KILL" });
        let stopped_at = Instant::now();
        wait_until(
            Duration::from_secs(20),
            "another instance takes over",
            || async {
                matches!(holder(&db).await, Some((owner, e)) if e > epoch && owner != leader)
            },
        )
        .await;
        let took = stopped_at.elapsed();
        if term {
            handovers.push(took);
            let status = process.wait(Duration::from_secs(30)).await;
            assert!(status.success(), "SIGTERM: clean exit, got {status}");
        } else {
            failovers.push(took);
            process.wait(Duration::from_secs(10)).await;
        }
        // The stopped instance comes back as a standby.
        instances.insert(leader.clone(), spawn(&leader));
    }

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    db.wait_all_delivered(Duration::from_secs(120), "every row is delivered")
        .await;
    for process in instances.values() {
        process.signal("TERM");
    }
    for process in instances.values_mut() {
        assert!(process.wait(Duration::from_secs(30)).await.success());
    }

    // Never two publishers: each epoch's marks lie strictly after the previous epoch's. A mark
    // is a row's delivered_at (rows mode; checkpoint mode's rare out-of-order ones) or a write of
    // the checkpoint row (checkpoint mode), as the trigger recorded them.
    let spans: Vec<(i64, f64, f64, i64)> = sqlx::query_as(
        "SELECT epoch, extract(epoch FROM min(at))::float8, extract(epoch FROM max(at))::float8, \
                count(*) \
         FROM (SELECT delivered_epoch AS epoch, delivered_at AS at \
               FROM outbox WHERE delivered_at IS NOT NULL \
               UNION ALL SELECT epoch, at FROM test_checkpoint_writes) marks \
         GROUP BY epoch ORDER BY epoch",
    )
    .fetch_all(&db.pool)
    .await
    .expect("spans");
    // (Not vacuous: each leader stopped above had published.)
    assert!(
        spans.len() >= N_KILLS + N_TERMS,
        "the marks of every leader: {spans:?}"
    );
    for pair in spans.windows(2) {
        assert!(
            pair[0].2 < pair[1].1,
            "epoch {} marked until {} but epoch {} from {}: two publishers at once",
            pair[0].0,
            pair[0].2,
            pair[1].0,
            pair[1].1
        );
    }
    let n_written = written.load(Ordering::Relaxed);
    let records = read_topic(&topic, n_written, Duration::from_secs(60)).await;
    let (distinct, duplicates) = assert_each_key_gapless_and_ordered(&records);
    assert_eq!(distinct, n_written, "every committed row arrived");
    let max_failover = *failovers.iter().max().expect("failovers");
    println!(
        "failover after SIGKILL ({N_KILLS}x): median {:?}, max {:?} (TTL {TTL:?}); handover after SIGTERM ({N_TERMS}x): median {:?}, max {:?}; {} epochs, {} rows, 0 lost, order kept, {duplicates} duplicates",
        median(failovers.clone()),
        max_failover,
        median(handovers.clone()),
        handovers.iter().max().expect("handovers"),
        spans.len(),
        n_written
    );
    assert!(
        max_failover <= TTL + Duration::from_millis(500),
        "failover within the TTL (+ polling slack)"
    );
    assert!(
        *handovers.iter().max().expect("handovers") <= Duration::from_secs(2),
        "a drained leader hands over at once"
    );
}
