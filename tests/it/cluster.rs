//! The real binary against a three-node Apache Kafka cluster of the test's own (KRaft, combined
//! broker+controller nodes, topics with replication factor 3, `min.insync.replicas=2`), with
//! writers committing throughout: the broker leading most partitions SIGKILLed and restarted;
//! two brokers down, so that `acks=all` cannot be met; a broker back with an empty data
//! directory. Each time no row is lost and each key's order holds.
//!
//! Where duplicates could come from, and why these tests expect none: the idempotent producer
//! retries a record under the same producer id and sequence number, and the partition leader
//! (the new one after a failover too, which has the producer's state from the replicated log)
//! drops a batch it already has; so a retry after a lost acknowledgement, a timed-out request or
//! a leader change adds nothing. Duplicates come only from the relay's side: a relay crash
//! (rows acknowledged and not yet marked are sent again; none here, the relay is stopped with
//! SIGTERM, which marks what was acknowledged), a producer replaced after a fatal error or after
//! `POSTHORN_ACK_STALL_MS` without an acknowledgement (60 s, longer than any outage here), or a
//! failed mark. The tests count them and print the count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::support::{
    assert_complete_and_ordered, create_aggregates, create_topic_replicated, delivered, env_vars,
    http_get, read_topic_at, relay_log_path, spawn_writers, unique, wait_until, KafkaCluster,
    Record, RelayProcess, TestDb, Wipe,
};

const N_KEYS: usize = 20;
const N_PER_KEY: usize = 100;
const N_PARTITIONS: i32 = 6;
const BATCH_SIZE: usize = 100;

/// Three JVMs take most of these two cores: the tests that start three nodes run one at a time
/// (their deadlines start once they hold this).
static THREE_NODES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A three-node cluster, a replicated topic, a database with aggregates, the relay running and
/// writers committing `N_KEYS * N_PER_KEY` versioned events.
struct Fixture {
    cluster: KafkaCluster,
    db: TestDb,
    topic: String,
    relay: RelayProcess,
    writers: JoinHandle<()>,
    started: Instant,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

async fn start(name: &str, extra: &[(&str, &str)]) -> Fixture {
    let one_at_a_time = THREE_NODES.lock().await;
    let started = Instant::now();
    let cluster = KafkaCluster::start(3).await;
    let db = TestDb::create(name).await;
    let topic = unique(&format!("it-{name}"));
    create_topic_replicated(&cluster.brokers(), &topic, N_PARTITIONS, 3).await;
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    let (brokers, batch_size) = (cluster.brokers(), BATCH_SIZE.to_string());
    let mut settings = vec![
        ("POSTHORN_KAFKA_BROKERS", brokers.as_str()),
        ("POSTHORN_BATCH_SIZE", batch_size.as_str()),
    ];
    settings.extend_from_slice(extra);
    let vars = env_vars(&db.url, &settings);
    let relay = RelayProcess::spawn(&vars, &relay_log_path(name));
    let writers = spawn_writers(&db.pool, &topic, &keys, N_KEYS * N_PER_KEY, 4);
    Fixture {
        cluster,
        db,
        topic,
        relay,
        writers,
        started,
        _one_at_a_time: one_at_a_time,
    }
}

impl Fixture {
    /// Waits until a few batches are delivered, and checks the writers are still going.
    async fn wait_for_progress(&self) {
        wait_until(
            Duration::from_secs(60),
            "the relay makes progress",
            || async { delivered(&self.db).await >= 5 * BATCH_SIZE as i64 },
        )
        .await;
        assert!(
            !self.writers.is_finished(),
            "the fault must hit while the writers are still committing"
        );
    }

    fn assert_relay_alive(&mut self, when: &str) {
        assert!(
            self.relay.child.try_wait().expect("poll").is_none(),
            "the relay survives {when}; its log: {:?}",
            self.relay.log
        );
    }

