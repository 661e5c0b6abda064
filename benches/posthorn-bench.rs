//! posthorn-bench: throughput, latency and footprint of the real relay, side by side with the
//! physical limit measured in the same run. Uses the same services as the tests
//! (POSTHORN_TEST_DATABASE_URL, POSTHORN_TEST_KAFKA_BROKERS); run it with `bash scripts/bench.sh`.
//!
//! Scenarios (each run `--runs` times; medians and min–max are printed):
//! 1. drain: N rows inserted while the relay is stopped, then the relay (the release binary)
//!    started; time until every row is acknowledged and marked.
//! 2. steady: writers insert at a fixed rate in one-row transactions; a consumer compares each
//!    record's arrival with the writer's commit time.
//! 3. footprint: relay CPU seconds per 100k rows and peak RSS (from the drain runs), idle CPU
//!    over `--idle-secs` with an empty outbox.
//! 4. limits: the same Postgres read + mark statements with no Kafka, and a bare rdkafka
//!    producer sending the same records with no Postgres; the relay's drain rate as a fraction of
//!    the smaller.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use posthorn::acks::Tracker;
use posthorn::config::{OutboxTable, PoisonPolicy};
use posthorn::contract::{header, RESERVED_HEADERS};
use posthorn::lease::Lease;
use posthorn::outbox::{Outbox, ReadPast};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, env = "POSTHORN_TEST_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "POSTHORN_TEST_KAFKA_BROKERS")]
    brokers: String,
    /// Rows per drain run (and per limit run).
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Steady-state rates in rows/s; 0 means "as fast as the writers go".
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,0")]
    rates: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Seconds the writers run at the rate before the steady-state window starts; records
    /// committed then are not counted. The relay's first ~0.1-0.3 s after start (its pools and
    /// probes connecting) are not steady state.
    #[arg(long, default_value_t = 2)]
    warm_up_secs: u64,
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Which scenarios: drain, steady, idle, limits (comma-separated), or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    #[arg(long, default_value = "1000")]
    batch_size: String,
    /// Extra environment for the relay, e.g. `--relay-env POSTHORN_KAFKA_LINGER_MS=10`
    /// (repeatable).
    #[arg(long = "relay-env")]
    relay_env: Vec<String>,
    /// The relay binary to measure (default: the one this build made), e.g. an older build for a
    /// before/after comparison.
    #[arg(long)]
    posthorn: Option<String>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == "all" || s == scenario)
    }
}

