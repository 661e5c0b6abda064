//! Soak: pushes N rows through the real `posthorn` binary while killing it with SIGKILL at
//! random moments and restarting it, then reads everything back from Kafka and prints three
//! numbers: rows lost, per-key order violations, duplicates. Run it with `scripts/soak.sh`
//! (which starts the services and builds in release mode).
//!
//! The topic is read back twice, by a `read_committed` and by a `read_uncommitted` consumer.
//! At least once (`--delivery at-least-once`, the default) there are no transactions and both
//! see the same records, duplicates included. Exactly once (`--delivery exactly-once`, with
//! `--tracking checkpoint`) each batch is a Kafka transaction: `read_committed` should see every
//! row once, while `read_uncommitted` also sees the records of the transactions that a SIGKILL
//! left open and the next relay aborted.
//!
//! Exits non-zero unless the `read_committed` consumer found no row lost and no key reordered,
//! and, exactly once, no duplicate either (nor a topic without transaction markers).
//!
//! A debug relay on a busy machine takes seconds to lead; killed sooner, it never publishes.
//! So by default (`--kill-clock published`) most kills are timed from the restarted relay's
//! first published row, and the summary says how many kills hit a relay that had published.
//!
//! Writers own disjoint sets of keys and number each key's events 1, 2, 3, ... in commit order,
//! so the expected stream per key is known exactly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use posthorn::config::Delivery;
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
    /// Longest time before the next kill, in ms (the time is uniform from 1/10 of this),
    /// counted as `--kill-clock` says.
    #[arg(long, default_value_t = 1500)]
    max_kill_interval_ms: u64,
    /// When the time to the next kill starts. `published`: once the restarted relay has
    /// published its first row (Kafka acknowledged it; or after 10 s without one), except for
    /// one kill in four, timed from the relay's start, so that kills land in its startup too,
    /// and for kills once the writers are done and no row is pending.
    /// `start`: always from the relay's start; a relay that takes longer than the interval to
    /// start leading then never publishes anything before it is killed.
    #[arg(long, value_enum, default_value_t = KillClock::Published)]
    kill_clock: KillClock,
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// POSTHORN_TRACKING for the relay. Default: rows, or checkpoint with
    /// `--delivery exactly-once` (which needs checkpoint).
    #[arg(long, value_enum)]
    tracking: Option<Tracking>,
    /// POSTHORN_DELIVERY for the relay. With exactly-once the soak also fails on any duplicate
    /// its read_committed consumer sees.
    #[arg(long, default_value = "at-least-once")]
    delivery: Delivery,
    /// POSTHORN_LOG for the relay; its log goes to target/soak-<run>.log.
    #[arg(long, default_value = "warn")]
    relay_log: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tracking {
    Rows,
    Checkpoint,
}

