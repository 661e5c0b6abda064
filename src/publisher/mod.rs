//! The only rdkafka code: producer settings, row → record, pipelined sends and delivery reports.
//!
//! A batch is sent as a pipeline: every record is handed to librdkafka without waiting, then the
//! delivery reports are collected. librdkafka keeps per-partition order with the idempotent
//! producer, so rows sent in id order reach each partition in id order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::admin::AdminClient;
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, PurgeConfig};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::acks::Tracker;
use crate::config::{
    is_secret_property, kafka_property_var, topic_name_problem, ConfigError, KafkaConfig,
    TopicTemplate,
};
use crate::events;
use crate::outbox::OutboxRow;
use crate::shutdown::Shutdown;

/// Header names posthorn sets on every record; a row's own `headers` may not use them.
/// (`content-type` is set on records with a value: tombstones have none.) One list for the
/// relay and the writer, which refuses them when an event is built.
pub use posthorn_writer::RESERVED_HEADERS;

/// How often a waiting batch checks whether the producer died of a fatal error.
const FATAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// posthorn's producer defaults, applied before the user's `POSTHORN_KAFKA_*` properties.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("client.id", "posthorn"),
    // The promise: no duplicates from retries, per-partition order, every replica has it.
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // A failure that would leave a gap in a partition (a later record written, an earlier one
    // failed) becomes a fatal error instead; the relay then resumes from the oldest
    // unacknowledged row, so a gap cannot reorder a key.
    ("enable.gapless.guarantee", "true"),
    // Never fail a record for taking long: a broker outage holds the batch (backpressure) instead
    // of failing records whose later siblings may already be written.
    ("message.timeout.ms", "0"),
    // Java clients' partitioner, so keys land where Java producers and consumers expect them.
    ("partitioner", "murmur2_random"),
    // A batch's records are handed over at once, so they batch without lingering; linger only
    // delays the last ones. Measured on posthorn-bench (2 cores, medians of 3): 5 ms gave
    // drain 69k rows/s and p99 30 ms at 1k rows/s; 1 ms gave 77k and 14 ms; 0 gave 67k and
    // 20 ms (requests too small under load).
    ("linger.ms", "1"),
    // linger.ms already batches; Nagle on top only delays the last segment of a request
    // (measured: p99 commit-to-ack at 1k rows/s went from ~400 ms to ~90 ms without it).
    ("socket.nagle.disable", "true"),
];

#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("reading Kafka metadata from {brokers}: {source}")]
    Metadata { brokers: String, source: KafkaError },
}

/// Which of posthorn's Kafka clients librdkafka reports a global error for. The error goes to
/// `events` (rdkafka's default context would log it the same way); the producer's lost
/// connections count as Kafka reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaClient {
    /// The relay's producer.
    Producer,
    /// The readiness probe's client: its errors are expected while a broker is down, and
    /// `/readyz` reports them.
    Probe,
    /// `posthorn check`'s producer: the command prints its verdict, nothing else.
    Check,
}

impl ClientContext for KafkaClient {
    fn error(&self, error: KafkaError, reason: &str) {
        match self {
            KafkaClient::Producer => events::ProducerClientError {
                error: &error,
                reason,
                connection_lost: error.rdkafka_error_code()
                    == Some(RDKafkaErrorCode::BrokerTransportFailure),
            }
            .emit(),
            KafkaClient::Probe | KafkaClient::Check => events::ProbeClientError {
                error: &error,
                reason,
            }
            .emit(),
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        let volume = match self {
            KafkaClient::Producer => events::LogVolume::AsLibrdkafkaSays,
            KafkaClient::Probe | KafkaClient::Check => events::LogVolume::Debug,
        };
        events::LibrdkafkaLog {
            level,
            facility,
            message,
            volume,
        }
        .emit();
    }
}

/// Delivery reports go to the oneshot channel each record carries.
impl ProducerContext for KafkaClient {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, report_to: Self::DeliveryOpaque) {
        let report = match result {
            Ok(_) => Ok(()),
            Err((err, _)) => Err(err.clone()),
        };
        // The batch may have stopped waiting (shutdown): nobody to tell.
        let _ = report_to.send(report);
    }
}

