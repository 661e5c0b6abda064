//! The relay loop: wait → read a batch → publish it pipelined → settle acks → mark delivered.
//!
//! One batch at a time: a batch is settled and marked before the next read, so every read sees
//! the oldest undelivered rows (including any a failed batch left behind) and nothing needs a
//! cursor. Transient failures (Postgres or Kafka down, a failed record) never end the loop: it
//! logs, backs off and resumes from the oldest undelivered row. Only a stop signal ends it.

use std::time::Duration;

use tokio::time::Instant;

use crate::acks::{Deliverable, Tracker};
use crate::config::{Config, ConfigError, PoisonPolicy};
use crate::events;
use crate::health::Heartbeat;
use crate::outbox::{Outbox, OutboxError, OutboxRow};
use crate::publisher::{DeadLetterPayload, Publisher, PublisherError};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Publisher(PublisherError),
}

impl From<PublisherError> for RelayError {
    fn from(err: PublisherError) -> Self {
        match err {
            PublisherError::Config(c) => RelayError::Config(c),
            other => RelayError::Publisher(other),
        }
    }
}

/// What a relay run did, returned when it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Rows marked delivered.
    pub n_published: u64,
}

/// Runs until `shutdown` fires; then stops reading, waits up to `config.shutdown_timeout` for
/// in-flight acknowledgements, marks what was acknowledged, and returns.
///
/// Errors only for settings that can never work (an invalid Kafka property, an unparsable
/// database URL), before any row is read.
pub async fn run(config: &Config, shutdown: Shutdown) -> Result<RelayStats, RelayError> {
    run_with_heartbeat(config, shutdown, &Heartbeat::new()).await
}