    /// Lets the writers finish, waits until every row is delivered, stops the relay (SIGTERM)
    /// and reads the topic back: returns the records and the number of duplicates, having
    /// asserted that none is lost and each key's order holds.
    async fn finish(mut self) -> (Fixture, Vec<Record>, usize) {
        (&mut self.writers).await.expect("writers");
        self.db
            .wait_all_delivered(Duration::from_secs(90), "every row is delivered")
            .await;
        self.relay.signal("TERM");
        assert!(self.relay.wait(Duration::from_secs(30)).await.success());
        let records = read_topic_at(
            &self.cluster.brokers(),
            &self.topic,
            N_KEYS * N_PER_KEY,
            Duration::from_secs(60),
        )
        .await;
        let duplicates = assert_complete_and_ordered(&records, N_KEYS, N_PER_KEY);
        (self, records, duplicates)
    }
}

/// A partition as the cluster's metadata describes it.
#[derive(Debug, Clone)]
struct PartitionState {
    leader: i32,
    isr: Vec<i32>,
}

/// The topic's partitions, from a metadata request to any live broker.
fn partitions(brokers: &str, topic: &str) -> Vec<PartitionState> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let topic = &metadata.topics()[0];
    assert!(topic.error().is_none(), "{topic:?}");
    topic
        .partitions()
        .iter()
        .map(|p| PartitionState {
            leader: p.leader(),
            isr: p.isr().to_vec(),
        })
        .collect()
}

/// The broker id that leads most of the topic's partitions, and how many it leads.
fn leader_of_most(partitions: &[PartitionState]) -> (i32, usize) {
    let mut led: BTreeMap<i32, usize> = BTreeMap::new();
    for p in partitions {
        *led.entry(p.leader).or_default() += 1;
    }
    led.into_iter()
        .max_by_key(|(_, n)| *n)
        .expect("the topic has partitions")
}

/// Whether `broker` is in the ISR of every partition of `topic`.
fn in_sync_everywhere(cluster: &KafkaCluster, topic: &str, broker: i32) -> bool {
    partitions(&cluster.brokers(), topic)
        .iter()
        .all(|p| p.isr.contains(&broker))
}

/// `/readyz`'s status and JSON body.
async fn readyz(addr: SocketAddr) -> (u16, Value) {
    let (status, body) = http_get(addr, "/readyz").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz JSON {body}: {e}"));
    (status, json)
}

