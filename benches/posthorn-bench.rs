//! posthorn-bench: throughput, latency and footprint of the real relay, side by side with the
//! physical limit measured in the same run, for each mode of the relay: a tracking mode
//! (`POSTHORN_TRACKING=rows` or `checkpoint`) and a delivery mode (`POSTHORN_DELIVERY=
//! at-least-once` or `exactly-once`). Uses the same services as the tests
//! (POSTHORN_TEST_DATABASE_URL, POSTHORN_TEST_KAFKA_BROKERS); run it with `bash scripts/bench.sh`.
//!
//! Modes: every pair of `--tracking` (default `rows,checkpoint`) and `--delivery` (default
//! `at-least-once`) but rows/exactly-once, which the relay refuses (exactly-once needs
//! checkpoint tracking): `--tracking checkpoint --delivery at-least-once,exactly-once` measures
//! checkpoint/at-least-once beside checkpoint/exactly-once, the comparison that isolates what
//! exactly-once costs. Tables label the relay's figures `[<tracking>/<delivery>]`; the figures of
//! the Postgres-only scenarios (wal, the Postgres limits, plan) do not depend on delivery and
//! run once per tracking mode, labelled `[<tracking>]`, with an at-least-once relay where one
//! runs. In exactly-once runs each relay gets its own checkpoint topic
//! (`POSTHORN_CHECKPOINT_TOPIC=<the run's topic>-checkpoint`, deleted with the run's topic: the
//! default, `posthorn-checkpoint.public.outbox`, would be shared by every run's database), and
//! the bench reads the relay's `posthorn_kafka_transactions_total` from its `/metrics` (on
//! `POSTHORN_HTTP_ADDR=127.0.0.1:<a free port>`, unless `--relay-env` sets it) before it stops
//! it: committed and aborted transactions, rows per transaction. An exactly-once run whose
//! relay committed no transaction is an error (a build without the mode ignores the variable).
//! Every consumer of the bench (the drain's tail, the steady scenario's) reads with
//! `isolation.level=read_committed` in every mode (librdkafka's default, now set explicitly): in
//! exactly-once it sees a record only once its transaction commits, in at-least-once (no
//! transactions) it sees what it saw before, so the modes' latencies are measured alike.
//!
//! Every scenario runs `--runs` times for each mode, the modes' runs interleaved (run 1 in the
//! order given, run 2 reversed, ...); medians and min–max are printed. Backlogs are written as a
//! service writes them: 100-row transactions from 4 writers.
//! 1. wal: WAL the relay adds per row, from `pg_current_wal_lsn()` deltas. Steady state: writers
//!    insert 100-row transactions at `--wal-rate` while the relay runs, minus the same writes
//!    with no relay. After a `CHECKPOINT`: a backlog drained right after one (full-page images).
//!    Postgres is shared, so other sessions' WAL is in every delta: the scenario also measures
//!    the cluster's WAL while the bench idles, and (with pg_walinspect) the WAL records of the
//!    bench's own database alone. Dead tuples the relay leaves (`n_dead_tup`, autovacuum off for
//!    the outbox) and what a VACUUM afterwards writes. Per tracking mode, at-least-once.
//! 2. drain: N rows written while the relay is stopped, then the relay (the release binary)
//!    started; time until every row is published and recorded (marked, or covered by the
//!    checkpoint; in exactly-once the checkpoint advances only after the Kafka transaction
//!    committed, so then every row is also visible to a read_committed consumer). Without a
//!    consumer, and with one tailing the topic as production has. Bounded by the smaller of the
//!    limits (5.) of its mode: Postgres read+record of its tracking mode, and Kafka produce for
//!    at-least-once or Kafka transactions for exactly-once (a producer has one transaction open
//!    at a time, so each batch also waits for its commit: AddPartitionsToTxn, EndTxn and a
//!    marker in every partition it wrote).
//! 3. steady: writers insert at a fixed rate in one-row transactions; a consumer compares each
//!    record's arrival with the writer's commit time. Bounded below by the relay's wake-up
//!    (NOTIFY, or the poll interval), its read, the produce round trip (acks=all) and the
//!    consumer's fetch (`fetch.wait.max.ms=5`); in exactly-once also by the transaction's commit
//!    (a record is not visible before it, and the last stable offset a read_committed consumer
//!    reads up to waits for it), for every row of the batch, the first one included.
//! 4. footprint: relay CPU seconds per 100k rows and peak RSS (from the drain runs), idle CPU
//!    over `--idle-secs` with an empty outbox. Per mode.
//! 5. limits: the relay's Postgres statements with no Kafka (read + record, and for checkpoint
//!    mode the window reads alone), per tracking mode; a bare rdkafka producer sending the same
//!    records with no Postgres; with an exactly-once mode, also a bare transactional producer
//!    (the relay's transactional settings) doing what an exactly-once relay does to Kafka: a
//!    transaction per `--batch-size` records plus a checkpoint record in a compacted topic,
//!    every delivery report awaited before the commit (as the relay has them: rust-rdkafka's
//!    `commit_transaction` flushes first, and that flush, with records still in flight and
//!    another thread serving the producer's events, waits in 100 ms polls), the transactions
//!    one after the other. The relay's drain rate as a fraction of the smaller limit of its
//!    mode.
//! 6. plan: EXPLAIN ANALYZE of the relay's own window statements (a page in the middle of a big
//!    window, and the empty window after it), before and after ANALYZE. Once, not per run.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use posthorn::acks::Tracker;
use posthorn::config::{OutboxTable, PoisonPolicy, Tracking};
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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, env = "POSTHORN_TEST_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "POSTHORN_TEST_KAFKA_BROKERS")]
    brokers: String,
    /// Rows per drain run (and per limit run, and per WAL run).
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tracking modes measured side by side (POSTHORN_TRACKING), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "rows,checkpoint", value_parser = parse_tracking)]
    tracking: Vec<Tracking>,
    /// Delivery modes measured side by side (POSTHORN_DELIVERY), comma-separated; with every
    /// tracking mode of `--tracking` but rows for exactly-once (which needs checkpoint).
    #[arg(long, value_delimiter = ',', default_value = "at-least-once", value_parser = parse_delivery)]
    delivery: Vec<Delivery>,
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
    /// In the steady scenario, ANALYZE the outbox once the relay is up (an outbox in service
    /// has statistics; a fresh one has none until autovacuum gets to it).
    #[arg(long)]
    steady_analyze: bool,
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// The writers' rate in the WAL scenario's steady state (rows/s, in 100-row transactions).
    #[arg(long, default_value_t = 10_000)]
    wal_rate: u64,
    /// Seconds over which the cluster's WAL is measured while the bench idles (per run).
    #[arg(long, default_value_t = 5)]
    wal_idle_secs: u64,
    /// Which scenarios: wal, drain, steady, idle, limits, plan (comma-separated), or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    #[arg(long, default_value = "1000")]
    batch_size: String,
    /// Extra environment for the relay, e.g. `--relay-env POSTHORN_KAFKA_LINGER_MS=10`
    /// (repeatable). POSTHORN_TRACKING and POSTHORN_DELIVERY are set by `--tracking` and
    /// `--delivery`.
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

fn parse_tracking(value: &str) -> Result<Tracking, String> {
    match value.trim() {
        "rows" => Ok(Tracking::Rows),
        "checkpoint" => Ok(Tracking::Checkpoint),
        other => Err(format!("'{other}' is neither 'rows' nor 'checkpoint'")),
    }
}

fn parse_delivery(value: &str) -> Result<Delivery, String> {
    match value.trim() {
        "at-least-once" => Ok(Delivery::AtLeastOnce),
        "exactly-once" => Ok(Delivery::ExactlyOnce),
        other => Err(format!(
            "'{other}' is neither 'at-least-once' nor 'exactly-once'"
        )),
    }
}

/// `POSTHORN_DELIVERY` (the bench's own copy, so that it also drives builds from before the
/// mode, e.g. with `--posthorn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

/// What the relay runs as: its tracking mode and its delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    tracking: Tracking,
    delivery: Delivery,
}

impl Mode {
    /// For what does not depend on delivery (and for `posthorn migrate`).
    fn at_least_once(tracking: Tracking) -> Mode {
        Mode {
            tracking,
            delivery: Delivery::AtLeastOnce,
        }
    }

    fn exactly_once(self) -> bool {
        self.delivery == Delivery::ExactlyOnce
    }

