//! The `opentelemetry` feature: an event carries the W3C trace context it was built in, and the
//! relay delivers it to Kafka as headers. Run with
//!
//!     cargo test -p posthorn-writer --features opentelemetry --test opentelemetry
//!
//! The last test needs PostgreSQL and a broker: `eval "$(bash scripts/services.sh env)"` first.
#![cfg(feature = "opentelemetry")]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use posthorn_writer::Event;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// A span of the SDK's tracer, child of a remote parent that has a tracestate.
fn span_context() -> Context {
    let parent = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
        SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("posthorn", "t61rcWkgMzE")]).expect("trace state"),
    ));
    let tracer = SdkTracerProvider::builder()
        .build()
        .tracer("posthorn-writer-test");
    let span = tracer.start_with_context("ship order", &parent);
    parent.with_span(span)
}

/// What W3C trace-context says `traceparent` is for `cx`'s span.
fn traceparent_of(cx: &Context) -> String {
    let span = cx.span();
    let sc = span.span_context();
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

fn shipped() -> posthorn_writer::EventBuilder {
    Event::builder("order", "order-42", "OrderShipped").json(&serde_json::json!({"n": 1}))
}

#[test]
fn build_copies_the_current_trace_context_into_the_headers() {
    let cx = span_context();
    let event = {
        let _attached = cx.clone().attach();
        shipped().build().expect("valid")
    };
    let traceparent = traceparent_of(&cx);
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(traceparent.ends_with("-01"), "sampled: {traceparent}");
    assert_eq!(event.headers()["traceparent"], traceparent);
    assert_eq!(event.headers()["tracestate"], "posthorn=t61rcWkgMzE");
    assert_eq!(event.headers().len(), 2);
}

#[test]
fn without_a_current_span_build_adds_no_trace_headers() {
    let event = shipped().build().expect("valid");
    assert!(event.headers().is_empty(), "{:?}", event.headers());
}

#[test]
fn an_explicit_traceparent_header_wins_over_the_current_context() {
    let explicit = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let _attached = span_context().attach();
    let event = shipped()
        .header("traceparent", explicit)
        .build()
        .expect("valid");
    assert_eq!(event.headers()["traceparent"], explicit);
    assert!(
        !event.headers().contains_key("tracestate"),
        "no tracestate of another trace"
    );
}

#[test]
fn trace_context_takes_the_given_context_over_the_current_one() {
    let given = span_context();
    let _attached = span_context().attach();
    let event = shipped().trace_context(&given).build().expect("valid");
    assert_eq!(event.headers()["traceparent"], traceparent_of(&given));
    assert_ne!(traceparent_of(&given), traceparent_of(&Context::current()));
}

/// `<prefix>_<nanoseconds>`: a name no other run uses.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}_{:x}", nanos & 0xffff_ffff_ffff)
}

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `eval \"$(bash scripts/services.sh env)\"` first")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_traceparent_arrives_as_a_kafka_header() {
    let (admin_url, brokers) = (
        service("POSTHORN_TEST_DATABASE_URL"),
        service("POSTHORN_TEST_KAFKA_BROKERS"),
    );
    let database = unique("posthorn_t_writer_otel");
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
        .execute(&mut admin)
        .await
        .expect("create database");
    let url = url_with_database(&admin_url, &database);
    let topic = unique("it-writer-otel");
    create_topic(&brokers, &topic).await;
    let config = posthorn::config::Config::from_vars(vec![
        ("POSTHORN_DATABASE_URL".to_owned(), url.clone()),
        ("POSTHORN_KAFKA_BROKERS".to_owned(), brokers.clone()),
        ("POSTHORN_TOPIC_TEMPLATE".to_owned(), topic.clone()),
        ("POSTHORN_POLL_INTERVAL_MS".to_owned(), "200".to_owned()),
    ])
    .expect("configuration");
    posthorn::migrate::run(&config.database, &config.outbox)
        .await
        .expect("migrate");
    let (trigger, shutdown) = posthorn::shutdown::Shutdown::new();
    let relay = tokio::spawn(async move { posthorn::relay::run(&config, shutdown).await });

    let cx = span_context();
    let event = {
        let _attached = cx.clone().attach();
        shipped().build().expect("valid")
    };
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    let event_id = posthorn_writer::enqueue(&mut tx, &event)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let headers = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_one_record_headers(&brokers, &topic)
    })
    .await
    .expect("consumer thread");
    trigger.trigger();
    relay
        .await
        .expect("relay task")
        .expect("the relay stops cleanly");
    assert_eq!(headers["event-id"], event_id.to_string());
    assert_eq!(headers["traceparent"], traceparent_of(&cx));
    assert_eq!(headers["tracestate"], "posthorn=t61rcWkgMzE");
}

fn url_with_database(admin_url: &str, database: &str) -> String {
    let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{database}")
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.expect("creating the topic");
    }
}

/// The headers of the first record of `topic`'s only partition; panics after 60 s.
fn read_one_record_headers(brokers: &str, topic: &str) -> HashMap<String, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("posthorn-writer-otel-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no record on {topic} within 60 s"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("consumer error");
        let mut headers = HashMap::new();
        for header in message.headers().iter().flat_map(|hs| hs.iter()) {
            let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
            headers.insert(header.key.to_owned(), value);
        }
        return headers;
    }
}