const PAD: usize = 260; // with the other fields, a ~300-byte JSON payload

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "posthorn-bench: {cores} cores, {} rows x {} runs, {} keys, ~300-byte payloads, batch size {}",
        args.rows, args.runs, args.keys, args.batch_size
    );
    let mut table: Vec<(String, String)> = Vec::new();

    let mut drain_rates = Vec::new();
    if args.wants("drain") {
        let (mut cpu_per_100k, mut rss) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let r = drain(&args).await?;
            let wall = args.rows as f64 / r.rows_per_sec;
            println!(
                "  drain run {run}: {:.0} rows/s, {:.2} CPU s per 100k rows, peak RSS {:.1} MiB; \
                 over {wall:.1} s wall on {cores} cores the CPU went to relay {:.1} s, postgres {:.1} s, broker {:.1} s",
                r.rows_per_sec, r.cpu_secs_per_100k, r.peak_rss_mib, r.cpu_split.0, r.cpu_split.1, r.cpu_split.2
            );
            drain_rates.push(r.rows_per_sec);
            cpu_per_100k.push(r.cpu_secs_per_100k);
            rss.push(r.peak_rss_mib);
        }
        table.push(("backlog drain (rows/s)".into(), summary(&drain_rates, 0)));
        table.push((
            "relay CPU s per 100k rows".into(),
            summary(&cpu_per_100k, 2),
        ));
        table.push(("relay peak RSS (MiB)".into(), summary(&rss, 1)));
    }
    if args.wants("limits") {
        let (mut pg, mut kafka) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let p = postgres_limit(&args).await?;
            let k = kafka_limit(&args).await?;
            println!(
                "  limits run {run}: postgres read+mark {p:.0} rows/s, kafka produce {k:.0} msgs/s"
            );
            pg.push(p);
            kafka.push(k);
        }
        table.push(("limit: postgres read+mark (rows/s)".into(), summary(&pg, 0)));
        table.push(("limit: kafka produce (msgs/s)".into(), summary(&kafka, 0)));
        if !drain_rates.is_empty() {
            let limit = median(&pg).min(median(&kafka));
            table.push((
                "drain / min(limits)".into(),
                format!("{:.2}", median(&drain_rates) / limit),
            ));
        }
    }
    if args.wants("steady") {
        for &rate in &args.rates {
            let mut results = Vec::new();
            for run in 1..=args.runs {
                let r = steady(&args, rate).await?;
                println!(
                    "  steady {} run {run}: wrote {:.0}/s, delivered {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms (transaction start to mark in the database: p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms)",
                    rate_name(rate), r.write_rate, r.throughput, r.p50, r.p99, r.p999, r.max, r.db.0, r.db.1, r.db.2
                );
                results.push(r);
            }
            let pick = |f: fn(&Steady) -> f64| results.iter().map(f).collect::<Vec<_>>();
            let name = rate_name(rate);
            table.push((
                format!("steady {name}: delivered (rows/s)"),
                summary(&pick(|r| r.throughput), 0),
            ));
            table.push((
                format!("steady {name}: p50 / p99 / p99.9 / max (ms)"),
                format!(
                    "{:.1} / {:.1} / {:.1} / {:.1}",
                    median(&pick(|r| r.p50)),
                    median(&pick(|r| r.p99)),
                    median(&pick(|r| r.p999)),
                    median(&pick(|r| r.max))
                ),
            ));
            table.push((
                format!("steady {name}: p99 spread (ms)"),
                summary(&pick(|r| r.p99), 1),
            ));
        }
    }
    if args.wants("idle") {
        let mut idle = Vec::new();
        for _ in 1..=args.runs {
            idle.push(idle_cpu(&args).await?);
        }
        table.push((
            format!("idle CPU over {} s (% of one core)", args.idle_secs),
            summary(&idle, 3),
        ));
    }

    println!("\n| measure ({cores} cores) | median [min–max] |\n|---|---|");
    for (k, v) in &table {
        println!("| {k} | {v} |");
    }
    Ok(())
}

fn rate_name(rate: u64) -> String {
    if rate == 0 {
        "max".into()
    } else {
        format!("{}k/s", rate as f64 / 1000.0)
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn summary(xs: &[f64], decimals: usize) -> String {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.*} [{:.*}–{:.*}]",
        decimals,
        median(xs),
        decimals,
        min,
        decimals,
        max
    )
}

/// A fresh database (migrated by the real binary) and topic for one run.
struct Setup {
    admin: String,
    name: String,
    url: String,
    pool: PgPool,
    topic: String,
}

impl Setup {
    async fn new(args: &Args, what: &str) -> anyhow::Result<Setup> {
        let id = format!("{:08x}", rand::rng().random::<u32>());
        let name = format!("posthorn_bench_{what}_{id}");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&args.database_url)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let mut url = url::Url::parse(&args.database_url)?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let status = posthorn_cmd(&url, args, "unused")
            .arg("migrate")
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "posthorn migrate failed");
        // The relay's pool options (TCP_NODELAY), so the Postgres limit runs as the relay does.
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        let pool = posthorn::tcp_nodelay::pool_options(&options)
            .max_connections(16)
            .connect_with(options)
            .await?;
        let topic = format!("posthorn-bench-{what}-{id}");
        create_topic(&args.brokers, &topic).await?;
        Ok(Setup {
            admin: args.database_url.clone(),
            name,
            url,
            pool,
            topic,
        })
    }

    async fn load(&self, rows: u64, keys: u64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'bench', 'key-' || (g % $2), 'BenchEvent', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', $3)) \
             FROM generate_series(1, $1) g",
        )
        .bind(rows as i64)
        .bind(keys as i64)
        .bind(PAD as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn pending(&self) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await?;
        let admin_client: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set(
                "bootstrap.servers",
                std::env::var("POSTHORN_TEST_KAFKA_BROKERS").unwrap_or_default(),
            )
            .create()?;
        let _ = admin_client
            .delete_topics(&[&self.topic], &AdminOptions::new())
            .await;
        Ok(())
    }
}

