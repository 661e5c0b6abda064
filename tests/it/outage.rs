//! A dependency outage costs the log a few lines, not thousands: failures are logged as state
//! changes (failing, still failing once a minute, works again) while the metrics count every
//! error. The real binary, a Kafka broker of the test's own killed for 20 s.

use std::time::Duration;

use crate::support::{
    create_topic_at, env_vars, read_topic_at, relay_log_path, run_posthorn, unique, wait_until,
    KafkaCluster, RelayProcess, Scrape, TestDb,
};

/// At most this many lines for a 20 s outage: the failure, the readiness change, a few
/// others (before the change it was ~450).
const MAX_LINES_FOR_AN_OUTAGE: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_away_for_20_seconds_costs_a_handful_of_log_lines_and_the_metrics_count_it() {
    let mut broker = KafkaCluster::start(1).await;
    let db = TestDb::create("outage_log").await;
    let topic = unique("it-outage-log");
    create_topic_at(&broker.brokers(), &topic, 1).await;
    let vars = env_vars(&db.url, &[("POSTHORN_KAFKA_BROKERS", &broker.brokers())]);
    let log_path = relay_log_path("outage-log");
    let mut relay = RelayProcess::spawn(&vars, &log_path);
    let addr = relay.http_addr().await;
    let insert = |n: i32| {
        let (pool, topic) = (db.pool.clone(), topic.clone());
        async move {
            sqlx::query(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ($1, 'k', 'E', jsonb_build_object('n', $2::int))",
            )
            .bind(&topic)
            .bind(n)
            .execute(&pool)
            .await
            .expect("insert");
        }
    };
    insert(1).await;
    db.wait_all_delivered(Duration::from_secs(30), "the first row is delivered")
        .await;
    let reconnects_before = Scrape::from(addr)
        .await
        .value("posthorn_reconnects_total", &[("service", "kafka")])
        .expect("the reconnect counter");

    let lines_before = read_log(&log_path).lines().count();
    broker.kill(0);
    insert(2).await;
    // The outage itself: 20 s of a relay that wants to publish and cannot.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let log = read_log(&log_path);
    let outage_lines: Vec<&str> = log.lines().skip(lines_before).collect();
    assert!(
        outage_lines.len() <= MAX_LINES_FOR_AN_OUTAGE,
        "{} lines for a 20 s outage:\n{}",
        outage_lines.len(),
        outage_lines.join("\n")
    );
    assert!(
        outage_lines.iter().any(|l| l.contains("Kafka is failing")),
        "the outage is logged once, with its reason:\n{}",
        outage_lines.join("\n")
    );
    let scrape = Scrape::from(addr).await;
    let reconnects = scrape
        .value("posthorn_reconnects_total", &[("service", "kafka")])
        .expect("the reconnect counter");
    assert!(
        reconnects > reconnects_before,
        "reconnects rose: {reconnects_before} -> {reconnects}"
    );
    let errors = scrape
        .value("posthorn_dependency_errors_total", &[("service", "kafka")])
        .expect("the error counter");
    assert!(
        errors > outage_lines.len() as f64,
        "every error is counted ({errors}), more than were logged"
    );

    broker.restart(0).await;
    db.wait_all_delivered(Duration::from_secs(60), "the row written during the outage")
        .await;
    wait_until(
        Duration::from_secs(60),
        "the relay logs that Kafka works again",
        || std::future::ready(read_log(&log_path).contains("Kafka works again.")),
    )
    .await;
    relay.signal("TERM");
    assert!(relay.wait(Duration::from_secs(30)).await.success());
    let records = read_topic_at(&broker.brokers(), &topic, 2, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 2, "both rows, once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_only_its_verdict_lines_when_no_broker_answers() {
    let db = TestDb::create("check_quiet").await;
    let nobody = format!("127.0.0.1:{}", crate::support::free_port());
    let vars = env_vars(&db.url, &[("POSTHORN_KAFKA_BROKERS", &nobody)]);
    let (code, stdout, stderr) = run_posthorn(&["check"], &vars);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    assert!(
        lines.len() <= 5,
        "four verdict lines and the summary:\n{}",
        lines.join("\n")
    );
    assert!(
        stdout.contains("kafka     FAILED: "),
        "the verdict names the failure: {stdout}"
    );
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