/// GETs `/readyz` until `condition` holds; panics with the last answer after `timeout`.
async fn readyz_until(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    condition: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, json) = readyz(addr).await;
        if condition(status, &json) {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}; last /readyz: {status} {json}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_leading_most_partitions_sigkilled_and_restarted_loses_no_row_and_keeps_key_order(
) {
    let mut f = start("cluster_leader_kill", &[]).await;
    f.wait_for_progress().await;
    let (leader, n_led) = leader_of_most(&partitions(&f.cluster.brokers(), &f.topic));
    let victim = f.cluster.index_of(leader);
    f.cluster.kill(victim);
    let at_kill = delivered(&f.db).await;

    // Two replicas of three are min.insync.replicas: once the controller has fenced the dead
    // broker (its session times out) and moved its partitions' leadership, acks=all is met
    // again and rows are delivered with the broker still down.
    wait_until(
        Duration::from_secs(60),
        "rows are delivered with the leader dead",
        || async { delivered(&f.db).await >= at_kill + 2 * BATCH_SIZE as i64 },
    )
    .await;
    let moved = partitions(&f.cluster.brokers(), &f.topic);
    assert!(
        moved.iter().all(|p| p.leader != leader && p.leader >= 0),
        "every partition has a live leader: {moved:?}"
    );
    f.assert_relay_alive("the leader's death");
    f.cluster.restart(victim).await;

    let (f, _, duplicates) = f.finish().await;
    wait_until(
        Duration::from_secs(30),
        "the restarted broker is in every partition's ISR again",
        || std::future::ready(in_sync_everywhere(&f.cluster, &f.topic, leader)),
    )
    .await;
    println!(
        "three brokers, leader of {n_led}/{N_PARTITIONS} partitions SIGKILLed and restarted: \
         0 lost, order kept, {duplicates} duplicates ({:.0?})",
        f.started.elapsed()
    );
    assert_eq!(duplicates, 0, "idempotent retries add no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_down_hold_the_relay_mark_nothing_and_readyz_says_why_until_they_return() {
    // The outage, the two restarts included, must stay shorter than the acknowledgement stall:
    // at the stall the relay purges its producer and replaces it, and records the survivor had
    // written (not acknowledged) are sent again by the new producer: duplicates (seen here with
    // the default 60 s, which ran out while the two nodes were still starting: 3 of them).
    let mut f = start("cluster_two_down", &[("POSTHORN_ACK_STALL_MS", "300000")]).await;
    let addr = f.relay.http_addr().await;
    readyz_until(addr, Duration::from_secs(30), "ready", |status, _| {
        status == 200
    })
    .await;
    f.wait_for_progress().await;
    // The survivor leads partitions: records reach a live leader there, which cannot have them
    // acknowledged by two of three replicas.
    let (survivor, _) = leader_of_most(&partitions(&f.cluster.brokers(), &f.topic));
    let down: Vec<usize> = (0..f.cluster.len())
        .filter(|&i| f.cluster.broker_id(i) != survivor)
        .collect();
    for &i in &down {
        f.cluster.kill(i);
    }
    let killed = Instant::now();
    let at_kill = delivered(&f.db).await;

    let answer = readyz_until(
        addr,
        Duration::from_secs(45),
        "/readyz says Kafka is not acknowledging",
        // Right after the kills a metadata request may go to a dead broker and time out
        // ("unreachable"); the survivor answers the next one.
        |status, json| {
            status == 503
                && json["kafka"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("not acknowledging: "))
        },
    )
    .await;
    let not_ready_after = killed.elapsed();
    assert_eq!(answer["ready"], false, "{answer}");
    assert_eq!(answer["postgres"], "ok", "{answer}");
    assert_eq!(answer["schema"], "ok", "{answer}");
    let reason = answer["kafka"].as_str().expect("a reason").to_owned();
    assert!(reason.starts_with("not acknowledging: "), "{reason}");
    // Waiting for acknowledgements is not being stuck.
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    f.assert_relay_alive("two brokers down");

    // Rows acknowledged before the kill may be marked after it: the batch acknowledged and not
    // yet marked (marks go with the next read) and the one in flight, no more. By now (15 s and
    // more without an acknowledgement) those marks are long done.
    let held = delivered(&f.db).await;
    assert!(
        held - at_kill <= 2 * BATCH_SIZE as i64,
        "at most two batches acknowledged before the kill are marked after it ({at_kill} -> {held})"
    );
    // Then nothing: a few seconds more, checked every 200 ms.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(
            delivered(&f.db).await,
            held,
            "no row is marked delivered while acks=all cannot be met"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(f.db.undelivered().await > 0, "rows wait for the brokers");
    f.assert_relay_alive("two brokers down");

    f.cluster.restart_all(&down).await;
    readyz_until(addr, Duration::from_secs(60), "ready again", |status, _| {
        status == 200
    })
    .await;
    let down_for = killed.elapsed();
    let (f, _, duplicates) = f.finish().await;
    println!(
        "three brokers, two down for {down_for:.0?} (/readyz 503 after {not_ready_after:.0?}: \
         {reason}): {} rows marked after the kill, then none; 0 lost, order kept, \
         {duplicates} duplicates ({:.0?})",
        held - at_kill,
        f.started.elapsed()
    );
    assert_eq!(duplicates, 0, "idempotent retries add no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_back_with_an_empty_data_directory_copies_every_partition_and_no_row_is_lost() {
    let mut f = start("cluster_wiped", &[]).await;
    f.wait_for_progress().await;
    let (leader, _) = leader_of_most(&partitions(&f.cluster.brokers(), &f.topic));
    let wiped = f.cluster.index_of(leader);
    let directory_id = |cluster: &KafkaCluster| {
        let properties = cluster.data_dir(wiped).join("meta.properties");
        std::fs::read_to_string(properties).ok().and_then(|p| {
            p.lines()
                .find_map(|l| l.strip_prefix("directory.id=").map(str::to_owned))
        })
    };
    let old_directory_id = directory_id(&f.cluster).expect("the data directory's id");
    f.cluster.kill(wiped);
    f.cluster.wipe(wiped, Wipe::Data);
    let restarted = Instant::now();
    f.cluster.restart(wiped).await;
    // KRaft: formatting the empty directory gave it a new directory id, and the controller's
    // partition registrations still name the old one (seen in the controllers' server.log:
    // the broker registers with `logDirs=[<new id>]`). With its one log directory the broker
    // creates the replicas there anyway, reports the new placement to the controller (its
    // directory-assignments channel) and fetches from the leaders.
    assert_ne!(
        directory_id(&f.cluster),
        Some(old_directory_id),
        "the re-formatted data directory has a new directory id"
    );
    // It fetches every partition from its leader and rejoins the ISR once it has caught up.
    let what = format!(
        "the wiped broker is in every partition's ISR again (see {:?})",
        f.cluster.server_log(wiped)
    );
    wait_until(Duration::from_secs(60), &what, || {
        std::future::ready(in_sync_everywhere(&f.cluster, &f.topic, leader))
    })
    .await;
    let in_sync_after = restarted.elapsed();
    let (f, records, duplicates) = f.finish().await;

    // Its own copy, read from its disk, is the records the consumer read from the leaders, in
    // the same order in every partition (it may still be fetching the last ones: wait a little).
    let mut read: BTreeMap<i32, Vec<DiskRecord>> = BTreeMap::new();
    for r in &records {
        read.entry(r.partition)
            .or_default()
            .push((r.key.clone(), r.value.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_disk = records_on_disk(&f.cluster.data_dir(wiped), &f.topic);
        if on_disk == read {
            break;
        }
        let counts = |m: &BTreeMap<i32, Vec<_>>| m.values().map(Vec::len).collect::<Vec<_>>();
        assert!(
            Instant::now() < deadline,
            "the wiped broker's disk has the records read from the leaders: per partition {:?} \
             on its disk, {:?} read",
            counts(&on_disk),
            counts(&read)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "three brokers, one back with its data wiped: in sync after {in_sync_after:.0?}, its disk \
         holds all {} records; 0 lost, order kept, {duplicates} duplicates ({:.0?})",
        records.len(),
        f.started.elapsed()
    );
    assert_eq!(duplicates, 0, "idempotent retries add no duplicates");
}

/// A record's key and value.
type DiskRecord = (Option<String>, Option<Vec<u8>>);

/// `topic`'s records on one broker's disk, per partition in offset order: (key, value), read
/// from its log segments (`<topic>-<partition>/*.log`, record batch format v2, uncompressed as
/// the relay sends them; control batches skipped). A batch still being written is left out.
fn records_on_disk(data_dir: &Path, topic: &str) -> BTreeMap<i32, Vec<DiskRecord>> {
    let mut partitions = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return partitions;
    };
    let prefix = format!("{topic}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(partition) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let mut segments: Vec<_> = std::fs::read_dir(entry.path())
            .expect("a partition directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        // Named by their base offset, zero-padded: names sort in offset order.
        segments.sort();
        let records: &mut Vec<DiskRecord> = partitions.entry(partition).or_default();
        for segment in segments {
            // A segment deleted under us (none is here: no retention) reads as empty.
            read_segment(&std::fs::read(&segment).unwrap_or_default(), records);
        }
    }
    partitions
}

fn read_segment(bytes: &[u8], records: &mut Vec<DiskRecord>) {
    let be32 = |b: &[u8]| i32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    let mut at = 0;
    // baseOffset (8) batchLength (4), then batchLength bytes.
    while at + 12 <= bytes.len() {
        let length = usize::try_from(be32(&bytes[at + 8..])).unwrap_or(0);
        let end = at + 12 + length;
        if length == 0 || end > bytes.len() {
            break;
        }
        let batch = &bytes[at + 12..end];
        // partitionLeaderEpoch (4) magic (1) crc (4) attributes (2) lastOffsetDelta (4)
        // baseTimestamp (8) maxTimestamp (8) producerId (8) producerEpoch (2) baseSequence (4)
        // recordsCount (4), then the records.
        assert_eq!(batch[4], 2, "record batch format v2");
        let attributes = i16::from_be_bytes([batch[9], batch[10]]);
        assert_eq!(attributes & 0x07, 0, "an uncompressed batch");
        let is_control = attributes & 0x20 != 0;
        let n_records = if is_control { 0 } else { be32(&batch[45..]) };
        let mut r = Varints {
            bytes: &batch[49..],
            at: 0,
        };
        for _ in 0..n_records {
            let length = usize::try_from(r.varint()).expect("a record length");
            let next = r.at + length;
            r.at += 1; // attributes
            r.varint(); // timestampDelta
            r.varint(); // offsetDelta
            let key = r
                .bytes_field()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let value = r.bytes_field().map(<[u8]>::to_vec);
            records.push((key, value));
            r.at = next; // past the headers
        }
        at = end;
    }
}

/// Kafka's zigzag varints, and byte fields prefixed by one (-1: null).
struct Varints<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Varints<'a> {
    fn varint(&mut self) -> i64 {
        let (mut raw, mut shift) = (0u64, 0);
        loop {
            let byte = self.bytes[self.at];
            self.at += 1;
            raw |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        (raw >> 1) as i64 ^ -((raw & 1) as i64)
    }

    fn bytes_field(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.varint()).ok()?;
        let field = &self.bytes[self.at..self.at + length];
        self.at += length;
        Some(field)
    }
}