fn posthorn_cmd(url: &str, args: &Args, topic: &str) -> Command {
    let binary = args
        .posthorn
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_posthorn").to_owned());
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("POSTHORN_DATABASE_URL", url)
        .env("POSTHORN_KAFKA_BROKERS", &args.brokers)
        .env("POSTHORN_TOPIC_TEMPLATE", topic)
        .env("POSTHORN_BATCH_SIZE", &args.batch_size)
        .env("POSTHORN_LOG", "warn")
        .stdin(Stdio::null());
    for pair in &args.relay_env {
        if let Some((k, v)) = pair.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd
}

/// (user + system CPU seconds, peak RSS in MiB) of a process, from /proc.
fn cpu_and_rss(pid: u32) -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = after.get(11)?.parse().ok()?;
            let stime: f64 = after.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(f64::NAN);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN);
    (cpu, rss)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// CPU seconds used so far by every process whose command name is `name`.
fn cpu_of_processes(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == name)
                .unwrap_or(false)
        })
        .map(|pid| cpu_and_rss(pid).0)
        .filter(|c| c.is_finite())
        .sum()
}

struct Drain {
    /// CPU seconds of (relay, postgres, broker) during the drain: where the machine's time went.
    cpu_split: (f64, f64, f64),
    rows_per_sec: f64,
    cpu_secs_per_100k: f64,
    peak_rss_mib: f64,
}

async fn drain(args: &Args) -> anyhow::Result<Drain> {
    let setup = Setup::new(args, "drain").await?;
    setup.load(args.rows, args.keys).await?;
    // The broker is Apache Kafka, a `java` process (every JVM on the machine counts: run the
    // bench with no other Kafka up).
    let (pg_before, broker_before) = (cpu_of_processes("postgres"), cpu_of_processes("java"));
    let started = Instant::now();
    let child = posthorn_cmd(&setup.url, args, &setup.topic)
        .arg("run")
        .spawn()?;
    let pid = child.id();
    let mut last = (0.0, 0.0);
    while setup.pending().await? {
        last = cpu_and_rss(pid);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (pg_after, broker_after) = (cpu_of_processes("postgres"), cpu_of_processes("java"));
    let (cpu, rss) = cpu_and_rss(pid);
    let (cpu, rss) = (
        if cpu.is_nan() { last.0 } else { cpu },
        if rss.is_nan() { last.1 } else { rss },
    );
    stop(child);
    setup.drop().await?;
    Ok(Drain {
        cpu_split: (cpu, pg_after - pg_before, broker_after - broker_before),
        rows_per_sec: args.rows as f64 / elapsed,
        cpu_secs_per_100k: cpu / (args.rows as f64 / 100_000.0),
        peak_rss_mib: rss,
    })
}

/// The relay's own read and mark statements in a loop, with every row acknowledged at once.
async fn postgres_limit(args: &Args) -> anyhow::Result<f64> {
    let setup = Setup::new(args, "pglimit").await?;
    setup.load(args.rows, args.keys).await?;
    let table = OutboxTable {
        schema: "public".into(),
        table: "outbox".into(),
    };
    let lease = Lease::new(
        setup.pool.clone(),
        &table,
        "bench",
        Duration::from_secs(300),
    );
    let epoch = lease
        .try_acquire()
        .await?
        .ok_or_else(|| anyhow::anyhow!("lease"))?
        .epoch;
    let outbox = Outbox::with_pool(setup.pool.clone(), &table, PoisonPolicy::DeadLetter);
    let batch: usize = args.batch_size.parse()?;
    let started = Instant::now();
    let mut n = 0u64;
    // The relay's statements in the relay's order, one after the other: read the next batch
    // past the one "in flight" (the read and its check), mark that one, repeat.
    let mut in_flight: Vec<posthorn::outbox::OutboxRow> = Vec::new();
    loop {
        let sent: Vec<i64> = in_flight.iter().map(|r| r.id).collect();
        let rows = match outbox.fetch_after(batch, &sent).await? {
            ReadPast::Rows(rows) => rows,
            ReadPast::RowBelow(_) => anyhow::bail!("no row commits below the batch here"),
        };
        if !in_flight.is_empty() {
            let mut tracker = Tracker::new(&in_flight, PoisonPolicy::DeadLetter);
            (0..in_flight.len()).for_each(|i| tracker.ack(i));
            n += outbox
                .mark_delivered(&tracker.finish().deliverable, epoch)
                .await?;
        }
        if rows.is_empty() {
            break;
        }
        in_flight = rows;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    setup.drop().await?;
    Ok(rate)
}

/// Creates `topic` with 6 partitions; returns the admin client (to delete it afterwards).
async fn create_topic(
    brokers: &str,
    topic: &str,
) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(admin)
}

/// A bare idempotent producer with posthorn's settings sending the same records.
async fn kafka_limit(args: &Args) -> anyhow::Result<f64> {
    let topic = format!(
        "posthorn-bench-kafkalimit-{:08x}",
        rand::rng().random::<u32>()
    );
    let admin = create_topic(&args.brokers, &topic).await?;
    // posthorn's own producer defaults, and the user's --relay-env POSTHORN_KAFKA_* overrides.
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers);
    for (k, v) in posthorn::publisher::DEFAULTS {
        config.set(*k, *v);
    }
    for pair in &args.relay_env {
        if let Some((k, v)) = pair.split_once('=') {
            if let Some(suffix) = k.strip_prefix("POSTHORN_KAFKA_") {
                config.set(posthorn::config::kafka_property_name(suffix), v);
            }
        }
    }
    let producer: FutureProducer = config.create()?;
    let pad = "x".repeat(PAD);
    let started = Instant::now();
    // As fast as the producer goes: every record handed over at once, waiting for delivery
    // reports only when librdkafka's queue is full. The same records as the relay's: key,
    // JSON value and posthorn's headers.
    let mut pending = std::collections::VecDeque::new();
    for seq in 0..args.rows {
        let key = format!("key-{}", seq % args.keys);
        let value = format!("{{\"pad\": \"{pad}\", \"seq\": {seq}}}");
        let event_id = uuid::Uuid::new_v4().to_string();
        let outbox_id = seq.to_string();
        let headers = OwnedHeaders::new_with_capacity(RESERVED_HEADERS.len())
            .insert(Header {
                key: header::EVENT_ID,
                value: Some(&event_id),
            })
            .insert(Header {
                key: header::EVENT_TYPE,
                value: Some("BenchEvent"),
            })
            .insert(Header {
                key: header::AGGREGATE_TYPE,
                value: Some("bench"),
            })
            .insert(Header {
                key: header::OUTBOX_ID,
                value: Some(&outbox_id),
            })
            .insert(Header {
                key: header::CONTENT_TYPE,
                value: Some("application/json"),
            });
        let mut record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&value)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if let Some(f) = pending.pop_front() {
                        f.await?
                            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
                    }
                }
                Err((e, _)) => anyhow::bail!("produce: {e}"),
            }
        }
    }
    for f in pending {
        f.await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    let rate = args.rows as f64 / started.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    Ok(rate)
}