/// [`run`], beating `heartbeat` at every iteration and while it legitimately waits (for rows,
/// for acknowledgements, out a backoff), so that `/healthz` can tell a stuck loop.
pub async fn run_with_heartbeat(
    config: &Config,
    mut shutdown: Shutdown,
    heartbeat: &Heartbeat,
) -> Result<RelayStats, RelayError> {
    let outbox = Outbox::connect_lazy(&config.database, &config.outbox, config.on_poison)?;
    // Created up front so that an invalid Kafka property is a start-up error, not a retry loop.
    let mut publisher = Some(Publisher::idempotent(
        &config.kafka,
        &config.topic_template,
    )?);
    events::RelayStarted {
        database: config.database.redacted(),
        brokers: &config.kafka.brokers,
        table: &config.outbox.qualified(),
        batch_size: config.batch_size,
    }
    .emit();
    let wakeups = outbox.spawn_listener(shutdown.clone());

    let mut stats = RelayStats::default();
    let mut n_unacknowledged = 0;
    let mut db_backoff = Backoff::new();
    let mut kafka_backoff = Backoff::new();
    // Rows still to be sent one at a time, after a record batch was rejected as a whole.
    let mut n_isolated: usize = 0;
    while !shutdown.is_triggered() {
        heartbeat.beat();
        let limit = if n_isolated > 0 { 1 } else { config.batch_size };
        let fetched = tokio::select! {
            _ = shutdown.triggered() => break,
            fetched = outbox.fetch_batch(limit) => fetched,
        };
        let rows = match fetched {
            Ok(rows) => {
                db_backoff.reset();
                rows
            }
            Err(err) => {
                let retry_in = db_backoff.next_delay();
                events::DatabaseFailed {
                    error: &err,
                    retry_in,
                    missing_table: err.is_undefined_table(),
                }
                .emit();
                sleep_unless_stopped(retry_in, &mut shutdown, heartbeat).await;
                continue;
            }
        };
        if rows.is_empty() {
            n_isolated = 0;
            // LISTEN was set up before this read, so a commit after it has already stored a
            // wake-up permit: no notification can fall between the read and the wait.
            let stop = heartbeat
                .during(async {
                    tokio::select! {
                        _ = shutdown.triggered() => true,
                        _ = wakeups.notified() => false,
                        _ = tokio::time::sleep(config.poll_interval) => false,
                    }
                })
                .await;
            if stop {
                break;
            }
            continue;
        }

        let producer = match publisher.take() {
            Some(p) => p,
            None => match Publisher::idempotent(&config.kafka, &config.topic_template) {
                Ok(p) => p,
                Err(err) => {
                    let retry_in = kafka_backoff.next_delay();
                    events::ProducerCreateFailed {
                        error: &err,
                        retry_in,
                    }
                    .emit();
                    sleep_unless_stopped(retry_in, &mut shutdown, heartbeat).await;
                    continue;
                }
            },
        };

        let started = Instant::now();
        let mut tracker = Tracker::new(&rows, config.on_poison);
        // A batch waits as long as the broker is away: that is a legitimate wait.
        let report = heartbeat
            .during(producer.publish(&rows, &mut tracker, &mut shutdown, config.shutdown_timeout))
            .await;
        let settled = tracker.finish();
        let n_marked = mark(&outbox, &settled.deliverable, &mut shutdown, heartbeat).await;
        stats.n_published += n_marked;
        n_unacknowledged = settled.n_held;
        events::BatchPublished {
            n_rows: rows.len(),
            n_marked,
            n_failed: settled.failed.len() + settled.poisoned.len(),
            n_held: settled.n_held,
            n_transient: report.n_transient,
            n_suspect: report.n_suspect,
            n_poisoned: settled.poisoned.len(),
            elapsed: started.elapsed(),
        }
        .emit();
        for (outbox_id, error) in &settled.failed {
            events::RowFailed {
                outbox_id: *outbox_id,
                error,
            }
            .emit();
        }
        n_isolated = n_isolated.saturating_sub(1);
        if report.n_suspect > 0 && n_isolated == 0 {
            // One row of a rejected record batch is poison; send the batch's unsettled rows one
            // at a time to find which, rather than failing its innocent neighbours.
            n_isolated = settled.failed.len() + settled.n_held;
            events::IsolatingRows { n_rows: n_isolated }.emit();
        }

        // A record Kafka failed may have left a gap behind which later records of its partition
        // were written, and a fatal error leaves the producer unusable: replace it (new producer
        // id, fresh sequence numbers); the next read resumes from the oldest undelivered row.
        let fatal = producer.fatal_error();
        if report.n_transient > 0 || report.n_suspect > 0 || fatal.is_some() {
            let reason = fatal
                .or_else(|| settled.failed.first().map(|(_, e)| e.clone()))
                .unwrap_or_default();
            producer.close().await;
            events::ProducerReplaced { reason: &reason }.emit();
        } else {
            publisher = Some(producer);
        }

        let mut failed = settled.failed;
        let poisoned = heartbeat
            .during(settle_poison(
                &rows,
                settled.poisoned,
                &mut publisher,
                config,
                &mut failed,
            ))
            .await;
        if let Err(err) = outbox.record_failures(&failed).await {
            events::DatabaseFailed {
                error: &err,
                retry_in: Duration::ZERO,
                missing_table: false,
            }
            .emit();
        }
        if let Err(err) = outbox.mark_failed(&poisoned).await {
            events::DatabaseFailed {
                error: &err,
                retry_in: Duration::ZERO,
                missing_table: false,
            }
            .emit();
        }
        if report.n_transient > 0 || (!failed.is_empty() && n_marked == 0 && poisoned.is_empty()) {
            // Kafka is failing records, or nothing but retries is left: wait before trying
            // again rather than spinning.
            sleep_unless_stopped(kafka_backoff.next_delay(), &mut shutdown, heartbeat).await;
        } else {
            kafka_backoff.reset();
        }
    }

    if let Some(producer) = publisher {
        producer.close().await;
    }
    drop(wakeups);
    outbox.pool().close().await;
    events::RelayStopped {
        n_published: stats.n_published,
        n_unacknowledged,
    }
    .emit();
    Ok(stats)
}

