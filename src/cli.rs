//! Command line: `posthorn [run] | migrate | check | status | redeliver`, all configured by
//! `POSTHORN_*` variables. The binary's edge: errors become `anyhow` here, and [`exit_code`] maps
//! them to a status.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::checkpoint_record::CheckpointRecord;
use crate::config::{Config, ConfigError, Delivery, LogConfig, LogFormat};
use crate::events;
use crate::lease::Lease;
use crate::migrate;
use crate::outbox::{Outbox, Redelivery, Requeued, Status};
use crate::publisher::{Publisher, PublisherError};
use crate::relay::RelayError;
use crate::shutdown::Shutdown;
use crate::sidecar;

/// Transactional-outbox relay: publishes committed Postgres outbox rows to Kafka, in order.
///
/// Configured by environment variables (POSTHORN_DATABASE_URL, POSTHORN_KAFKA_BROKERS, ...);
/// see the README for all of them.
#[derive(Debug, Parser)]
#[command(name = "posthorn", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay outbox rows to Kafka until SIGTERM/SIGINT (the default).
    Run,
    /// Create or upgrade the outbox table in POSTHORN_SCHEMA.
    Migrate,
    /// Validate the configuration, connect to Postgres and Kafka, report what was found.
    Check,
    /// Show the backlog, the oldest pending row, failed rows by error and the last delivery.
    Status(StatusArgs),
    /// Re-queue rows: all failed rows, or the failed and delivered rows of an id range or of
    /// given event ids.
    Redeliver(RedeliverArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// How many distinct errors of failed rows to list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: u16,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("rows")
        .required(true)
        .args(["failed", "from_id", "event_ids"])
))]
pub struct RedeliverArgs {
    /// Every failed row: failed_at is cleared (attempts and last_error are kept), and the relay
    /// publishes it again.
    #[arg(long)]
    pub failed: bool,
    /// First id of a range (with --to-id): its failed rows are re-queued, and its delivered
    /// rows are published again (duplicates, by design).
    #[arg(long, value_name = "ID", requires = "to_id")]
    pub from_id: Option<i64>,
    /// Last id of the range, inclusive.
    #[arg(long, value_name = "ID", requires = "from_id")]
    pub to_id: Option<i64>,
    /// The row with this event id, if failed or delivered (repeatable).
    #[arg(long = "event-id", value_name = "UUID")]
    pub event_ids: Vec<Uuid>,
    /// Say how many rows would be re-queued, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl RedeliverArgs {
    fn redelivery(&self) -> anyhow::Result<Redelivery> {
        if self.failed {
            return Ok(Redelivery::Failed);
        }
        if let (Some(from), Some(to)) = (self.from_id, self.to_id) {
            anyhow::ensure!(
                from <= to,
                "--from-id {from} is greater than --to-id {to}: nothing to re-queue"
            );
            return Ok(Redelivery::IdRange { from, to });
        }
        anyhow::ensure!(
            !self.event_ids.is_empty(),
            "say which rows: --failed, --from-id/--to-id or --event-id"
        );
        let distinct: BTreeSet<Uuid> = self.event_ids.iter().copied().collect();
        Ok(Redelivery::EventIds(distinct.into_iter().collect()))
    }
}

/// Runs the chosen command to completion.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    init_tracing(&config.log);
    for name in &config.unknown_vars {
        events::UnknownVariable { name }.emit();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run_relay(&config).await,
            Command::Migrate => run_migrate(&config).await,
            Command::Check => run_check(&config).await,
            Command::Status(args) => run_status(&config, &args).await,
            Command::Redeliver(args) => run_redeliver(&config, &args).await,
        }
    })
}

/// Prints the error as one line on stderr and picks the exit status: 2 for configuration
/// errors, 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if let Some(config) = err.downcast_ref::<ConfigError>() {
        eprintln!("posthorn: configuration error: {config}");
        return ExitCode::from(2);
    }
    eprintln!("posthorn: error: {err:#}");
    ExitCode::from(1)
}

async fn run_relay(config: &Config) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listening on POSTHORN_HTTP_ADDR={}", config.http_addr))?;
    match sidecar::run(config, listener, shutdown).await {
        Ok(_stats) => Ok(()),
        Err(RelayError::Config(c)) => Err(c.into()),
        Err(other) => Err(other.into()),
    }
}

