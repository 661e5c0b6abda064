//! Reads a topic from the beginning with a plain Kafka consumer and prints each record, then a
//! summary: how many records, keys, duplicates, and whether every key's `version` field arrived
//! in order.
//!
//! cargo run --example tail -- --brokers 127.0.0.1:9092 --topic order --expect 90

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Stop after this many records.
    #[arg(long, default_value_t = 0)]
    expect: usize,
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Create the topic with this many partitions first (and exit).
    #[arg(long)]
    create_partitions: Option<i32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(partitions) = args.create_partitions {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .create()?;
        let topic = NewTopic::new(&args.topic, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics(&[topic], &AdminOptions::new()).await? {
            if let Err((name, err)) = result {
                anyhow::bail!("creating topic {name}: {err}");
            }
        }
        println!(
            "tail: created topic {} with {partitions} partitions",
            args.topic
        );
        return Ok(());
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "posthorn-demo-tail")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        assignment.add_partition_offset(&args.topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut seen = 0;
    let mut newest: HashMap<String, i64> = HashMap::new();
    let mut distinct = HashSet::new();
    let mut out_of_order = 0;
    while seen < args.expect && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        seen += 1;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let event_type = message
            .headers()
            .and_then(|hs| hs.iter().find(|h| h.key == "event-type"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        println!(
            "consumed p{}@{:<5} key={key:<9} {event_type:<15} {value}",
            message.partition(),
            message.offset()
        );
        let version = serde_json::from_str::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| v["version"].as_i64())
            .unwrap_or(0);
        let last = newest.entry(key.clone()).or_insert(0);
        if version == *last + 1 {
            *last = version;
        } else if version > *last + 1 {
            out_of_order += 1;
        }
        distinct.insert((key, version));
    }
    let duplicates = seen - distinct.len();
    println!(
        "tail: consumed {seen} records ({} keys) from {}: {duplicates} duplicates, {out_of_order} out of per-key order",
        newest.len(),
        args.topic
    );
    if seen < args.expect {
        anyhow::bail!(
            "expected {} records, got {seen} within {} s",
            args.expect,
            args.timeout_secs
        );
    }
    if out_of_order > 0 {
        anyhow::bail!("{out_of_order} records arrived out of per-key order");
    }
    Ok(())
}
