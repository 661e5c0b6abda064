//! Exactly-once delivery's Kafka side: the transactional producer's calls (init, begin, commit
//! with the checkpoint record, abort), what their errors mean ([`TxnError`]), the checkpoint
//! topic (created compacted if missing) and the read of its last committed record.
//!
//! librdkafka's transactional calls block (they wait for the coordinator), so each runs on the
//! blocking pool. A transaction's records are the batch's and one checkpoint record, keyed by
//! the outbox's identity, naming the rows the transaction publishes (`checkpoint_record`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::checkpoint_record::{ranges, CheckpointRecord, SetAside, VERSION};
use crate::config::{KafkaConfig, TestFault};
use crate::events;

use super::client::KafkaClient;
use super::record::Record;
use super::Publisher;

/// How long one transactional call may wait for the coordinator.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a commit that failed with a retriable error (a timeout, the coordinator
/// moving) is tried again before its outcome counts as unknown.
const COMMIT_ATTEMPTS: u32 = 3;

/// Producer properties exactly-once delivery sets on top of posthorn's defaults.
/// `transaction.timeout.ms` bounds how long the coordinator keeps a transaction open without
/// hearing from its producer (a dead leader's open transaction is aborted by then, or at once by
/// the next leader's init); `message.timeout.ms` is shorter, so a record that cannot be written
/// fails, and its transaction is aborted and tried again, before the coordinator gives up on it.
/// A batch normally takes milliseconds; these bound a broker outage.
pub(super) const TRANSACTIONAL: &[(&str, &str)] = &[
    ("transaction.timeout.ms", "60000"),
    ("message.timeout.ms", "30000"),
    // A gap cannot reach a read_committed consumer: the transaction with the failed record is
    // aborted as a whole. So no fatal error for it (the idempotent producer's guard).
    ("enable.gapless.guarantee", "false"),
];

/// What exactly-once's producer needs besides the Kafka settings.
#[derive(Debug, Clone)]
pub(crate) struct TxnSettings {
    pub(crate) transactional_id: String,
    pub(crate) checkpoint_topic: String,
    /// The outbox's identity: the checkpoint records' key.
    pub(crate) outbox: Uuid,
    /// `schema.table`, written into each checkpoint record.
    pub(crate) table: String,
    /// The lease epoch the producer publishes with.
    pub(crate) epoch: i64,
    /// Transactions this leader began, across its producers.
    pub(crate) counter: Arc<AtomicU64>,
    pub(crate) test_fault: Option<TestFault>,
}

/// A producer's transactional state.
pub(super) struct Txn {
    pub(super) settings: TxnSettings,
    initialised: AtomicBool,
    /// The number of the transaction begun last.
    current: AtomicU64,
}

impl Txn {
    pub(super) fn new(settings: TxnSettings) -> Txn {
        Txn {
            settings,
            initialised: AtomicBool::new(false),
            current: AtomicU64::new(0),
        }
    }
}

/// What a transactional call's failure means for the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TxnError {
    /// The transaction cannot commit (a record failed, the broker refused a step): abort it
    /// and publish its rows again.
    #[error("{0}")]
    Abortable(String),
    /// A newer producer with this `transactional.id` was initialised: this one may write
    /// nothing more. Its leader has lost the lease, or another relay uses the same id.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The producer is unusable, or a commit's outcome is unknown: drop it and lead afresh
    /// (init, then the checkpoint topic says what committed).
    #[error("{0}")]
    Fatal(String),
    /// The call may succeed if made again (init while the coordinator loads).
    #[error("{0}")]
    Retriable(String),
}

/// What librdkafka says of a failed transactional call.
struct Verdict {
    code: Option<RDKafkaErrorCode>,
    fatal: bool,
    abortable: bool,
    retriable: bool,
}

impl TxnError {
    fn of(err: &KafkaError) -> TxnError {
        let verdict = match err {
            KafkaError::Transaction(rd) => Verdict {
                code: Some(rd.code()),
                fatal: rd.is_fatal(),
                abortable: rd.txn_requires_abort(),
                retriable: rd.is_retriable(),
            },
            other => Verdict {
                code: other.rdkafka_error_code(),
                fatal: true,
                abortable: false,
                retriable: false,
            },
        };
        TxnError::classify(&verdict, err.to_string())
    }

    fn classify(verdict: &Verdict, text: String) -> TxnError {
        let fenced = matches!(
            verdict.code,
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        );
        if fenced {
            TxnError::Fenced(text)
        } else if verdict.fatal {
            TxnError::Fatal(text)
        } else if verdict.abortable {
            TxnError::Abortable(text)
        } else if verdict.retriable {
            TxnError::Retriable(text)
        } else {
            TxnError::Fatal(text)
        }
    }
}

