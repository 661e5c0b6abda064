//! Exactly-once delivery (`POSTHORN_DELIVERY=exactly-once`, checkpoint tracking) under
//! transactional errors injected with rdkafka's MockCluster, whose in-process brokers include a
//! transaction coordinator: InitProducerId, AddPartitionsToTxn, Produce and EndTxn answered with
//! errors librdkafka treats as retriable, abortable or fatal (`rdkafka_txnmgr.c`,
//! `rdkafka_idempotence.c`, `rdkafka_request.c` of the librdkafka the relay links). Postgres is
//! real; the records are read back with a real consumer from the mock cluster.
//!
//! The mock's coordinator neither filters aborted records for `read_committed` consumers nor
//! writes transaction markers (see `transactions.rs` for real Kafka): an aborted transaction's
//! records stay readable, a repeated suffix of each key. So on the mock these tests can show
//! that nothing is lost (every row reaches the topic, every row ends up delivered in Postgres)
//! and that each key's records arrive in commit order (a repeat only of a version already seen),
//! not that a `read_committed` consumer sees each row once.
//!
//! The rows are written in phases, each delivered before the next: errors are pushed onto the
//! mock's per-request stacks between phases, before the transactions that must meet them
//! exist, and the mock counts the requests it receives, so each test checks that every error
//! it injected was answered (a stack gives its errors to the next requests of its kind, one
//! each). Not metrics: the in-process relay shares the process's registry with every other
//! test.

use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::support::{
    assert_complete_and_ordered, create_aggregates, read_topic_at, spawn_writers, unique,
    RunningRelay, TestDb, Tracking,
};

use RDKafkaRespErr::*;

const N_KEYS: usize = 10;
/// Rows a phase writes (a multiple of N_KEYS: each key gets the same number).
const N_PHASE: usize = 200;

/// A mock cluster whose requests are counted. `MockCluster::new` keeps its cluster's handle
/// private, so the cluster is made by a client configured with `test.mock.num.brokers` (it lives
/// as long as that client), reached through the client's handle for what rdkafka does not wrap:
/// librdkafka's request tracking.
struct Mock {
    /// Never produces; owns the cluster.
    owner: BaseProducer,
}

impl Mock {
    fn new(n_brokers: usize) -> Mock {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", n_brokers.to_string())
            .create()
            .expect("a client with a mock cluster");
        let mock = Mock { owner };
        // SAFETY: the cluster is valid while `owner` lives, and `self` owns `owner`.
        unsafe { rdsys::rd_kafka_mock_start_request_tracking(mock.raw()) };
        mock
    }

    fn raw(&self) -> *mut rdsys::rd_kafka_mock_cluster_t {
        // SAFETY: `native_ptr` is the live handle of `owner`.
        let cluster =
            unsafe { rdsys::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr()) };
        assert!(!cluster.is_null(), "the owner client has a mock cluster");
        cluster
    }

    fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.owner
            .client()
            .mock_cluster()
            .expect("the owner client has a mock cluster")
    }

    fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// Requests of `api` the cluster has received so far.
    fn n_requests(&self, api: RDKafkaApiKey) -> usize {
        let api = i16::from(api);
        let mut n = 0;
        // SAFETY: the array and its elements are librdkafka's copies, ours to free, read before
        // they are freed; a count of 0 comes with a null array, which the destroy frees as such.
        unsafe {
            let requests = rdsys::rd_kafka_mock_get_requests(self.raw(), &mut n);
            let matching = (0..n)
                .filter(|&i| rdsys::rd_kafka_mock_request_api_key(*requests.add(i)) == api)
                .count();
            rdsys::rd_kafka_mock_request_destroy_array(requests, n);
            matching
        }
    }

    /// Pushes `errors` onto the stack of `api`: the next `errors.len()` requests of `api` get
    /// them, one each, in order.
    fn inject(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) -> Injected {
        let before = self.n_requests(api);
        self.cluster().request_errors(api, errors);
        Injected {
            api,
            before,
            n: errors.len(),
        }
    }

    /// Asserts that every error of `injected` was answered: as many requests of its kind came
    /// after it was pushed.
    fn assert_served(&self, injected: &Injected) {
        let after = self.n_requests(injected.api);
        assert!(
            after >= injected.before + injected.n,
            "all {} injected {:?} errors were answered ({} requests of it since)",
            injected.n,
            injected.api,
            after - injected.before
        );
    }
}

/// Errors pushed onto one request kind's stack, and how many of its requests came before.
struct Injected {
    api: RDKafkaApiKey,
    before: usize,
    n: usize,
}

struct Fixture {
    db: TestDb,
    mock: Mock,
    topic: String,
    checkpoint_topic: String,
    keys: Vec<String>,
}

