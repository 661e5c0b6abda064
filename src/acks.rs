//! Per-key in-order acknowledgement: which rows of a batch may be marked delivered.
//!
//! A row may be marked only once Kafka acknowledged it AND every earlier undelivered row of the
//! same aggregate was acknowledged. A batch is the oldest undelivered rows in id order, apart from
//! the previous batch's when it was read past them (the relay does that only once every row of
//! the previous batch is acknowledged), so every earlier undelivered row of an aggregate that is
//! visible is in the batch, before it, or already acknowledged. (A row that is not yet visible
//! belongs to a transaction that commits later, which comes later in commit order too.) So the
//! rule is decided within the batch: walk it in id order and, per aggregate, stop at the first
//! row that is not acknowledged.

use std::collections::HashSet;

use crate::config::PoisonPolicy;
use crate::row::{Failure, OutboxRow, Poison};

/// What happened to one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Kafka acknowledged the record.
    Acked,
    /// Publishing failed for a reason that may pass; the error is recorded on the row and it is
    /// read again later.
    Failed(Failure),
    /// Kafka will never accept this row: it is marked failed, and `POSTHORN_ON_POISON` decides
    /// whether later rows of its aggregate wait.
    Poison(Poison),
    /// Not sent, because an earlier row of the same aggregate failed in this batch: sending it
    /// would put it ahead of that row.
    Withheld,
    /// Sent, but no acknowledgement arrived before the relay stopped waiting (shutdown).
    Unknown,
}

/// Ids whose own ack and every earlier same-aggregate ack have arrived. Only
/// [`Tracker::finish`] builds one, so nothing else can mark rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deliverable(Vec<i64>);

impl Deliverable {
    /// Rows recorded as delivered on their own (checkpoint mode's rare out-of-order marks).
    pub(crate) fn from_ids(mut ids: Vec<i64>) -> Deliverable {
        ids.sort_unstable();
        Deliverable(ids)
    }

    pub fn ids(&self) -> &[i64] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The outcome of a batch, decided.
#[derive(Debug, Default)]
pub struct Settled {
    pub deliverable: Deliverable,
    /// Rows whose attempt failed, with the error: recorded on the row, retried later.
    pub(crate) failed: Vec<(i64, Failure)>,
    /// Rows Kafka will never accept, with the reason: marked failed.
    pub(crate) poisoned: Vec<(i64, Poison)>,
    /// Rows held back behind an earlier failure or left unacknowledged.
    pub(crate) n_held: usize,
}

/// Collects outcomes for one batch, rows in id order.
pub struct Tracker<'a> {
    rows: &'a [OutboxRow],
    policy: PoisonPolicy,
    outcomes: Vec<Option<Outcome>>,
    /// Aggregates with a failed row in this batch: their later rows are withheld.
    blocked: HashSet<(&'a str, &'a str)>,
}