/// How long the polling thread waits for librdkafka's events per call. rdkafka's own
/// `ThreadedProducer` polls every 100 ms, and each `poll` busy-waits through its last
/// sub-millisecond (it truncates the remaining time to whole milliseconds, then polls with 0):
/// measured with perf, ~1% of a core on an idle relay. A longer wait costs nothing (an event
/// wakes it at once) and cuts that to ~0.1%; it bounds only how long a dropped producer's
/// thread takes to notice.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// A `BaseProducer` with a thread of its own serving its events (delivery reports, errors).
struct PolledProducer {
    producer: Arc<BaseProducer<KafkaClient>>,
    stop: Arc<AtomicBool>,
}

impl PolledProducer {
    fn new(config: &ClientConfig, client: KafkaClient) -> Result<PolledProducer, KafkaError> {
        let producer: Arc<BaseProducer<KafkaClient>> =
            Arc::new(config.create_with_context(client)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_producer, thread_stop) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-poll".to_owned())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    thread_producer.poll(POLL_WAIT);
                    // The in-flight gauge, sampled here: after each poll the reports it served
                    // are out of librdkafka's count, and an idle producer is sampled once per
                    // POLL_WAIT, so the gauge never keeps a settled batch's count. One call (a
                    // queue lock) per poll, not per record.
                    events::ProducerQueue {
                        n_in_flight: thread_producer.in_flight_count(),
                    }
                    .emit();
                }
                // The last reference may be this one: librdkafka's destructor (purge, then
                // up to 500 ms serving the purged records' reports) runs here, off the runtime.
            })
            .map_err(|err| {
                KafkaError::ClientCreation(format!("starting the poll thread: {err}"))
            })?;
        Ok(PolledProducer { producer, stop })
    }
}