async fn fixture(name: &str) -> Fixture {
    let db = TestDb::create(name).await;
    let mock = Mock::new(3);
    let topic = unique("it-txn-faults");
    mock.cluster()
        .create_topic(&topic, 3, 1)
        .expect("mock topic");
    // Made here: the mock serves no CreateTopics (nor names a controller), so the relay must
    // find its checkpoint topic there rather than create it.
    let checkpoint_topic = unique("it-txn-faults-checkpoint");
    mock.cluster()
        .create_topic(&checkpoint_topic, 1, 1)
        .expect("mock checkpoint topic");
    let keys: Vec<String> = (0..N_KEYS).map(|k| format!("k{k}")).collect();
    create_aggregates(&db.pool, &keys).await;
    Fixture {
        db,
        mock,
        topic,
        checkpoint_topic,
        keys,
    }
}

fn relay_for(f: &Fixture) -> RunningRelay {
    RunningRelay::start(Tracking::Checkpoint.config(
        &f.db.url,
        &[
            ("POSTHORN_KAFKA_BROKERS", &f.mock.bootstrap_servers()),
            ("POSTHORN_DELIVERY", "exactly-once"),
            ("POSTHORN_CHECKPOINT_TOPIC", &f.checkpoint_topic),
            ("POSTHORN_BATCH_SIZE", "50"),
        ],
    ))
}

/// Writes a phase's rows (four concurrent writers, the relay running) and waits until every row
/// so far is delivered.
async fn phase(f: &Fixture, what: &str) {
    spawn_writers(&f.db.pool, &f.topic, &f.keys, N_PHASE, 4)
        .await
        .expect("writers");
    f.db.wait_all_delivered(Duration::from_secs(120), what)
        .await;
}

/// Stops the relay, reads the topic back and asserts that every row of `n_phases` phases
/// arrived, each key's in commit order (repeats only of versions already seen). Returns the
/// number of repeats.
async fn finish(f: &Fixture, relay: RunningRelay, n_phases: usize) -> usize {
    relay.stop().await;
    let n_rows = n_phases * N_PHASE;
    let records = read_topic_at(
        &f.mock.bootstrap_servers(),
        &f.topic,
        n_rows,
        Duration::from_secs(60),
    )
    .await;
    assert_complete_and_ordered(&records, N_KEYS, n_rows / N_KEYS)
}

/// Errors librdkafka retries by itself (rediscovering the coordinator, backing off): a leader's
/// init, a transaction's partition registrations and its commit each meet a run of them, and
/// the transactions commit without being aborted. On the mock an aborted transaction's records
/// would stay in the log as repeats, so none is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retriable_coordinator_errors_are_retried_within_the_transaction_losing_reordering_and_repeating_nothing(
) {
    let f = fixture("txn_faults_retriable").await;
    // Before the relay starts: its first init meets them.
    let init = f.mock.inject(
        RDKafkaApiKey::InitProducerId,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        ],
    );
    let relay = relay_for(&f);
    phase(&f, "the first phase is delivered after a retried init").await;
    f.mock.assert_served(&init);

    let add = f.mock.inject(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        ],
    );
    phase(
        &f,
        "the second phase is delivered through retried partition registrations",
    )
    .await;
    f.mock.assert_served(&add);

    let end = f.mock.inject(
        RDKafkaApiKey::EndTxn,
        &[
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ],
    );
    phase(&f, "the third phase is delivered through a retried commit").await;
    f.mock.assert_served(&end);

    let repeats = finish(&f, relay, 3).await;
    assert_eq!(
        repeats, 0,
        "no transaction was aborted or published again for a retriable error"
    );
}

/// A commit the coordinator refuses with an abortable error: librdkafka's EndTxn treats
/// UNKNOWN_PRODUCER_ID as abortable with an epoch bump, and any error it does not name (here
/// TRANSACTION_COORDINATOR_FENCED) as abortable. The relay aborts, rewinds to the oldest row not
/// yet marked and publishes it again in a new transaction (with a new producer). The aborted transaction's records
/// were written before the EndTxn (the commit flushes first), so on the mock they stay in the
/// log: the repeats show the rows went out twice, the second time after the first, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abortable_commit_error_aborts_the_transaction_and_publishes_its_rows_again_in_order() {
    let f = fixture("txn_faults_abortable_commit").await;
    let relay = relay_for(&f);
    phase(&f, "the first phase is delivered").await;

    let bump = f.mock.inject(
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
    );
    phase(
        &f,
        "the second phase is delivered after an aborted commit (epoch bumped)",
    )
    .await;
    f.mock.assert_served(&bump);

    let refused = f.mock.inject(
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_TRANSACTION_COORDINATOR_FENCED],
    );
    phase(&f, "the third phase is delivered after an aborted commit").await;
    f.mock.assert_served(&refused);

    let repeats = finish(&f, relay, 3).await;
    assert!(
        repeats > 0,
        "the aborted transactions' records are in the mock's log, ahead of the same rows \
         published again"
    );
    println!("two aborted commits: 0 lost, order kept, {repeats} records of aborted transactions");
}

