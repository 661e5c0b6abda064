//! The only rdkafka code: producer settings, row → record, pipelined sends and delivery reports.
//!
//! A batch is sent as a pipeline: every record is handed to librdkafka without waiting, then the
//! delivery reports are collected. librdkafka keeps per-partition order with the idempotent
//! producer, so rows sent in id order reach each partition in id order.

mod client;
mod probe;
mod record;
mod transaction;
mod verdict;

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::acks::Tracker;
use crate::config::{
    is_secret_property, kafka_property_var, ConfigError, KafkaConfig, TopicTemplate,
};
use crate::events;
use crate::row::{OutboxRow, Poison};
use crate::shutdown::Shutdown;

use client::{KafkaClient, PolledProducer};
use record::Record;
use verdict::{record_failure, settle};

pub(crate) use probe::KafkaProbe;
pub(crate) use record::DeadLetterPayload;
pub(crate) use transaction::{ensure_checkpoint_topic, last_checkpoint, TxnError, TxnSettings};
pub(crate) use verdict::{DeadLetterError, FatalError, PublishReport};

/// Header names posthorn sets on every record; a row's own `headers` may not use them.
/// (`content-type` is set on records with a value: tombstones have none.) One list for the
/// relay and the writer, which refuses them when an event is built.
pub use posthorn_writer::RESERVED_HEADERS;

/// A batch's delivery reports as they arrive: each settles its row in the tracker.
struct Reports<'b, 't> {
    tracker: &'b mut Tracker<'t>,
    rows: &'b [OutboxRow],
    /// A batch-level rejection names the row only when the row was sent alone.
    scope: verdict::Scope,
    report: PublishReport,
}

impl Reports<'_, '_> {
    fn settle(&mut self, sent: verdict::Sent) {
        self.report
            .add(settle(self.tracker, self.rows, sent, self.scope));
    }
}

/// What ends the wait for a batch's delivery reports besides the reports themselves.
struct Waiting<'a> {
    shutdown: &'a mut Shutdown,
    grace: Duration,
    still_leader: &'a (dyn Fn() -> bool + Sync),
    ack_stall: Duration,
}

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

/// The idempotent (or transactional) producer and the rules that turn a row into a record.
pub(crate) struct Publisher {
    producer: PolledProducer,
    topic_template: TopicTemplate,
    brokers: String,
    /// Exactly once: the transactional state; none for the idempotent producer.
    txn: Option<transaction::Txn>,
}

/// What the broker told `check`.
#[derive(Debug)]
pub(crate) struct ClusterInfo {
    pub(crate) brokers: Vec<String>,
    pub(crate) n_topics: usize,
}

impl Publisher {
    /// An idempotent producer with posthorn's defaults and the user's properties.
    pub(crate) fn idempotent(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
    ) -> Result<Publisher, PublisherError> {
        Publisher::with_client(kafka, topic_template, KafkaClient::Producer)
    }

    /// The relay's producer as `posthorn check` uses it (same settings, so the check refuses
    /// what the relay would), whose client errors are not logged: the check prints a verdict.
    pub(crate) fn idempotent_for_check(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
    ) -> Result<Publisher, PublisherError> {
        Publisher::with_client(kafka, topic_template, KafkaClient::Check)
    }