impl Drop for PolledProducer {
    fn drop(&mut self) {
        // Nothing is written after this: what is queued or in flight fails as purged.
        self.producer
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::ops::Deref for PolledProducer {
    type Target = BaseProducer<KafkaClient>;
    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

/// The idempotent producer and the rules that turn a row into a record.
pub struct Publisher {
    producer: PolledProducer,
    topic_template: TopicTemplate,
    brokers: String,
}

/// What the broker told `check`.
#[derive(Debug)]
pub struct ClusterInfo {
    pub brokers: Vec<String>,
    pub n_topics: usize,
}

impl Publisher {
    /// An idempotent producer with posthorn's defaults and the user's properties.
    pub fn idempotent(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
    ) -> Result<Publisher, PublisherError> {
        Publisher::with_client(kafka, topic_template, KafkaClient::Producer)
    }

    /// The relay's producer as `posthorn check` uses it (same settings, so the check refuses
    /// what the relay would), whose client errors are not logged: the check prints a verdict.
    pub fn idempotent_for_check(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
    ) -> Result<Publisher, PublisherError> {
        Publisher::with_client(kafka, topic_template, KafkaClient::Check)
    }

    fn with_client(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
        client: KafkaClient,
    ) -> Result<Publisher, PublisherError> {
        let config = client_config(kafka);
        let producer = PolledProducer::new(&config, client).map_err(creation_error)?;
        Ok(Publisher {
            producer,
            topic_template: topic_template.clone(),
            brokers: kafka.brokers.clone(),
        })
    }

    /// Sends the rows allowed by `tracker` and records each one's outcome in it. Returns when
    /// every sent record has its delivery report, or `grace` after `shutdown` fired, or as soon
    /// as `still_leader` says this instance lost the lease (then what is still queued is purged:
    /// a deposed leader must not write). If no acknowledgement arrives for `ack_stall`, the
    /// records are purged (they fail, and the relay replaces the producer): a producer whose
    /// state the broker lost (a broker restarted empty) never recovers by itself.
    pub async fn publish(
        &self,
        rows: &[OutboxRow],
        tracker: &mut Tracker<'_>,
        shutdown: &mut Shutdown,
        grace: Duration,
        still_leader: &(dyn Fn() -> bool + Sync),
        ack_stall: Duration,
    ) -> PublishReport {
        // A batch-level rejection names the row only when the row was sent alone.
        let alone = rows.len() == 1;
        let mut report = PublishReport::default();
        let mut pending = FuturesUnordered::new();
        // Per aggregate: the last row sent and its topic.
        let mut last_sent: HashMap<(&str, &str), (usize, String)> = HashMap::new();
        let mut purged = false;
        'send: for (i, row) in rows.iter().enumerate() {
            if !still_leader() {
                break 'send;
            }
            if !tracker.may_send(i) {
                tracker.withhold(i);
                continue;
            }
            let (topic, headers) = match self.prepare(row) {
                Ok(prepared) => prepared,
                Err(problem) => {
                    tracker.poison(i, problem);
                    continue;
                }
            };
            let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            // Within one partition the idempotent producer never writes a record after an
            // earlier one failed. Across topics nothing does: so a row bound for another topic
            // than its aggregate's previous row waits until that row is acknowledged.
            if let Some((j, previous_topic)) = last_sent.get(&aggregate) {
                let j = *j;
                if *previous_topic != topic {
                    while !tracker.is_settled(j) {
                        tokio::select! {
                            next = pending.next() => match next {
                                Some(sent) => report.add(settle(tracker, rows, sent, alone)),
                                None => break,
                            },
                            _ = shutdown.triggered() => break 'send,
                            _ = tokio::time::sleep(FATAL_CHECK_INTERVAL) => {
                                self.purge_if_fatal(&mut purged);
                            }
                        }
                    }
                    if !tracker.may_send(i) {
                        tracker.withhold(i);
                        continue;
                    }
                }
            }
            let (report_to, delivery) = oneshot::channel();
            let mut record =
                BaseRecord::<[u8], [u8], _>::with_opaque_to(&topic, Box::new(report_to))
                    .key(row.aggregate_id.as_bytes())
                    .headers(headers);
            if let Some(payload) = &row.payload {
                record = record.payload(payload.as_bytes());
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => {
                        let record_topic = topic.clone();
                        pending.push(async move { (i, record_topic, delivery.await) });
                        last_sent.insert(aggregate, (i, topic));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: wait for a delivery report to free room.
                        record = back;
                        match pending.next().await {
                            Some(sent) => report.add(settle(tracker, rows, sent, alone)),
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((err, _)) => {
                        // librdkafka refused the record itself (e.g. larger than
                        // message.max.bytes): a verdict on this record alone.
                        report.add(record_failure(tracker, i, &err, true));
                        break;
                    }
                }
            }
        }

        let mut deadline: Option<Instant> = None;
        if shutdown.is_triggered() {
            deadline = Some(Instant::now() + grace);
        }
        let mut last_progress = Instant::now();
        let mut n_pending = pending.len();
        while !pending.is_empty() {
            if pending.len() < n_pending {
                n_pending = pending.len();
                last_progress = Instant::now();
            } else if !purged && last_progress.elapsed() >= ack_stall {
                events::AcksStalled {
                    n_records: pending.len(),
                    waited: ack_stall,
                }
                .emit();
                self.purge();
                purged = true;
            }
            let stop_at = deadline.unwrap_or_else(Instant::now);
            tokio::select! {
                Some(sent) = pending.next() => report.add(settle(tracker, rows, sent, alone)),
                _ = shutdown.triggered(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(stop_at), if deadline.is_some() => break,
                _ = tokio::time::sleep(FATAL_CHECK_INTERVAL) => {
                    self.purge_if_fatal(&mut purged);
                    if !still_leader() {
                        self.purge();
                        break;
                    }
                }
            }
        }
        if !still_leader() {
            self.purge();
        }
        report
    }

    /// Drops every record not yet acknowledged: queued ones are never sent.
    fn purge(&self) {
        self.producer
            .purge(PurgeConfig::default().queue().inflight().non_blocking());
    }

    /// After a fatal error librdkafka produces nothing more, and records never time out here:
    /// purge them so that their delivery reports (failures) arrive and the batch settles.
    fn purge_if_fatal(&self, purged: &mut bool) {
        if !*purged && self.producer.client().fatal_error().is_some() {
            self.purge();
            *purged = true;
        }
    }

    /// The topic and headers for a row, or why Kafka could never accept it.
    fn prepare(&self, row: &OutboxRow) -> Result<(String, OwnedHeaders), String> {
        let topic = match &row.topic {
            Some(topic) => topic.clone(),
            None => self
                .topic_template
                .render(&row.aggregate_type, &row.event_type),
        };
        if let Some(problem) = topic_name_problem(&topic) {
            return Err(problem);
        }
        let own = match &row.headers {
            None => BTreeMap::new(),
            Some(json) => parse_headers(json)?,
        };
        let event_id = row.event_id.hyphenated().to_string();
        let outbox_id = row.id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(RESERVED_HEADERS.len() + own.len())
            .insert(header("event-id", &event_id))
            .insert(header("event-type", &row.event_type))
            .insert(header("aggregate-type", &row.aggregate_type))
            .insert(header("outbox-id", &outbox_id));
        if let Some(payload) = &row.payload {
            headers = headers.insert(header("content-type", payload.content_type()));
        }
        for (name, value) in &own {
            headers = headers.insert(header(name, value));
        }
        Ok((topic, headers))
    }

    /// Publishes poison rows to the dead-letter topic: the row's key, value (unless `payload`
    /// is [`DeadLetterPayload::Omit`]: header `posthorn-payload-omitted: true`) and headers, plus
    /// `posthorn-error` and `posthorn-original-topic`. Returns, per row, whether it got there.
    pub async fn dead_letter(
        &self,
        rows: &[(&OutboxRow, &str)],
        topic: &str,
        payload: DeadLetterPayload,
    ) -> Vec<Result<(), DeadLetterError>> {
        let mut results = Vec::with_capacity(rows.len());
        for (row, error) in rows {
            let result = self
                .dead_letter_one(row, error, topic, payload == DeadLetterPayload::Keep)
                .await;
            results.push(result.map_err(|err| DeadLetterError {
                too_large: matches!(
                    err.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::MessageBatchTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize
                    )
                ),
                message: describe(&err),
            }));
        }
        results
    }

    async fn dead_letter_one(
        &self,
        row: &OutboxRow,
        error: &str,
        topic: &str,
        with_payload: bool,
    ) -> Result<(), KafkaError> {
        let original_topic = match &row.topic {
            Some(t) => t.clone(),
            None => self
                .topic_template
                .render(&row.aggregate_type, &row.event_type),
        };
        let event_id = row.event_id.hyphenated().to_string();
        let outbox_id = row.id.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(header("event-id", &event_id))
            .insert(header("event-type", &row.event_type))
            .insert(header("aggregate-type", &row.aggregate_type))
            .insert(header("outbox-id", &outbox_id))
            .insert(header("posthorn-error", error))
            .insert(header("posthorn-original-topic", &original_topic));
        // The row's own headers may be what made it poison: copy them only when they parse.
        if let Some(Ok(own)) = row.headers.as_deref().map(parse_headers) {
            for (name, value) in &own {
                headers = headers.insert(header(name, value));
            }
        }
        let payload = row.payload.as_ref().filter(|_| with_payload);
        if row.payload.is_some() && payload.is_none() {
            headers = headers.insert(header("posthorn-payload-omitted", "true"));
        }
        if let Some(payload) = payload {
            headers = headers.insert(header("content-type", payload.content_type()));
        }
        let (report_to, delivery) = oneshot::channel();
        let mut record = BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, Box::new(report_to))
            .key(row.aggregate_id.as_bytes())
            .headers(headers);
        if let Some(payload) = payload {
            record = record.payload(payload.as_bytes());
        }
        match self.producer.send(record) {
            Ok(()) => delivery.await.unwrap_or(Err(KafkaError::Canceled)),
            Err((err, _)) => Err(err),
        }
    }

    /// Connects to a broker now, in the background, rather than when the first record is sent.
    /// librdkafka asks for the idempotent producer's id on a 500 ms timer, and only once a
    /// broker connection is up: connecting at once makes the id ready ~0.5 s after creation
    /// instead of ~1 s, which the first batch would otherwise wait for. A failure here is only
    /// a lost head start: sending reports the real error.
    pub fn connect_early(&self) {
        let producer = self.producer.producer.clone();
        tokio::task::spawn_blocking(move || {
            let _ = brokers_only_metadata(producer.client(), Duration::from_secs(10));
        });
    }

    /// Asks the cluster for its metadata (brokers, topics), as `check` does.
    pub async fn cluster_info(&self, timeout: Duration) -> Result<ClusterInfo, PublisherError> {
        let producer = self.producer.producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|m| {
                let brokers = m
                    .brokers()
                    .iter()
                    .map(|b| format!("{}:{} (id {})", b.host(), b.port(), b.id()))
                    .collect();
                ClusterInfo {
                    brokers,
                    n_topics: m.topics().len(),
                }
            })
        })
        .await
        .map_err(|_| PublisherError::Metadata {
            brokers: self.brokers.clone(),
            source: KafkaError::Canceled,
        })?;
        metadata.map_err(|source| PublisherError::Metadata {
            brokers: self.brokers.clone(),
            source,
        })
    }

    /// The fatal error that stopped this producer, if one did: it must be replaced.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Stops the producer: what it still holds is purged (never sent), and librdkafka's
    /// destructor runs on the polling thread, off the async runtime.
    pub async fn close(self) {
        drop(self);
    }
}