async fn run_migrate(config: &Config) -> anyhow::Result<()> {
    let applied = migrate::run(&config.database, &config.outbox).await?;
    let table = config.outbox.qualified();
    if applied.is_empty() {
        println!("{table} is up to date.");
    }
    for (version, description) in migrate::known().filter(|(v, _)| applied.contains(v)) {
        println!("{table}: applied migration {version} ({description}).");
    }
    Ok(())
}

async fn run_check(config: &Config) -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let mut failures = 0;
    println!(
        "config    ok: table {}, topic template set, batch size {}, poll interval {} ms",
        config.outbox.qualified(),
        config.batch_size,
        config.poll_interval.as_millis()
    );

    let outbox = Outbox::connect_lazy(config)?;
    match tokio::time::timeout(TIMEOUT, outbox.server_version()).await {
        Ok(Ok(version)) => {
            println!(
                "postgres  ok: {} (server {version})",
                config.database.redacted()
            );
            match outbox.counts().await {
                Ok((pending, delivered, failed)) => println!(
                    "outbox    ok: {} has {pending} pending, {delivered} delivered and {failed} failed rows",
                    config.outbox.qualified()
                ),
                Err(err) => {
                    failures += 1;
                    let hint = if err.is_undefined_table() {
                        " (run `posthorn migrate`)"
                    } else {
                        ""
                    };
                    println!("outbox    FAILED: {err}{hint}");
                }
            }
        }
        Ok(Err(err)) => {
            failures += 1;
            println!("postgres  FAILED: {}: {err}", config.database.redacted());
        }
        Err(_) => {
            failures += 1;
            println!(
                "postgres  FAILED: {}: no answer within {TIMEOUT:?}",
                config.database.redacted()
            );
        }
    }
    outbox.pool().close().await;

    let publisher = match Publisher::idempotent_for_check(&config.kafka, &config.topic_template) {
        Ok(p) => p,
        Err(PublisherError::Config(c)) => return Err(c.into()),
        Err(other) => return Err(other.into()),
    };
    match publisher.cluster_info(TIMEOUT).await {
        Ok(info) => println!(
            "kafka     ok: {} answered; brokers [{}], {} topics",
            config.kafka.brokers,
            info.brokers.join(", "),
            info.n_topics
        ),
        Err(err) => {
            failures += 1;
            println!("kafka     FAILED: {err}");
        }
    }
    publisher.close().await;

    if failures > 0 {
        anyhow::bail!("check failed: {failures} of 3 checks did not pass");
    }
    println!("All checks passed.");
    Ok(())
}

async fn run_status(config: &Config, args: &StatusArgs) -> anyhow::Result<()> {
    let outbox = Outbox::connect_lazy(config)?;
    let status = outbox.status(i64::from(args.top)).await;
    // Who publishes: the lease's holder (none before any instance ran).
    let holder = Lease::new(
        outbox.pool().clone(),
        &config.outbox,
        &config.instance_id,
        config.lease_ttl,
    )
    .holder()
    .await
    .ok()
    .flatten();
    let checkpoint = match config.delivery {
        Delivery::AtLeastOnce => None,
        Delivery::ExactlyOnce => Some(last_kafka_checkpoint(config, &outbox).await),
    };
    outbox.pool().close().await;
    let status = status.map_err(|err| {
        let hint = if err.is_undefined_table() || err.is_undefined_column() {
            " (run `posthorn migrate`)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "reading {} in {}: {err}{hint}",
            config.outbox.qualified(),
            config.database.redacted()
        )
    })?;
    if args.json {
        let mut json = status_json(config, &status);
        json["leader"] = match &holder {
            Some(h) => serde_json::json!({"owner": h.owner, "epoch": h.epoch, "live": h.live}),
            None => serde_json::Value::Null,
        };
        if let Some(checkpoint) = &checkpoint {
            json["checkpoint_topic"] = config.checkpoint_topic.clone().into();
            match checkpoint {
                Ok(record) => json["last_checkpoint"] = serde_json::json!(record),
                Err(error) => json["last_checkpoint_error"] = error.clone().into(),
            }
        }
        println!("{json}");
    } else {
        let table = status_table(config, &status, args.top);
        let leader = match &holder {
            Some(h) if h.live => format!("{} (epoch {})", h.owner, h.epoch),
            Some(h) => format!(
                "none: the lease of {} (epoch {}) has expired or was released",
                h.owner, h.epoch
            ),
            None => "none yet (no instance has run)".to_owned(),
        };
        let mut leader = format!("  leader           {leader}\n");
        if let Some(checkpoint) = &checkpoint {
            leader.push_str(&format!(
                "  last checkpoint  {} (topic {})\n",
                match checkpoint {
                    Ok(Some(record)) => describe_checkpoint(record),
                    Ok(None) => "none yet (no transaction committed)".to_owned(),
                    Err(error) => format!("unknown: {error}"),
                },
                config.checkpoint_topic
            ));
        }
        // The leader goes right under the heading line.
        match table.split_once("\n\n") {
            Some((heading, rest)) => print!("{heading}\n\n{leader}{rest}"),
            None => print!("{table}{leader}"),
        }
    }
    Ok(())
}

