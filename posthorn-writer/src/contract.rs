//! The outbox contract's rules in one place, for the relay, this crate and the tests: the
//! record's header names, Kafka's topic-name rule, the identifier rule for schema and table
//! names. The table's CHECK constraints (`migrations/`) state the same rules in SQL; posthorn's
//! integration tests check both on one table of cases (`tests/it/contract.rs`).

/// The header names posthorn writes.
pub mod header {
    /// The row's `event_id` (a UUID): what consumers deduplicate on.
    pub const EVENT_ID: &str = "event-id";
    pub const EVENT_TYPE: &str = "event-type";
    pub const AGGREGATE_TYPE: &str = "aggregate-type";
    /// The row's `id`.
    pub const OUTBOX_ID: &str = "outbox-id";
    /// On records with a value (tombstones have none).
    pub const CONTENT_TYPE: &str = "content-type";
    /// On dead-letter records: why the row is poison.
    pub const POSTHORN_ERROR: &str = "posthorn-error";
    /// On dead-letter records: where the row was going.
    pub const POSTHORN_ORIGINAL_TOPIC: &str = "posthorn-original-topic";
    /// On dead-letter records published without the row's payload.
    pub const POSTHORN_PAYLOAD_OMITTED: &str = "posthorn-payload-omitted";
}

/// Header names posthorn sets on every record; an event's own headers may not use them.
/// (`content-type` is set on records with a value: tombstones have none.)
pub const RESERVED_HEADERS: [&str; 5] = [
    header::EVENT_ID,
    header::EVENT_TYPE,
    header::AGGREGATE_TYPE,
    header::OUTBOX_ID,
    header::CONTENT_TYPE,
];

/// Whether `name` is one of [`RESERVED_HEADERS`].
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name)
}

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Why a name is not a Kafka topic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicNameProblem {
    Empty,
    TooLong {
        len: usize,
    },
    /// `.` or `..`.
    Dots(String),
    /// A character other than a-z, A-Z, 0-9, `.`, `_`, `-`.
    Characters(String),
}

impl std::fmt::Display for TopicNameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopicNameProblem::Empty => write!(f, "the topic name is empty"),
            TopicNameProblem::TooLong { len } => write!(
                f,
                "the topic name is {len} characters long; Kafka allows {MAX_TOPIC_LEN}"
            ),
            TopicNameProblem::Dots(topic) => write!(f, "'{topic}' is not a valid topic name"),
            TopicNameProblem::Characters(topic) => write!(
                f,
                "topic '{topic}' has characters Kafka does not allow (only a-z, A-Z, 0-9, '.', \
                 '_', '-')"
            ),
        }
    }
}

/// Kafka's rule for topic names (the table's `topic` CHECK states it too).
pub fn topic_name_problem(topic: &str) -> Option<TopicNameProblem> {
    if topic.is_empty() {
        return Some(TopicNameProblem::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Some(TopicNameProblem::TooLong { len: topic.len() });
    }
    if topic == "." || topic == ".." {
        return Some(TopicNameProblem::Dots(topic.to_owned()));
    }
    if !topic.chars().all(is_topic_char) {
        return Some(TopicNameProblem::Characters(topic.to_owned()));
    }
    None
}

/// A character Kafka allows in a topic name.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The identifier rule for `POSTHORN_SCHEMA` and `POSTHORN_TABLE`: a lowercase SQL identifier
/// (a-z, 0-9, `_`; not starting with a digit; at most 63 bytes), so it needs no quoting and
/// names the same table in every tool.
pub fn is_identifier(value: &str) -> bool {
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && value.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka() {
        assert_eq!(topic_name_problem("a.B_c-9"), None);
        assert_eq!(topic_name_problem(""), Some(TopicNameProblem::Empty));
        assert!(topic_name_problem("..").is_some());
        assert!(topic_name_problem("a b").is_some());
        assert!(topic_name_problem(&"x".repeat(249)).is_none());
        assert!(topic_name_problem(&"x".repeat(250)).is_some());
    }

    #[test]
    fn identifiers_are_plain_lowercase_sql_names() {
        assert!(is_identifier("order_events2"));
        assert!(is_identifier("_x"));
        assert!(!is_identifier("Sales"));
        assert!(!is_identifier("2x"));
        assert!(!is_identifier("out\"box"));
        assert!(!is_identifier(&"x".repeat(64)));
    }
}
