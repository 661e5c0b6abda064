//! The only rdkafka code: producer settings, row → record, pipelined sends and delivery reports.
//!
//! A batch is sent as a pipeline: every record is handed to librdkafka without waiting, then the
//! delivery reports are collected. librdkafka keeps per-partition order with the idempotent
//! producer, so rows sent in id order reach each partition in id order.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use crate::acks::Tracker;
use crate::config::{
    is_secret_property, kafka_property_var, topic_name_problem, ConfigError, KafkaConfig,
    TopicTemplate,
};
use crate::outbox::OutboxRow;
use crate::shutdown::Shutdown;

/// Header names posthorn sets on every record; a row's own `headers` may not use them.
pub const RESERVED_HEADERS: [&str; 4] = ["event-id", "event-type", "aggregate-type", "outbox-id"];

/// posthorn's producer defaults, applied before the user's `POSTHORN_KAFKA_*` properties.
const DEFAULTS: &[(&str, &str)] = &[
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
    ("linger.ms", "5"),
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

/// The idempotent producer and the rules that turn a row into a record.
pub struct Publisher {
    producer: FutureProducer,
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
        let config = client_config(kafka);
        let producer: FutureProducer = config.create().map_err(|err| match err {
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
        })?;
        Ok(Publisher {
            producer,
            topic_template: topic_template.clone(),
            brokers: kafka.brokers.clone(),
        })
    }

    /// Sends the rows allowed by `tracker` and records each one's outcome in it. Returns when
    /// every sent record has its delivery report, or `grace` after `shutdown` fired, with the
    /// number of records Kafka (not posthorn's own checks) failed.
    pub async fn publish(
        &self,
        rows: &[OutboxRow],
        tracker: &mut Tracker<'_>,
        shutdown: &mut Shutdown,
        grace: Duration,
    ) -> usize {
        let mut n_kafka_failures = 0;
        let mut pending = FuturesUnordered::new();
        for (i, row) in rows.iter().enumerate() {
            if !tracker.may_send(i) {
                tracker.withhold(i);
                continue;
            }
            let (topic, headers) = match self.prepare(row) {
                Ok(prepared) => prepared,
                Err(problem) => {
                    tracker.fail(i, problem);
                    continue;
                }
            };
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
                .key(row.aggregate_id.as_bytes())
                .headers(headers);
            if let Some(payload) = &row.payload {
                record = record.payload(payload.as_bytes());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(async move { (i, delivery.await) });
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: wait for a delivery report to free room.
                        record = back;
                        match pending.next().await {
                            Some((j, report)) => n_kafka_failures += settle(tracker, j, report),
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((err, _)) => {
                        tracker.fail(i, describe(&err));
                        n_kafka_failures += 1;
                        break;
                    }
                }
            }
        }

        let mut deadline: Option<Instant> = None;
        while !pending.is_empty() {
            let stop_at = deadline.unwrap_or_else(Instant::now);
            tokio::select! {
                Some((j, report)) = pending.next() => n_kafka_failures += settle(tracker, j, report),
                _ = shutdown.triggered(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + grace);
                }
                _ = tokio::time::sleep_until(stop_at), if deadline.is_some() => break,
            }
        }
        n_kafka_failures
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
        for (name, value) in &own {
            headers = headers.insert(header(name, value));
        }
        Ok((topic, headers))
    }

    /// Asks the cluster for its metadata (brokers, topics), as `check` does.
    pub async fn cluster_info(&self, timeout: Duration) -> Result<ClusterInfo, PublisherError> {
        let producer = self.producer.clone();
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

    /// Records handed to librdkafka and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Drops the producer off the async runtime: librdkafka's destructor purges and may block
    /// for up to half a second.
    pub async fn close(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
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

type Report = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

/// Records a delivery report in the tracker; returns 1 if Kafka failed the record, else 0.
fn settle(tracker: &mut Tracker<'_>, i: usize, report: Report) -> usize {
    match report {
        Ok(Ok(_delivery)) => {
            tracker.ack(i);
            0
        }
        Ok(Err((err, _message))) => {
            tracker.fail(i, describe(&err));
            1
        }
        Err(_canceled) => {
            tracker.fail(
                i,
                "the producer closed before the record's delivery report".to_owned(),
            );
            1
        }
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