/// Applies `POSTHORN_ON_POISON` to rows Kafka will never accept. Returns the rows to mark
/// failed, with the reason. With a dead-letter topic, a row is marked failed only once the
/// dead-letter topic has it (without its payload if that is what made it too large); a row that
/// could not be dead-lettered joins `retry` instead.
async fn settle_poison(
    rows: &[OutboxRow],
    poisoned: Vec<(i64, String)>,
    publisher: &mut Option<Publisher>,
    config: &Config,
    retry: &mut Vec<(i64, String)>,
) -> Vec<(i64, String)> {
    let dead_letter_topic = match (&config.dead_letter_topic, config.on_poison) {
        (Some(topic), PoisonPolicy::DeadLetter) if !poisoned.is_empty() => topic.as_str(),
        _ => {
            for (outbox_id, reason) in &poisoned {
                events::RowPoisoned {
                    outbox_id: *outbox_id,
                    reason,
                    policy: config.on_poison,
                    dead_letter_topic: None,
                }
                .emit();
            }
            return poisoned;
        }
    };
    let mut pending: Vec<(&OutboxRow, &str)> = poisoned
        .iter()
        .filter_map(|(id, reason)| {
            rows.iter()
                .find(|r| r.id == *id)
                .map(|r| (r, reason.as_str()))
        })
        .collect();
    let mut failed = Vec::new();
    for payload in [DeadLetterPayload::Keep, DeadLetterPayload::Omit] {
        if pending.is_empty() {
            break;
        }
        ensure_usable_producer(publisher, config).await;
        let Some(producer) = publisher.as_ref() else {
            break;
        };
        let results = producer
            .dead_letter(&pending, dead_letter_topic, payload)
            .await;
        let mut too_large = Vec::new();
        for ((row, reason), result) in pending.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    events::RowPoisoned {
                        outbox_id: row.id,
                        reason,
                        policy: config.on_poison,
                        dead_letter_topic: Some(dead_letter_topic),
                    }
                    .emit();
                    failed.push((
                        row.id,
                        format!("{reason} (dead-lettered to {dead_letter_topic})"),
                    ));
                }
                Err(err) if err.too_large && payload == DeadLetterPayload::Keep => {
                    too_large.push((row, reason));
                }
                Err(err) => retry.push((
                    row.id,
                    format!(
                        "{reason}; publishing to the dead-letter topic failed: {}",
                        err.message
                    ),
                )),
            }
        }
        pending = too_large;
    }
    retry.extend(pending.into_iter().map(|(row, reason)| {
        (
            row.id,
            format!("{reason}; not yet dead-lettered: no usable producer"),
        )
    }));
    failed
}

/// Replaces a producer that a fatal error stopped (or creates one if there is none).
async fn ensure_usable_producer(publisher: &mut Option<Publisher>, config: &Config) {
    if let Some(reason) = publisher.as_ref().and_then(Publisher::fatal_error) {
        if let Some(old) = publisher.take() {
            old.close().await;
        }
        events::ProducerReplaced { reason: &reason }.emit();
    }
    if publisher.is_none() {
        *publisher = Publisher::idempotent(&config.kafka, &config.topic_template).ok();
    }
}

/// Marks acknowledged rows, retrying while Postgres is unavailable. A row that stays unmarked
/// is published again later (a duplicate, never a loss), so after a stop signal it tries a few
/// more times and then gives up.
async fn mark(
    outbox: &Outbox,
    rows: &Deliverable,
    shutdown: &mut Shutdown,
    heartbeat: &Heartbeat,
) -> u64 {
    const ATTEMPTS_AFTER_STOP: u32 = 3;
    let mut backoff = Backoff::with_bounds(Duration::from_millis(50), Duration::from_secs(5));
    let mut attempts_after_stop = 0;
    loop {
        match outbox.mark_delivered(rows).await {
            Ok(n) => return n,
            Err(err) => {
                let retry_in = backoff.next_delay();
                events::MarkFailed {
                    error: &err,
                    n_rows: rows.len(),
                    retry_in,
                }
                .emit();
                if shutdown.is_triggered() {
                    attempts_after_stop += 1;
                    if attempts_after_stop >= ATTEMPTS_AFTER_STOP {
                        return 0;
                    }
                }
                heartbeat.during(tokio::time::sleep(retry_in)).await;
            }
        }
    }
}

async fn sleep_unless_stopped(delay: Duration, shutdown: &mut Shutdown, heartbeat: &Heartbeat) {
    heartbeat
        .during(async {
            tokio::select! {
                _ = shutdown.triggered() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        })
        .await
}