/// Exactly once: the checkpoint topic's last committed record for this outbox (read as a new
/// leader reads it), or why it could not be read.
async fn last_kafka_checkpoint(
    config: &Config,
    outbox: &Outbox,
) -> Result<Option<CheckpointRecord>, String> {
    let identity = outbox.identity().await.map_err(|err| err.to_string())?;
    crate::publisher::last_checkpoint(&config.kafka, &config.checkpoint_topic, identity)
        .await
        .map_err(|err| err.to_string())
}

fn describe_checkpoint(record: &CheckpointRecord) -> String {
    let ids = |ranges: &[(i64, i64)]| {
        ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut text = format!(
        "transaction {} of epoch {}, published ids {}",
        record.transaction,
        record.epoch,
        shorten(&ids(&record.published), 60)
    );
    if !record.set_aside.is_empty() {
        text.push_str(&format!(", {} set aside", record.set_aside.len()));
    }
    text
}

fn status_json(config: &Config, status: &Status) -> serde_json::Value {
    serde_json::json!({
        "table": config.outbox.qualified(),
        "tracking": config.tracking.as_str(),
        "delivery": config.delivery.as_str(),
        "pending": status.n_pending,
        "retrying": status.n_retrying,
        "oldest_pending": status.oldest_pending.as_ref().map(|o| serde_json::json!({
            "id": o.id,
            "age_seconds": round_tenths(o.age),
            "attempts": o.attempts,
            "last_error": o.last_error,
        })),
        "delivered": status.n_delivered,
        "last_delivered": status.last_delivered.as_ref().map(|l| serde_json::json!({
            "id": l.id,
            "delivered_at": rfc3339(l.delivered_at_us),
            "age_seconds": round_tenths(l.age),
        })),
        "failed": status.n_failed,
        "failed_by_error": status.failed_by_error.iter().map(|e| serde_json::json!({
            "error": e.error,
            "rows": e.n_rows,
        })).collect::<Vec<_>>(),
    })
}

fn status_table(config: &Config, status: &Status, top: u16) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "outbox {} in {} (tracking: {}, delivery: {})\n",
        config.outbox.qualified(),
        config.database.redacted(),
        config.tracking.as_str(),
        config.delivery.as_str()
    );
    let _ = writeln!(
        out,
        "  pending          {} rows ({} with failed attempts)",
        status.n_pending, status.n_retrying
    );
    match &status.oldest_pending {
        Some(o) => {
            let _ = write!(
                out,
                "  oldest pending   id {}, {} old, {} failed attempts",
                o.id,
                age(o.age),
                o.attempts
            );
            match &o.last_error {
                Some(e) => {
                    let _ = writeln!(out, ", last error: {}", shorten(e, 100));
                }
                None => out.push('\n'),
            }
        }
        None => out.push_str("  oldest pending   none\n"),
    }
    let _ = writeln!(
        out,
        "  delivered        {} rows still in the table",
        status.n_delivered
    );
    match &status.last_delivered {
        Some(l) => {
            let _ = writeln!(
                out,
                "  last delivered   id {} at {} ({} ago)",
                l.id,
                rfc3339(l.delivered_at_us),
                age(l.age)
            );
        }
        None => out.push_str("  last delivered   none\n"),
    }
    let _ = write!(out, "  failed           {} rows", status.n_failed);
    if status.n_failed > 0 {
        out.push_str(" (re-queue them with `posthorn redeliver --failed`)");
    }
    out.push('\n');
    if !status.failed_by_error.is_empty() {
        let _ = writeln!(out, "\nfailed rows by error (top {top}):");
        let _ = writeln!(out, "  {:>8}  LAST ERROR", "ROWS");
        for e in &status.failed_by_error {
            let _ = writeln!(out, "  {:>8}  {}", e.n_rows, shorten(&e.error, 120));
        }
    }
    out
}

