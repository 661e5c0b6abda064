//! The checkpoint record of exactly-once delivery: one per Kafka transaction, in the compacted
//! checkpoint topic, keyed by the outbox's identity, committed together with the batch's
//! records. It names the rows that transaction makes published (and the poison rows it sets
//! aside) that Postgres may not have recorded yet, so that a new leader, having fenced the last
//! one, can record them before it reads: then none of them is published twice.
//!
//! Pure data (serde), like `row`: the publisher writes and reads it, the outbox applies it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The value of a checkpoint record, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The format's version: 1.
    pub version: u32,
    /// The outbox's identity (`<table>_identity`), also the record's key.
    pub outbox: Uuid,
    /// `schema.table`, for people reading the topic.
    pub table: String,
    /// The lease epoch of the leader that committed it.
    pub epoch: i64,
    /// The leader's count of its transactions (from 1 in each epoch).
    pub transaction: u64,
    /// Outbox ids published by this transaction or by an earlier one whose Postgres record
    /// had not returned when this one began: inclusive ranges, ascending.
    pub published: Vec<(i64, i64)>,
    /// Poison rows this transaction dead-lettered: marked failed with `reason`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set_aside: Vec<SetAside>,
}

/// A poison row a transaction set aside, and why (as stored in `last_error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAside {
    pub id: i64,
    pub reason: String,
}

pub const VERSION: u32 = 1;

impl CheckpointRecord {
    /// Every id of `published`, ascending.
    pub fn published_ids(&self) -> Vec<i64> {
        self.published
            .iter()
            .flat_map(|&(first, last)| first..=last)
            .collect()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of numbers and strings: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<CheckpointRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// `ids` as inclusive ranges of consecutive ids, ascending (duplicates merged).
pub fn ranges(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => out.push((id, id)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_consecutive_ids_and_give_them_back() {
        let ids = [7, 1, 2, 3, 5, 3, 6, 10];
        let r = ranges(&ids);
        assert_eq!(r, vec![(1, 3), (5, 7), (10, 10)]);
        let record = CheckpointRecord {
            version: VERSION,
            outbox: Uuid::nil(),
            table: "public.outbox".into(),
            epoch: 3,
            transaction: 9,
            published: r,
            set_aside: Vec::new(),
        };
        assert_eq!(record.published_ids(), vec![1, 2, 3, 5, 6, 7, 10]);
        assert!(ranges(&[]).is_empty());
    }

    #[test]
    fn the_json_round_trips_and_omits_an_empty_set_aside() {
        let record = CheckpointRecord {
            version: VERSION,
            outbox: Uuid::nil(),
            table: "public.outbox".into(),
            epoch: 3,
            transaction: 9,
            published: vec![(1, 3)],
            set_aside: Vec::new(),
        };
        let json = record.to_json();
        let text = String::from_utf8(json.clone()).expect("utf-8");
        assert!(!text.contains("set_aside"), "{text}");
        assert_eq!(CheckpointRecord::from_json(&json).expect("parses"), record);
        let with = CheckpointRecord {
            set_aside: vec![SetAside {
                id: 4,
                reason: "Kafka: too large".into(),
            }],
            ..record
        };
        assert_eq!(
            CheckpointRecord::from_json(&with.to_json()).expect("parses"),
            with
        );
    }
}