impl<'a> Tracker<'a> {
    /// `rows` must be in id order, as `Outbox::fetch_batch` returns them.
    pub fn new(rows: &'a [OutboxRow], policy: PoisonPolicy) -> Tracker<'a> {
        debug_assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        Tracker {
            rows,
            policy,
            outcomes: vec![None; rows.len()],
            blocked: HashSet::new(),
        }
    }

    /// Whether row `i` may be sent: no earlier row of its aggregate failed in this batch.
    pub(crate) fn may_send(&self, i: usize) -> bool {
        !self.blocked.contains(&self.rows[i].aggregate())
    }

    /// Whether row `i` has an outcome yet.
    pub(crate) fn is_settled(&self, i: usize) -> bool {
        self.outcomes[i].is_some()
    }

    pub(crate) fn withhold(&mut self, i: usize) {
        self.outcomes[i] = Some(Outcome::Withheld);
    }

    pub fn ack(&mut self, i: usize) {
        self.outcomes[i] = Some(Outcome::Acked);
    }

    /// Row `i` failed: record why, and hold back the later rows of its aggregate.
    pub(crate) fn fail(&mut self, i: usize, error: Failure) {
        self.blocked.insert(self.rows[i].aggregate());
        self.outcomes[i] = Some(Outcome::Failed(error));
    }

    /// Row `i` can never be published. Under `halt-key` its aggregate's later rows are held
    /// back; under `dead-letter` they go on.
    pub(crate) fn poison(&mut self, i: usize, reason: Poison) {
        if self.policy == PoisonPolicy::HaltKey {
            self.blocked.insert(self.rows[i].aggregate());
        }
        self.outcomes[i] = Some(Outcome::Poison(reason));
    }

    /// Decides the batch. Rows with no outcome yet count as [`Outcome::Unknown`].
    pub fn finish(self) -> Settled {
        let mut stopped: HashSet<(&str, &str)> = HashSet::new();
        let mut settled = Settled::default();
        for (row, outcome) in self.rows.iter().zip(self.outcomes) {
            let key = row.aggregate();
            let outcome = outcome.unwrap_or(Outcome::Unknown);
            match outcome {
                Outcome::Acked if !stopped.contains(&key) => {
                    settled.deliverable.0.push(row.id);
                }
                Outcome::Poison(reason) => {
                    // A poison row is settled either way; only halt-key stops its aggregate.
                    if self.policy == PoisonPolicy::HaltKey {
                        stopped.insert(key);
                    }
                    settled.poisoned.push((row.id, reason));
                }
                Outcome::Failed(error) => {
                    stopped.insert(key);
                    settled.failed.push((row.id, error));
                }
                Outcome::Acked | Outcome::Withheld | Outcome::Unknown => {
                    stopped.insert(key);
                    settled.n_held += 1;
                }
            }
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(keys: &[&str]) -> Vec<OutboxRow> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| OutboxRow {
                id: i as i64 + 1,
                event_id: uuid::Uuid::nil(),
                aggregate_type: "order".into(),
                aggregate_id: (*k).into(),
                event_type: "e".into(),
                payload: None,
                topic: None,
                headers: None,
                created_at_us: 0,
            })
            .collect()
    }

    #[test]
    fn all_acked_rows_are_deliverable() {
        let rows = rows(&["a", "b", "a"]);
        let mut t = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        (0..3).for_each(|i| t.ack(i));
        let s = t.finish();
        assert_eq!(s.deliverable.ids(), &[1, 2, 3]);
        assert!(s.failed.is_empty());
    }

    #[test]
    fn a_row_after_a_failed_row_of_its_key_is_not_deliverable_but_other_keys_are() {
        let rows = rows(&["a", "b", "a", "b"]);
        let mut t = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        t.fail(0, Failure::Kafka("boom".into()));
        assert!(!t.may_send(2));
        assert!(t.may_send(1));
        t.ack(1);
        t.ack(2); // acked anyway (sent before the failure was known)
        t.ack(3);
        let s = t.finish();
        assert_eq!(s.deliverable.ids(), &[2, 4]);
        assert_eq!(s.failed, vec![(1, Failure::Kafka("boom".into()))]);
        assert_eq!(s.n_held, 1);
    }

    #[test]
    fn a_row_after_an_unacknowledged_row_of_its_key_is_not_deliverable() {
        let rows = rows(&["a", "a", "b"]);
        let mut t = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        t.ack(1);
        t.ack(2);
        let s = t.finish();
        assert_eq!(s.deliverable.ids(), &[3]);
        assert_eq!(s.n_held, 2);
    }

    #[test]
    fn under_dead_letter_a_poison_row_lets_its_aggregate_go_on() {
        let rows = rows(&["a", "a", "b"]);
        let mut t = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        t.poison(0, Poison::Kafka("too large".into()));
        assert!(t.may_send(1));
        t.ack(1);
        t.ack(2);
        let s = t.finish();
        assert_eq!(s.deliverable.ids(), &[2, 3]);
        assert_eq!(s.poisoned, vec![(1, Poison::Kafka("too large".into()))]);
    }

    #[test]
    fn under_halt_key_a_poison_row_holds_its_aggregate_only() {
        let rows = rows(&["a", "a", "b"]);
        let mut t = Tracker::new(&rows, PoisonPolicy::HaltKey);
        t.poison(0, Poison::Kafka("too large".into()));
        assert!(!t.may_send(1));
        t.withhold(1);
        t.ack(2);
        let s = t.finish();
        assert_eq!(s.deliverable.ids(), &[3]);
        assert_eq!(s.poisoned.len(), 1);
        assert_eq!(s.n_held, 1);
    }

    #[test]
    fn the_same_id_under_another_aggregate_type_is_another_key() {
        let mut rows = rows(&["42", "42"]);
        rows[1].aggregate_type = "customer".into();
        let mut t = Tracker::new(&rows, PoisonPolicy::DeadLetter);
        t.fail(0, Failure::Kafka("x".into()));
        assert!(t.may_send(1));
        t.ack(1);
        assert_eq!(t.finish().deliverable.ids(), &[2]);
    }
}