async fn run_redeliver(config: &Config, args: &RedeliverArgs) -> anyhow::Result<()> {
    let which = args.redelivery()?;
    let outbox = Outbox::connect_lazy(config)?;
    let result = if args.dry_run {
        outbox.count_redeliverable(&which).await
    } else {
        outbox.redeliver(&which).await
    };
    outbox.pool().close().await;
    let table = config.outbox.qualified();
    let requeued = result.with_context(|| format!("re-queueing rows of {table}"))?;
    print!(
        "{}",
        redeliver_report(&table, &which, &requeued, args.dry_run)
    );
    Ok(())
}

fn redeliver_report(table: &str, which: &Redelivery, r: &Requeued, dry_run: bool) -> String {
    let mut out = if dry_run {
        format!("Dry run: would re-queue {} rows of {table}", r.n_changed())
    } else {
        format!("Re-queued {} rows of {table}", r.n_changed())
    };
    out.push_str(&format!(
        ": {} failed (attempts and last_error kept), {} delivered (published again: duplicates by design).\n",
        r.n_failed, r.n_delivered
    ));
    if r.n_already_pending > 0 {
        out.push_str(&format!(
            "{} selected rows were pending already and are unchanged.\n",
            r.n_already_pending
        ));
    }
    if let Redelivery::EventIds(ids) = which {
        let n_unmatched = ids.len() as i64 - r.n_changed() - r.n_already_pending;
        if n_unmatched > 0 {
            out.push_str(&format!(
                "{n_unmatched} of the {} event ids match no row.\n",
                ids.len()
            ));
        }
    }
    if dry_run {
        out.push_str("Nothing changed (--dry-run).\n");
    }
    out
}

/// `4m 12s`: whole seconds.
fn age(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn round_tenths(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// Microseconds since the Unix epoch as `2026-11-25T21:14:03Z`.
fn rfc3339(us: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// At most `max` characters, on one line.
fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut short: String = one_line.chars().take(max - 1).collect();
    short.push('…');
    short
}

fn init_tracing(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&log.filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeliver_needs_exactly_one_kind_of_selection() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["posthorn", "redeliver"].iter().chain(args.iter())).map(|cli| {
                match cli.command {
                    Some(Command::Redeliver(args)) => args.redelivery(),
                    other => panic!("parsed as {other:?}"),
                }
            })
        };
        assert_eq!(
            parse(&["--failed"]).expect("parses").expect("valid"),
            Redelivery::Failed
        );
        assert_eq!(
            parse(&["--from-id", "3", "--to-id", "7", "--dry-run"])
                .expect("parses")
                .expect("valid"),
            Redelivery::IdRange { from: 3, to: 7 }
        );
        let id = Uuid::new_v4();
        let idv = id.to_string();
        assert_eq!(
            parse(&["--event-id", &idv, "--event-id", &idv])
                .expect("parses")
                .expect("valid"),
            Redelivery::EventIds(vec![id])
        );
        assert!(parse(&[]).is_err(), "a selection is required");
        assert!(parse(&["--from-id", "3"]).is_err(), "--to-id is required");
        assert!(parse(&["--failed", "--from-id", "1", "--to-id", "2"]).is_err());
        assert!(parse(&["--event-id", "not-a-uuid"]).is_err());
        let backwards = parse(&["--from-id", "7", "--to-id", "3"]).expect("parses");
        assert!(backwards.is_err());
    }

    #[test]
    fn the_redeliver_report_says_what_changed_and_warns_of_duplicates() {
        let r = Requeued {
            n_failed: 2,
            n_delivered: 3,
            n_already_pending: 1,
        };
        let text = redeliver_report(
            "\"public\".\"outbox\"",
            &Redelivery::IdRange { from: 1, to: 6 },
            &r,
            false,
        );
        assert!(
            text.starts_with("Re-queued 5 rows of \"public\".\"outbox\": 2 failed"),
            "{text}"
        );
        assert!(text.contains("duplicates by design"), "{text}");
        assert!(
            text.contains("1 selected rows were pending already"),
            "{text}"
        );
        let dry = redeliver_report("t", &Redelivery::Failed, &r, true);
        assert!(dry.starts_with("Dry run: would re-queue 5 rows"), "{dry}");
        assert!(dry.ends_with("Nothing changed (--dry-run).\n"), "{dry}");
    }

    #[test]
    fn long_errors_are_shortened_to_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(age(Duration::from_millis(252_900)), "4m 12s");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
