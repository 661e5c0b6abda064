//! Soak: pushes N rows through the real `posthorn` binary while killing it with SIGKILL at
//! random moments and restarting it, then reads everything back from Kafka and prints three
//! numbers: rows lost, per-key order violations, duplicates. Exits non-zero unless the first two
//! are 0. Run it with `scripts/soak.sh` (which starts the services and builds in release mode).
//!
//! Writers own disjoint sets of keys and number each key's events 1, 2, 3, ... in commit order,
//! so the expected stream per key is known exactly.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
struct Args {
    /// Admin URL of the Postgres server; the soak creates its own database there.
    #[arg(long, env = "POSTHORN_TEST_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "POSTHORN_TEST_KAFKA_BROKERS")]
    brokers: String,
    /// The posthorn binary to run and kill.
    #[arg(long, default_value = "target/release/posthorn")]
    posthorn: String,
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// SIGKILLs, at least; the soak goes on killing until the writers are done.
    #[arg(long, default_value_t = 50)]
    kills: u32,
    /// Longest time between a restart and the next kill, in ms (the time is uniform from 1/10
    /// of this).
    #[arg(long, default_value_t = 1500)]
    max_kill_interval_ms: u64,
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// POSTHORN_TRACKING for the relay: rows or checkpoint.
    #[arg(long, default_value = "rows")]
    tracking: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let db_name = format!("posthorn_soak_{run_id}");
    let topic = format!("posthorn-soak-{run_id}");

    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut db_url = url::Url::parse(&args.database_url)?;
    db_url.set_path(&format!("/{db_name}"));
    let db_url = db_url.to_string();
    // A port of its own, so the soak can tell when the relay is up (see `wait_serving`).
    let http_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let env = [
        ("POSTHORN_DATABASE_URL", db_url.as_str()),
        ("POSTHORN_KAFKA_BROKERS", args.brokers.as_str()),
        ("POSTHORN_TOPIC_TEMPLATE", topic.as_str()),
        ("POSTHORN_BATCH_SIZE", &args.batch_size.to_string()),
        ("POSTHORN_LOG", "warn"),
        ("POSTHORN_TRACKING", args.tracking.as_str()),
        ("POSTHORN_HTTP_ADDR", &http_addr.to_string()),
        // The restarted relay is the same instance: it takes its lease over at once.
        ("POSTHORN_INSTANCE_ID", &format!("soak-{run_id}")),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let status = Command::new(&args.posthorn)
        .arg("migrate")
        .envs(env.clone())
        .status()?;
    anyhow::ensure!(status.success(), "posthorn migrate failed");
    let admin_client: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()?;
    for r in admin_client
        .create_topics(
            &[NewTopic::new(&topic, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    println!(
        "soak: {} rows over {} keys, {} writers, >= {} SIGKILLs, database {db_name}, topic {topic}",
        args.rows, args.keys, args.writers, args.kills
    );

    // Writers: writer w owns keys k with k % writers == w, and writes batches of 200 rows per
    // transaction, each key's versions in order.
    let pool = PgPoolOptions::new()
        .max_connections(args.writers as u32 + 1)
        .connect(&db_url)
        .await?;
    let written = Arc::new(AtomicU64::new(0));
    let per_writer = args.rows / args.writers;
    let mut writer_tasks = Vec::new();
    for w in 0..args.writers {
        let (pool, written, keys, writers) =
            (pool.clone(), written.clone(), args.keys, args.writers);
        let n = if w == args.writers - 1 {
            args.rows - per_writer * (args.writers - 1)
        } else {
            per_writer
        };
        writer_tasks.push(tokio::spawn(async move {
            let own_keys: Vec<u64> = (0..keys).filter(|k| k % writers == w).collect();
            let mut versions: HashMap<u64, i64> = HashMap::new();
            let mut done = 0u64;
            while done < n {
                let size = (n - done).min(200);
                let mut ids = Vec::with_capacity(size as usize);
                let mut payloads = Vec::with_capacity(size as usize);
                for j in 0..size {
                    let key = own_keys[((done + j) % own_keys.len() as u64) as usize];
                    let v = versions.entry(key).or_insert(0);
                    *v += 1;
                    ids.push(format!("k{key}"));
                    payloads.push(format!("{{\"version\": {v}, \"pad\": \"{}\"}}", "x".repeat(200)));
                }
                sqlx::query(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'soak', k, 'Soaked', p::jsonb FROM unnest($1::text[], $2::text[]) AS t(k, p)",
                )
                .bind(&ids)
                .bind(&payloads)
                .execute(&pool)
                .await?;
                done += size;
                written.fetch_add(size, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        }));
    }

    // The relay, killed and restarted.
    let log = std::fs::File::create(format!("target/soak-{run_id}.log"))?;
    let spawn = || -> std::io::Result<Child> {
        Command::new(&args.posthorn)
            .arg("run")
            .envs(env.clone())
            .stdout(Stdio::null())
            .stderr(log.try_clone()?)
            .spawn()
    };
    let mut relay = spawn()?;
    let mut kills = 0u32;
    let mut peak_rss_kb = 0u64;
    let writers_done = || writer_tasks.iter().all(|t| t.is_finished());
    while kills < args.kills || !writers_done() {
        let wait =
            rand::rng().random_range(args.max_kill_interval_ms / 10..=args.max_kill_interval_ms);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        peak_rss_kb = peak_rss_kb.max(peak_rss(relay.id()));
        relay.kill()?; // SIGKILL
        relay.wait()?;
        kills += 1;
        if kills % 10 == 0 {
            println!(
                "soak: {kills} kills, {} rows written, {:.0?} elapsed",
                written.load(Ordering::Relaxed),
                started.elapsed()
            );
        }
        relay = spawn()?;
    }
    for t in writer_tasks {
        t.await??;
    }
    println!(
        "soak: writers done ({} rows); draining with the relay alive",
        written.load(Ordering::Relaxed)
    );
    loop {
        // Pending in either tracking mode: not marked, and not covered by a checkpoint row.
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox AS o WHERE o.delivered_at IS NULL AND NOT EXISTS ( \
                 SELECT 1 FROM outbox_checkpoint AS c \
                 WHERE pg_visible_in_snapshot(o.txid, c.snapshot) \
                    OR (c.window_end IS NOT NULL AND pg_visible_in_snapshot(o.txid, c.window_end) \
                        AND o.id <= c.position))",
        )
        .fetch_one(&pool)
        .await?;
        peak_rss_kb = peak_rss_kb.max(peak_rss(relay.id()));
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The relay installs its SIGTERM handler before it serves HTTP. If the previous relay
    // drained everything, this one may be only milliseconds old: a SIGTERM before the handler
    // exists would kill it like SIGKILL and say nothing about a clean stop.
    wait_serving(http_addr).await?;
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()?;
    let status = relay.wait()?;
    anyhow::ensure!(
        status.success(),
        "the final relay did not stop cleanly: {status}"
    );
    let relay_secs = started.elapsed();

    // Read everything back and check it.
    let (lost, order_violations, duplicates, consumed) = tokio::task::spawn_blocking({
        let (brokers, topic, keys, rows, writers) = (
            args.brokers.clone(),
            topic.clone(),
            args.keys,
            args.rows,
            args.writers,
        );
        move || verify(&brokers, &topic, keys, rows, writers)
    })
    .await??;
    println!(
        "soak: {} rows, {kills} SIGKILLs, relay peak RSS {} MiB, {:.1?} until drained; {consumed} records consumed",
        args.rows,
        peak_rss_kb / 1024,
        relay_secs
    );
    println!("tracking: {}", args.tracking);
    println!("rows lost: {lost}");
    println!("per-key order violations: {order_violations}");
    println!("duplicates: {duplicates}");
    anyhow::ensure!(
        lost == 0 && order_violations == 0,
        "the soak found lost rows or reordered keys"
    );
    Ok(())
}

/// Waits until something answers HTTP on `addr` (any status will do), for at most 30 s.
async fn wait_serving(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://{addr}/healthz");
    loop {
        let answered = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(2)))
                    .build()
                    .into();
                agent.get(&url).call().is_ok()
            }
        })
        .await?;
        if answered {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not serve {url} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process's peak resident set (VmHWM), in KiB; 0 if it cannot be read.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Returns (lost, order violations, duplicates, records consumed).
fn verify(
    brokers: &str,
    topic: &str,
    keys: u64,
    rows: u64,
    writers: u64,
) -> anyhow::Result<(u64, u64, u64, u64)> {
    // What each key should have: how many events the writers gave it.
    let mut expected: HashMap<String, i64> = HashMap::new();
    let per_writer = rows / writers;
    for w in 0..writers {
        let n = if w == writers - 1 {
            rows - per_writer * (writers - 1)
        } else {
            per_writer
        };
        let own_keys: Vec<u64> = (0..keys).filter(|k| k % writers == w).collect();
        for j in 0..n {
            *expected
                .entry(format!(
                    "k{}",
                    own_keys[(j % own_keys.len() as u64) as usize]
                ))
                .or_insert(0) += 1;
        }
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "posthorn-soak-verify")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let mut newest: HashMap<String, i64> = HashMap::new();
    let (mut order_violations, mut duplicates, mut consumed) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    while ends
        .iter()
        .any(|(p, high)| positions.get(p).copied().unwrap_or(0) < *high)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading the topic back took too long"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        positions.insert(message.partition(), message.offset() + 1);
        consumed += 1;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        let version = value["version"].as_i64().unwrap_or(-1);
        let max_seen = newest.entry(key).or_insert(0);
        if version == *max_seen + 1 {
            *max_seen = version;
        } else if version >= 1 && version <= *max_seen {
            duplicates += 1; // a repeat of a version already seen: a redelivered suffix
        } else {
            order_violations += 1; // a version arriving before an earlier one
        }
    }
    let lost = expected
        .iter()
        .map(|(k, n)| (n - newest.get(k).copied().unwrap_or(0)).max(0) as u64)
        .sum();
    Ok((lost, order_violations, duplicates, consumed))
}