/// A light Kafka client of its own that answers "does a broker answer?" for `/readyz`, without
/// touching the relay's producer.
pub struct KafkaProbe {
    client: Arc<AdminClient<KafkaClient>>,
    brokers: String,
}

impl KafkaProbe {
    /// Connects with the user's properties (security, SASL) but none of the producer's.
    pub fn new(kafka: &KafkaConfig) -> Result<KafkaProbe, PublisherError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &kafka.properties {
            config.set(k, v);
        }
        config.set("client.id", "posthorn-probe");
        let client: AdminClient<KafkaClient> = config
            .create_with_context(KafkaClient::Probe)
            .map_err(creation_error)?;
        Ok(KafkaProbe {
            client: Arc::new(client),
            brokers: kafka.brokers.clone(),
        })
    }

    /// Asks a broker for the cluster's brokers (no topics: cheap on clusters with thousands of
    /// them), waiting at most `timeout`. Returns how many brokers the cluster has.
    pub async fn check(&self, timeout: Duration) -> Result<usize, PublisherError> {
        let client = self.client.clone();
        let metadata =
            tokio::task::spawn_blocking(move || brokers_only_metadata(client.inner(), timeout))
                .await
                .unwrap_or(Err(KafkaError::Canceled));
        metadata.map_err(|source| PublisherError::Metadata {
            brokers: self.brokers.clone(),
            source,
        })
    }
}

