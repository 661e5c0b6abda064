//! Probes of Kafka transactions on the test broker (Apache Kafka, through rdkafka and the
//! librdkafka the relay links): init, commit and abort, what `read_committed` and
//! `read_uncommitted` consumers see, and a second producer with the same `transactional.id`
//! fencing the first. Not posthorn's code: the ground an exactly-once relay would stand on, and
//! what rdkafka's MockCluster cannot show (it neither fences nor filters aborted records).
//!
//! Records are checked by consuming them (key, value), each read ending at an `end` record
//! committed last in the partition: past it, the consumer has passed every earlier record.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::support::{create_topic, services, unique};

const TIMEOUT: Duration = Duration::from_secs(30);

fn transactional_producer(transactional_id: &str) -> BaseProducer {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("transactional.id", transactional_id)
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(TIMEOUT)
        .expect("init_transactions");
    producer
}

/// Sends `(key, value)` records and waits until the broker has them (written, in the open
/// transaction: not yet committed or aborted).
fn send_and_flush(producer: &BaseProducer, topic: &str, records: &[(&str, &str)]) {
    for (key, value) in records {
        producer
            .send(BaseRecord::to(topic).key(*key).payload(*value))
            .map_err(|(err, _)| err)
            .expect("send");
    }
    producer.flush(TIMEOUT).expect("every record written");
}

/// `topic`'s (key, value) records in partition 0 as a consumer with `isolation` reads them,
/// from the beginning up to and including the record keyed `end`.
fn read_to_end(topic: &str, isolation: &str) -> Vec<(String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("group.id", unique("posthorn-it-txn-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + TIMEOUT;
    let mut records = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no 'end' record within {TIMEOUT:?} ({isolation}); read {records:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("consumer error");
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let record = (text(message.key()), text(message.payload()));
        let end = record.0 == "end";
        records.push(record);
        if end {
            return records;
        }
    }
}

fn keys(records: &[(String, String)]) -> Vec<&str> {
    records.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test]
async fn committed_records_are_read_by_read_committed_consumers_and_aborted_ones_never_are() {
    let topic = unique("it-txn-commit-abort");
    create_topic(&topic, 1).await;
    let producer = transactional_producer(&unique("posthorn-it-txn"));

    producer.begin_transaction().expect("begin");
    send_and_flush(
        &producer,
        &topic,
        &[("c1", "committed 1"), ("c2", "committed 2")],
    );
    producer.commit_transaction(TIMEOUT).expect("commit");

    producer.begin_transaction().expect("begin");
    send_and_flush(
        &producer,
        &topic,
        &[("a1", "aborted 1"), ("a2", "aborted 2")],
    );
    producer.abort_transaction(TIMEOUT).expect("abort");

    producer.begin_transaction().expect("begin");
    send_and_flush(&producer, &topic, &[("c3", "committed 3"), ("end", "")]);
    producer.commit_transaction(TIMEOUT).expect("commit");

    let committed = read_to_end(&topic, "read_committed");
    assert_eq!(keys(&committed), ["c1", "c2", "c3", "end"]);
    assert_eq!(committed[0].1, "committed 1");
    // The aborted records are in the log (the abort happened on the broker, after the records
    // were written): only the isolation level hides them.
    let everything = read_to_end(&topic, "read_uncommitted");
    assert_eq!(keys(&everything), ["c1", "c2", "a1", "a2", "c3", "end"]);
    assert_eq!(everything[2].1, "aborted 1");
}

#[tokio::test]
async fn a_second_producer_with_the_same_transactional_id_fences_the_first_and_aborts_its_open_transaction(
) {
    let topic = unique("it-txn-fencing");
    create_topic(&topic, 1).await;
    let transactional_id = unique("posthorn-it-txn");
    let first = transactional_producer(&transactional_id);
    first.begin_transaction().expect("begin");
    send_and_flush(
        &first,
        &topic,
        &[("open1", "first's"), ("open2", "first's")],
    );

    // Its init bumps the producer epoch and aborts the transaction the first left open.
    let second = transactional_producer(&transactional_id);

    let err = first
        .commit_transaction(TIMEOUT)
        .expect_err("the fenced producer cannot commit");
    let KafkaError::Transaction(txn_err) = &err else {
        panic!("a transaction error, not {err:?}");
    };
    // librdkafka reports the broker's fencing (PRODUCER_FENCED, or INVALID_PRODUCER_EPOCH from
    // older brokers) as its own fatal `_FENCED` (-144), not as ProducerFenced (90).
    assert_eq!(txn_err.code(), RDKafkaErrorCode::Fenced, "{err}");
    assert!(txn_err.is_fatal(), "fencing is fatal: {err}");
    assert_eq!(
        first.client().fatal_error().map(|(code, _)| code),
        Some(RDKafkaErrorCode::Fenced)
    );
    println!("the fenced producer's commit: {err}");

    second.begin_transaction().expect("begin");
    send_and_flush(&second, &topic, &[("second1", "second's"), ("end", "")]);
    second.commit_transaction(TIMEOUT).expect("commit");

    let committed = read_to_end(&topic, "read_committed");
    assert_eq!(keys(&committed), ["second1", "end"]);
    let everything = read_to_end(&topic, "read_uncommitted");
    assert_eq!(keys(&everything), ["open1", "open2", "second1", "end"]);
}