impl Tracking {
    fn as_str(self) -> &'static str {
        match self {
            Tracking::Rows => "rows",
            Tracking::Checkpoint => "checkpoint",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KillClock {
    Published,
    Start,
}

/// A relay process: killed (SIGKILL) and reaped when dropped, so that an error anywhere in
/// the soak leaves no relay behind.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracking = match (args.delivery, args.tracking) {
        (Delivery::ExactlyOnce, Some(Tracking::Rows)) => anyhow::bail!(
            "--delivery exactly-once needs --tracking checkpoint (the relay refuses \
             POSTHORN_DELIVERY=exactly-once with POSTHORN_TRACKING=rows): drop --tracking, or \
             pass --tracking checkpoint"
        ),
        (_, Some(tracking)) => tracking,
        (Delivery::ExactlyOnce, None) => Tracking::Checkpoint,
        (Delivery::AtLeastOnce, None) => Tracking::Rows,
    };
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
    // Exactly once, the relay's transactional.id and its checkpoint records' key default to
    // the outbox's identity (made by `migrate` in this run's database), so runs do not meet.
    let env = [
        ("POSTHORN_DATABASE_URL", db_url.as_str()),
        ("POSTHORN_KAFKA_BROKERS", args.brokers.as_str()),
        ("POSTHORN_TOPIC_TEMPLATE", topic.as_str()),
        ("POSTHORN_BATCH_SIZE", &args.batch_size.to_string()),
        ("POSTHORN_LOG", args.relay_log.as_str()),
        ("POSTHORN_TRACKING", tracking.as_str()),
        ("POSTHORN_DELIVERY", args.delivery.as_str()),
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
    let log_path = format!("target/soak-{run_id}.log");
    println!(
        "soak: {} rows over {} keys, {} writers, >= {} SIGKILLs, tracking {}, delivery {}, \
         database {db_name}, topic {topic}, relay log {log_path}",
        args.rows,
        args.keys,
        args.writers,
        args.kills,
        tracking.as_str(),
        args.delivery.as_str()
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
    let log = std::fs::File::create(&log_path)?;
    let spawn = || -> std::io::Result<Relay> {
        Command::new(&args.posthorn)
            .arg("run")
            .envs(env.clone())
            .stdout(Stdio::null())
            .stderr(log.try_clone()?)
            .spawn()
            .map(Relay)
    };
    // Exits the soak did not cause; a refusal to start (exit code 2, a configuration error)
    // ends the soak at once, as every restart would be refused too.
    let mut own_exits: Vec<String> = Vec::new();
    let mut own_exit = |status: ExitStatus| -> anyhow::Result<()> {
        anyhow::ensure!(
            status.code() != Some(2),
            "the relay refused to start ({status}); see {log_path}"
        );
        println!("soak: the relay exited by itself: {status} (see {log_path})");
        own_exits.push(status.to_string());
        Ok(())
    };
    // The relay's transaction counters, scraped from /metrics just before each SIGKILL and
    // before the last relay's SIGTERM (a relay's counters start at 0, so the sum misses only
    // what a relay did between its scrape and its kill).
    let mut counters = RelayCounters::default();
    let mut relay = spawn()?;
    let mut kills = 0u32;
    // Kills of a relay that had published something, by its /metrics just before the kill.
    let mut kills_publishing = 0u32;
    let mut peak_rss_kb = 0u64;
    let writers_done = || writer_tasks.iter().all(|t| t.is_finished());
    while kills < args.kills || !writers_done() {
        // Once the writers are done and the backlog is drained, a relay has nothing to publish:
        // then the clock starts at its start.
        if args.kill_clock == KillClock::Published
            && !rand::rng().random_bool(0.25)
            && (!writers_done() || pending(&pool).await? > 0)
        {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && relay.0.try_wait()?.is_none()
                && scrape_counters(http_addr).await.published == 0
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let wait =
            rand::rng().random_range(args.max_kill_interval_ms / 10..=args.max_kill_interval_ms);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        peak_rss_kb = peak_rss_kb.max(peak_rss(relay.0.id()));
        if let Some(status) = relay.0.try_wait()? {
            own_exit(status)?;
        } else {
            let scraped = scrape_counters(http_addr).await;
            if scraped.published > 0 {
                kills_publishing += 1;
            }
            counters.add(scraped);
            relay.0.kill()?; // SIGKILL
            relay.0.wait()?;
            kills += 1;
            if kills % 10 == 0 {
                println!(
                    "soak: {kills} kills, {} rows written, {:.0?} elapsed",
                    written.load(Ordering::Relaxed),
                    started.elapsed()
                );
            }
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
    // Fails if the backlog stops shrinking for this long (a relay stuck, or one that no longer
    // records what it published), rather than waiting for ever.
    const DRAIN_STALL: Duration = Duration::from_secs(120);
    let mut least_pending = i64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let pending = pending(&pool).await?;
        peak_rss_kb = peak_rss_kb.max(peak_rss(relay.0.id()));
        if pending == 0 {
            break;
        }
        if pending < least_pending {
            least_pending = pending;
            last_progress = Instant::now();
        }
        anyhow::ensure!(
            last_progress.elapsed() < DRAIN_STALL,
            "draining: {pending} rows still pending, none delivered for {DRAIN_STALL:?}; see \
             {log_path}"
        );
        if let Some(status) = relay.0.try_wait()? {
            own_exit(status)?;
            relay = spawn()?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The relay installs its SIGTERM handler before it serves HTTP. If the previous relay
    // drained everything, this one may be only milliseconds old: a SIGTERM before the handler
    // exists would kill it like SIGKILL and say nothing about a clean stop.
    wait_serving(http_addr).await?;
    let last_relay = scrape_counters(http_addr).await;
    counters.add(last_relay);
    Command::new("kill")
        .args(["-TERM", &relay.0.id().to_string()])
        .status()?;
    let status = relay.0.wait()?;
    anyhow::ensure!(
        status.success(),
        "the final relay did not stop cleanly: {status}; see {log_path}"
    );
    let relay_secs = started.elapsed();

    // Read everything back, with both isolation levels, and check it. Both read up to the
    // high watermarks taken now that no relay runs.
    let expected = Arc::new(expected_versions(args.keys, args.rows, args.writers));
    let ends = Arc::new(
        tokio::task::spawn_blocking({
            let (brokers, topic) = (args.brokers.clone(), topic.clone());
            move || high_watermarks(&brokers, &topic)
        })
        .await??,
    );
    let read = |isolation: &'static str| {
        let (brokers, topic, ends, expected) = (
            args.brokers.clone(),
            topic.clone(),
            ends.clone(),
            expected.clone(),
        );
        tokio::task::spawn_blocking(move || {
            read_back(&brokers, &topic, isolation, &ends, &expected)
        })
    };
    let (committed, uncommitted) = (read("read_committed"), read("read_uncommitted"));
    let (committed, uncommitted) = (committed.await??, uncommitted.await??);
    println!(
        "soak: {} rows, {kills} SIGKILLs, relay peak RSS {} MiB, {:.1?} until drained, {:.1?} in all",
        args.rows,
        peak_rss_kb / 1024,
        relay_secs,
        started.elapsed()
    );
    println!(
        "SIGKILLs of a relay that had published rows: {kills_publishing} of {kills} (kill clock \
         {})",
        match args.kill_clock {
            KillClock::Published => "published",
            KillClock::Start => "start",
        }
    );
    println!("tracking: {}", tracking.as_str());
    println!("delivery: {}", args.delivery.as_str());
    println!(
        "relay exits the soak did not cause: {}{}",
        own_exits.len(),
        if own_exits.is_empty() {
            String::new()
        } else {
            format!(" ({})", own_exits.join(", "))
        }
    );
    if counters.with_transactions == 0 {
        println!(
            "relay transactions (/metrics): none reported ({} relays scraped)",
            counters.scraped
        );
    } else {
        println!(
            "relay transactions (/metrics of {} relays, each scraped just before its SIGKILL or \
             SIGTERM): {}; the last relay alone: {}",
            counters.scraped,
            counters.describe(),
            last_relay.describe()
        );
    }
    // Offsets no record was read at: transaction markers (each transaction leaves one in each
    // partition it wrote to). None without transactions.
    let log_end: i64 = ends.iter().map(|(_, high)| high).sum();
    let markers = log_end - uncommitted.consumed as i64;
    println!(
        "topic: {log_end} offsets up to the high watermarks ({}), {} records read \
         read_uncommitted, {} read_committed ({} in aborted transactions), {markers} offsets \
         without a record (transaction markers)",
        describe_ends(&ends),
        uncommitted.consumed,
        committed.consumed,
        uncommitted.consumed as i64 - committed.consumed as i64
    );
    println!(
        "rows lost: read_committed {}, read_uncommitted {}",
        committed.lost, uncommitted.lost
    );
    println!(
        "per-key order violations: read_committed {}, read_uncommitted {}",
        committed.order_violations, uncommitted.order_violations
    );
    println!(
        "duplicates: read_committed {}, read_uncommitted {}",
        committed.duplicates, uncommitted.duplicates
    );
    for r in [&committed, &uncommitted] {
        for example in &r.examples {
            println!("{}: {example}", r.isolation);
        }
        if r.duplicates > 0 {
            println!(
                "{}: the duplicates are {} runs (consecutive records of a partition, each a \
                 version already seen)",
                r.isolation,
                r.duplicate_runs.len()
            );
        }
        // Duplicates are expected but for read_committed exactly once: list those.
        if args.delivery == Delivery::ExactlyOnce && r.isolation == "read_committed" {
            for run in r.duplicate_runs.iter().take(20) {
                println!("{}: duplicate run: {}", r.isolation, run.describe());
            }
            if r.duplicate_runs.len() > 20 {
                println!(
                    "{}: ... and {} more duplicate runs",
                    r.isolation,
                    r.duplicate_runs.len() - 20
                );
            }
        }
    }
    anyhow::ensure!(
        committed.lost == 0 && committed.order_violations == 0,
        "the soak found lost rows or reordered keys (read_committed); relay log {log_path}"
    );
    anyhow::ensure!(
        args.delivery != Delivery::ExactlyOnce || markers > 0,
        "exactly once, yet the topic holds no transaction markers: the relay did not publish \
         in transactions (does {} know POSTHORN_DELIVERY?); relay log {log_path}",
        args.posthorn
    );
    anyhow::ensure!(
        args.delivery != Delivery::ExactlyOnce || committed.duplicates == 0,
        "exactly once, the read_committed consumer saw {} duplicates; relay log {log_path}",
        committed.duplicates
    );
    Ok(())
}

/// Rows pending in either tracking mode: not marked, and not covered by a checkpoint row.
async fn pending(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox AS o WHERE o.delivered_at IS NULL AND NOT EXISTS ( \
             SELECT 1 FROM outbox_checkpoint AS c \
             WHERE pg_visible_in_snapshot(o.txid, c.snapshot) \
                OR (c.window_end IS NOT NULL AND pg_visible_in_snapshot(o.txid, c.window_end) \
                    AND o.id <= c.position))",
    )
    .fetch_one(pool)
    .await
}

/// Waits until something answers HTTP on `addr` (any status will do), for at most 30 s.
async fn wait_serving(addr: SocketAddr) -> anyhow::Result<()> {
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

/// The relay's Kafka transaction counters, summed over the relays scraped.
#[derive(Default, Clone, Copy)]
struct RelayCounters {
    /// Relays whose /metrics answered.
    scraped: u32,
    /// Relays whose /metrics had `posthorn_kafka_transactions_total`.
    with_transactions: u32,
    committed: u64,
    aborted: u64,
    fenced: u64,
    /// `posthorn_rows_published_total`, all topics.
    published: u64,
}

impl RelayCounters {
    fn add(&mut self, other: RelayCounters) {
        self.scraped += other.scraped;
        self.with_transactions += other.with_transactions;
        self.committed += other.committed;
        self.aborted += other.aborted;
        self.fenced += other.fenced;
        self.published += other.published;
    }

    fn describe(&self) -> String {
        if self.with_transactions == 0 {
            return "no posthorn_kafka_transactions_total on /metrics".to_owned();
        }
        format!(
            "committed {}, aborted {}, producer fenced {}",
            self.committed, self.aborted, self.fenced
        )
    }
}

/// Reads the relay's /metrics (for 1 s at most); all zero, `scraped` 0, if it does not answer
/// (a relay just started may not serve yet).
async fn scrape_counters(addr: SocketAddr) -> RelayCounters {
    let body = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(1)))
            .build()
            .into();
        agent
            .get(&format!("http://{addr}/metrics"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    })
    .await
    .ok()
    .flatten();
    let Some(body) = body else {
        return RelayCounters::default();
    };
    let mut counters = RelayCounters {
        scraped: 1,
        ..RelayCounters::default()
    };
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, labels, rest) = match line.split_once('{') {
            Some((name, rest)) => match rest.split_once('}') {
                Some((labels, rest)) => (name, labels, rest),
                None => continue,
            },
            None => match line.split_once(' ') {
                Some((name, rest)) => (name, "", rest),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let value = value as u64;
        match name.trim() {
            "posthorn_kafka_transactions_total" => {
                counters.with_transactions = 1;
                if labels.contains("outcome=\"committed\"") {
                    counters.committed += value;
                } else if labels.contains("outcome=\"aborted\"") {
                    counters.aborted += value;
                }
            }
            "posthorn_kafka_producer_fenced_total" => counters.fenced += value,
            "posthorn_rows_published_total" => counters.published += value,
            _ => {}
        }
    }
    counters
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

/// What each key should have: how many events the writers gave it (its last version).
fn expected_versions(keys: u64, rows: u64, writers: u64) -> HashMap<String, i64> {
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
    expected
}

/// Each partition's high watermark, as a `read_uncommitted` client sees it: the end of the
/// log, control records (transaction markers) included. A `read_committed` client's
/// watermark query answers the last stable offset instead, which an open transaction holds
/// back: reading up to that would hide it.
fn high_watermarks(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "posthorn-soak-verify")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut ends = Vec::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        ends.push((p.id(), high));
    }
    ends.sort();
    Ok(ends)
}

fn describe_ends(ends: &[(i32, i64)]) -> String {
    ends.iter()
        .map(|(p, high)| format!("{p}:{high}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one consumer read.
struct Readback {
    isolation: &'static str,
    consumed: u64,
    lost: u64,
    order_violations: u64,
    duplicates: u64,
    /// The first few order violations and keys with rows lost, to look up in the relay's log.
    examples: Vec<String>,
    /// The duplicates, as runs of consecutive records.
    duplicate_runs: Vec<DuplicateRun>,
}

/// Consecutive records of one partition (no record in between that was not a duplicate),
/// each a version of its key already seen: one batch (or transaction) published again.
struct DuplicateRun {
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    records: u64,
    /// Where the versions were first seen, the lowest and highest offset.
    originals: (i64, i64),
    keys: std::collections::BTreeSet<String>,
    /// The first record's timestamp (ms since the epoch).
    timestamp: Option<i64>,
}

impl DuplicateRun {
    fn describe(&self) -> String {
        let keys: Vec<&str> = self.keys.iter().take(5).map(String::as_str).collect();
        format!(
            "partition {} offsets {}..={}: {} records of {} keys ({}{}), first seen at offsets \
             {}..={}; timestamp {:?}",
            self.partition,
            self.first_offset,
            self.last_offset,
            self.records,
            self.keys.len(),
            keys.join(" "),
            if self.keys.len() > 5 { " ..." } else { "" },
            self.originals.0,
            self.originals.1,
            self.timestamp
        )
    }
}

/// Reads `topic` from the beginning with `isolation.level=isolation` until each partition's
/// position reaches its end in `ends`, and checks every key's versions against `expected`.
/// The position, not the last record's offset, tells the end: a transaction's commit or
/// abort marker occupies an offset that no record is delivered for, and a `read_committed`
/// consumer also skips the records of aborted transactions.
fn read_back(
    brokers: &str,
    topic: &str,
    isolation: &'static str,
    ends: &[(i32, i64)],
    expected: &HashMap<String, i64>,
) -> anyhow::Result<Readback> {
    const EXAMPLES: usize = 10;
    // Fails if the position stops moving for this long short of the end (with
    // read_committed: a transaction left open, holding the last stable offset back).
    const STALL: Duration = Duration::from_secs(60);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("posthorn-soak-verify-{isolation}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, _) in ends {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    // Per key: the newest version seen so far, and the offset each version was first seen at.
    let mut first_seen: HashMap<String, Vec<i64>> = HashMap::new();
    let (mut order_violations, mut duplicates, mut consumed) = (0u64, 0u64, 0u64);
    let mut examples = Vec::new();
    let mut order_examples = 0usize;
    let mut duplicate_runs: Vec<DuplicateRun> = Vec::new();
    // Per partition: the index in `duplicate_runs` of the run its last record extended, if
    // that record was a duplicate.
    let mut open_run: HashMap<i32, usize> = HashMap::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let (mut last_positions, mut last_progress) = (Vec::new(), Instant::now());
    let mut since_check = 0u32;
    loop {
        // Check where the consumer is when it has nothing to deliver, and every 1000 records.
        let message = consumer.poll(Duration::from_millis(200));
        if message.is_none() || since_check >= 1000 {
            since_check = 0;
            let positions = positions(&consumer, topic, ends)?;
            if positions
                .iter()
                .zip(ends)
                .all(|(pos, (_, high))| pos >= high)
            {
                break;
            }
            if positions != last_positions {
                last_positions = positions;
                last_progress = Instant::now();
            }
            if last_progress.elapsed() >= STALL || Instant::now() >= deadline {
                let seen: Vec<String> = ends
                    .iter()
                    .map(|(p, _)| {
                        consumer
                            .fetch_watermarks(topic, *p, Duration::from_secs(10))
                            .map(|(_, high)| format!("{p}:{high}"))
                            .unwrap_or_else(|e| format!("{p}:? ({e})"))
                    })
                    .collect();
                anyhow::bail!(
                    "{isolation}: reading {topic} back stopped short of the end after {:.0?} \
                     ({}): positions {} (partition:offset), high watermarks {}; the watermarks \
                     this consumer sees (with read_committed, the last stable offsets: lower \
                     if a transaction is still open): {}",
                    started.elapsed(),
                    if last_progress.elapsed() >= STALL {
                        format!("no progress for {STALL:?}")
                    } else {
                        "too long in all".to_owned()
                    },
                    last_positions
                        .iter()
                        .zip(ends)
                        .map(|(pos, (p, _))| format!("{p}:{pos}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    describe_ends(ends),
                    seen.join(" ")
                );
            }
        }
        let Some(message) = message else {
            continue;
        };
        let message = message?;
        since_check += 1;
        consumed += 1;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        let version = value["version"].as_i64().unwrap_or(-1);
        let (partition, offset) = (message.partition(), message.offset());
        let seen = first_seen.entry(key.clone()).or_default();
        let max_seen = seen.len() as i64;
        if version >= 1 && version <= max_seen {
            duplicates += 1; // a repeat of a version already seen: a redelivered suffix
            let original = seen[version as usize - 1];
            match open_run.get(&partition) {
                Some(&i) => {
                    let run = &mut duplicate_runs[i];
                    run.last_offset = offset;
                    run.records += 1;
                    run.originals = (run.originals.0.min(original), run.originals.1.max(original));
                    run.keys.insert(key);
                }
                None => {
                    open_run.insert(partition, duplicate_runs.len());
                    duplicate_runs.push(DuplicateRun {
                        partition,
                        first_offset: offset,
                        last_offset: offset,
                        records: 1,
                        originals: (original, original),
                        keys: [key].into(),
                        timestamp: message.timestamp().to_millis(),
                    });
                }
            }
            continue;
        }
        open_run.remove(&partition);
        if version == max_seen + 1 {
            seen.push(offset);
        } else {
            order_violations += 1; // a version arriving before an earlier one
            if order_examples < EXAMPLES {
                order_examples += 1;
                examples.push(format!(
                    "order violation: key {key} version {version} at partition {partition} \
                     offset {offset}, after version {max_seen}, timestamp {:?}",
                    message.timestamp().to_millis()
                ));
            }
        }
    }
    let mut short: Vec<(&String, i64, i64)> = expected
        .iter()
        .map(|(k, n)| {
            let newest = first_seen.get(k).map_or(0, |s| s.len() as i64);
            (k, *n, newest)
        })
        .filter(|(_, n, newest)| newest < n)
        .collect();
    short.sort();
    let lost = short.iter().map(|(_, n, newest)| (n - newest) as u64).sum();
    if !short.is_empty() {
        examples.push(format!(
            "lost: {} of {} keys end short of their last version",
            short.len(),
            expected.len()
        ));
    }
    for (key, n, newest) in short.iter().take(EXAMPLES) {
        examples.push(format!("lost: key {key} ends at version {newest} of {n}"));
    }
    Ok(Readback {
        isolation,
        consumed,
        lost,
        order_violations,
        duplicates,
        examples,
        duplicate_runs,
    })
}

/// The consumer's position in each partition of `ends`, in that order (0 before the first
/// record).
fn positions(
    consumer: &BaseConsumer,
    topic: &str,
    ends: &[(i32, i64)],
) -> anyhow::Result<Vec<i64>> {
    let tpl = consumer.position()?;
    Ok(ends
        .iter()
        .map(
            |(p, _)| match tpl.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => n,
                _ => 0,
            },
        )
        .collect())
}
