//! The relay's decisions, as plain data and plain functions: what is in flight, what is
//! acknowledged and not yet marked, the read-ahead, isolation; and, for each event, what to do
//! next. No I/O happens here: the loop in `relay::run` starts what a [`Next`] asks for and
//! reports back with the next event. So every rule below is unit-tested without Postgres or
//! Kafka.
//!
//! A *round* is the work started together: publishing one batch, marking the batch before it
//! (acknowledged in full), and reading the next batch past both (the read-ahead); or, between
//! batches, reading the next batch while the last one is marked. A round's outcome is decided
//! only once all its work is done, so a batch is sent only after the previous one settled, and
//! a read from the oldest row never overtakes a mark.
//!
//! - Clean batch (every row acknowledged, the producer healthy, still leading, not stopping): it
//!   is parked as [`Acked`] and marked during the next round; the read-ahead, which left its
//!   rows out, is the next batch.
//! - Anything else: the read-ahead is dropped (it may hold later rows of an aggregate whose row
//!   failed), what was acknowledged is marked at once ([`Next::Settle`]), and the next read
//!   starts from the oldest undelivered row.
//! - A record batch Kafka rejected as a whole: the batch's unsettled rows are sent one at a time
//!   (isolation) to find the poison one.

use std::time::Duration;

use tokio::time::Instant;

use crate::acks::{Deliverable, Settled};
use crate::outbox::{OutboxError, ReadPast};
use crate::publisher::{FatalError, PublishReport, TxnError};
use crate::retry::Backoff;
use crate::row::{Failure, OutboxRow};

/// The relay's state while it leads with one epoch.
pub(crate) struct Pipeline {
    batch_size: usize,
    epoch: i64,
    /// The batch being published.
    in_flight: Option<InFlight>,
    /// The published batch's outcome, held until the rest of its round is done.
    acknowledged: Option<Acknowledged>,
    /// The last batch, acknowledged in full and not yet marked.
    acked: Option<Acked>,
    /// A mark of an [`Acked`] batch is running.
    marking: bool,
    /// A read is running, and which.
    reading: Option<ReadKind>,
    /// The next batch's rows, read while the current one was published.
    read_ahead: Option<ReadAhead>,
    /// What the last read (not a read-ahead) returned, held until its round is done.
    fetched: Option<Fetched>,
    /// Time spent reading the batch about to be published.
    read_elapsed: Duration,
    /// Rows still to be sent one at a time, after a record batch was rejected as a whole.
    n_isolated: usize,
    /// Rows of the last settled batch held back or left unacknowledged.
    n_unacknowledged: usize,
    /// Nothing to publish: waiting for a notification or the poll interval.
    idle: bool,
    /// Why the relay leaves this epoch, once the work in progress is done.
    leaving: Option<Leave>,
    db_backoff: Backoff,
    kafka_backoff: Backoff,
}

/// What the loop does next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Start this work; its events come back through [`Pipeline::read`], [`Pipeline::marked`]
    /// and [`Pipeline::acknowledged`].
    Start(Work),
    /// Wait for the work already running.
    Wait,
    /// Nothing is pending: wait for a notification or the poll interval, then
    /// [`Pipeline::woke`].
    Idle,
    /// A read failed: report it, wait `retry_in`, then [`Pipeline::backed_off`].
    DatabaseFailed {
        error: OutboxError,
        retry_in: Duration,
    },
    /// Kafka is failing records, or nothing but retries is left: wait `retry_in`, then
    /// [`Pipeline::backed_off`].
    BackOff { retry_in: Duration },
    /// The batch did not settle cleanly: carry this out, then [`Pipeline::settled`].
    Settle(Box<Unclean>),
    /// Nothing is running or pending: leave the loop.
    Leave(Leave),
}

/// Why the relay stops publishing with its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    /// The stop signal: drained, stop.
    Stop,
    /// The lease is lost: drop the producer and stand by.
    StandBy,
}

/// Work to start at once, concurrently.
#[derive(Debug, Default)]
pub(crate) struct Work {
    pub(crate) publish: Option<Vec<OutboxRow>>,
    pub(crate) mark: Option<Acked>,
    pub(crate) read: Option<Read>,
}