/// `rd_kafka_commit_transaction`, called directly. rdkafka's `commit_transaction` first runs a
/// flush loop of its own that, when another thread serves the producer's events (the relay's
/// poll thread does), can wait out a whole 100 ms poll for an event that thread took: measured
/// with the bench, 100 ms added to an occasional commit. librdkafka's commit flushes by itself
/// first, serving events in rounds of at most 10 ms; every record is acknowledged by then.
fn commit_now(
    producer: &rdkafka::producer::BaseProducer<KafkaClient>,
    timeout: Duration,
) -> Result<(), TxnError> {
    use rdkafka::bindings as rd;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `native_ptr` is a live rd_kafka_t for as long as `producer` is borrowed; the
    // call blocks for at most `timeout_ms`.
    let error =
        unsafe { rd::rd_kafka_commit_transaction(producer.client().native_ptr(), timeout_ms) };
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is an rd_kafka_error_t that we own: read, then destroyed once.
    let (verdict, text) = unsafe {
        let verdict = Verdict {
            code: Some(RDKafkaErrorCode::from(rd::rd_kafka_error_code(error))),
            fatal: rd::rd_kafka_error_is_fatal(error) != 0,
            abortable: rd::rd_kafka_error_txn_requires_abort(error) != 0,
            retriable: rd::rd_kafka_error_is_retriable(error) != 0,
        };
        let text = std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error))
            .to_string_lossy()
            .into_owned();
        rd::rd_kafka_error_destroy(error);
        (verdict, text)
    };
    Err(TxnError::classify(
        &verdict,
        format!("Transaction error: {text}"),
    ))
}

/// How many commits this process made: the test fault points count them.
static COMMITS: AtomicU64 = AtomicU64::new(0);

impl Publisher {
    /// Whether this producer publishes in transactions.
    pub(crate) fn is_transactional(&self) -> bool {
        self.txn.is_some()
    }

    fn txn(&self) -> Result<&Txn, TxnError> {
        self.txn
            .as_ref()
            .ok_or_else(|| TxnError::Fatal("not a transactional producer".to_owned()))
    }

