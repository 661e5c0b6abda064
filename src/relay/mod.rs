//! The relay loop: wait → read a batch → publish it pipelined → settle acks → mark delivered.
//!
//! [`run`] stands by until this instance holds the lease, then leads: one `select!` over a
//! closed set of events (a batch acknowledged, a batch marked, a batch read, woken, the lease
//! lost, the stop signal) drives a [`Pipeline`], whose transitions are plain functions that say
//! what to start next (see `pipeline.rs` for the rules: clean and unclean batches, the
//! read-ahead, isolation). This module only carries them out: it owns the futures, the
//! producer (`producer.rs`) and the poison policy's dead-lettering (`poison.rs`).
//!
//! Every read takes the oldest undelivered rows (or reads past rows sent and not yet marked,
//! and checks nothing lies below them), so nothing needs a cursor. Transient failures
//! (Postgres or Kafka down, a failed record) never end the loop: it logs, backs off and resumes
//! from the oldest undelivered row. Only a stop signal ends it.

mod exactly_once;
mod pipeline;
mod poison;
mod producer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acks::{Deliverable, Tracker};
use crate::config::{Config, ConfigError};
use crate::events;
use crate::heartbeat::Heartbeat;
use crate::lease::{Keeper, Lease, LeaseWatch};
use crate::outbox::{Outbox, OutboxError, ReadPast, Wakeups};
use crate::publisher::{PublisherError, TxnError};
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

use pipeline::{
    Acked, Acknowledged, LeaseState, Leave, Next, Pipeline, Read, ReadDone, ReadKind, SettleReport,
    Transaction, Unclean, Work,
};
use producer::ProducerSlot;

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
    /// Reads past the rows in flight that found an undelivered row below them and read again
    /// from the oldest (this run's share of `posthorn_read_restarts_total`).
    pub n_read_restarts: u64,
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

/// [`run`], beating `heartbeat` at every event and while it legitimately waits (for the lease,
/// for rows, for the broker, in a backoff), so `/healthz` can tell a wedged loop.
pub(crate) async fn run_with_heartbeat(
    config: &Config,
    mut shutdown: Shutdown,
    heartbeat: &Heartbeat,
) -> Result<RelayStats, RelayError> {
    let outbox = Outbox::connect_lazy(config)?;
    // Created up front so that an invalid Kafka property is a start-up error, not a retry loop.
    let producer = ProducerSlot::create(config)?;
    events::RelayStarted {
        database: config.database.redacted(),
        brokers: &config.kafka.brokers,
        table: &config.outbox.qualified(),
        batch_size: config.batch_size,
        tracking: config.tracking,
        delivery: config.delivery,
    }
    .emit();
    let lease = Arc::new(Lease::new(
        outbox.pool().clone(),
        &config.outbox,
        &config.instance_id,
        config.lease_ttl,
    ));
    let mut keeper = Keeper::spawn(lease.clone());
    let relay = Relay {
        config,
        heartbeat,
        wakeups: outbox.spawn_listener(shutdown.clone()),
        lease: keeper.watch(),
        outbox,
    };
    let mut state = State {
        pipeline: Pipeline::new(config.batch_size),
        producer,
        stats: RelayStats::default(),
        fenced_holding_lease: false,
    };

    let mut last_epoch = None;
    while let Some(epoch) = stand_by(&mut keeper, &lease, &mut shutdown, heartbeat).await {
        last_epoch = Some(epoch);
        match relay.lead(&mut state, epoch, &mut shutdown).await {
            Leave::Stop => break,
            // Lost the lease: drop the producer (purging whatever it still holds).
            Leave::StandBy => {
                state.producer.close();
                if std::mem::take(&mut state.fenced_holding_lease) {
                    // Another relay uses this transactional.id: don't fence it straight back.
                    relay
                        .sleep_unless_stopped(exactly_once::AFTER_FENCED, &mut shutdown)
                        .await;
                }
            }
        }
    }
    // Everything acknowledged was marked before this: the mark is fenced by the lease.
    keeper.stop().await;
    if let Some(epoch) = last_epoch {
        // Drained: hand over at once rather than make a standby wait for the expiry.
        if lease.release(epoch).await.is_ok() {
            events::LeaseReleased { epoch }.emit();
        }
    }
    state.producer.close();
    let Relay {
        outbox, wakeups, ..
    } = relay;
    drop(wakeups);
    outbox.pool().close().await;
    events::RelayStopped {
        n_published: state.stats.n_published,
        n_unacknowledged: state.pipeline.n_unacknowledged(),
    }
    .emit();
    Ok(state.stats)
}