/// A read to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Read {
    pub(crate) kind: ReadKind,
    pub(crate) limit: usize,
    /// Rows sent and not yet marked, in id order: the read goes past them (`fetch_after`).
    /// Empty: from the oldest undelivered row.
    pub(crate) past: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    /// The next batch, while the last one is marked.
    Next,
    /// Again from the oldest row: the read past found a row below the rows sent.
    Oldest,
    /// The batch after the one being published.
    Ahead,
}

/// A batch Kafka acknowledged in full, waiting to be marked delivered.
#[derive(Debug)]
pub(crate) struct Acked {
    pub(crate) deliverable: Deliverable,
    pub(crate) epoch: i64,
    pub(crate) n_rows: usize,
    pub(crate) read: Duration,
    pub(crate) publish: Duration,
    /// When its first record was sent.
    pub(crate) started: Instant,
}

/// How publishing a batch ended.
#[derive(Debug)]
pub(crate) struct Acknowledged {
    pub(crate) rows: Vec<OutboxRow>,
    pub(crate) settled: Settled,
    pub(crate) report: PublishReport,
    /// The fatal error that stopped the producer, if one did.
    pub(crate) fatal: Option<FatalError>,
    /// The lease as the batch ended.
    pub(crate) lease: LeaseState,
    /// Exactly once: how the batch's Kafka transaction ended.
    pub(crate) transaction: Transaction,
    pub(crate) publish: Duration,
    pub(crate) started: Instant,
}

/// How a batch's Kafka transaction ended (exactly-once delivery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transaction {
    /// At-least-once delivery: there is none.
    None,
    /// Committed: the acknowledged rows are published.
    Committed,
    /// Aborted: no row of the batch is published (the settled outcome says so already).
    Aborted,
    /// The producer can write no more (fenced, fatal, or a commit whose outcome is unknown):
    /// this leadership ends; the next one finds out from the checkpoint topic what committed.
    ProducerLost(TxnError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    Held,
    Lost,
}

/// A batch that did not settle cleanly, and what to do about it: mark `settled.deliverable` at
/// once, record the failures, apply the poison policy, replace the producer if `replace` says
/// why.
#[derive(Debug)]
pub(crate) struct Unclean {
    pub(crate) rows: Vec<OutboxRow>,
    pub(crate) settled: Settled,
    pub(crate) report: PublishReport,
    pub(crate) epoch: i64,
    pub(crate) read: Duration,
    pub(crate) publish: Duration,
    pub(crate) started: Instant,
    /// Rows now to be sent one at a time, when this batch starts an isolation.
    pub(crate) isolate: Option<usize>,
    pub(crate) replace: Option<ReplaceReason>,
}

/// Why the producer must be replaced (new producer id, fresh sequence numbers): a record Kafka
/// failed may have left a gap behind which later records of its partition were written, and a
/// fatal error leaves the producer unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplaceReason {
    Fatal(FatalError),
    RecordFailed(Failure),
    /// A rejected record batch, or a transient failure, with no failed row to name.
    Unnamed,
}

impl std::fmt::Display for ReplaceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplaceReason::Fatal(err) => write!(f, "{err}"),
            ReplaceReason::RecordFailed(failure) => write!(f, "{failure}"),
            ReplaceReason::Unnamed => Ok(()),
        }
    }
}

/// What carrying out an [`Unclean`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SettleReport {
    pub(crate) n_marked: u64,
    /// Rows recorded as failed attempts (they are read again).
    pub(crate) n_retried: usize,
    /// Rows marked failed as poison.
    pub(crate) n_poisoned: usize,
    pub(crate) n_transient: usize,
}

/// What a read found.
#[derive(Debug)]
pub(crate) struct ReadDone {
    pub(crate) result: Result<ReadPast, OutboxError>,
    pub(crate) elapsed: Duration,
}

#[derive(Debug)]
struct InFlight {
    n_rows: usize,
    read: Duration,
}

#[derive(Debug)]
struct ReadAhead {
    rows: Vec<OutboxRow>,
    read: Duration,
}

#[derive(Debug)]
enum Fetched {
    Rows(Vec<OutboxRow>),
    RowBelow,
    Failed(OutboxError),
}

impl Pipeline {
    pub(crate) fn new(batch_size: usize) -> Pipeline {
        Pipeline {
            batch_size,
            epoch: 0,
            in_flight: None,
            acknowledged: None,
            acked: None,
            marking: false,
            reading: None,
            read_ahead: None,
            fetched: None,
            read_elapsed: Duration::ZERO,
            n_isolated: 0,
            n_unacknowledged: 0,
            idle: false,
            leaving: None,
            db_backoff: Backoff::new(),
            kafka_backoff: Backoff::new(),
        }
    }

