//! The relay loop: wait → read a batch → publish it pipelined → settle acks → mark delivered.
//!
//! One batch at a time: a batch is settled and marked before the next read, so every read sees
//! the oldest undelivered rows (including any a failed batch left behind) and nothing needs a
//! cursor. Transient failures (Postgres or Kafka down, a failed record) never end the loop: it
//! logs, backs off and resumes from the oldest undelivered row. Only a stop signal ends it.

use std::time::Duration;

use tokio::time::Instant;

use crate::acks::{Deliverable, Tracker};
use crate::config::{Config, ConfigError};
use crate::events;
use crate::outbox::{Outbox, OutboxError};
use crate::publisher::{Publisher, PublisherError};
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
pub async fn run(config: &Config, mut shutdown: Shutdown) -> Result<RelayStats, RelayError> {
    let outbox = Outbox::connect_lazy(&config.database, &config.outbox)?;
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
    while !shutdown.is_triggered() {
        let fetched = tokio::select! {
            _ = shutdown.triggered() => break,
            fetched = outbox.fetch_batch(config.batch_size) => fetched,
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
                sleep_unless_stopped(retry_in, &mut shutdown).await;
                continue;
            }
        };
        if rows.is_empty() {
            // LISTEN was set up before this read, so a commit after it has already stored a
            // wake-up permit: no notification can fall between the read and the wait.
            tokio::select! {
                _ = shutdown.triggered() => break,
                _ = wakeups.notified() => {}
                _ = tokio::time::sleep(config.poll_interval) => {}
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
                    sleep_unless_stopped(retry_in, &mut shutdown).await;
                    continue;
                }
            },
        };

        let started = Instant::now();
        let mut tracker = Tracker::new(&rows);
        let n_kafka_failures = producer
            .publish(&rows, &mut tracker, &mut shutdown, config.shutdown_timeout)
            .await;
        let settled = tracker.finish();
        let n_marked = mark(&outbox, &settled.deliverable, &mut shutdown).await;
        stats.n_published += n_marked;
        n_unacknowledged = settled.n_held;
        events::BatchPublished {
            n_rows: rows.len(),
            n_marked,
            n_failed: settled.failed.len(),
            n_held: settled.n_held,
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
        if let Err(err) = outbox.record_failures(&settled.failed).await {
            events::DatabaseFailed {
                error: &err,
                retry_in: Duration::ZERO,
                missing_table: false,
            }
            .emit();
        }

        if n_kafka_failures > 0 {
            // A record Kafka failed may have left a gap behind which later records of its
            // partition were written, and a fatal error leaves the producer unusable: start over
            // with a new producer (new producer id, fresh sequence numbers) from the oldest
            // undelivered row.
            let reason = producer
                .fatal_error()
                .or_else(|| settled.failed.first().map(|(_, e)| e.clone()))
                .unwrap_or_default();
            producer.close().await;
            let retry_in = kafka_backoff.next_delay();
            events::ProducerReplaced {
                reason: &reason,
                retry_in,
            }
            .emit();
            sleep_unless_stopped(retry_in, &mut shutdown).await;
            continue;
        }
        publisher = Some(producer);
        if !settled.failed.is_empty() && n_marked == 0 {
            // Only rows that fail posthorn's own checks are left: wait before trying them again
            // rather than spinning on them.
            sleep_unless_stopped(kafka_backoff.next_delay(), &mut shutdown).await;
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

/// Marks acknowledged rows, retrying while Postgres is unavailable. A row that stays unmarked
/// is published again later (a duplicate, never a loss), so after a stop signal it tries a few
/// more times and then gives up.
async fn mark(outbox: &Outbox, rows: &Deliverable, shutdown: &mut Shutdown) -> u64 {
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
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

async fn sleep_unless_stopped(delay: Duration, shutdown: &mut Shutdown) {
    tokio::select! {
        _ = shutdown.triggered() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
