//! The relay loop: wait → read a batch → publish it pipelined → settle acks → mark delivered.
//!
//! A batch is settled before the next one is sent, and every read takes the oldest undelivered
//! rows (including any a failed batch left behind), so nothing needs a cursor. Postgres work
//! overlaps Kafka work only on the clean path: while a full batch waits for its acks, the
//! previous batch (acknowledged in full) is marked and, concurrently, the next one is read past
//! both. A batch that did not settle cleanly discards that read-ahead, is marked at once,
//! and the next read starts again from the oldest undelivered row. Transient failures (Postgres
//! or Kafka down, a failed record) never end the loop: it logs, backs off and resumes from the
//! oldest undelivered row. Only a stop signal ends it.

use std::time::Duration;

use tokio::time::Instant;

use std::sync::Arc;

use crate::acks::{Deliverable, Tracker};
use crate::config::{Config, ConfigError, PoisonPolicy};
use crate::events;
use crate::health::Heartbeat;
use crate::lease::{Keeper, Lease};
use crate::outbox::{Outbox, OutboxError, OutboxRow, ReadPast};
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

/// Runs until `shutdown` fires: stands by until this instance holds the outbox's lease, then
/// publishes while it holds it. On `shutdown` it stops reading, waits up to
/// `config.shutdown_timeout` for in-flight acknowledgements, marks what was acknowledged,
/// releases the lease and returns.
///
/// Errors only for settings that can never work (an invalid Kafka property, an unparsable
/// database URL), before any row is read.
pub async fn run(config: &Config, shutdown: Shutdown) -> Result<RelayStats, RelayError> {
    run_with_heartbeat(config, shutdown, &Heartbeat::new()).await
}