    /// Starts leading with `epoch`: read the oldest rows.
    pub(crate) fn lead(&mut self, epoch: i64) -> Next {
        debug_assert!(self.is_at_rest());
        self.epoch = epoch;
        self.leaving = None;
        self.read_next()
    }

    /// Whether nothing is running, parked or pending.
    pub(crate) fn is_at_rest(&self) -> bool {
        self.in_flight.is_none()
            && self.acknowledged.is_none()
            && self.acked.is_none()
            && !self.marking
            && self.reading.is_none()
            && self.read_ahead.is_none()
            && self.fetched.is_none()
    }

    /// Whether a read is wanted: when not, the loop abandons the one it runs.
    pub(crate) fn is_reading(&self) -> bool {
        self.reading.is_some()
    }

    /// Rows of the last settled batch held back or left unacknowledged.
    pub(crate) fn n_unacknowledged(&self) -> usize {
        self.n_unacknowledged
    }

    /// Whether the loop is waiting for rows.
    pub(crate) fn is_idle(&self) -> bool {
        self.idle
    }

    /// A read ended.
    pub(crate) fn read(&mut self, done: ReadDone) -> Next {
        let Some(kind) = self.reading.take() else {
            return self.advance();
        };
        match kind {
            ReadKind::Ahead => {
                // A failed read-ahead is only a lost optimisation: the next read reports it.
                if let Ok(ReadPast::Rows(rows)) = done.result {
                    if !rows.is_empty() {
                        self.read_ahead = Some(ReadAhead {
                            rows,
                            read: done.elapsed,
                        });
                    }
                }
            }
            ReadKind::Next | ReadKind::Oldest => {
                self.read_elapsed += done.elapsed;
                self.fetched = Some(match done.result {
                    Ok(ReadPast::Rows(rows)) => Fetched::Rows(rows),
                    Ok(ReadPast::RowBelow(_)) => Fetched::RowBelow,
                    Err(err) => Fetched::Failed(err),
                });
            }
        }
        self.advance()
    }

    /// The mark of the acknowledged batch returned.
    pub(crate) fn marked(&mut self) -> Next {
        self.marking = false;
        self.advance()
    }

    /// Publishing the batch in flight ended.
    pub(crate) fn acknowledged(&mut self, outcome: Acknowledged) -> Next {
        self.acknowledged = Some(outcome);
        self.advance()
    }

    /// A notification arrived, or the poll interval passed.
    pub(crate) fn woke(&mut self) -> Next {
        if !self.idle {
            return Next::Wait;
        }
        self.idle = false;
        self.read_next()
    }

    /// The stop signal: finish what is in flight, mark what was acknowledged, stop.
    pub(crate) fn stop(&mut self) -> Next {
        self.leave(Leave::Stop)
    }

    /// The lease is lost: finish what is in flight (the producer purges it), mark what was
    /// acknowledged (the mark is fenced: the next leader publishes those rows again), stand by.
    pub(crate) fn lease_lost(&mut self) -> Next {
        self.leave(Leave::StandBy)
    }

    /// The work of `Next::Start(work)` could not start: no producer could be created. The
    /// batch is dropped (it is read again); the acknowledged batch stays parked. Returns how
    /// long to wait before [`Pipeline::backed_off`].
    pub(crate) fn no_producer(&mut self, work: Work) -> Duration {
        self.in_flight = None;
        self.reading = None;
        if let Some(acked) = work.mark {
            self.marking = false;
            self.acked = Some(acked);
        }
        self.read_elapsed = Duration::ZERO;
        self.kafka_backoff.next_delay()
    }

    /// A backoff was waited out.
    pub(crate) fn backed_off(&mut self) -> Next {
        self.advance()
    }

    /// An [`Unclean`] batch was carried out.
    pub(crate) fn settled(&mut self, report: SettleReport) -> Next {
        let nothing_moved = report.n_retried > 0 && report.n_marked == 0 && report.n_poisoned == 0;
        if report.n_transient > 0 || nothing_moved {
            return Next::BackOff {
                retry_in: self.kafka_backoff.next_delay(),
            };
        }
        self.kafka_backoff.reset();
        self.advance()
    }

