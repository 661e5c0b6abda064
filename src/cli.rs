//! Command line: `posthorn [run] | migrate | check`, all configured by `POSTHORN_*` variables.
//! The binary's edge: errors become `anyhow` here, and [`exit_code`] maps them to a status.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, LogConfig, LogFormat};
use crate::events;
use crate::migrate;
use crate::outbox::Outbox;
use crate::publisher::{Publisher, PublisherError};
use crate::relay::{self, RelayError};
use crate::shutdown::Shutdown;

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
    match relay::run(config, shutdown).await {
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

    let outbox = Outbox::connect_lazy(
        &config.database,
        &config.outbox,
        config.on_poison,
        &config.instance_id,
    )?;
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

    let publisher = match Publisher::idempotent(&config.kafka, &config.topic_template) {
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