/// Waits until this instance leads, and returns its epoch; `None` on the stop signal. A
/// standby waits for the lease as long as another instance holds it: a legitimate wait. It says
/// so only once the keeper has tried: on a fresh start the lease is usually free.
async fn stand_by(
    keeper: &mut Keeper,
    lease: &Lease,
    shutdown: &mut Shutdown,
    heartbeat: &Heartbeat,
) -> Option<i64> {
    if shutdown.is_triggered() {
        return None;
    }
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
    leadership.map(|l| l.epoch)
}

/// What the loop reads and never changes.
struct Relay<'a> {
    config: &'a Config,
    heartbeat: &'a Heartbeat,
    outbox: Outbox,
    wakeups: Wakeups,
    lease: LeaseWatch,
}

/// What the loop changes.
struct State {
    pipeline: Pipeline,
    producer: ProducerSlot,
    stats: RelayStats,
    /// Exactly once: the producer was fenced while this instance held the lease.
    fenced_holding_lease: bool,
}

/// The events the loop waits for.
enum Event {
    Acknowledged(Acknowledged),
    Marked(Marked),
    Read(ReadDone),
    Woke,
    LeaseLost,
    Stop,
}

/// A mark of an acknowledged batch, returned.
struct Marked {
    acked: Acked,
    n_marked: u64,
    mark: Duration,
}

/// The work running, one future of each kind at most.
struct Running<'a> {
    publishing: Task<'a, Acknowledged>,
    marking: Task<'a, Marked>,
    reading: Task<'a, ReadDone>,
    waiting: Task<'a, ()>,
}

impl<'a> Relay<'a> {
    /// Publishes while leading with `epoch`, until the stop signal or the loss of the lease.
    async fn lead(&'a self, state: &mut State, epoch: i64, shutdown: &mut Shutdown) -> Leave {
        let mut running = Running {
            publishing: Task::none(),
            marking: Task::none(),
            reading: Task::none(),
            waiting: Task::none(),
        };
        let (mut stopping, mut lease_lost) = (false, false);
        self.outbox.begin_epoch();
        if let Some(leave) = self.begin_leading(state, epoch, shutdown).await {
            return leave;
        }
        let mut next = state.pipeline.lead(epoch);
        loop {
            if let Some(leave) = self
                .carry_out(next, state, &mut running, epoch, shutdown)
                .await
            {
                return leave;
            }
            let event = tokio::select! {
                // Acknowledgements first: a settled batch decides what is read next.
                biased;
                acknowledged = running.publishing.done() => Event::Acknowledged(acknowledged),
                marked = running.marking.done() => Event::Marked(marked),
                read = running.reading.done() => Event::Read(read),
                _ = shutdown.triggered(), if !stopping => Event::Stop,
                _ = self.lease.lapsed(epoch), if !lease_lost => Event::LeaseLost,
                () = running.waiting.done() => Event::Woke,
            };
            self.heartbeat.beat();
            next = match event {
                Event::Acknowledged(acknowledged) => {
                    if let Transaction::ProducerLost(TxnError::Fenced(error)) =
                        &acknowledged.transaction
                    {
                        let lease_held = self.lease.leads_with(epoch);
                        state.fenced_holding_lease = lease_held;
                        events::ProducerFenced {
                            transactional_id: state.producer.transactional_id().unwrap_or(""),
                            error,
                            lease_held,
                        }
                        .emit();
                    }
                    state.pipeline.acknowledged(acknowledged)
                }
                Event::Marked(marked) => {
                    self.report_marked(state, marked);
                    state.pipeline.marked()
                }
                Event::Read(read) => {
                    if let Ok(ReadPast::RowBelow(outbox_id)) = read.result {
                        events::ReadRestarted { outbox_id }.emit();
                        state.stats.n_read_restarts += 1;
                    }
                    state.pipeline.read(read)
                }
                Event::Woke => state.pipeline.woke(),
                Event::LeaseLost => {
                    lease_lost = true;
                    state.pipeline.lease_lost()
                }
                Event::Stop => {
                    stopping = true;
                    state.pipeline.stop()
                }
            };
        }
    }

    /// Exactly once: fences, reads the checkpoint topic and records its last transaction
    /// before the first read, retrying until it succeeds; `Some` if the relay must leave
    /// instead (the stop signal, the lease lost). At least once: nothing to do.
    async fn begin_leading(
        &self,
        state: &mut State,
        epoch: i64,
        shutdown: &mut Shutdown,
    ) -> Option<Leave> {
        let mut backoff = Backoff::with_bounds(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let result = self
                .heartbeat
                .during(exactly_once::begin_leading(
                    &mut state.producer,
                    &self.outbox,
                    epoch,
                ))
                .await;
            let Err(error) = result else {
                return None;
            };
            let retry_in = backoff.next_delay();
            events::RecoveryFailed {
                error: &error.to_string(),
                retry_in,
            }
            .emit();
            state.producer.close();
            self.sleep_unless_stopped(retry_in, shutdown).await;
            if shutdown.is_triggered() {
                return Some(Leave::Stop);
            }
            if !self.lease.leads_with(epoch) {
                return Some(Leave::StandBy);
            }
        }
    }