    fn leave(&mut self, why: Leave) -> Next {
        // A stop outranks a lost lease: both drain, a stop then ends the run.
        if self.leaving != Some(Leave::Stop) {
            self.leaving = Some(why);
        }
        self.idle = false;
        // What is being read, or was read ahead, will not be published with this epoch.
        self.reading = None;
        self.read_ahead = None;
        self.fetched = None;
        self.advance()
    }

    /// Decides what comes next once the work in progress allows it.
    fn advance(&mut self) -> Next {
        if self.in_flight.is_some() && self.acknowledged.is_none()
            || self.marking
            || self.reading.is_some()
        {
            return Next::Wait;
        }
        if let Some(outcome) = self.acknowledged.take() {
            if let Some(unclean) = self.settle(outcome) {
                return Next::Settle(Box::new(unclean));
            }
        }
        if let Some(why) = self.leaving {
            // Marked before leaving: the mark is fenced by the lease.
            return match self.acked.take() {
                Some(acked) => self.start(Work {
                    mark: Some(acked),
                    ..Work::default()
                }),
                None => Next::Leave(why),
            };
        }
        match self.fetched.take() {
            Some(Fetched::Rows(rows)) => {
                self.db_backoff.reset();
                if rows.is_empty() {
                    self.n_isolated = 0;
                    self.read_elapsed = Duration::ZERO;
                    // LISTEN was set up before this read, so a commit after it has already
                    // stored a wake-up: no notification can fall between the read and the wait.
                    self.idle = true;
                    return Next::Idle;
                }
                let read = std::mem::take(&mut self.read_elapsed);
                return self.publish(rows, read);
            }
            Some(Fetched::RowBelow) => {
                // The acknowledged batch is marked by now: read from the oldest.
                return self.start(Work {
                    read: Some(Read {
                        kind: ReadKind::Oldest,
                        limit: self.limit(),
                        past: Vec::new(),
                    }),
                    ..Work::default()
                });
            }
            Some(Fetched::Failed(error)) => {
                self.read_elapsed = Duration::ZERO;
                return Next::DatabaseFailed {
                    error,
                    retry_in: self.db_backoff.next_delay(),
                };
            }
            None => {}
        }
        if let Some(ahead) = self.read_ahead.take() {
            return self.publish(ahead.rows, ahead.read);
        }
        self.read_next()
    }

    /// The published batch's round is done: a clean batch is parked to be marked during the
    /// next round; any other is returned to be settled at once.
    fn settle(&mut self, outcome: Acknowledged) -> Option<Unclean> {
        let in_flight = self.in_flight.take();
        let (n_rows, read) =
            in_flight.map_or((outcome.rows.len(), Duration::ZERO), |f| (f.n_rows, f.read));
        let Acknowledged {
            rows,
            settled,
            report,
            fatal,
            lease,
            transaction,
            publish,
            started,
        } = outcome;
        if let Transaction::ProducerLost(_) = transaction {
            // Only a new leadership, which fences and reads the checkpoint topic first, may
            // publish again. A stop outranks it.
            if self.leaving != Some(Leave::Stop) {
                self.leaving = Some(Leave::StandBy);
            }
        }
        let clean = settled.deliverable.len() == n_rows
            && report.n_transient == 0
            && report.n_suspect == 0
            && fatal.is_none()
            && lease == LeaseState::Held
            && self.leaving.is_none();
        self.n_isolated = self.n_isolated.saturating_sub(1);
        self.n_unacknowledged = settled.n_held;
        if clean {
            // Every row acknowledged: no row of this batch can be read again, so the
            // read-ahead (which left them out) holds the oldest undelivered rows after them.
            debug_assert!(self.acked.is_none(), "marked during this round");
            self.acked = Some(Acked {
                deliverable: settled.deliverable,
                epoch: self.epoch,
                n_rows,
                read,
                publish,
                started,
            });
            self.kafka_backoff.reset();
            return None;
        }
        // The read-ahead may hold later rows of an aggregate whose row failed here.
        self.read_ahead = None;
        let isolate = if report.n_suspect > 0 && self.n_isolated == 0 {
            // One row of a rejected record batch is poison; send the batch's unsettled rows one
            // at a time to find which, rather than failing its innocent neighbours.
            self.n_isolated = settled.failed.len() + settled.n_held;
            Some(self.n_isolated)
        } else {
            None
        };
        let replace = if report.n_transient > 0 || report.n_suspect > 0 || fatal.is_some() {
            Some(match (fatal, settled.failed.first()) {
                (Some(fatal), _) => ReplaceReason::Fatal(fatal),
                (None, Some((_, failure))) => ReplaceReason::RecordFailed(failure.clone()),
                (None, None) => ReplaceReason::Unnamed,
            })
        } else {
            None
        };
        Some(Unclean {
            rows,
            settled,
            report,
            epoch: self.epoch,
            read,
            publish,
            started,
            isolate,
            replace,
        })
    }