    /// `<tracking>/<delivery>`, as the tables label the relay's figures.
    fn label(self) -> String {
        format!("{}/{}", self.tracking.as_str(), self.delivery.as_str())
    }
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == "all" || s == scenario)
    }

    /// Every mode measured, in the order given: tracking-major, rows/exactly-once left out.
    fn all_modes(&self) -> Vec<Mode> {
        let mut modes = Vec::new();
        for &tracking in &self.tracking {
            for &delivery in &self.delivery {
                let mode = Mode { tracking, delivery };
                let refused = tracking == Tracking::Rows && delivery == Delivery::ExactlyOnce;
                if !refused && !modes.contains(&mode) {
                    modes.push(mode);
                }
            }
        }
        modes
    }

    /// The modes in the order run `run` (from 1) measures them: as given, then reversed, so
    /// that neither mode always goes first.
    fn modes(&self, run: usize) -> Vec<Mode> {
        interleaved(self.all_modes(), run)
    }

    /// The tracking modes alone, for the scenarios that do not depend on delivery, in the
    /// order run `run` measures them.
    fn tracking_modes(&self, run: usize) -> Vec<Tracking> {
        let mut trackings = Vec::new();
        for t in &self.tracking {
            if !trackings.contains(t) {
                trackings.push(*t);
            }
        }
        interleaved(trackings, run)
    }
}

fn interleaved<T>(mut modes: Vec<T>, run: usize) -> Vec<T> {
    if run % 2 == 0 {
        modes.reverse();
    }
    modes
}

const PAD: usize = 260; // with the other fields, a ~300-byte JSON payload
/// Rows per writer transaction when the bench writes a backlog or the WAL scenario's rows.
const TX_ROWS: u64 = 100;
/// Concurrent writers when the bench writes a backlog or the WAL scenario's rows.
const WRITERS: u64 = 4;

/// Results per (measure, mode): one value per run.
#[derive(Default)]
struct Figures(Vec<(String, Vec<f64>, usize)>);

impl Figures {
    fn push(&mut self, name: String, value: f64, decimals: usize) {
        match self.0.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, values, _)) => values.push(value),
            None => self.0.push((name, vec![value], decimals)),
        }
    }

    fn get(&self, name: &str) -> Vec<f64> {
        self.0
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.clone())
            .unwrap_or_default()
    }

    fn into_table(self, table: &mut Vec<(String, String)>) {
        for (name, values, decimals) in self.0 {
            table.push((name, summary(&values, decimals)));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.tracking.is_empty(), "--tracking names no mode");
    anyhow::ensure!(!args.delivery.is_empty(), "--delivery names no mode");
    for (var, option) in [
        ("POSTHORN_TRACKING=", "--tracking"),
        ("POSTHORN_DELIVERY=", "--delivery"),
    ] {
        anyhow::ensure!(
            !args.relay_env.iter().any(|e| e.starts_with(var)),
            "set the mode with {option}, not --relay-env"
        );
    }
    anyhow::ensure!(
        !args.all_modes().is_empty(),
        "no mode to measure: exactly-once needs --tracking checkpoint"
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let modes: Vec<String> = args.all_modes().iter().map(|m| m.label()).collect();
    println!(
        "posthorn-bench: {cores} cores, {} rows x {} runs per mode ({}, interleaved), {} keys, \
         ~300-byte payloads, batch size {}",
        args.rows,
        args.runs,
        modes.join(", "),
        args.keys,
        args.batch_size
    );
    if args.tracking.contains(&Tracking::Rows) && args.delivery.contains(&Delivery::ExactlyOnce) {
        println!(
            "  (no rows/exactly-once: the relay refuses exactly-once without checkpoint tracking)"
        );
    }
    println!("  load average at start: {}", loadavg());
    let (ssl, own_tls) = postgres_tls(&args).await?;
    println!(
        "  postgres: ssl = {ssl}; the bench's own connection (sqlx defaults, sslmode=prefer): {own_tls}"
    );
    let mut table: Vec<(String, String)> = Vec::new();

    if args.wants("wal") {
        wal_scenario(&args, &mut table).await?;
    }
    let mut drain_rates = Figures::default();
    if args.wants("drain") {
        let mut figures = Figures::default();
        let mut load = Vec::new();
        let mut tls_checked = Vec::new();
        for run in 1..=args.runs {
            for mode in args.modes(run) {
                for tail in [false, true] {
                    let m = mode.label();
                    let check_tls = !tls_checked.contains(&mode);
                    let r = drain(&args, mode, tail, check_tls).await?;
                    if let Some(tls) = &r.tls {
                        println!("  drain [{m}]: the relay's connections: {tls}");
                        tls_checked.push(mode);
                    }
                    let wall = args.rows as f64 / r.rows_per_sec;
                    let consumer = match r.consumed {
                        Some(n) => format!(
                            ", the consumer had read {n} records when the last row was recorded"
                        ),
                        None => String::new(),
                    };
                    let with = if tail {
                        "with a consumer"
                    } else {
                        "no consumer"
                    };
                    let transactions = r.transactions.describe(args.rows);
                    println!(
                        "  drain run {run} [{m}] {with}: {:.0} rows/s, {:.2} CPU s per 100k rows, peak RSS {:.1} MiB; \
                         over {wall:.1} s wall on {cores} cores the CPU went to relay {:.1} s, postgres (this database's sessions) {:.1} s, broker {:.1} s{consumer}{transactions}",
                        r.rows_per_sec, r.cpu_secs_per_100k, r.peak_rss_mib, r.cpu_split.0, r.cpu_split.1, r.cpu_split.2
                    );
                    let with_name = if tail {
                        "consumer tailing"
                    } else {
                        "no consumer"
                    };
                    let name = format!("backlog drain [{m}], {with_name} (rows/s)");
                    drain_rates.push(name.clone(), r.rows_per_sec, 0);
                    figures.push(name, r.rows_per_sec, 0);
                    if !tail {
                        figures.push(
                            format!("relay CPU s per 100k rows [{m}], no consumer"),
                            r.cpu_secs_per_100k,
                            2,
                        );
                        figures.push(format!("relay peak RSS (MiB) [{m}]"), r.peak_rss_mib, 1);
                    }
                    if mode.exactly_once() {
                        figures.push(
                            format!(
                                "drain [{m}], {with_name}: rows per committed Kafka transaction"
                            ),
                            r.transactions.rows_per_commit(args.rows),
                            0,
                        );
                        figures.push(
                            format!("drain [{m}], {with_name}: Kafka transactions aborted or of unknown outcome"),
                            r.transactions.not_committed(),
                            0,
                        );
                    }
                }
            }
            load.push(load1());
        }
        figures.into_table(&mut table);
        table.push((
            "load average (1 min) after each drain run".into(),
            summary(&load, 2),
        ));
    }
    if args.wants("limits") {
        let mut figures = Figures::default();
        let mut load = Vec::new();
        let batch: usize = args.batch_size.parse()?;
        for run in 1..=args.runs {
            for mode in args.tracking_modes(run) {
                let m = mode.as_str();
                let p = postgres_limit(&args, mode).await?;
                println!("  limits run {run} [{m}]: postgres read+record {p:.0} rows/s");
                figures.push(format!("limit [{m}]: postgres read+record (rows/s)"), p, 0);
                if mode == Tracking::Checkpoint {
                    let r = read_only_limit(&args).await?;
                    println!("  limits run {run} [{m}]: postgres window reads alone {r:.0} rows/s");
                    figures.push(
                        format!("limit [{m}]: postgres window reads alone (rows/s)"),
                        r,
                        0,
                    );
                }
            }
            // Kafka's limits, in the order of the run's modes (at-least-once's, then
            // exactly-once's, or the reverse).
            let mut deliveries: Vec<Delivery> = Vec::new();
            for mode in args.modes(run) {
                if !deliveries.contains(&mode.delivery) {
                    deliveries.push(mode.delivery);
                }
            }
            for delivery in deliveries {
                match delivery {
                    Delivery::AtLeastOnce => {
                        let k = kafka_limit(&args).await?;
                        println!("  limits run {run}: kafka produce {k:.0} msgs/s");
                        figures.push(KAFKA_LIMIT.into(), k, 0);
                    }
                    Delivery::ExactlyOnce => {
                        let k = kafka_transactions_limit(&args, batch).await?;
                        println!(
                            "  limits run {run}: kafka transactions of {batch} records + a checkpoint record {k:.0} msgs/s"
                        );
                        figures.push(kafka_transactions_limit_name(batch), k, 0);
                    }
                }
            }
            load.push(load1());
        }
        let mut ratios = Vec::new();
        for mode in args.all_modes() {
            let m = mode.label();
            let drained = drain_rates.get(&format!("backlog drain [{m}], no consumer (rows/s)"));
            let pg = figures.get(&format!(
                "limit [{}]: postgres read+record (rows/s)",
                mode.tracking.as_str()
            ));
            let kafka = match mode.delivery {
                Delivery::AtLeastOnce => figures.get(KAFKA_LIMIT),
                Delivery::ExactlyOnce => figures.get(&kafka_transactions_limit_name(batch)),
            };
            if !drained.is_empty() {
                ratios.push((
                    format!("drain (no consumer) / min(limits) [{m}]"),
                    format!("{:.2}", median(&drained) / median(&pg).min(median(&kafka))),
                ));
            }
        }
        figures.into_table(&mut table);
        table.extend(ratios);
        table.push((
            "load average (1 min) after each limits run".into(),
            summary(&load, 2),
        ));
    }
    if args.wants("steady") {
        for &rate in &args.rates {
            let mut results: Vec<(Mode, Steady)> = Vec::new();
            let mut load = Vec::new();
            for run in 1..=args.runs {
                for mode in args.modes(run) {
                    let r = steady(&args, rate, mode).await?;
                    let db = match r.db {
                        Some((p99, p999, max)) => format!(
                            "transaction start to mark in the database: p99 {p99:.1} ms, p99.9 {p999:.1} ms, max {max:.1} ms"
                        ),
                        None => "no per-row mark in the database to time".into(),
                    };
                    let stats = if r.analyzed {
                        "the outbox had statistics"
                    } else {
                        "the outbox had no statistics"
                    };
                    let transactions = r.transactions.describe(r.rows_sent);
                    println!(
                        "  steady {} run {run} [{}]: wrote {:.0}/s, delivered {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({db}); {stats}{transactions}",
                        rate_name(rate), mode.label(), r.write_rate, r.throughput, r.p50, r.p99, r.p999, r.max
                    );
                    results.push((mode, r));
                }
                load.push(load1());
            }
            let name = rate_name(rate);
            for mode in args.all_modes() {
                let m = mode.label();
                let pick = |f: fn(&Steady) -> f64| {
                    results
                        .iter()
                        .filter(|(r_mode, _)| *r_mode == mode)
                        .map(|(_, r)| f(r))
                        .collect::<Vec<_>>()
                };
                table.push((
                    format!("steady {name} [{m}]: delivered (rows/s)"),
                    summary(&pick(|r| r.throughput), 0),
                ));
                table.push((
                    format!("steady {name} [{m}]: p50 / p99 / p99.9 / max (ms)"),
                    format!(
                        "{:.1} / {:.1} / {:.1} / {:.1}",
                        median(&pick(|r| r.p50)),
                        median(&pick(|r| r.p99)),
                        median(&pick(|r| r.p999)),
                        median(&pick(|r| r.max))
                    ),
                ));
                table.push((
                    format!("steady {name} [{m}]: p50 spread (ms)"),
                    summary(&pick(|r| r.p50), 1),
                ));
                table.push((
                    format!("steady {name} [{m}]: p99 spread (ms)"),
                    summary(&pick(|r| r.p99), 1),
                ));
                if mode.exactly_once() {
                    table.push((
                        format!("steady {name} [{m}]: rows per committed Kafka transaction"),
                        summary(&pick(|r| r.transactions.rows_per_commit(r.rows_sent)), 1),
                    ));
                    table.push((
                        format!(
                            "steady {name} [{m}]: Kafka transactions aborted or of unknown outcome"
                        ),
                        summary(&pick(|r| r.transactions.not_committed()), 0),
                    ));
                }
            }
            table.push((
                format!("load average (1 min) after each steady {name} run"),
                summary(&load, 2),
            ));
        }
    }
    if args.wants("idle") {
        let mut figures = Figures::default();
        for run in 1..=args.runs {
            for mode in args.modes(run) {
                figures.push(
                    format!(
                        "idle CPU over {} s (% of one core) [{}]",
                        args.idle_secs,
                        mode.label()
                    ),
                    idle_cpu(&args, mode).await?,
                    3,
                );
            }
        }
        figures.into_table(&mut table);
    }
    if args.wants("plan") && args.tracking.contains(&Tracking::Checkpoint) {
        plan(&args).await?;
    }

    println!("\n  load average at the end: {}", loadavg());
    println!("\n| measure ({cores} cores) | median [min–max] |\n|---|---|");
    for (k, v) in &table {
        println!("| {k} | {v} |");
    }
    Ok(())
}

/// /proc/loadavg's 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `SHOW ssl`, and whether the bench's own connection (sqlx's defaults) uses TLS.
async fn postgres_tls(args: &Args) -> anyhow::Result<(String, String)> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&pool).await?;
    let (on, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    let own = if on {
        format!("TLS ({})", version.unwrap_or_default())
    } else {
        "no TLS".into()
    };
    Ok((ssl, own))
}