/// [`run`], beating `heartbeat` at every iteration and while it legitimately waits (for the
/// lease, for rows, for the broker, in a backoff), so `/healthz` can tell a wedged loop.
pub async fn run_with_heartbeat(
    config: &Config,
    mut shutdown: Shutdown,
    heartbeat: &Heartbeat,
) -> Result<RelayStats, RelayError> {
    let outbox = Outbox::connect_lazy(config)?;
    // Created up front so that an invalid Kafka property is a start-up error, not a retry loop.
    let publisher = Publisher::idempotent(&config.kafka, &config.topic_template)?;
    publisher.connect_early();
    events::RelayStarted {
        database: config.database.redacted(),
        brokers: &config.kafka.brokers,
        table: &config.outbox.qualified(),
        batch_size: config.batch_size,
    }
    .emit();
    let lease = Arc::new(Lease::new(
        outbox.pool().clone(),
        &config.outbox,
        &config.instance_id,
        config.lease_ttl,
    ));
    let mut keeper = Keeper::spawn(lease.clone());
    let wakeups = outbox.spawn_listener(shutdown.clone());
    let mut relay = Relay {
        config,
        outbox,
        publisher: Some(publisher),
        stats: RelayStats::default(),
        n_unacknowledged: 0,
        db_backoff: Backoff::new(),
        kafka_backoff: Backoff::new(),
        n_isolated: 0,
        acked: None,
        read_ahead: None,
    };

    let mut last_epoch = None;
    'standby: while !shutdown.is_triggered() {
        // A standby waits for the lease as long as another instance holds it: a legitimate wait.
        // It says so only once the keeper has tried: on a fresh start the lease is usually free.
        let first_try = lease.timing().standby_poll * 2;
        let leadership = heartbeat
            .during(async {
                tokio::select! {
                    _ = shutdown.triggered() => return None,
                    leadership = keeper.leadership() => return Some(leadership),
                    _ = tokio::time::sleep(first_try) => {}
                }
                events::StandingBy {
                    owner: lease.owner(),
                }
                .emit();
                tokio::select! {
                    _ = shutdown.triggered() => None,
                    leadership = keeper.leadership() => Some(leadership),
                }
            })
            .await;
        let Some(leadership) = leadership else {
            break 'standby;
        };
        let epoch = leadership.epoch;
        last_epoch = Some(epoch);
        while !shutdown.is_triggered() {
            heartbeat.beat();
            if !keeper.leads_with(epoch) {
                // Lost the lease: drop the producer (purging whatever it still holds) and
                // stand by. Marks of this epoch are refused: the next leader publishes those
                // rows again.
                relay.read_ahead = None;
                relay.mark_acked(&shutdown, heartbeat).await;
                if let Some(producer) = relay.publisher.take() {
                    producer.close().await;
                }
                continue 'standby;
            }
            let limit = if relay.n_isolated > 0 {
                1
            } else {
                config.batch_size
            };
            let (fetched, read) = match relay.read_ahead.take() {
                Some(ReadAhead { rows, read }) => (Ok(rows), read),
                None => {
                    // The acknowledged batch is marked while this read runs past it.
                    let read_started = Instant::now();
                    let sent = relay.acked.as_ref().map(Acked::ids).unwrap_or_default();
                    let (outbox, acked, stats) =
                        (&relay.outbox, &mut relay.acked, &mut relay.stats);
                    let mark_shutdown = shutdown.clone();
                    let (fetched, mut read) = tokio::select! {
                        _ = shutdown.triggered() => break 'standby,
                        (fetched, ()) = async {
                            tokio::join!(
                                async {
                                    let fetched = outbox.fetch_after(limit, &sent).await;
                                    (fetched, read_started.elapsed())
                                },
                                mark_acked(outbox, acked, stats, &mark_shutdown, heartbeat),
                            )
                        } => fetched,
                    };
                    let fetched = match fetched {
                        Ok(ReadPast::Rows(rows)) => Ok(rows),
                        Ok(ReadPast::RowBelow(outbox_id)) => {
                            // Read from the oldest: the acknowledged batch is marked by now.
                            events::ReadRestarted { outbox_id }.emit();
                            let again_started = Instant::now();
                            let fetched = tokio::select! {
                                _ = shutdown.triggered() => break 'standby,
                                fetched = relay.outbox.fetch_batch(limit) => fetched,
                            };
                            read += again_started.elapsed();
                            fetched
                        }
                        Err(err) => Err(err),
                    };
                    (fetched, read)
                }
            };
            let rows = match fetched {
                Ok(rows) => {
                    relay.db_backoff.reset();
                    rows
                }
                Err(err) => {
                    let retry_in = relay.db_backoff.next_delay();
                    events::DatabaseFailed {
                        error: &err,
                        retry_in,
                        missing_table: err.is_undefined_table() || err.is_undefined_column(),
                    }
                    .emit();
                    sleep_unless_stopped(retry_in, &mut shutdown, heartbeat).await;
                    continue;
                }
            };
            if rows.is_empty() {
                relay.n_isolated = 0;
                // LISTEN was set up before this read, so a commit after it has already stored a
                // wake-up permit: no notification can fall between the read and the wait. An
                // idle leader publishes nothing; the lease is checked again after the wake.
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
                    break 'standby;
                }
                continue;
            }
            relay
                .publish_batch(rows, read, epoch, &keeper, &mut shutdown, heartbeat)
                .await;
        }
    }
    // Marked before the lease is released: the mark is fenced by it.
    relay.mark_acked(&shutdown, heartbeat).await;
    keeper.stop().await;
    if let Some(epoch) = last_epoch {
        // Drained: hand over at once rather than make a standby wait for the expiry.
        if lease.release(epoch).await.is_ok() {
            events::LeaseReleased { epoch }.emit();
        }
    }
    if let Some(producer) = relay.publisher.take() {
        producer.close().await;
    }
    drop(wakeups);
    relay.outbox.pool().close().await;
    events::RelayStopped {
        n_published: relay.stats.n_published,
        n_unacknowledged: relay.n_unacknowledged,
    }
    .emit();
    Ok(relay.stats)
}

/// The relay's state between batches.
struct Relay<'a> {
    config: &'a Config,
    outbox: Outbox,
    /// `None` after the producer was dropped; the next batch creates one.
    publisher: Option<Publisher>,
    stats: RelayStats,
    n_unacknowledged: usize,
    db_backoff: Backoff,
    kafka_backoff: Backoff,
    /// Rows still to be sent one at a time, after a record batch was rejected as a whole.
    n_isolated: usize,
    /// The last batch, acknowledged in full and not yet marked: it is marked while the next
    /// batch is read or published.
    acked: Option<Acked>,
    /// The next batch, read while the last one was published.
    read_ahead: Option<ReadAhead>,
}