    /// Runs a blocking transactional call on the blocking pool.
    async fn blocking<F>(&self, call: F) -> Result<(), TxnError>
    where
        F: FnOnce(&rdkafka::producer::BaseProducer<KafkaClient>) -> Result<(), KafkaError>
            + Send
            + 'static,
    {
        let producer = self.producer.producer.clone();
        tokio::task::spawn_blocking(move || call(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
            .map_err(|err| TxnError::of(&err))
    }

    /// `init_transactions`, once per producer: fences every older producer with the same
    /// `transactional.id` and aborts the transaction one left open. Retried while the
    /// coordinator asks for it.
    pub(crate) async fn init_transactions(&self) -> Result<(), TxnError> {
        let txn = self.txn()?;
        if txn.initialised.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut attempts = 0;
        loop {
            match self.blocking(|p| p.init_transactions(CALL_TIMEOUT)).await {
                Ok(()) => break,
                Err(TxnError::Retriable(_)) if attempts < 2 => attempts += 1,
                Err(err) => return Err(err),
            }
        }
        txn.initialised.store(true, Ordering::Release);
        events::TransactionsInitialised {
            transactional_id: &txn.settings.transactional_id,
            epoch: txn.settings.epoch,
        }
        .emit();
        Ok(())
    }

    /// Begins a transaction (after `init_transactions` if this producer has not made it).
    pub(crate) async fn begin_transaction(&self) -> Result<(), TxnError> {
        self.init_transactions().await?;
        let txn = self.txn()?;
        self.producer
            .begin_transaction()
            .map_err(|err| TxnError::of(&err))?;
        let n = txn.settings.counter.fetch_add(1, Ordering::Relaxed) + 1;
        txn.current.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the checkpoint record naming `published` and `set_aside`, then commits. Returns
    /// the transaction's number. A commit refused as abortable is the caller's to abort.
    pub(crate) async fn commit_transaction(
        &self,
        published: &[i64],
        set_aside: Vec<SetAside>,
    ) -> Result<u64, TxnError> {
        let txn = self.txn()?;
        let settings = &txn.settings;
        let number = txn.current.load(Ordering::Relaxed);
        let record = CheckpointRecord {
            version: VERSION,
            outbox: settings.outbox,
            table: settings.table.clone(),
            epoch: settings.epoch,
            transaction: number,
            published: ranges(published),
            set_aside,
        };
        let key = settings.outbox.to_string();
        let value = record.to_json();
        let checkpoint = Record {
            topic: settings.checkpoint_topic.clone(),
            key: key.as_bytes(),
            value: Some(value.as_slice()),
            headers: rdkafka::message::OwnedHeaders::new(),
        };
        self.send_one(checkpoint)
            .await
            .map_err(|err| TxnError::Abortable(format!("writing the checkpoint record: {err}")))?;
        let n_commit = COMMITS.fetch_add(1, Ordering::Relaxed) + 1;
        if settings.test_fault == Some(TestFault::StopBeforeCommit(n_commit)) {
            stop_this_process();
        }
        let mut attempts = 0;
        loop {
            let producer = self.producer.producer.clone();
            let committed =
                tokio::task::spawn_blocking(move || commit_now(&producer, CALL_TIMEOUT))
                    .await
                    .unwrap_or_else(|_| {
                        Err(TxnError::Fatal("the commit's thread panicked".into()))
                    });
            match committed {
                Ok(()) => break,
                Err(TxnError::Retriable(_)) if attempts + 1 < COMMIT_ATTEMPTS => attempts += 1,
                // Committed or not: only the checkpoint topic can tell.
                Err(TxnError::Retriable(err)) => {
                    return Err(TxnError::Fatal(format!(
                        "the commit's outcome is unknown: {err}"
                    )))
                }
                Err(err) => return Err(err),
            }
        }
        if settings.test_fault == Some(TestFault::CrashAfterCommit(n_commit)) {
            events::TestFaultFired {
                point: "crash-after-commit",
            }
            .emit();
            std::process::abort();
        }
        Ok(number)
    }

    /// Aborts the open transaction: none of its records reaches a read_committed consumer.
    pub(crate) async fn abort_transaction(&self) -> Result<(), TxnError> {
        self.txn()?;
        let mut attempts = 0;
        loop {
            match self.blocking(|p| p.abort_transaction(CALL_TIMEOUT)).await {
                Ok(()) => return Ok(()),
                Err(TxnError::Retriable(_)) if attempts < 2 => attempts += 1,
                Err(TxnError::Retriable(err) | TxnError::Abortable(err)) => {
                    return Err(TxnError::Fatal(err))
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// The test fault point `stop-before-commit`: the process stops itself (SIGSTOP) and goes on
/// when a test sends SIGCONT.
fn stop_this_process() {
    events::TestFaultFired {
        point: "stop-before-commit",
    }
    .emit();
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &std::process::id().to_string()])
        .status();
}

/// A client config with the user's properties (security, SASL) and none of the producer's.
fn side_client_config(kafka: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        config.set(k, v);
    }
    config.set("client.id", client_id);
    config
}

/// Creates the checkpoint topic, compacted with one partition, unless it exists. Not being
/// allowed to create it is no error if it exists.
pub(crate) async fn ensure_checkpoint_topic(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<(), TxnError> {
    let mut config = side_client_config(kafka, "posthorn-admin");
    // A metadata request must never create it with the broker's defaults (not compacted).
    config.set("allow.auto.create.topics", "false");
    let admin: Arc<AdminClient<KafkaClient>> = Arc::new(
        config
            .create_with_context(KafkaClient::Probe)
            .map_err(|err| TxnError::Fatal(err.to_string()))?,
    );
    // There already (created by an operator, or by an earlier leader): nothing to ask for, and
    // no need to be allowed to create topics.
    let exists = {
        let admin = admin.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || topic_exists(admin.inner(), &topic))
            .await
            .unwrap_or(false)
    };
    if exists {
        return Ok(());
    }
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        // Compact within minutes rather than the default week, so the next leader's read of the
        // topic stays short.
        .set("segment.ms", "600000")
        .set("min.cleanable.dirty.ratio", "0.1");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&[new], &options)
        .await
        .map_err(|err| TxnError::Retriable(format!("creating {topic}: {err}")))?;
    for result in results {
        match result {
            Ok(_) => events::CheckpointTopicCreated { topic }.emit(),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                // Perhaps not allowed to create topics: fine if it is there.
                let exists = topic_exists(admin.inner(), topic);
                if !exists {
                    return Err(TxnError::Retriable(format!(
                        "the checkpoint topic {topic} does not exist and creating it failed: \
                         {code}; create it (compacted, one partition) or set \
                         POSTHORN_CHECKPOINT_TOPIC"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn topic_exists(client: &rdkafka::client::Client<KafkaClient>, topic: &str) -> bool {
    client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map(|m| {
            m.topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(false)
}

/// How far from each partition's end the read of the checkpoint topic starts: with one outbox
/// per topic the last record is among the last few offsets (one record and one commit or abort
/// marker a transaction). If the tail holds none for this outbox, the whole partition is read.
const TAIL: i64 = 64;

/// The last committed checkpoint record of `outbox` in `topic`, read `read_committed` to the
/// end. Call it after `init_transactions`: then no transaction of this outbox is still open, and
/// the end a read_committed reader reaches is the log's end.
pub(crate) async fn last_checkpoint(
    kafka: &KafkaConfig,
    topic: &str,
    outbox: Uuid,
) -> Result<Option<CheckpointRecord>, TxnError> {
    let config = {
        let mut c = side_client_config(kafka, "posthorn-checkpoint-reader");
        c.set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .set("group.id", format!("posthorn-checkpoint-reader-{outbox}"));
        c
    };
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_last(&config, &topic, outbox))
        .await
        .unwrap_or_else(|_| Err(TxnError::Retriable("the checkpoint read panicked".into())))
}

fn read_last(
    config: &ClientConfig,
    topic: &str,
    outbox: Uuid,
) -> Result<Option<CheckpointRecord>, TxnError> {
    let retriable = |what: &str, err: KafkaError| TxnError::Retriable(format!("{what}: {err}"));
    let consumer: BaseConsumer<KafkaClient> = config
        .create_with_context(KafkaClient::Probe)
        .map_err(|err| TxnError::Fatal(err.to_string()))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .map_err(|err| retriable("reading the checkpoint topic's metadata", err))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(TxnError::Retriable(format!(
            "the checkpoint topic {topic} has no partitions (does it exist?)"
        )));
    }
    let key = outbox.to_string();
    let mut bounds = Vec::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, CALL_TIMEOUT)
            .map_err(|err| retriable("reading the checkpoint topic's offsets", err))?;
        bounds.push((p, low, high));
    }
    // The tail first; the whole topic only if the tail names nothing of this outbox.
    for whole in [false, true] {
        let mut assignment = TopicPartitionList::new();
        let mut n_assigned = 0;
        for &(p, low, high) in &bounds {
            if high <= low {
                continue;
            }
            let start = if whole { low } else { (high - TAIL).max(low) };
            if whole && start == (high - TAIL).max(low) {
                continue; // read in full already
            }
            assignment
                .add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|err| retriable("assigning the checkpoint topic", err))?;
            n_assigned += 1;
        }
        if n_assigned == 0 {
            return Ok(None);
        }
        let found = read_assigned(&consumer, &assignment, n_assigned, &key)?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Reads the assigned partitions to their end; the last record keyed `key`, parsed.
fn read_assigned(
    consumer: &BaseConsumer<KafkaClient>,
    assignment: &TopicPartitionList,
    n_partitions: usize,
    key: &str,
) -> Result<Option<CheckpointRecord>, TxnError> {
    consumer
        .assign(assignment)
        .map_err(|err| TxnError::Retriable(format!("assigning the checkpoint topic: {err}")))?;
    let deadline = std::time::Instant::now() + CALL_TIMEOUT;
    let mut at_end = std::collections::HashSet::new();
    // The last record keyed `key` (a tombstone, None: an operator reset the checkpoint).
    let mut last: Option<(i32, i64, Option<CheckpointRecord>)> = None;
    while at_end.len() < n_partitions {
        if std::time::Instant::now() > deadline {
            return Err(TxnError::Retriable(format!(
                "reading the checkpoint topic to its end took longer than {CALL_TIMEOUT:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(err)) => {
                return Err(TxnError::Retriable(format!(
                    "reading the checkpoint topic: {err}"
                )))
            }
            Some(Ok(message)) => {
                if message.key() != Some(key.as_bytes()) {
                    continue;
                }
                let record = match message.payload() {
                    None => None,
                    Some(value) => Some(CheckpointRecord::from_json(value).map_err(|err| {
                        TxnError::Fatal(format!(
                            "the checkpoint record at offset {} of partition {} is not one \
                             posthorn wrote: {err}",
                            message.offset(),
                            message.partition()
                        ))
                    })?),
                };
                let later = last
                    .as_ref()
                    .is_none_or(|(p, o, _)| *p != message.partition() || *o < message.offset());
                if later {
                    last = Some((message.partition(), message.offset(), record));
                }
            }
        }
    }
    Ok(last.and_then(|(_, _, record)| record))
}