/// Assigns every partition of `topic` to `consumer`, from the beginning.
fn assign_from_beginning(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<()> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
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

const INSERT_RANGE: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
     SELECT 'bench', 'key-' || (g % $3), 'BenchEvent', \
            jsonb_build_object('seq', g, 'pad', repeat('x', $4)) \
     FROM generate_series($1::bigint, $2::bigint) g";

/// Rows in state "not yet published" (the spec's "pending", valid in both modes) for row `o`.
const PENDING: &str = "o.delivered_at IS NULL AND o.failed_at IS NULL \
     AND NOT EXISTS (SELECT 1 FROM outbox_checkpoint c \
         WHERE pg_visible_in_snapshot(o.txid, c.snapshot) \
            OR (c.window_end IS NOT NULL AND pg_visible_in_snapshot(o.txid, c.window_end) \
                AND o.id <= c.position))";

/// A fresh database (migrated by the real binary) and topic for one run.
struct Setup {
    admin: String,
    brokers: String,
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
        let status = posthorn_cmd(&url, args, "unused", Mode::at_least_once(Tracking::Rows))
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
            brokers: args.brokers.clone(),
            name,
            url,
            pool,
            topic,
        })
    }

    /// `rows` rows as a service writes them: 100-row transactions from 4 writers, as fast as
    /// they go.
    async fn load(&self, rows: u64, keys: u64) -> anyhow::Result<()> {
        write_transactions(&self.pool, rows, keys, None).await?;
        Ok(())
    }

    /// For the measurements of WAL and dead tuples: no autovacuum on the outbox (it would add
    /// its own WAL at a time of its choosing, and remove the dead tuples being counted).
    async fn disable_autovacuum(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("ALTER TABLE outbox SET (autovacuum_enabled = false)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether a row is not yet published, in `tracking`'s terms. In checkpoint mode, first the
    /// newest row (cheap; while it is pending, so is the backlog), then every row whose
    /// transaction the checkpoint's snapshot does not already cover (a pending row's txid is at
    /// or above that snapshot's xmin).
    async fn pending(&self, tracking: Tracking) -> anyhow::Result<bool> {
        let sql = match tracking {
            Tracking::Rows => {
                return Ok(sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL)",
                )
                .fetch_one(&self.pool)
                .await?);
            }
            Tracking::Checkpoint => format!(
                "SELECT EXISTS (SELECT 1 FROM outbox o WHERE o.id = (SELECT max(id) FROM outbox) AND {PENDING})"
            ),
        };
        let newest: bool = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?;
        if newest {
            return Ok(true);
        }
        let any = format!(
            "SELECT EXISTS (SELECT 1 FROM outbox o \
             WHERE o.txid >= coalesce((SELECT pg_snapshot_xmin(snapshot) FROM outbox_checkpoint), '0'::xid8) \
               AND {PENDING})"
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(any))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn wait_published(&self, tracking: Tracking, poll: Duration) -> anyhow::Result<()> {
        while self.pending(tracking).await? {
            tokio::time::sleep(poll).await;
        }
        Ok(())
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
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        // The run's topic, and its exactly-once relay's checkpoint topic if it made one.
        let checkpoint = checkpoint_topic(&self.topic);
        let _ = admin_client
            .delete_topics(&[&self.topic, &checkpoint], &AdminOptions::new())
            .await;
        Ok(())
    }
}