struct Steady {
    /// p99, p99.9 and max of delivered_at - created_at in the database: from the writer's
    /// transaction start (`now()`) to the mark, on one clock. Its tail against the consumer's
    /// says on which side of the mark a delay was.
    db: (f64, f64, f64),
    write_rate: f64,
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

async fn steady(args: &Args, rate: u64) -> anyhow::Result<Steady> {
    let setup = Setup::new(args, "steady").await?;
    let child = posthorn_cmd(&setup.url, args, &setup.topic)
        .arg("run")
        .spawn()?;
    // Warm up: wait until a warm-up row (no `seq`, so the consumer skips it) is delivered, so
    // the relay is up; then the writers run `--warm-up-secs` at the rate before the window
    // starts. Rows written in the relay's first ~0.1-0.3 s waited 50-200 ms while its pools and
    // probes connected: a start-up cost, not steady state.
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('bench', 'warm-up', 'BenchEvent', '{}')",
    )
    .execute(&setup.pool)
    .await?;
    let warm_up_deadline = Instant::now() + Duration::from_secs(30);
    while setup.pending().await? {
        anyhow::ensure!(
            Instant::now() < warm_up_deadline,
            "the relay did not deliver the warm-up row within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let base = Instant::now();
    let max_events = if rate == 0 {
        5_000_000
    } else {
        rate * (args.warm_up_secs + args.steady_secs) + 10
    } as usize;
    let commit_ns: Arc<Vec<AtomicU64>> =
        Arc::new((0..max_events).map(|_| AtomicU64::new(0)).collect());
    let next_seq = Arc::new(AtomicU64::new(0));
    let stop_writing = Arc::new(AtomicBool::new(false));

    // The consumer: reads from the end, measures arrival - commit per record.
    let consumer_done = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (brokers, topic, commit_ns, done) = (
            args.brokers.clone(),
            setup.topic.clone(),
            commit_ns.clone(),
            consumer_done.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<Vec<(usize, f64)>> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "posthorn-bench")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "5")
                .create()?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut tpl = TopicPartitionList::new();
            for p in md.topics()[0].partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
            c.assign(&tpl)?;
            let mut latencies: Vec<(usize, f64)> = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let Some(m) = c.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let m = m?;
                let arrived = base.elapsed().as_nanos() as u64;
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
                let seq = v["seq"].as_u64().unwrap_or(u64::MAX) as usize;
                if let Some(committed) = commit_ns.get(seq).map(|c| c.load(Ordering::Acquire)) {
                    if committed > 0 {
                        latencies.push((seq, arrived.saturating_sub(committed) as f64 / 1e6));
                    }
                }
            }
            Ok(latencies)
        })
    };

    let n_writers: u64 = if rate == 0 { 8 } else { 4 };
    let mut writers = Vec::new();
    for _ in 0..n_writers {
        let (pool, commit_ns, next_seq, stop_writing) = (
            setup.pool.clone(),
            commit_ns.clone(),
            next_seq.clone(),
            stop_writing.clone(),
        );
        let per_writer = rate as f64 / n_writers as f64;
        writers.push(tokio::spawn(async move {
            let mut written = 0u64;
            let t0 = Instant::now();
            while !stop_writing.load(Ordering::Relaxed) {
                if per_writer > 0.0 {
                    let due = t0 + Duration::from_secs_f64(written as f64 / per_writer);
                    tokio::time::sleep_until(due.into()).await;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                if seq as usize >= commit_ns.len() {
                    break;
                }
                sqlx::query(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('bench', $1, 'BenchEvent', jsonb_build_object('seq', $2::bigint, 'pad', repeat('x', $3)))",
                )
                .bind(format!("key-{}", seq % 10_000))
                .bind(seq as i64)
                .bind(PAD as i32)
                .execute(&pool)
                .await?;
                commit_ns[seq as usize].store(base.elapsed().as_nanos() as u64, Ordering::Release);
                written += 1;
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warm_up_secs)).await;
    // The window: rows from this seq on, committed from now on.
    let measured_from = next_seq.load(Ordering::Relaxed);
    let window_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    stop_writing.store(true, Ordering::Relaxed);
    for w in writers {
        w.await??;
    }
    let write_secs = window_started.elapsed().as_secs_f64();
    let n_written = next_seq.load(Ordering::Relaxed).min(commit_ns.len() as u64) - measured_from;
    while setup.pending().await? {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_secs = window_started.elapsed().as_secs_f64();
    let db: (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
                percentile_cont(0.999) WITHIN GROUP (ORDER BY ms), max(ms) \
         FROM (SELECT (extract(epoch FROM delivered_at - created_at) * 1000)::float8 AS ms \
               FROM outbox WHERE aggregate_id <> 'warm-up' \
                 AND (payload->>'seq')::bigint >= $1) AS t",
    )
    .bind(measured_from as i64)
    .fetch_one(&setup.pool)
    .await?;
    // Let the consumer read the last records.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer_done.store(true, Ordering::Relaxed);
    let mut latencies: Vec<f64> = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))??
        .into_iter()
        .filter(|&(seq, _)| seq as u64 >= measured_from)
        .map(|(_, latency)| latency)
        .collect();
    stop(child);
    setup.drop().await?;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Steady {
        db,
        write_rate: n_written as f64 / write_secs,
        throughput: n_written as f64 / delivered_secs,
        p50: q(0.5),
        p99: q(0.99),
        p999: q(0.999),
        max: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

async fn idle_cpu(args: &Args) -> anyhow::Result<f64> {
    let setup = Setup::new(args, "idle").await?;
    let child = posthorn_cmd(&setup.url, args, &setup.topic)
        .arg("run")
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await; // start-up is not idle
    let (before, _) = cpu_and_rss(child.id());
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (after, _) = cpu_and_rss(child.id());
    stop(child);
    setup.drop().await?;
    Ok((after - before) / args.idle_secs as f64 * 100.0)
}