    /// Exactly once's producer: posthorn's defaults, the transactional ones on top
    /// (`transaction::TRANSACTIONAL`), the user's properties, and `settings.transactional_id`.
    /// It publishes nothing before `init_transactions`.
    pub(crate) fn transactional(
        kafka: &KafkaConfig,
        topic_template: &TopicTemplate,
        settings: TxnSettings,
    ) -> Result<Publisher, PublisherError> {
        let mut config = client_config(kafka);
        for (k, v) in transaction::TRANSACTIONAL {
            if !kafka.properties.contains_key(*k) {
                config.set(*k, *v);
            }
        }
        config.set("transactional.id", &settings.transactional_id);
        let producer =
            PolledProducer::new(&config, KafkaClient::Producer).map_err(creation_error)?;
        Ok(Publisher {
            producer,
            topic_template: topic_template.clone(),
            brokers: kafka.brokers.clone(),
            txn: Some(transaction::Txn::new(settings)),
        })
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
            txn: None,
        })
    }

    /// Sends the rows allowed by `tracker` and records each one's outcome in it. Returns when
    /// every sent record has its delivery report, or `grace` after `shutdown` fired, or as soon
    /// as `still_leader` says this instance lost the lease (then what is still queued is purged:
    /// a deposed leader must not write). If no acknowledgement arrives for `ack_stall`, the
    /// records are purged (they fail, and the relay replaces the producer): a producer whose
    /// state the broker lost (a broker restarted empty) never recovers by itself.
    pub(crate) async fn publish(
        &self,
        rows: &[OutboxRow],
        tracker: &mut Tracker<'_>,
        shutdown: &mut Shutdown,
        grace: Duration,
        still_leader: &(dyn Fn() -> bool + Sync),
        ack_stall: Duration,
    ) -> PublishReport {
        // A batch-level rejection names the row only when the row was sent alone.
        let mut reports = Reports {
            tracker,
            rows,
            scope: verdict::Scope::of_batch(rows.len()),
            report: PublishReport::default(),
        };
        let mut pending = FuturesUnordered::new();
        // Per aggregate: the last row sent and its topic.
        let mut last_sent: HashMap<(&str, &str), (usize, String)> = HashMap::new();
        let mut purged = false;
        'send: for (i, row) in rows.iter().enumerate() {
            if !still_leader() {
                break 'send;
            }
            if !reports.tracker.may_send(i) {
                reports.tracker.withhold(i);
                continue;
            }
            let Record {
                topic,
                key,
                value,
                headers,
            } = match record::record(row, &self.topic_template) {
                Ok(record) => record,
                Err(poison) => {
                    reports.tracker.poison(i, poison);
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
                    while !reports.tracker.is_settled(j) {
                        tokio::select! {
                            next = pending.next() => match next {
                                Some(sent) => reports.settle(sent),
                                None => break,
                            },
                            _ = shutdown.triggered() => break 'send,
                            _ = tokio::time::sleep(FATAL_CHECK_INTERVAL) => {
                                self.purge_if_fatal(&mut purged);
                            }
                        }
                    }
                    if !reports.tracker.may_send(i) {
                        reports.tracker.withhold(i);
                        continue;
                    }
                }
            }
            let (report_to, delivery) = oneshot::channel();
            let mut record =
                BaseRecord::<[u8], [u8], _>::with_opaque_to(&topic, Box::new(report_to))
                    .key(key)
                    .headers(headers);
            if let Some(value) = value {
                record = record.payload(value);
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
                            Some(sent) => reports.settle(sent),
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((err, _)) => {
                        // librdkafka refused the record itself (e.g. larger than
                        // message.max.bytes): a verdict on this record alone.
                        reports.report.add(record_failure(
                            reports.tracker,
                            i,
                            &err,
                            verdict::Scope::ThisRecord,
                        ));
                        break;
                    }
                }
            }
        }

        let waiting = Waiting {
            shutdown,
            grace,
            still_leader,
            ack_stall,
        };
        self.await_reports(&mut pending, &mut reports, purged, waiting)
            .await;
        reports.report
    }

    /// Collects the delivery reports of the records sent, until every one has arrived, or
    /// `grace` after the stop signal, or the lease is lost (then what is queued is purged). A
    /// batch with no acknowledgement for `ack_stall` is purged once: its records fail.
    async fn await_reports<F: std::future::Future<Output = verdict::Sent>>(
        &self,
        pending: &mut FuturesUnordered<F>,
        reports: &mut Reports<'_, '_>,
        mut purged: bool,
        waiting: Waiting<'_>,
    ) {
        let Waiting {
            shutdown,
            grace,
            still_leader,
            ack_stall,
        } = waiting;
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
                Some(sent) = pending.next() => reports.settle(sent),
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

    /// Publishes poison rows to the dead-letter topic (`record::dead_letter_record`), one at a
    /// time. Returns, per row, whether it got there.
    ///
    /// A transactional producer sends them in one transaction, whose checkpoint record sets
    /// them aside: if it cannot commit, none got there.
    pub(crate) async fn dead_letter(
        &self,
        rows: &[(&OutboxRow, Poison)],
        topic: &str,
        payload: DeadLetterPayload,
    ) -> Vec<Result<(), DeadLetterError>> {
        if !self.is_transactional() {
            return self.dead_letter_each(rows, topic, payload).await;
        }
        if let Err(err) = self.begin_transaction().await {
            let refused = DeadLetterError::Refused(err.to_string());
            return rows.iter().map(|_| Err(refused.clone())).collect();
        }
        let mut results = self.dead_letter_each(rows, topic, payload).await;
        let set_aside: Vec<crate::checkpoint_record::SetAside> = rows
            .iter()
            .zip(&results)
            .filter(|(_, result)| result.is_ok())
            .map(|((row, reason), _)| crate::checkpoint_record::SetAside {
                id: row.id,
                reason: crate::row::Poisoned {
                    reason: reason.clone(),
                    dead_letter_topic: Some(topic.to_owned()),
                }
                .to_string(),
            })
            .collect();
        let outcome = if set_aside.is_empty() {
            Err(TxnError::Abortable("nothing was dead-lettered".to_owned()))
        } else {
            self.commit_transaction(&[], set_aside).await.map(|_| ())
        };
        match outcome {
            Ok(()) => events::TransactionCommitted {
                n_records: rows.len(),
            }
            .emit(),
            Err(err) => {
                let aborted = match &err {
                    TxnError::Abortable(_) => self.abort_transaction().await,
                    _ => Err(err.clone()),
                };
                events::TransactionAborted {
                    reason: &err.to_string(),
                    producer_lost: aborted.is_err(),
                }
                .emit();
                for result in results.iter_mut().filter(|r| r.is_ok()) {
                    *result = Err(DeadLetterError::Refused(format!(
                        "its transaction did not commit: {err}"
                    )));
                }
            }
        }
        results
    }

    /// Each row to the dead-letter topic, one at a time.
    async fn dead_letter_each(
        &self,
        rows: &[(&OutboxRow, Poison)],
        topic: &str,
        payload: DeadLetterPayload,
    ) -> Vec<Result<(), DeadLetterError>> {
        let mut results = Vec::with_capacity(rows.len());
        for (row, reason) in rows {
            let record =
                record::dead_letter_record(row, reason, topic, &self.topic_template, payload);
            let result = self.send_one(record).await;
            results.push(result.map_err(|err| DeadLetterError::of(&err)));
        }
        results
    }

    /// Sends one record and waits for its delivery report.
    async fn send_one(&self, record: Record<'_>) -> Result<(), KafkaError> {
        let (report_to, delivery) = oneshot::channel();
        let mut base =
            BaseRecord::<[u8], [u8], _>::with_opaque_to(&record.topic, Box::new(report_to))
                .key(record.key)
                .headers(record.headers);
        if let Some(value) = record.value {
            base = base.payload(value);
        }
        match self.producer.send(base) {
            Ok(()) => delivery.await.unwrap_or(Err(KafkaError::Canceled)),
            Err((err, _)) => Err(err),
        }
    }

    /// Connects to a broker now, in the background, rather than when the first record is sent.
    /// librdkafka asks for the idempotent producer's id on a 500 ms timer, and only once a
    /// broker connection is up: connecting at once makes the id ready ~0.5 s after creation
    /// instead of ~1 s, which the first batch would otherwise wait for. A failure here is only
    /// a lost head start: sending reports the real error.
    pub(crate) fn connect_early(&self) {
        let producer = self.producer.producer.clone();
        tokio::task::spawn_blocking(move || {
            let _ = probe::brokers_only_metadata(producer.client(), Duration::from_secs(10));
        });
    }

    /// Asks the cluster for its metadata (brokers, topics), as `check` does.
    pub(crate) async fn cluster_info(
        &self,
        timeout: Duration,
    ) -> Result<ClusterInfo, PublisherError> {
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
    pub(crate) fn fatal_error(&self) -> Option<FatalError> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| FatalError::new(code, reason))
    }

    /// Stops the producer: what it still holds is purged (never sent), and librdkafka's
    /// destructor runs on the polling thread, off the async runtime.
    pub(crate) async fn close(self) {
        drop(self);
    }
}

/// A client librdkafka refused to create: an invalid property is a configuration error naming
/// its variable (but never a secret's value or librdkafka's description of it).
pub(crate) fn creation_error(err: KafkaError) -> PublisherError {
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

#[cfg(test)]
mod tests {
    use super::*;

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