/// A metadata request for brokers only. rdkafka's safe `fetch_metadata` asks for one topic or
/// for all of them; librdkafka asks for none when given `all_topics = 0` and no topic handle
/// on a client that knows no topics, as the probe's client never does.
fn brokers_only_metadata<C: ClientContext>(
    client: &Client<C>,
    timeout: Duration,
) -> Result<usize, KafkaError> {
    use rdkafka::bindings as rd;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let mut metadata: *const rd::rd_kafka_metadata = std::ptr::null();
    // SAFETY: `native_ptr` is a live rd_kafka_t for as long as `client` is borrowed, and
    // `metadata` is a valid out-pointer; librdkafka blocks for at most `timeout_ms`.
    let code = unsafe {
        rd::rd_kafka_metadata(
            client.native_ptr(),
            0,
            std::ptr::null_mut(),
            &mut metadata,
            timeout_ms,
        )
    };
    if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(KafkaError::MetadataFetch(code.into()));
    }
    if metadata.is_null() {
        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail));
    }
    // SAFETY: on success librdkafka set `metadata` to a structure we own until we pass it to
    // rd_kafka_metadata_destroy, once, after the last read.
    let n_brokers = unsafe { (*metadata).broker_cnt };
    unsafe { rd::rd_kafka_metadata_destroy(metadata) };
    Ok(usize::try_from(n_brokers).unwrap_or(0))
}

/// A client librdkafka refused to create: an invalid property is a configuration error naming
/// its variable (but never a secret's value or librdkafka's description of it).
fn creation_error(err: KafkaError) -> PublisherError {
    match err {
        KafkaError::ClientConfig(_, description, property, _) => {
            let problem = if is_secret_property(&property) {
                "librdkafka rejected this property".to_owned()
            } else {
                format!("librdkafka rejected it: {description}")
            };
            PublisherError::Config(ConfigError::Invalid {
                var: kafka_property_var(&property),
                problem,
                example: "see the librdkafka CONFIGURATION.md for valid properties",
            })
        }
        other => PublisherError::Create(other),
    }
}

fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in DEFAULTS {
        config.set(*k, *v);
    }
    for (k, v) in &kafka.properties {
        config.set(k, v);
    }
    config
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// A row's `headers`: a JSON object of string → string, not using a reserved name.
fn parse_headers(json: &str) -> Result<BTreeMap<String, String>, String> {
    let map: BTreeMap<String, String> = serde_json::from_str(json)
        .map_err(|err| format!("headers are not a JSON object of strings ({err})"))?;
    if let Some(name) = map.keys().find(|k| RESERVED_HEADERS.contains(&k.as_str())) {
        return Err(format!(
            "headers use the reserved name '{name}', which posthorn sets itself"
        ));
    }
    Ok(map)
}

/// A record's delivery report: `Err(RecvError)` if the producer went away without one.
type Report = Result<Result<(), KafkaError>, oneshot::error::RecvError>;

/// A sent record: the row's index in the batch, its topic, and its delivery report.
type Sent = (usize, String, Report);