/// A batch Kafka acknowledged in full, waiting to be marked delivered.
struct Acked {
    deliverable: Deliverable,
    epoch: i64,
    n_rows: usize,
    read: Duration,
    publish: Duration,
    /// When its first record was sent.
    started: Instant,
}

impl Acked {
    fn ids(&self) -> Vec<i64> {
        self.deliverable.ids().to_vec()
    }
}

/// Rows read while the previous batch was being published: the oldest undelivered rows then,
/// apart from that batch's.
struct ReadAhead {
    rows: Vec<OutboxRow>,
    read: Duration,
}

impl Relay<'_> {
    /// Marks the acknowledged batch, if one is waiting.
    async fn mark_acked(&mut self, shutdown: &Shutdown, heartbeat: &Heartbeat) {
        mark_acked(
            &self.outbox,
            &mut self.acked,
            &mut self.stats,
            shutdown,
            heartbeat,
        )
        .await;
    }

    /// Publishes one batch as leader with `epoch`, settles it and marks it.
    async fn publish_batch(
        &mut self,
        rows: Vec<OutboxRow>,
        read: Duration,
        epoch: i64,
        keeper: &Keeper,
        shutdown: &mut Shutdown,
        heartbeat: &Heartbeat,
    ) {
        let config = self.config;
        let producer = match self.publisher.take() {
            Some(p) => p,
            None => match Publisher::idempotent(&config.kafka, &config.topic_template) {
                Ok(p) => {
                    p.connect_early();
                    p
                }
                Err(err) => {
                    let retry_in = self.kafka_backoff.next_delay();
                    events::ProducerCreateFailed {
                        error: &err,
                        retry_in,
                    }
                    .emit();
                    sleep_unless_stopped(retry_in, shutdown, heartbeat).await;
                    return;
                }
            },
        };

        let started = Instant::now();
        let mut tracker = Tracker::new(&rows, config.on_poison);
        let still_leader = || keeper.leads_with(epoch);
        // A full batch means a backlog: read the next batch while this one waits for its acks.
        let read_ahead = self.n_isolated == 0 && rows.len() >= config.batch_size;
        // Rows sent and not yet marked: the previous batch (marked meanwhile) and this one.
        let sent: Vec<i64> = if read_ahead {
            let mut sent: Vec<i64> = self.acked.as_ref().map(Acked::ids).unwrap_or_default();
            sent.extend(rows.iter().map(|r| r.id));
            sent.sort_unstable();
            sent
        } else {
            Vec::new()
        };
        let pg_shutdown = shutdown.clone();
        let (outbox, acked, stats) = (&self.outbox, &mut self.acked, &mut self.stats);
        let ((report, publish), next) = tokio::join!(
            async {
                // A batch waits as long as the broker is away: that is a legitimate wait.
                let report = heartbeat
                    .during(producer.publish(
                        &rows,
                        &mut tracker,
                        shutdown,
                        config.shutdown_timeout,
                        &still_leader,
                        config.ack_stall,
                    ))
                    .await;
                (report, started.elapsed())
            },
            async {
                // The previous batch is marked while the next one is read past both.
                let read_past = async {
                    if !read_ahead || pg_shutdown.is_triggered() {
                        return None;
                    }
                    let read_started = Instant::now();
                    // A failed read-ahead is only a lost optimisation: the next read reports it.
                    let rows = match outbox.fetch_after(config.batch_size, &sent).await.ok()? {
                        ReadPast::Rows(rows) => rows,
                        ReadPast::RowBelow(outbox_id) => {
                            events::ReadRestarted { outbox_id }.emit();
                            return None;
                        }
                    };
                    Some(ReadAhead {
                        rows,
                        read: read_started.elapsed(),
                    })
                };
                let ((), next) = tokio::join!(
                    mark_acked(outbox, acked, stats, &pg_shutdown, heartbeat),
                    read_past,
                );
                next
            },
        );
        let settled = tracker.finish();
        let n_rows = rows.len();
        let clean = settled.deliverable.len() == n_rows
            && report.n_transient == 0
            && report.n_suspect == 0
            && producer.fatal_error().is_none()
            && keeper.leads_with(epoch)
            && !shutdown.is_triggered();
        if clean {
            // Every row acknowledged: no row of this batch can be read again, so the read-ahead
            // (which left them out) holds the oldest undelivered rows after them. Marking waits
            // for the next batch's publish.
            self.acked = Some(Acked {
                deliverable: settled.deliverable,
                epoch,
                n_rows,
                read,
                publish,
                started,
            });
            self.read_ahead = next.filter(|next| !next.rows.is_empty());
            self.publisher = Some(producer);
            self.n_unacknowledged = 0;
            self.n_isolated = self.n_isolated.saturating_sub(1);
            self.kafka_backoff.reset();
            return;
        }
        // Something did not settle: the read-ahead may hold later rows of an aggregate whose row
        // failed here. Drop it; mark what was acknowledged now; the next read starts over.
        drop(next);
        let mark_started = Instant::now();
        let n_marked = mark(
            &self.outbox,
            &settled.deliverable,
            epoch,
            shutdown,
            heartbeat,
        )
        .await;
        self.stats.n_published += n_marked;
        self.n_unacknowledged = settled.n_held;
        events::BatchPublished {
            n_rows,
            n_marked,
            n_failed: settled.failed.len() + settled.poisoned.len(),
            n_held: settled.n_held,
            n_transient: report.n_transient,
            n_suspect: report.n_suspect,
            n_poisoned: settled.poisoned.len(),
            read,
            publish,
            mark: mark_started.elapsed(),
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
        self.n_isolated = self.n_isolated.saturating_sub(1);
        if report.n_suspect > 0 && self.n_isolated == 0 {
            // One row of a rejected record batch is poison; send the batch's unsettled rows one
            // at a time to find which, rather than failing its innocent neighbours.
            self.n_isolated = settled.failed.len() + settled.n_held;
            events::IsolatingRows {
                n_rows: self.n_isolated,
            }
            .emit();
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
            self.publisher = Some(producer);
        }

        let mut failed = settled.failed;
        let poisoned = heartbeat
            .during(settle_poison(
                &rows,
                settled.poisoned,
                &mut self.publisher,
                config,
                &mut failed,
            ))
            .await;
        if let Err(err) = self.outbox.record_failures(&failed).await {
            events::DatabaseFailed {
                error: &err,
                retry_in: Duration::ZERO,
                missing_table: false,
            }
            .emit();
        }
        if let Err(err) = self.outbox.mark_failed(&poisoned, epoch).await {
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
            sleep_unless_stopped(self.kafka_backoff.next_delay(), shutdown, heartbeat).await;
        } else {
            self.kafka_backoff.reset();
        }
    }
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

/// Marks the batch waiting in `acked` (acknowledged in full), if there is one, and reports it.
/// `acked` is emptied only once the mark returned, so a mark cut short by a stop signal is made
/// again before the relay stops.
async fn mark_acked(
    outbox: &Outbox,
    acked: &mut Option<Acked>,
    stats: &mut RelayStats,
    shutdown: &Shutdown,
    heartbeat: &Heartbeat,
) {
    let Some(batch) = acked.as_ref() else {
        return;
    };
    let started = Instant::now();
    let n_marked = mark(outbox, &batch.deliverable, batch.epoch, shutdown, heartbeat).await;
    let mark_elapsed = started.elapsed();
    stats.n_published += n_marked;
    events::BatchPublished {
        n_rows: batch.n_rows,
        n_marked,
        n_failed: 0,
        n_held: 0,
        n_transient: 0,
        n_suspect: 0,
        n_poisoned: 0,
        read: batch.read,
        publish: batch.publish,
        mark: mark_elapsed,
        elapsed: batch.started.elapsed(),
    }
    .emit();
    *acked = None;
}

/// Marks acknowledged rows, retrying while Postgres is unavailable. A row that stays unmarked
/// is published again later (a duplicate, never a loss), so after a stop signal it tries a few
/// more times and then gives up.
async fn mark(
    outbox: &Outbox,
    rows: &Deliverable,
    epoch: i64,
    shutdown: &Shutdown,
    heartbeat: &Heartbeat,
) -> u64 {
    const ATTEMPTS_AFTER_STOP: u32 = 3;
    let mut backoff = Backoff::with_bounds(Duration::from_millis(50), Duration::from_secs(5));
    let mut attempts_after_stop = 0;
    loop {
        match outbox.mark_delivered(rows, epoch).await {
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
        .await;
}