/// `rows` rows in transactions of `TX_ROWS` rows from `WRITERS` writers: as fast as they go, or
/// at `rate` rows/s in all. Returns the seconds it took.
async fn write_transactions(
    pool: &PgPool,
    rows: u64,
    keys: u64,
    rate: Option<u64>,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (pool, next) = (pool.clone(), next.clone());
        let tx_per_sec = rate.map(|r| r as f64 / TX_ROWS as f64 / WRITERS as f64);
        writers.push(tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                if let Some(tx_per_sec) = tx_per_sec {
                    let due = started + Duration::from_secs_f64(done as f64 / tx_per_sec);
                    tokio::time::sleep_until(due.into()).await;
                }
                let first = next.fetch_add(TX_ROWS, Ordering::Relaxed);
                if first >= rows {
                    break;
                }
                let last = (first + TX_ROWS).min(rows) - 1;
                sqlx::query(INSERT_RANGE)
                    .bind(first as i64)
                    .bind(last as i64)
                    .bind(keys as i64)
                    .bind(PAD as i32)
                    .execute(&pool)
                    .await?;
                done += 1;
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The checkpoint topic of an exactly-once relay publishing to `topic`: one per run, deleted
/// with it (the relay's default, `posthorn-checkpoint.public.outbox`, would be every run's).
fn checkpoint_topic(topic: &str) -> String {
    format!("{topic}-checkpoint")
}

/// The relay binary's command, with `POSTHORN_TRACKING` and (for exactly-once)
/// `POSTHORN_DELIVERY` and `POSTHORN_CHECKPOINT_TOPIC` of `mode`. At-least-once sets no
/// POSTHORN_DELIVERY (its default), so that builds from before it run as they did.
fn posthorn_cmd(url: &str, args: &Args, topic: &str, mode: Mode) -> Command {
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
        .env("POSTHORN_TRACKING", mode.tracking.as_str())
        .env("POSTHORN_LOG", "warn")
        .stdin(Stdio::null());
    if mode.exactly_once() {
        cmd.env("POSTHORN_DELIVERY", mode.delivery.as_str())
            .env("POSTHORN_CHECKPOINT_TOPIC", checkpoint_topic(topic));
    }
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

/// `posthorn run` in one mode, serving `/metrics` on `http`.
struct Relay {
    child: Child,
    http: SocketAddr,
}

impl Relay {
    /// The relay of mode `mode` on `setup`'s database and topic, its HTTP endpoints on a free
    /// loopback port (unless `--relay-env` sets POSTHORN_HTTP_ADDR).
    fn start(setup: &Setup, args: &Args, mode: Mode) -> anyhow::Result<Relay> {
        let mut cmd = posthorn_cmd(&setup.url, args, &setup.topic, mode);
        let given = args
            .relay_env
            .iter()
            .find_map(|e| e.strip_prefix("POSTHORN_HTTP_ADDR="));
        let http = match given {
            Some(addr) => {
                let mut addr: SocketAddr = addr.trim().parse()?;
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                    });
                }
                addr
            }
            None => {
                let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                cmd.env("POSTHORN_HTTP_ADDR", addr.to_string());
                addr
            }
        };
        let child = cmd.arg("run").spawn()?;
        Ok(Relay { child, http })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Reads the relay's Kafka transactions from `/metrics`, then stops it.
    async fn finish(self) -> Transactions {
        let transactions = self.transactions().await;
        stop(self.child);
        transactions
    }

    fn stop(self) {
        stop(self.child);
    }

    /// `posthorn_kafka_transactions_total` by outcome, None if `/metrics` has no such series
    /// (or could not be read: said on stdout).
    async fn transactions(&self) -> Transactions {
        let url = format!("http://{}/metrics", self.http);
        let fetched = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            Ok(agent.get(&url).call()?.body_mut().read_to_string()?)
        })
        .await;
        let text = match fetched {
            Ok(Ok(text)) => text,
            Ok(Err(err)) => {
                println!("  (the relay's /metrics on {}: {err:#})", self.http);
                return Transactions(None);
            }
            Err(err) => {
                println!("  (the relay's /metrics on {}: {err})", self.http);
                return Transactions(None);
            }
        };
        Transactions::parse(&text)
    }
}

/// A relay's Kafka transactions when it stopped, from its `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TxnCounts {
    /// `posthorn_kafka_transactions_total` by outcome.
    committed: u64,
    aborted: u64,
    /// Failed commits whose outcome the next leadership reads from the checkpoint topic.
    unknown: u64,
    /// `posthorn_kafka_producer_fenced_total`: a newer producer of the same transactional.id.
    fenced: u64,
}

/// None if the relay had no `posthorn_kafka_transactions_total` series (at-least-once, or a
/// build without transactions).
#[derive(Debug, Clone, Copy, Default)]
struct Transactions(Option<TxnCounts>);

impl Transactions {
    fn parse(metrics: &str) -> Transactions {
        let (mut found, mut counts) = (false, TxnCounts::default());
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            // `name{labels} value` or `name value`.
            let Some(i) = line.find(['{', ' ']) else {
                continue;
            };
            let (name, rest) = line.split_at(i);
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => match r.split_once('}') {
                    Some(split) => split,
                    None => continue,
                },
                None => ("", rest),
            };
            let Some(value) = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            let value = value as u64;
            match name {
                "posthorn_kafka_transactions_total" => {
                    found = true;
                    if labels.contains("outcome=\"committed\"") {
                        counts.committed += value;
                    } else if labels.contains("outcome=\"aborted\"") {
                        counts.aborted += value;
                    } else if labels.contains("outcome=\"unknown\"") {
                        counts.unknown += value;
                    }
                }
                "posthorn_kafka_producer_fenced_total" => counts.fenced += value,
                _ => {}
            }
        }
        Transactions(found.then_some(counts))
    }

    /// For a run's line: nothing if the relay had no transactions.
    fn describe(&self, rows: u64) -> String {
        match self.0 {
            Some(c) if c != TxnCounts::default() => format!(
                "; Kafka transactions: {} committed ({:.1} rows each), {} aborted, {} unknown; producer fenced {} times",
                c.committed,
                self.rows_per_commit(rows),
                c.aborted,
                c.unknown,
                c.fenced
            ),
            _ => String::new(),
        }
    }

    fn rows_per_commit(&self, rows: u64) -> f64 {
        match self.0 {
            Some(c) if c.committed > 0 => rows as f64 / c.committed as f64,
            _ => f64::NAN,
        }
    }

    /// Transactions that did not commit (aborted, or of unknown outcome).
    fn not_committed(&self) -> f64 {
        self.0.map_or(f64::NAN, |c| (c.aborted + c.unknown) as f64)
    }

    /// An exactly-once relay that published must have committed transactions: one that did not
    /// is not measuring exactly-once (a build without the mode ignores POSTHORN_DELIVERY).
    fn check(&self, mode: Mode) -> anyhow::Result<()> {
        if mode.exactly_once() {
            anyhow::ensure!(
                matches!(self.0, Some(c) if c.committed > 0),
                "the {} relay published with no committed Kafka transaction on its /metrics \
                 (posthorn_kafka_transactions_total: {:?}): does this build know POSTHORN_DELIVERY?",
                mode.label(),
                self.0
            );
        }
        Ok(())
    }
}

/// The broker's processes: the one `scripts/services.sh` started (its pid file) and its `java`
/// children; every `java` process if there is no pid file (then other JVMs count too).
fn broker_pids() -> Vec<u32> {
    let state =
        std::env::var("POSTHORN_STATE_DIR").unwrap_or_else(|_| "/tmp/posthorn-services".into());
    let Some(root) = std::fs::read_to_string(format!("{state}/broker.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    else {
        return processes()
            .filter(|pid| comm(*pid).as_deref() == Some("java"))
            .collect();
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    std::iter::once(root)
        .chain(processes().filter(|pid| parent(*pid) == Some(root)))
        .collect()
}

fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

fn cpu_of_pids(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| cpu_and_rss(*pid).0)
        .filter(|c| c.is_finite())
        .sum()
}

/// CPU seconds so far of this database's Postgres sessions, per backend pid.
async fn session_cpu(pool: &PgPool) -> anyhow::Result<Vec<(u32, f64)>> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(pool)
            .await?;
    Ok(pids
        .into_iter()
        .map(|pid| (pid as u32, cpu_and_rss(pid as u32).0))
        .filter(|(_, cpu)| cpu.is_finite())
        .collect())
}

/// CPU seconds this database's sessions used since `before` (sessions opened since count
/// whole).
fn session_cpu_since(before: &[(u32, f64)], now: &[(u32, f64)]) -> f64 {
    now.iter()
        .map(|(pid, cpu)| {
            let earlier = before
                .iter()
                .find(|(p, _)| p == pid)
                .map_or(0.0, |(_, c)| *c);
            cpu - earlier
        })
        .sum()
}