    /// Publishes `rows`, marks the acknowledged batch meanwhile, and, for a full batch (a
    /// backlog), reads the next one past both.
    fn publish(&mut self, rows: Vec<OutboxRow>, read: Duration) -> Next {
        let read_ahead = self.n_isolated == 0 && rows.len() >= self.batch_size;
        let ahead = read_ahead.then(|| {
            let mut past: Vec<i64> = self.acked_ids();
            past.extend(rows.iter().map(|r| r.id));
            past.sort_unstable();
            Read {
                kind: ReadKind::Ahead,
                limit: self.batch_size,
                past,
            }
        });
        self.in_flight = Some(InFlight {
            n_rows: rows.len(),
            read,
        });
        let mark = self.acked.take();
        self.start(Work {
            publish: Some(rows),
            mark,
            read: ahead,
        })
    }

    /// Reads the next batch past the acknowledged one, which is marked meanwhile.
    fn read_next(&mut self) -> Next {
        let read = Read {
            kind: ReadKind::Next,
            limit: self.limit(),
            past: self.acked_ids(),
        };
        let mark = self.acked.take();
        self.start(Work {
            read: Some(read),
            mark,
            ..Work::default()
        })
    }

    fn start(&mut self, work: Work) -> Next {
        self.marking |= work.mark.is_some();
        if let Some(read) = &work.read {
            self.reading = Some(read.kind);
        }
        Next::Start(work)
    }

    fn limit(&self) -> usize {
        if self.n_isolated > 0 {
            1
        } else {
            self.batch_size
        }
    }