/// Whether a dead-letter record carries the row's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterPayload {
    Keep,
    Omit,
}

/// Why a row did not reach the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetterError {
    /// The record was refused as too large: try again without the payload.
    pub too_large: bool,
    pub message: String,
}

/// What went wrong in a batch, beyond each row's outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishReport {
    /// Records Kafka failed for reasons that may pass (including a fatal producer error): the
    /// producer must be replaced before the next batch.
    pub n_transient: usize,
    /// Records failed by a rejection of their whole record batch (too large, invalid): one of
    /// the batch's rows is poison, but which is known only once each is sent alone.
    pub n_suspect: usize,
}

impl PublishReport {
    fn add(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Acked | Verdict::Poison => {}
            Verdict::Transient => self.n_transient += 1,
            Verdict::Suspect => self.n_suspect += 1,
        }
    }
}

/// How one record's delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Acked,
    Transient,
    Suspect,
    Poison,
}

/// Records a delivery report in the tracker.
fn settle(tracker: &mut Tracker<'_>, rows: &[OutboxRow], sent: Sent, alone: bool) -> Verdict {
    let (i, topic, report) = sent;
    match report {
        Ok(Ok(())) => {
            tracker.ack(i);
            events::RecordAcknowledged {
                topic: &topic,
                created_at_us: rows[i].created_at_us,
            }
            .emit();
            Verdict::Acked
        }
        Ok(Err(err)) => record_failure(tracker, i, &err, alone),
        Err(_canceled) => {
            tracker.fail(
                i,
                "the producer closed before the record's delivery report".to_owned(),
            );
            Verdict::Transient
        }
    }
}

/// Classifies a failed record and records it in the tracker. `about_this_record` says the
/// error is a verdict on this record alone (it was refused locally, or sent alone).
fn record_failure(
    tracker: &mut Tracker<'_>,
    i: usize,
    err: &KafkaError,
    about_this_record: bool,
) -> Verdict {
    let verdict = classify(err.rdkafka_error_code(), about_this_record);
    match verdict {
        Verdict::Poison => tracker.poison(i, describe(err)),
        _ => tracker.fail(i, describe(err)),
    }
    verdict
}

fn classify(code: Option<RDKafkaErrorCode>, about_this_record: bool) -> Verdict {
    use RDKafkaErrorCode as C;
    match code {
        // Decided per topic: every record for that topic would fail the same way.
        Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::InvalidTopic) => Verdict::Poison,
        // Decided per record batch: poison only when the batch held this record alone.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidMessage,
        ) => {
            if about_this_record {
                Verdict::Poison
            } else {
                Verdict::Suspect
            }
        }
        _ => Verdict::Transient,
    }
}

fn describe(err: &KafkaError) -> String {
    format!("Kafka: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_must_be_an_object_of_strings() {
        assert_eq!(
            parse_headers(r#"{"a": "1", "b": "x"}"#).expect("valid")["b"],
            "x"
        );
        assert!(parse_headers(r#"{"a": 1}"#).is_err());
        assert!(parse_headers(r#"["a"]"#).is_err());
        let err = parse_headers(r#"{"event-id": "x"}"#).expect_err("reserved");
        assert!(err.contains("reserved name 'event-id'"), "{err}");
    }

    #[test]
    fn batch_level_rejections_are_poison_only_for_a_record_sent_alone() {
        use RDKafkaErrorCode as C;
        assert_eq!(
            classify(Some(C::MessageSizeTooLarge), false),
            Verdict::Suspect
        );
        assert_eq!(
            classify(Some(C::MessageSizeTooLarge), true),
            Verdict::Poison
        );
        assert_eq!(
            classify(Some(C::UnknownTopicOrPartition), false),
            Verdict::Poison
        );
        assert_eq!(
            classify(Some(C::NotEnoughReplicas), true),
            Verdict::Transient
        );
        assert_eq!(
            classify(Some(C::OutOfOrderSequenceNumber), true),
            Verdict::Transient
        );
        assert_eq!(
            classify(Some(C::TopicAuthorizationFailed), true),
            Verdict::Transient
        );
        assert_eq!(classify(None, true), Verdict::Transient);
    }

    #[test]
    fn user_properties_override_defaults() {
        let kafka = KafkaConfig {
            brokers: "k:9092".into(),
            properties: [("linger.ms".to_owned(), "50".to_owned())].into(),
        };
        let config = client_config(&kafka);
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("bootstrap.servers"), Some("k:9092"));
    }
}