/// Errors before the commit that leave the transaction unable to commit: AddPartitionsToTxn
/// refused with TOPIC_AUTHORIZATION_FAILED (librdkafka: a permanent partition error, abortable),
/// and a Produce answered UNKNOWN_PRODUCER_ID (abortable, the epoch bumped). The relay aborts and
/// publishes the rows again; none is lost, none reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abortable_errors_inside_the_transaction_abort_it_and_lose_or_reorder_nothing() {
    let f = fixture("txn_faults_abortable_inside").await;
    let relay = relay_for(&f);
    phase(&f, "the first phase is delivered").await;

    let add = f.mock.inject(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    phase(
        &f,
        "the second phase is delivered after a refused partition registration",
    )
    .await;
    f.mock.assert_served(&add);

    let produce = f.mock.inject(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
    );
    phase(
        &f,
        "the third phase is delivered after a refused produce request",
    )
    .await;
    f.mock.assert_served(&produce);

    let repeats = finish(&f, relay, 3).await;
    println!("two abortable errors inside transactions: 0 lost, order kept, {repeats} repeats");
}

/// Fatal errors: a Produce answered INVALID_PRODUCER_EPOCH and an EndTxn answered
/// PRODUCER_FENCED (librdkafka: the producer is fenced, a fatal error). The relay drops the
/// producer, stands by (a few seconds after a fence), leads again with a new one (init, then
/// recovery from the checkpoint topic) and goes on; no row is lost, none reordered. Each time a
/// new producer is initialised: an InitProducerId after the error.
///
/// On the mock the recovery after the fenced commit finds that transaction's checkpoint record
/// (the mock does not hide it) and records its rows as published; the mock kept their records
/// too, so nothing is lost here either. On real Kafka both are hidden from read_committed
/// readers and the rows are published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_producer_is_dropped_and_a_new_leader_term_loses_nothing_and_keeps_key_order() {
    let f = fixture("txn_faults_fenced").await;
    let relay = relay_for(&f);
    phase(&f, "the first phase is delivered").await;

    let inits = f.mock.n_requests(RDKafkaApiKey::InitProducerId);
    let produce = f.mock.inject(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
    );
    phase(
        &f,
        "the second phase is delivered after a fenced produce request",
    )
    .await;
    f.mock.assert_served(&produce);
    let inits_after_produce = f.mock.n_requests(RDKafkaApiKey::InitProducerId);
    assert!(
        inits_after_produce > inits,
        "a new producer was initialised after the fenced produce request"
    );

    let end = f
        .mock
        .inject(RDKafkaApiKey::EndTxn, &[RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    phase(&f, "the third phase is delivered after a fenced commit").await;
    f.mock.assert_served(&end);
    assert!(
        f.mock.n_requests(RDKafkaApiKey::InitProducerId) > inits_after_produce,
        "a new producer was initialised after the fenced commit"
    );

    let repeats = finish(&f, relay, 3).await;
    println!("two fenced producers replaced: 0 lost, order kept, {repeats} repeats");
}

/// An init_transactions that fails: InitProducerId answered TRANSACTIONAL_ID_AUTHORIZATION_FAILED
/// is fatal for the producer (librdkafka's `rd_kafka_idemp_check_error`), so the relay must drop
/// it and try again with another, with backoff; interleaved retriable errors are retried inside
/// librdkafka. The errors are there before the relay starts: the first batch waits for an init
/// that succeeds, and then every row is delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_init_transactions_is_retried_until_one_succeeds_and_then_nothing_is_lost() {
    let f = fixture("txn_faults_init").await;
    let init = f.mock.inject(
        RDKafkaApiKey::InitProducerId,
        &[
            RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
            RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        ],
    );
    let relay = relay_for(&f);
    phase(&f, "the first phase is delivered after two failed inits").await;
    f.mock.assert_served(&init);
    assert!(
        f.mock.n_requests(RDKafkaApiKey::InitProducerId) > init.before + init.n,
        "an init succeeded after the injected errors"
    );
    phase(&f, "the second phase is delivered").await;

    let repeats = finish(&f, relay, 2).await;
    assert_eq!(repeats, 0, "no record was written before an init succeeded");
}