    fn acked_ids(&self) -> Vec<i64> {
        self.acked
            .as_ref()
            .map(|a| a.deliverable.ids().to_vec())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acks::Tracker;
    use crate::config::PoisonPolicy;

    const BATCH: usize = 3;

    fn rows(ids: std::ops::RangeInclusive<i64>) -> Vec<OutboxRow> {
        ids.map(|id| OutboxRow {
            id,
            event_id: uuid::Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: format!("k{}", id % 2),
            event_type: "e".into(),
            payload: None,
            topic: None,
            headers: None,
            created_at_us: 0,
        })
        .collect()
    }

    fn ids(rows: &[OutboxRow]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    fn read_done(rows: Vec<OutboxRow>) -> ReadDone {
        ReadDone {
            result: Ok(ReadPast::Rows(rows)),
            elapsed: Duration::from_millis(1),
        }
    }

    /// Publishing `rows` ended with `ack(i)` true for the rows Kafka acknowledged; the others
    /// failed.
    fn acknowledged(rows: Vec<OutboxRow>, ack: impl Fn(usize) -> bool) -> Acknowledged {
        let mut tracker = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        let mut report = PublishReport::default();
        for i in 0..rows.len() {
            if ack(i) {
                tracker.ack(i);
            } else {
                tracker.fail(
                    i,
                    Failure::Kafka("Broker: Not enough in-sync replicas".into()),
                );
                report.n_transient += 1;
            }
        }
        let settled = tracker.finish();
        Acknowledged {
            rows,
            settled,
            report,
            fatal: None,
            lease: LeaseState::Held,
            transaction: Transaction::None,
            publish: Duration::from_millis(2),
            started: Instant::now(),
        }
    }

    /// A batch Kafka rejected as a whole: every record failed as a suspect.
    fn rejected(rows: Vec<OutboxRow>) -> Acknowledged {
        let mut tracker = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        for i in 0..rows.len() {
            if tracker.may_send(i) {
                tracker.fail(i, Failure::Kafka("Broker: Message size too large".into()));
            } else {
                tracker.withhold(i);
            }
        }
        let settled = tracker.finish();
        Acknowledged {
            rows,
            settled,
            report: PublishReport {
                n_transient: 0,
                n_suspect: 2,
            },
            fatal: None,
            lease: LeaseState::Held,
            transaction: Transaction::None,
            publish: Duration::ZERO,
            started: Instant::now(),
        }
    }

    fn start(next: Next) -> Work {
        match next {
            Next::Start(work) => work,
            other => panic!("expected work to start, got {other:?}"),
        }
    }

    fn settle(next: Next) -> Unclean {
        match next {
            Next::Settle(unclean) => *unclean,
            other => panic!("expected a batch to settle, got {other:?}"),
        }
    }

    fn published(report: &Unclean, n_marked: u64) -> SettleReport {
        SettleReport {
            n_marked,
            n_retried: report.settled.failed.len(),
            n_poisoned: 0,
            n_transient: report.report.n_transient,
        }
    }

    /// A pipeline leading with epoch 7 that has read `first` and is publishing it.
    fn publishing(first: Vec<OutboxRow>) -> (Pipeline, Work) {
        let mut p = Pipeline::new(BATCH);
        let work = start(p.lead(7));
        assert_eq!(
            work.read,
            Some(Read {
                kind: ReadKind::Next,
                limit: BATCH,
                past: vec![]
            })
        );
        let work = start(p.read(read_done(first)));
        (p, work)
    }

    #[test]
    fn a_clean_batch_is_marked_while_the_next_one_is_read_past_it() {
        let (mut p, work) = publishing(rows(1..=2));
        let batch = work.publish.expect("publishes what it read");
        assert_eq!(ids(&batch), [1, 2]);
        assert!(
            work.read.is_none(),
            "a batch that is not full means no backlog"
        );
        assert!(work.mark.is_none());

        // Clean: parked, and marked while the next read goes past it.
        let work = start(p.acknowledged(acknowledged(batch, |_| true)));
        let acked = work.mark.expect("the acknowledged batch is marked");
        assert_eq!(acked.deliverable.ids(), [1, 2]);
        assert_eq!(acked.epoch, 7);
        assert_eq!(
            work.read,
            Some(Read {
                kind: ReadKind::Next,
                limit: BATCH,
                past: vec![1, 2]
            })
        );
        assert!(matches!(p.read(read_done(rows(3..=3))), Next::Wait));
        // The read returned first; the batch is published only once the mark returned.
        let work = start(p.marked());
        assert_eq!(ids(&work.publish.expect("publishes")), [3]);
        assert_eq!(p.n_unacknowledged(), 0);
    }

    #[test]
    fn an_empty_read_idles_until_woken() {
        let mut p = Pipeline::new(BATCH);
        start(p.lead(7));
        assert!(matches!(p.read(read_done(vec![])), Next::Idle));
        assert!(p.is_idle());
        let work = start(p.woke());
        assert_eq!(work.read.expect("reads again").kind, ReadKind::Next);
        assert!(!p.is_idle());
    }

    #[test]
    fn a_row_below_the_rows_sent_restarts_the_read_from_the_oldest_after_the_mark() {
        let (mut p, work) = publishing(rows(1..=2));
        start(p.acknowledged(acknowledged(work.publish.expect("batch"), |_| true)));
        let below = ReadDone {
            result: Ok(ReadPast::RowBelow(0)),
            elapsed: Duration::ZERO,
        };
        assert!(matches!(p.read(below), Next::Wait), "the mark runs");
        let work = start(p.marked());
        assert_eq!(
            work.read,
            Some(Read {
                kind: ReadKind::Oldest,
                limit: BATCH,
                past: vec![]
            })
        );
        assert!(work.mark.is_none());
    }

    #[test]
    fn a_full_batch_reads_ahead_and_a_clean_one_publishes_the_read_ahead_next() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        let ahead = work.read.expect("a full batch reads ahead");
        assert_eq!(ahead.kind, ReadKind::Ahead);
        assert_eq!(ahead.past, [1, 2, 3]);
        assert!(matches!(p.read(read_done(rows(4..=6))), Next::Wait));
        // The next batch goes out with the read-ahead, the clean one is marked meanwhile, and
        // the batch after is read past both.
        let work = start(p.acknowledged(acknowledged(batch, |_| true)));
        assert_eq!(ids(&work.publish.expect("the read-ahead")), [4, 5, 6]);
        assert_eq!(work.mark.expect("marked").deliverable.ids(), [1, 2, 3]);
        assert_eq!(work.read.expect("reads ahead").past, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_partial_failure_drops_the_read_ahead_and_reads_again_from_the_oldest() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        assert!(matches!(p.read(read_done(rows(4..=6))), Next::Wait));
        // Row 1 (key k1) failed; row 3 (k1 too) is held behind it, row 2 (k0) was acknowledged.
        let unclean = settle(p.acknowledged(acknowledged(batch, |i| i != 0)));
        assert_eq!(unclean.settled.deliverable.ids(), [2], "marked at once");
        assert_eq!(unclean.epoch, 7);
        assert!(matches!(
            unclean.replace,
            Some(ReplaceReason::RecordFailed(Failure::Kafka(_)))
        ));
        assert_eq!(unclean.isolate, None);
        assert_eq!(p.n_unacknowledged(), 1);
        // Kafka failed a record: back off, then read from the oldest (nothing is parked).
        assert!(matches!(
            p.settled(published(&unclean, 1)),
            Next::BackOff { .. }
        ));
        let work = start(p.backed_off());
        assert!(work.publish.is_none(), "the read-ahead is gone");
        assert!(work.mark.is_none());
        assert_eq!(
            work.read,
            Some(Read {
                kind: ReadKind::Next,
                limit: BATCH,
                past: vec![]
            })
        );
    }

    #[test]
    fn a_batch_rejected_as_a_whole_is_sent_again_one_row_at_a_time() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        assert!(matches!(p.read(read_done(rows(4..=6))), Next::Wait));
        let unclean = settle(p.acknowledged(rejected(batch)));
        // Rows 1 and 2 failed, row 3 was withheld behind row 1.
        assert_eq!(unclean.isolate, Some(3));
        assert!(
            unclean.replace.is_some(),
            "a rejected batch replaces the producer"
        );
        // Nothing moved and only retries are left: back off, then read one row at a time.
        let next = p.settled(SettleReport {
            n_marked: 0,
            n_retried: 3,
            n_poisoned: 0,
            n_transient: 0,
        });
        assert!(matches!(next, Next::BackOff { .. }), "{next:?}");
        let mut work = start(p.backed_off());
        for id in 1..=3 {
            let read = work.read.expect("reads");
            assert_eq!(read.limit, 1, "row {id} alone");
            let mut next = p.read(read_done(rows(id..=id)));
            if work.mark.is_some() {
                assert!(matches!(next, Next::Wait));
                next = p.marked();
            }
            let sent = start(next);
            let batch = sent.publish.expect("one row");
            assert!(sent.read.is_none(), "no read-ahead while isolating");
            work = start(p.acknowledged(acknowledged(batch, |_| true)));
        }
        // Isolation is over: the next read takes a whole batch again.
        assert_eq!(work.read.expect("reads").limit, BATCH);
    }

    #[test]
    fn losing_the_lease_mid_batch_settles_it_then_stands_by() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        // The read-ahead is running when the lease lapses: it is abandoned.
        assert!(
            matches!(p.lease_lost(), Next::Wait),
            "the batch is in flight"
        );
        assert!(!p.is_reading());
        // The producer stopped at once: nothing more was acknowledged.
        let mut outcome = acknowledged(batch, |i| i == 0);
        outcome.lease = LeaseState::Lost;
        outcome.report.n_transient = 0;
        let unclean = settle(p.acknowledged(outcome));
        assert_eq!(
            unclean.settled.deliverable.ids(),
            [1],
            "marked, fenced by epoch 7"
        );
        assert_eq!(unclean.epoch, 7);
        let next = p.settled(SettleReport {
            n_marked: 0,
            n_retried: 0,
            n_poisoned: 0,
            n_transient: 0,
        });
        assert!(matches!(next, Next::Leave(Leave::StandBy)), "{next:?}");
        assert!(p.is_at_rest());
        // Leading again (another epoch) starts from the oldest row.
        let work = start(p.lead(8));
        assert_eq!(work.read.expect("reads").past, Vec::<i64>::new());
    }