    /// Carries out `next` and what the pipeline says after it, until it waits for an event
    /// (`None`) or leaves.
    async fn carry_out(
        &'a self,
        mut next: Next,
        state: &mut State,
        running: &mut Running<'a>,
        epoch: i64,
        shutdown: &mut Shutdown,
    ) -> Option<Leave> {
        loop {
            next = match next {
                Next::Start(work) => match self.start(work, state, running, epoch, shutdown) {
                    Ok(()) => Next::Wait,
                    Err(failed) => {
                        let (work, error) = *failed;
                        let retry_in = state.pipeline.no_producer(work);
                        events::ProducerCreateFailed {
                            error: &error,
                            retry_in,
                        }
                        .emit();
                        self.sleep_unless_stopped(retry_in, shutdown).await;
                        state.pipeline.backed_off()
                    }
                },
                Next::Wait => {
                    // What the pipeline no longer wants is abandoned.
                    if !state.pipeline.is_reading() {
                        running.reading.cancel();
                    }
                    if !state.pipeline.is_idle() {
                        running.waiting.cancel();
                    }
                    debug_assert!(running.any(), "waiting for nothing");
                    return None;
                }
                Next::Idle => {
                    let (wakeups, poll_interval) = (&self.wakeups, self.config.poll_interval);
                    // An idle leader publishes nothing; the lease is checked again after the
                    // wake.
                    running.waiting.start(self.heartbeat.during(async move {
                        tokio::select! {
                            _ = wakeups.notified() => {}
                            _ = tokio::time::sleep(poll_interval) => {}
                        }
                    }));
                    Next::Wait
                }
                Next::DatabaseFailed { error, retry_in } => {
                    events::DatabaseFailed {
                        error: &error,
                        retry_in,
                        missing_table: error.is_undefined_table() || error.is_undefined_column(),
                    }
                    .emit();
                    self.sleep_unless_stopped(retry_in, shutdown).await;
                    state.pipeline.backed_off()
                }
                Next::BackOff { retry_in } => {
                    self.sleep_unless_stopped(retry_in, shutdown).await;
                    state.pipeline.backed_off()
                }
                Next::Settle(unclean) => {
                    let report = self.settle(*unclean, state, shutdown).await;
                    state.pipeline.settled(report)
                }
                Next::Leave(leave) => return Some(leave),
            };
        }
    }

    /// Starts the futures `work` asks for. Fails, starting nothing, if it publishes and no
    /// producer can be created.
    fn start(
        &'a self,
        work: Work,
        state: &mut State,
        running: &mut Running<'a>,
        epoch: i64,
        shutdown: &Shutdown,
    ) -> Result<(), Box<(Work, PublisherError)>> {
        let producer = match &work.publish {
            Some(_) => match state.producer.get() {
                Ok(producer) => Some(producer),
                Err(err) => return Err(Box::new((work, err))),
            },
            None => None,
        };
        let Work {
            publish,
            mark: acked,
            read,
        } = work;
        if let (Some(rows), Some(producer)) = (publish, producer) {
            let (config, heartbeat, lease) = (self.config, self.heartbeat, &self.lease);
            let mut shutdown = shutdown.clone();
            // Exactly once: the batch before this one may still be being marked; this
            // transaction's checkpoint names its rows too.
            let unmarked: Vec<i64> = acked
                .as_ref()
                .map(|a| a.deliverable.ids().to_vec())
                .unwrap_or_default();
            running.publishing.start(async move {
                let started = Instant::now();
                let still_leader = || lease.leads_with(epoch);
                let began = match producer.is_transactional() {
                    true => Some(producer.begin_transaction().await),
                    false => None,
                };
                let (settled, report, transaction) = match began {
                    Some(Err(error)) => exactly_once::not_begun(&rows, config.on_poison, error),
                    began => {
                        let mut tracker = Tracker::new(&rows, config.on_poison);
                        // A batch waits as long as the broker is away: a legitimate wait.
                        let report = heartbeat
                            .during(producer.publish(
                                &rows,
                                &mut tracker,
                                &mut shutdown,
                                config.shutdown_timeout,
                                &still_leader,
                                config.ack_stall,
                            ))
                            .await;
                        let settled = tracker.finish();
                        match began {
                            None => (settled, report, Transaction::None),
                            Some(_) => {
                                heartbeat
                                    .during(exactly_once::end(
                                        &producer,
                                        settled,
                                        report,
                                        rows.len(),
                                        &unmarked,
                                        &still_leader,
                                    ))
                                    .await
                            }
                        }
                    }
                };
                Acknowledged {
                    settled,
                    report,
                    transaction,
                    fatal: producer.fatal_error(),
                    lease: if lease.leads_with(epoch) {
                        LeaseState::Held
                    } else {
                        LeaseState::Lost
                    },
                    publish: started.elapsed(),
                    started,
                    rows,
                }
            });
        }
        if let Some(acked) = acked {
            let (outbox, heartbeat, shutdown) = (&self.outbox, self.heartbeat, shutdown.clone());
            running.marking.start(async move {
                let started = Instant::now();
                let n_marked = mark(
                    outbox,
                    &acked.deliverable,
                    acked.epoch,
                    &shutdown,
                    heartbeat,
                )
                .await;
                Marked {
                    acked,
                    n_marked,
                    mark: started.elapsed(),
                }
            });
        }
        if let Some(Read { kind, limit, past }) = read {
            let outbox = &self.outbox;
            running.reading.start(async move {
                let started = Instant::now();
                let result = match kind {
                    ReadKind::Oldest => outbox.fetch_batch(limit).await.map(ReadPast::Rows),
                    ReadKind::Next | ReadKind::Ahead => outbox.fetch_after(limit, &past).await,
                };
                ReadDone {
                    result,
                    elapsed: started.elapsed(),
                }
            });
        }
        Ok(())
    }