/// A consumer reading a topic from its start while the relay writes it, as production has one:
/// the broker serves its fetches while it takes the relay's writes.
struct Tail {
    done: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Tail {
    fn start(brokers: &str, topic: &str) -> Tail {
        let done = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let thread = {
            let (brokers, topic, done, count) = (
                brokers.to_owned(),
                topic.to_owned(),
                done.clone(),
                count.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", format!("posthorn-bench-tail-{topic}"))
                    .set("isolation.level", "read_committed")
                    .create()?;
                assign_from_beginning(&c, &topic)?;
                let mut bytes = 0usize;
                while !done.load(Ordering::Relaxed) {
                    if let Some(m) = c.poll(Duration::from_millis(50)) {
                        bytes += m?.payload().map_or(0, |p| p.len());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::hint::black_box(bytes);
                Ok(())
            })
        };
        Tail {
            done,
            count,
            thread,
        }
    }

    /// Stops the consumer; how many records it had read.
    fn stop(self) -> anyhow::Result<u64> {
        let n = self.count.load(Ordering::Relaxed);
        self.done.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
        Ok(n)
    }
}

struct Drain {
    /// CPU seconds of (relay, this database's Postgres sessions, broker) during the drain: where
    /// the machine's time went.
    cpu_split: (f64, f64, f64),
    rows_per_sec: f64,
    cpu_secs_per_100k: f64,
    peak_rss_mib: f64,
    /// Records the tailing consumer had read when the last row was recorded.
    consumed: Option<u64>,
    /// The relay's Postgres connections and whether they use TLS, if asked for.
    tls: Option<String>,
    transactions: Transactions,
}

async fn drain(args: &Args, mode: Mode, tail: bool, check_tls: bool) -> anyhow::Result<Drain> {
    let tracking = mode.tracking;
    let setup = Setup::new(args, "drain").await?;
    setup.load(args.rows, args.keys).await?;
    let consumer = tail.then(|| Tail::start(&args.brokers, &setup.topic));
    // Postgres: this database's sessions (the relay's and the bench's own polling), not the
    // other sessions sharing the server, nor its background processes. The broker: Apache
    // Kafka's JVM as scripts/services.sh started it.
    let brokers = broker_pids();
    let (pg_before, broker_before) = (session_cpu(&setup.pool).await?, cpu_of_pids(&brokers));
    let started = Instant::now();
    let relay = Relay::start(&setup, args, mode)?;
    let pid = relay.id();
    let mut last = (0.0, 0.0);
    while setup.pending(tracking).await? {
        last = cpu_and_rss(pid);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let consumed = consumer.map(Tail::stop).transpose()?;
    let (pg_after, broker_after) = (session_cpu(&setup.pool).await?, cpu_of_pids(&brokers));
    let (cpu, rss) = cpu_and_rss(pid);
    let (cpu, rss) = (
        if cpu.is_nan() { last.0 } else { cpu },
        if rss.is_nan() { last.1 } else { rss },
    );
    let tls = if check_tls {
        Some(relay_tls(&setup.pool).await?)
    } else {
        None
    };
    let transactions = relay.finish().await;
    setup.drop().await?;
    transactions.check(mode)?;
    Ok(Drain {
        transactions,
        cpu_split: (
            cpu,
            session_cpu_since(&pg_before, &pg_after),
            broker_after - broker_before,
        ),
        rows_per_sec: args.rows as f64 / elapsed,
        cpu_secs_per_100k: cpu / (args.rows as f64 / 100_000.0),
        peak_rss_mib: rss,
        consumed,
        tls,
    })
}

/// The relay's sessions in this database (application names "posthorn ..."), from pg_stat_ssl.
async fn relay_tls(pool: &PgPool) -> anyhow::Result<String> {
    let (on, all, versions): (i64, i64, Option<String>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*), \
                string_agg(DISTINCT s.version || ' ' || s.cipher, ', ') \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.application_name LIKE 'posthorn%'",
    )
    .fetch_one(pool)
    .await?;
    Ok(format!(
        "{on} of {all} on TLS ({})",
        versions.unwrap_or_else(|| "none".into())
    ))
}

/// An outbox handle of mode `tracking` on the bench's pool, and a lease epoch to record with.
async fn bench_outbox(setup: &Setup, tracking: Tracking) -> anyhow::Result<(Outbox, i64)> {
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
    let outbox = Outbox::with_pool(setup.pool.clone(), &table, PoisonPolicy::DeadLetter)
        .tracked_by(tracking);
    Ok((outbox, epoch))
}

/// The relay's own read and record statements (`posthorn::outbox::Outbox` in mode `tracking`)
/// in a loop, with every row acknowledged at once.
async fn postgres_limit(args: &Args, tracking: Tracking) -> anyhow::Result<f64> {
    let setup = Setup::new(args, "pglimit").await?;
    setup.load(args.rows, args.keys).await?;
    let (outbox, epoch) = bench_outbox(&setup, tracking).await?;
    let batch: usize = args.batch_size.parse()?;
    let started = Instant::now();
    let mut n = 0u64;
    // The relay's statements in the relay's order, one after the other: read the next batch
    // past the one "in flight" (the read and, in rows mode, its check), record that one, repeat.
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
    anyhow::ensure!(
        n == args.rows,
        "the {} limit recorded {n} of {} rows",
        tracking.as_str(),
        args.rows
    );
    setup.drop().await?;
    Ok(rate)
}

/// Checkpoint mode's window reads alone (the relay's own statements, through `Outbox`): the
/// backlog is one window, read a page at a time past the page before, nothing recorded.
async fn read_only_limit(args: &Args) -> anyhow::Result<f64> {
    let setup = Setup::new(args, "readlimit").await?;
    setup.load(args.rows, args.keys).await?;
    let (outbox, _) = bench_outbox(&setup, Tracking::Checkpoint).await?;
    let batch: usize = args.batch_size.parse()?;
    let started = Instant::now();
    let mut n = 0u64;
    let mut sent: Vec<i64> = Vec::new();
    loop {
        let rows = match outbox.fetch_after(batch, &sent).await? {
            ReadPast::Rows(rows) => rows,
            ReadPast::RowBelow(_) => anyhow::bail!("checkpoint mode never reads below"),
        };
        if rows.is_empty() {
            break;
        }
        n += rows.len() as u64;
        sent = rows.iter().map(|r| r.id).collect();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        n == args.rows,
        "the window reads returned {n} of {} rows",
        args.rows
    );
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

const KAFKA_LIMIT: &str = "limit: kafka produce (msgs/s)";

fn kafka_transactions_limit_name(batch: usize) -> String {
    format!("limit: kafka transactions of {batch} records + a checkpoint record (msgs/s)")
}

/// The settings exactly-once's producer puts over posthorn's defaults (a copy of the relay's
/// `publisher::transaction::TRANSACTIONAL`, which the crate does not export).
const TRANSACTIONAL: &[(&str, &str)] = &[
    ("transaction.timeout.ms", "60000"),
    ("message.timeout.ms", "30000"),
    ("enable.gapless.guarantee", "false"),
];

/// posthorn's own producer defaults, `extra` over them, and the user's --relay-env
/// POSTHORN_KAFKA_* overrides.
fn producer_config(args: &Args, extra: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers);
    for (k, v) in posthorn::publisher::DEFAULTS.iter().chain(extra) {
        config.set(*k, *v);
    }
    for pair in &args.relay_env {
        if let Some((k, v)) = pair.split_once('=') {
            if let Some(suffix) = k.strip_prefix("POSTHORN_KAFKA_") {
                config.set(posthorn::config::kafka_property_name(suffix), v);
            }
        }
    }
    config
}

/// The record the relay sends for the bench's row `seq`: key, JSON value and posthorn's
/// headers.
struct BenchRecord {
    key: String,
    value: String,
    headers: OwnedHeaders,
}

fn bench_record(seq: u64, keys: u64, pad: &str) -> BenchRecord {
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
    BenchRecord {
        key: format!("key-{}", seq % keys),
        value: format!("{{\"pad\": \"{pad}\", \"seq\": {seq}}}"),
        headers,
    }
}

type Delivered = rdkafka::producer::DeliveryFuture;

/// Hands `record` to the producer; while librdkafka's queue is full, waits for the oldest
/// delivery report of `pending`.
async fn send_waiting(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, String, String>,
    pending: &mut std::collections::VecDeque<Delivered>,
) -> anyhow::Result<()> {
    loop {
        match producer.send_result(record) {
            Ok(f) => {
                pending.push_back(f);
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                match pending.pop_front() {
                    Some(f) => {
                        f.await?
                            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
                    }
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
}

/// A bare idempotent producer with posthorn's settings sending the same records.
async fn kafka_limit(args: &Args) -> anyhow::Result<f64> {
    let topic = format!(
        "posthorn-bench-kafkalimit-{:08x}",
        rand::rng().random::<u32>()
    );
    let admin = create_topic(&args.brokers, &topic).await?;
    let producer: FutureProducer = producer_config(args, &[]).create()?;
    let pad = "x".repeat(PAD);
    let started = Instant::now();
    // As fast as the producer goes: every record handed over at once, waiting for delivery
    // reports only when librdkafka's queue is full. The same records as the relay's: key,
    // JSON value and posthorn's headers.
    let mut pending = std::collections::VecDeque::new();
    for seq in 0..args.rows {
        let r = bench_record(seq, args.keys, &pad);
        let record = FutureRecord::to(&topic)
            .key(&r.key)
            .payload(&r.value)
            .headers(r.headers);
        send_waiting(&producer, record, &mut pending).await?;
    }
    for f in pending {
        f.await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    let rate = args.rows as f64 / started.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    Ok(rate)
}

/// A bare transactional producer (exactly-once's settings and a `transactional.id`) doing to
/// Kafka what an exactly-once relay does, with no Postgres: for every `batch` records, a
/// transaction holding them and one checkpoint record (keyed by an outbox identity, in a
/// compacted one-partition topic), every delivery report awaited, then committed before the
/// next transaction begins (a producer has one open at a time). The same records as
/// [`kafka_limit`]'s.
async fn kafka_transactions_limit(args: &Args, batch: usize) -> anyhow::Result<f64> {
    anyhow::ensure!(batch > 0, "--batch-size 0");
    let id = format!("{:08x}", rand::rng().random::<u32>());
    let topic = format!("posthorn-bench-kafkatxlimit-{id}");
    let checkpoints = checkpoint_topic(&topic);
    let admin = create_topic(&args.brokers, &topic).await?;
    for r in admin
        .create_topics(
            &[NewTopic::new(&checkpoints, 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact")],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let mut config = producer_config(args, TRANSACTIONAL);
    config.set(
        "transactional.id",
        format!("posthorn-bench-kafkatxlimit-{id}"),
    );
    let producer: FutureProducer = config.create()?;
    let timeout = Duration::from_secs(60);
    // librdkafka's transactional calls block: off the runtime's scheduling.
    tokio::task::block_in_place(|| producer.init_transactions(timeout))?;
    let identity = uuid::Uuid::new_v4();
    let pad = "x".repeat(PAD);
    let started = Instant::now();
    let (mut first, mut transaction) = (0u64, 0u64);
    while first < args.rows {
        let end = (first + batch as u64).min(args.rows);
        producer.begin_transaction()?;
        let mut pending = std::collections::VecDeque::new();
        for seq in first..end {
            let r = bench_record(seq, args.keys, &pad);
            let record = FutureRecord::to(&topic)
                .key(&r.key)
                .payload(&r.value)
                .headers(r.headers);
            send_waiting(&producer, record, &mut pending).await?;
        }
        transaction += 1;
        // As big as the relay's (posthorn::checkpoint_record's JSON, one id range).
        let key = identity.to_string();
        let value = format!(
            "{{\"version\":1,\"outbox\":\"{identity}\",\"table\":\"public.outbox\",\"epoch\":1,\
             \"transaction\":{transaction},\"published\":[[{first},{}]]}}",
            end - 1
        );
        let record = FutureRecord::to(&checkpoints).key(&key).payload(&value);
        send_waiting(&producer, record, &mut pending).await?;
        // Every delivery report before the commit, as the relay has them (it judges each
        // record's): rust-rdkafka's commit_transaction flushes first, and its flush, while
        // records are in flight and another thread serves the producer's events, waits in
        // polls of 100 ms: a commit with records in flight takes at least 100 ms.
        for f in pending {
            f.await?
                .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        }
        tokio::task::block_in_place(|| producer.commit_transaction(timeout))?;
        first = end;
    }
    let rate = args.rows as f64 / started.elapsed().as_secs_f64();
    drop(producer);
    let _ = admin
        .delete_topics(&[&topic, &checkpoints], &AdminOptions::new())
        .await;
    Ok(rate)
}

struct Steady {
    /// p99, p99.9 and max of delivered_at - created_at in the database: from the writer's
    /// transaction start (`now()`) to the mark, on one clock. Its tail against the consumer's
    /// says on which side of the mark a delay was. None in checkpoint mode (no per-row mark).
    db: Option<(f64, f64, f64)>,
    write_rate: f64,
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Whether the outbox had statistics (an ANALYZE or autovacuum's) by the end of the run.
    analyzed: bool,
    /// Rows the relay published in the run (the warm-up row and every writer's, the window's
    /// and the warm-up's), and its Kafka transactions.
    rows_sent: u64,
    transactions: Transactions,
}

async fn steady(args: &Args, rate: u64, mode: Mode) -> anyhow::Result<Steady> {
    let tracking = mode.tracking;
    let setup = Setup::new(args, "steady").await?;
    let relay = Relay::start(&setup, args, mode)?;
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
    while setup.pending(tracking).await? {
        anyhow::ensure!(
            Instant::now() < warm_up_deadline,
            "the relay did not deliver the warm-up row within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    if args.steady_analyze {
        sqlx::raw_sql("ANALYZE outbox").execute(&setup.pool).await?;
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
                // Exactly-once's records only once committed; in at-least-once the same as
                // read_uncommitted (no transactions). librdkafka's default, set explicitly.
                .set("isolation.level", "read_committed")
                .set("fetch.wait.max.ms", "5")
                .create()?;
            assign_from_beginning(&c, &topic)?;
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
    while setup.pending(tracking).await? {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_secs = window_started.elapsed().as_secs_f64();
    let db = match tracking {
        Tracking::Rows => Some(
            sqlx::query_as(
                "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
                        percentile_cont(0.999) WITHIN GROUP (ORDER BY ms), max(ms) \
                 FROM (SELECT (extract(epoch FROM delivered_at - created_at) * 1000)::float8 AS ms \
                       FROM outbox WHERE aggregate_id <> 'warm-up' \
                         AND (payload->>'seq')::bigint >= $1) AS t",
            )
            .bind(measured_from as i64)
            .fetch_one(&setup.pool)
            .await?,
        ),
        Tracking::Checkpoint => None,
    };
    let analyzed: bool = sqlx::query_scalar(
        "SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL \
         FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = 'outbox'",
    )
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
    let transactions = relay.finish().await;
    setup.drop().await?;
    transactions.check(mode)?;
    let rows_sent = 1 + next_seq.load(Ordering::Relaxed).min(commit_ns.len() as u64);
    latencies.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Steady {
        analyzed,
        rows_sent,
        transactions,
        db,
        write_rate: n_written as f64 / write_secs,
        throughput: n_written as f64 / delivered_secs,
        p50: q(0.5),
        p99: q(0.99),
        p999: q(0.999),
        max: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

async fn idle_cpu(args: &Args, mode: Mode) -> anyhow::Result<f64> {
    let setup = Setup::new(args, "idle").await?;
    let relay = Relay::start(&setup, args, mode)?;
    tokio::time::sleep(Duration::from_secs(2)).await; // start-up is not idle
    let (before, _) = cpu_and_rss(relay.id());
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (after, _) = cpu_and_rss(relay.id());
    relay.stop();
    setup.drop().await?;
    Ok((after - before) / args.idle_secs as f64 * 100.0)
}

async fn lsn(pool: &PgPool) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?)
}

/// Bytes of WAL from `from` to `to` (`pg_wal_lsn_diff`).
async fn lsn_diff(pool: &PgPool, from: &str, to: &str) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff($2::pg_lsn, $1::pg_lsn)::float8")
            .bind(from)
            .bind(to)
            .fetch_one(pool)
            .await?,
    )
}

/// The WAL records of one database alone, with pg_walinspect: records with a block of one of
/// its relations, and the records (commits) of the transactions that wrote them. Every delta of
/// `pg_current_wal_lsn()` also counts the other sessions' WAL; this does not.
struct WalInspect {
    /// `%/<database oid>/%`, as the database appears in `block_ref` ("rel 1663/<db>/<rel>").
    pattern: String,
}

impl WalInspect {
    async fn new(pool: &PgPool) -> Option<WalInspect> {
        let created = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .execute(pool)
            .await;
        if let Err(err) = created {
            println!("  (no pg_walinspect, so no per-database WAL figures: {err})");
            return None;
        }
        let oid: i64 = sqlx::query_scalar(
            "SELECT oid::bigint FROM pg_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        Some(WalInspect {
            pattern: format!("%/{oid}/%"),
        })
    }

    /// (bytes, of them full-page images) of this database's records from `from` to `to`.
    async fn ours(&self, pool: &PgPool, from: &str, to: &str) -> Option<(f64, f64)> {
        if lsn_diff(pool, from, to).await.ok()? <= 0.0 {
            return Some((0.0, 0.0));
        }
        // pg_walinspect reads only flushed WAL.
        for _ in 0..100 {
            let flushed: bool =
                sqlx::query_scalar("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
                    .bind(to)
                    .fetch_one(pool)
                    .await
                    .ok()?;
            if flushed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let found = sqlx::query_as(
            "WITH r AS MATERIALIZED ( \
                 SELECT xid::text::bigint AS x, coalesce(block_ref LIKE $3, false) AS mine, \
                        pg_wal_lsn_diff(end_lsn, start_lsn) AS len, fpi_length \
                 FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)) \
             SELECT coalesce(sum(len), 0)::float8, coalesce(sum(fpi_length), 0)::float8 FROM r \
             WHERE mine OR (x <> 0 AND x IN (SELECT x FROM r WHERE mine AND x <> 0))",
        )
        .bind(from)
        .bind(to)
        .bind(&self.pattern)
        .fetch_one(pool)
        .await;
        match found {
            Ok(bytes) => Some(bytes),
            Err(err) => {
                println!("  (pg_walinspect from {from} to {to}: {err})");
                None
            }
        }
    }
}

/// The outbox's tuple counters, once the sessions that wrote it have flushed their statistics
/// (`inserted` rows counted: the writers' sessions flush within a second of going idle, the
/// relay's when it exits), and two readings half a second apart agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuples {
    inserted: i64,
    dead: i64,
    updated: i64,
    hot_updated: i64,
}

async fn tuples(pool: &PgPool, inserted: u64) -> anyhow::Result<Tuples> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    loop {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(pool)
            .await?;
        let (inserted_now, dead, updated, hot_updated): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT n_tup_ins, n_dead_tup, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
             WHERE schemaname = 'public' AND relname = 'outbox'",
        )
        .fetch_one(pool)
        .await?;
        let now = Tuples {
            inserted: inserted_now,
            dead,
            updated,
            hot_updated,
        };
        if now.inserted >= inserted as i64 && last == Some(now) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            println!("  (statistics not settled after 20 s: {now:?}, {inserted} rows inserted)");
            return Ok(now);
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// WAL of a plain VACUUM of the outbox (what autovacuum would write later): (bytes, this
/// database's records only).
async fn vacuum(pool: &PgPool, inspect: Option<&WalInspect>) -> anyhow::Result<WalBytes> {
    let from = lsn(pool).await?;
    sqlx::raw_sql("VACUUM outbox").execute(pool).await?;
    let to = lsn(pool).await?;
    let bytes = lsn_diff(pool, &from, &to).await?;
    let ours = match inspect {
        Some(i) => i.ours(pool, &from, &to).await,
        None => None,
    };
    Ok(WalBytes { bytes, ours })
}

/// WAL over a stretch: the `pg_current_wal_lsn()` delta (every session's), and this database's
/// records alone (bytes, of them full-page images) if pg_walinspect could tell.
#[derive(Debug, Clone, Copy)]
struct WalBytes {
    bytes: f64,
    ours: Option<(f64, f64)>,
}

impl WalBytes {
    async fn measure(
        pool: &PgPool,
        inspect: Option<&WalInspect>,
        from: &str,
        to: &str,
    ) -> anyhow::Result<WalBytes> {
        let bytes = lsn_diff(pool, from, to).await?;
        let ours = match inspect {
            Some(i) => i.ours(pool, from, to).await,
            None => None,
        };
        Ok(WalBytes { bytes, ours })
    }

    fn describe(&self, rows: u64) -> String {
        let n = rows as f64;
        match self.ours {
            Some((ours, fpi)) => format!(
                "{:.1} B/row (this database's records alone {:.1} B/row, {:.1} of them full-page images)",
                self.bytes / n,
                ours / n,
                fpi / n
            ),
            None => format!("{:.1} B/row", self.bytes / n),
        }
    }
}

/// The cluster's WAL per second while the bench does nothing: other sessions' writes.
async fn idle_wal(args: &Args) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    let from = lsn(&pool).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.wal_idle_secs)).await;
    let to = lsn(&pool).await?;
    let bytes = lsn_diff(&pool, &from, &to).await?;
    pool.close().await;
    Ok(bytes / started.elapsed().as_secs_f64())
}

struct WalSteady {
    /// Seconds from the first write to the last row published (to the last write without a
    /// relay).
    secs: f64,
    wal: WalBytes,
    tuples: Tuples,
    vacuum: WalBytes,
}

/// Writers insert `--rows` rows in 100-row transactions at `--wal-rate` while the relay of mode
/// `tracking` runs (with no relay if None); the WAL from the first write until every row is
/// published.
async fn wal_steady(args: &Args, tracking: Option<Tracking>) -> anyhow::Result<WalSteady> {
    let setup = Setup::new(args, "wal").await?;
    setup.disable_autovacuum().await?;
    let inspect = WalInspect::new(&setup.pool).await;
    let relay = match tracking {
        Some(tracking) => Some(Relay::start(&setup, args, Mode::at_least_once(tracking))?),
        None => None,
    };
    // A warm-up row with and without the relay (the relay's start is not steady state).
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('bench', 'warm-up', 'BenchEvent', '{}')",
    )
    .execute(&setup.pool)
    .await?;
    if let Some(tracking) = tracking {
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup.pending(tracking).await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the relay did not deliver the warm-up row within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let from = lsn(&setup.pool).await?;
    let started = Instant::now();
    write_transactions(&setup.pool, args.rows, args.keys, Some(args.wal_rate)).await?;
    if let Some(tracking) = tracking {
        setup
            .wait_published(tracking, Duration::from_millis(20))
            .await?;
    }
    let to = lsn(&setup.pool).await?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(relay) = relay {
        relay.stop();
    }
    let wal = WalBytes::measure(&setup.pool, inspect.as_ref(), &from, &to).await?;
    let tuples = tuples(&setup.pool, args.rows + 1).await?;
    let vacuum = vacuum(&setup.pool, inspect.as_ref()).await?;
    setup.drop().await?;
    Ok(WalSteady {
        secs,
        wal,
        tuples,
        vacuum,
    })
}

struct WalDrain {
    secs: f64,
    /// The backlog's inserts (no relay running).
    insert: WalBytes,
    /// From the CHECKPOINT's end until every row is published: the relay's.
    relay: WalBytes,
    tuples: Tuples,
}

/// A backlog of `--rows` rows in 100-row transactions, then a CHECKPOINT, then the relay of mode
/// `tracking` drains it: every page it writes is its first write since the checkpoint.
async fn wal_after_checkpoint(args: &Args, tracking: Tracking) -> anyhow::Result<WalDrain> {
    let setup = Setup::new(args, "walcp").await?;
    setup.disable_autovacuum().await?;
    let inspect = WalInspect::new(&setup.pool).await;
    let a = lsn(&setup.pool).await?;
    setup.load(args.rows, args.keys).await?;
    let b = lsn(&setup.pool).await?;
    // Before the CHECKPOINT, which may recycle the segments that hold the inserts' WAL.
    let insert = WalBytes::measure(&setup.pool, inspect.as_ref(), &a, &b).await?;
    sqlx::raw_sql("CHECKPOINT").execute(&setup.pool).await?;
    let c = lsn(&setup.pool).await?;
    let started = Instant::now();
    let relay = Relay::start(&setup, args, Mode::at_least_once(tracking))?;
    setup
        .wait_published(tracking, Duration::from_millis(50))
        .await?;
    let d = lsn(&setup.pool).await?;
    let secs = started.elapsed().as_secs_f64();
    relay.stop();
    let relay = WalBytes::measure(&setup.pool, inspect.as_ref(), &c, &d).await?;
    let tuples = tuples(&setup.pool, args.rows).await?;
    setup.drop().await?;
    Ok(WalDrain {
        secs,
        insert,
        relay,
        tuples,
    })
}

async fn wal_scenario(args: &Args, table: &mut Vec<(String, String)>) -> anyhow::Result<()> {
    let n = args.rows as f64;
    let mut figures = Figures::default();
    let (mut idle_rates, mut steady_secs, mut drain_secs, mut load) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!(
        "  wal: {} rows per run in {TX_ROWS}-row transactions from {WRITERS} writers (steady state at {} rows/s), \
         autovacuum off for the outbox",
        args.rows, args.wal_rate
    );
    for run in 1..=args.runs {
        let idle = idle_wal(args).await?;
        println!(
            "  wal run {run}: the cluster's WAL while the bench idles: {idle:.0} B/s over {} s",
            args.wal_idle_secs
        );
        idle_rates.push(idle);

        let base = wal_steady(args, None).await?;
        println!(
            "  wal run {run} steady [no relay]: {:.1} s, {}; dead tuples {}; VACUUM after: {}",
            base.secs,
            base.wal.describe(args.rows),
            base.tuples.dead,
            base.vacuum.describe(args.rows)
        );
        steady_secs.push(base.secs);
        figures.push(
            "wal steady: service insert, no relay (B/row)".into(),
            base.wal.bytes / n,
            1,
        );
        if let Some((ours, _)) = base.wal.ours {
            figures.push(
                "wal steady: service insert, no relay, this database's records alone (B/row)"
                    .into(),
                ours / n,
                1,
            );
        }
        figures.push(
            "VACUUM after the steady run [no relay] (B/row)".into(),
            base.vacuum.bytes / n,
            1,
        );
        for mode in args.tracking_modes(run) {
            let m = mode.as_str();
            let r = wal_steady(args, Some(mode)).await?;
            let added = (r.wal.bytes - base.wal.bytes) / n;
            let ratio = 100.0 * added / (base.wal.bytes / n);
            let ours = match (base.wal.ours, r.wal.ours) {
                (Some((b, b_fpi)), Some((o, o_fpi))) => {
                    let added = (o - b) / n;
                    let ratio = 100.0 * added / (b / n);
                    figures.push(
                        format!(
                            "wal steady [{m}]: relay-added, this database's records alone (B/row)"
                        ),
                        added,
                        1,
                    );
                    figures.push(
                        format!("wal steady [{m}]: relay-added / service insert, this database's records alone (%)"),
                        ratio,
                        1,
                    );
                    format!(
                        "; this database's records alone: relay-added {added:.1} B/row ({ratio:.1}%), full-page images {:.1} B/row",
                        (o_fpi - b_fpi) / n
                    )
                }
                _ => String::new(),
            };
            println!(
                "  wal run {run} steady [{m}]: {:.1} s, {}; relay-added {added:.1} B/row ({ratio:.1}% of the service's insert){ours}; \
                 dead tuples {} ({} updates, {} HOT); VACUUM after: {}",
                r.secs,
                r.wal.describe(args.rows),
                r.tuples.dead,
                r.tuples.updated,
                r.tuples.hot_updated,
                r.vacuum.describe(args.rows)
            );
            steady_secs.push(r.secs);
            figures.push(format!("wal steady [{m}]: relay-added (B/row)"), added, 1);
            figures.push(
                format!("wal steady [{m}]: relay-added / service insert (%)"),
                ratio,
                1,
            );
            figures.push(
                format!("dead tuples per row after the steady run [{m}]"),
                r.tuples.dead as f64 / n,
                3,
            );
            figures.push(
                format!("VACUUM after the steady run [{m}] (B/row)"),
                r.vacuum.bytes / n,
                1,
            );
        }
        for mode in args.tracking_modes(run) {
            let m = mode.as_str();
            let r = wal_after_checkpoint(args, mode).await?;
            let ratio = 100.0 * r.relay.bytes / r.insert.bytes;
            println!(
                "  wal run {run} drain after CHECKPOINT [{m}]: backlog insert {}; the relay's drain ({:.1} s): {} \
                 ({ratio:.1}% of the insert); dead tuples {} ({} updates, {} HOT)",
                r.insert.describe(args.rows),
                r.secs,
                r.relay.describe(args.rows),
                r.tuples.dead,
                r.tuples.updated,
                r.tuples.hot_updated
            );
            drain_secs.push(r.secs);
            figures.push(
                format!("wal drain after CHECKPOINT [{m}]: relay (B/row)"),
                r.relay.bytes / n,
                1,
            );
            figures.push(
                format!("wal drain after CHECKPOINT [{m}]: relay / service insert (%)"),
                ratio,
                1,
            );
            if let (Some((insert, _)), Some((relay, fpi))) = (r.insert.ours, r.relay.ours) {
                figures.push(
                    format!("wal drain after CHECKPOINT [{m}]: relay, this database's records alone (B/row)"),
                    relay / n,
                    1,
                );
                figures.push(
                    format!("wal drain after CHECKPOINT [{m}]: of which full-page images (B/row)"),
                    fpi / n,
                    1,
                );
                figures.push(
                    format!("wal drain after CHECKPOINT [{m}]: relay / service insert, this database's records alone (%)"),
                    100.0 * relay / insert,
                    1,
                );
            }
            figures.push(
                format!("dead tuples per row after the drain [{m}]"),
                r.tuples.dead as f64 / n,
                3,
            );
        }
        load.push(load1());
    }
    figures.into_table(table);
    let idle = median(&idle_rates);
    table.push((
        "wal: the cluster's WAL while the bench idles (B/s)".into(),
        summary(&idle_rates, 0),
    ));
    table.push((
        "wal: that over a steady run / after-CHECKPOINT drain (B/row)".into(),
        format!(
            "{:.1} / {:.1}",
            idle * median(&steady_secs) / n,
            idle * median(&drain_secs) / n
        ),
    ));
    table.push((
        "load average (1 min) after each wal run".into(),
        summary(&load, 2),
    ));
    Ok(())
}

/// The statement a session ran last (or runs), if pg_stat_activity holds all of it.
async fn last_statement(pool: &PgPool, pid: i32) -> anyhow::Result<Result<String, String>> {
    let (query, limit): (String, i32) = sqlx::query_as(
        "SELECT query, (SELECT setting::int FROM pg_settings \
                        WHERE name = 'track_activity_query_size') \
         FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(pid)
    .fetch_one(pool)
    .await?;
    if query.len() + 1 >= limit as usize {
        return Ok(Err(format!(
            "truncated at track_activity_query_size ({limit} bytes)"
        )));
    }
    if !query.contains("txid") || !query.contains("ORDER BY id LIMIT") {
        return Ok(Err(format!("not a window read: {}", abbreviate(&query))));
    }
    Ok(Ok(query))
}

/// The statement with its column list left out.
fn abbreviate(sql: &str) -> String {
    match (sql.find("SELECT "), sql.find(" FROM ")) {
        (Some(0), Some(from)) => format!("SELECT … {}", &sql[from + 1..]),
        _ => sql.to_owned(),
    }
}

async fn explain(pool: &PgPool, sql: &str) -> anyhow::Result<Vec<String>> {
    let lines: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")))
            .persistent(false)
            .fetch_all(pool)
            .await?;
    Ok(lines)
}

/// The relay's own window statements (captured from pg_stat_activity while `Outbox` reads a
/// backlog of `--rows` rows in checkpoint mode): a page in the middle of the big window, and the
/// empty window after it; EXPLAIN ANALYZE of each before and after ANALYZE.
async fn plan(args: &Args) -> anyhow::Result<()> {
    let setup = Setup::new(args, "plan").await?;
    setup.disable_autovacuum().await?;
    setup.load(args.rows, args.keys).await?;
    println!(
        "\n  plan: the relay's window statements on {} rows in {TX_ROWS}-row transactions, read by \
         posthorn::outbox::Outbox in checkpoint mode on one connection (unprepared, as the relay sends them)",
        args.rows
    );
    let options: sqlx::postgres::PgConnectOptions = setup.url.parse()?;
    let one = posthorn::tcp_nodelay::pool_options(&options)
        .max_connections(1)
        .connect_with(options)
        .await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&one)
        .await?;
    let table = OutboxTable {
        schema: "public".into(),
        table: "outbox".into(),
    };
    let outbox = Outbox::with_pool(one.clone(), &table, PoisonPolicy::DeadLetter)
        .tracked_by(Tracking::Checkpoint);
    let batch: usize = args.batch_size.parse()?;
    let middle_page = (args.rows as usize / batch.max(1)) / 2 + 1;
    let mut sent: Vec<i64> = Vec::new();
    let mut middle = Err("the window had no middle page".to_owned());
    let mut page = 0;
    let read_started = Instant::now();
    loop {
        let rows = match outbox.fetch_after(batch, &sent).await? {
            ReadPast::Rows(rows) => rows,
            ReadPast::RowBelow(_) => anyhow::bail!("checkpoint mode never reads below"),
        };
        page += 1;
        if page == middle_page {
            middle = last_statement(&setup.pool, pid).await?;
        }
        if rows.is_empty() {
            break;
        }
        sent = rows.iter().map(|r| r.id).collect();
    }
    println!(
        "  plan: {} pages read in {:.2} s (before ANALYZE)",
        page - 1,
        read_started.elapsed().as_secs_f64()
    );
    // Another transaction id, so that the next read takes a new snapshot: the empty window
    // after the backlog (what the relay reads at every poll once it is caught up).
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&setup.pool)
        .await?;
    let rows = match outbox.fetch_after(batch, &sent).await? {
        ReadPast::Rows(rows) => rows,
        ReadPast::RowBelow(_) => anyhow::bail!("checkpoint mode never reads below"),
    };
    anyhow::ensure!(rows.is_empty(), "the window after the backlog had rows");
    let empty = last_statement(&setup.pool, pid).await?;
    one.close().await;
    let statements = [
        (
            format!("page {middle_page} of the backlog's window"),
            middle,
        ),
        ("the empty window after it".to_owned(), empty),
    ];
    for (what, sql) in &statements {
        match sql {
            Ok(sql) => println!("  plan: {what}: {}", abbreviate(sql)),
            Err(why) => println!("  plan: {what}: not captured ({why})"),
        }
    }
    for analyzed in [false, true] {
        if analyzed {
            sqlx::raw_sql("ANALYZE outbox").execute(&setup.pool).await?;
        }
        for (what, sql) in &statements {
            let Ok(sql) = sql else { continue };
            let when = if analyzed {
                "after ANALYZE"
            } else {
                "before ANALYZE"
            };
            println!("  plan: {what}, {when}:");
            for line in explain(&setup.pool, sql).await? {
                println!("    {line}");
            }
        }
    }
    setup.drop().await?;
    Ok(())
}