    #[test]
    fn a_producer_lost_to_fencing_ends_the_leadership_after_the_batch_settles() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        // Exactly once: the commit was refused as fenced, so nothing of the batch counts.
        let mut outcome = acknowledged(batch, |_| true);
        outcome.settled.n_held += outcome.settled.deliverable.len();
        outcome.settled.deliverable = Deliverable::default();
        outcome.transaction = Transaction::ProducerLost(TxnError::Fenced(
            "Local: This instance has been fenced".into(),
        ));
        // The round ends once the read-ahead returns; the read-ahead is dropped.
        assert!(matches!(p.acknowledged(outcome), Next::Wait));
        let unclean = settle(p.read(read_done(rows(4..=6))));
        assert!(unclean.settled.deliverable.is_empty(), "nothing is marked");
        let next = p.settled(SettleReport {
            n_marked: 0,
            n_retried: 0,
            n_poisoned: 0,
            n_transient: 0,
        });
        // Whether or not the lease lapsed: only a new leadership (which fences and reads the
        // checkpoint topic first) publishes again.
        assert!(matches!(next, Next::Leave(Leave::StandBy)), "{next:?}");
        assert!(p.is_at_rest());
    }

    #[test]
    fn a_stop_mid_batch_waits_for_its_acknowledgements_and_marks_them_before_leaving() {
        let (mut p, work) = publishing(rows(1..=2));
        let batch = work.publish.expect("batch");
        start(p.acknowledged(acknowledged(batch, |_| true)));
        // Batch 1 is being marked, batch 2 read past it, when the stop arrives.
        assert!(matches!(p.stop(), Next::Wait), "the mark runs on");
        assert!(!p.is_reading(), "the read is abandoned");
        assert!(matches!(p.marked(), Next::Leave(Leave::Stop)));

        // A stop while a batch is in flight: it is acknowledged (within the grace period),
        // then marked at once, then the relay leaves.
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        assert!(matches!(p.stop(), Next::Wait));
        let unclean = settle(p.acknowledged(acknowledged(batch, |_| true)));
        assert_eq!(unclean.settled.deliverable.ids(), [1, 2, 3]);
        let next = p.settled(published(&unclean, 3));
        assert!(matches!(next, Next::Leave(Leave::Stop)), "{next:?}");
        assert!(p.is_at_rest());
    }

    #[test]
    fn a_stop_with_a_clean_batch_parked_marks_it_before_leaving() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        assert!(matches!(p.read(read_done(rows(4..=6))), Next::Wait));
        // Clean: batch 1 parked, batch 2 published from the read-ahead while batch 1 is marked.
        let work = start(p.acknowledged(acknowledged(batch, |_| true)));
        let second = work.publish.expect("the read-ahead");
        assert!(matches!(p.marked(), Next::Wait));
        assert!(matches!(p.stop(), Next::Wait));
        // Batch 2 acknowledged in full after the stop: not clean (stopping), so marked at once.
        let unclean = settle(p.acknowledged(acknowledged(second, |_| true)));
        assert_eq!(unclean.settled.deliverable.ids(), [4, 5, 6]);
        assert!(matches!(
            p.settled(published(&unclean, 3)),
            Next::Leave(Leave::Stop)
        ));
    }

    #[test]
    fn a_failed_read_backs_off_and_reads_again() {
        let mut p = Pipeline::new(BATCH);
        start(p.lead(7));
        let failed = ReadDone {
            result: Err(OutboxError::Settings(sqlx::Error::PoolTimedOut)),
            elapsed: Duration::ZERO,
        };
        assert!(matches!(p.read(failed), Next::DatabaseFailed { .. }));
        assert_eq!(
            start(p.backed_off()).read.expect("reads").kind,
            ReadKind::Next
        );
    }

    #[test]
    fn without_a_producer_the_batch_is_dropped_and_the_acknowledged_one_stays_parked() {
        let (mut p, work) = publishing(rows(1..=3));
        let batch = work.publish.expect("batch");
        assert!(matches!(p.read(read_done(rows(4..=6))), Next::Wait));
        let work = start(p.acknowledged(acknowledged(batch, |_| true)));
        p.no_producer(work);
        // Read again past the parked batch, marking it meanwhile.
        let work = start(p.backed_off());
        assert_eq!(work.mark.expect("marked").deliverable.ids(), [1, 2, 3]);
        assert_eq!(work.read.expect("reads").past, [1, 2, 3]);
    }
}