    /// Reports the mark of a batch acknowledged in full.
    fn report_marked(&self, state: &mut State, marked: Marked) {
        let Marked {
            acked,
            n_marked,
            mark,
        } = marked;
        state.stats.n_published += n_marked;
        events::BatchPublished {
            n_rows: acked.n_rows,
            n_marked,
            n_failed: 0,
            n_held: 0,
            n_transient: 0,
            n_suspect: 0,
            n_poisoned: 0,
            read: acked.read,
            publish: acked.publish,
            mark,
            elapsed: acked.started.elapsed(),
        }
        .emit();
    }

    /// Carries out a batch that did not settle cleanly: marks what was acknowledged now,
    /// replaces the producer if asked, applies the poison policy, and records the failures.
    async fn settle(
        &self,
        unclean: Unclean,
        state: &mut State,
        shutdown: &mut Shutdown,
    ) -> SettleReport {
        let Unclean {
            rows,
            settled,
            report,
            epoch,
            read,
            publish,
            started,
            isolate,
            replace,
        } = unclean;
        let mark_started = Instant::now();
        let n_marked = mark(
            &self.outbox,
            &settled.deliverable,
            epoch,
            shutdown,
            self.heartbeat,
        )
        .await;
        state.stats.n_published += n_marked;
        events::BatchPublished {
            n_rows: rows.len(),
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
        for (outbox_id, failure) in &settled.failed {
            events::RowFailed {
                outbox_id: *outbox_id,
                error: &failure.to_string(),
            }
            .emit();
        }
        if let Some(n_rows) = isolate {
            events::IsolatingRows { n_rows }.emit();
        }
        if let Some(reason) = &replace {
            state.producer.replace(reason);
        }

        let mut retried = settled.failed;
        let poisoned = self
            .heartbeat
            .during(poison::settle(
                &rows,
                settled.poisoned,
                &mut state.producer,
                self.config,
                &mut retried,
            ))
            .await;
        if let Err(err) = self.outbox.record_failures(&retried).await {
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
        SettleReport {
            n_marked,
            n_retried: retried.len(),
            n_poisoned: poisoned.len(),
            n_transient: report.n_transient,
        }
    }

    async fn sleep_unless_stopped(&self, delay: Duration, shutdown: &mut Shutdown) {
        self.heartbeat
            .during(async {
                tokio::select! {
                    _ = shutdown.triggered() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            })
            .await;
    }
}

impl Running<'_> {
    fn any(&self) -> bool {
        self.publishing.is_running()
            || self.marking.is_running()
            || self.reading.is_running()
            || self.waiting.is_running()
    }
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

/// A future the loop may be running: polled only through [`Task::done`], which never resolves
/// while there is none.
struct Task<'a, T>(Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>);

impl<'a, T> Task<'a, T> {
    fn none() -> Self {
        Task(None)
    }

    fn start(&mut self, future: impl Future<Output = T> + Send + 'a) {
        debug_assert!(self.0.is_none(), "one at a time");
        self.0 = Some(Box::pin(future));
    }

    fn is_running(&self) -> bool {
        self.0.is_some()
    }

    fn cancel(&mut self) {
        self.0 = None;
    }

    async fn done(&mut self) -> T {
        let output = match self.0.as_mut() {
            Some(future) => future.await,
            None => std::future::pending().await,
        };
        self.0 = None;
        output
    }
}
