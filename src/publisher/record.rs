//! Row → record, as pure functions: the topic, the key, the headers (their names are the
//! contract's, in `posthorn_writer::contract`), and the dead-letter record. Nothing here talks
//! to Kafka.

use std::collections::BTreeMap;

use posthorn_writer::contract::{self, header};
use rdkafka::message::{Header, OwnedHeaders};

use crate::config::TopicTemplate;
use crate::row::{OutboxRow, Payload, Poison};

/// Whether a dead-letter record carries the row's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterPayload {
    Keep,
    /// Without it (header `posthorn-payload-omitted: true`): the payload made it too large.
    Omit,
}

/// A record's parts, borrowed from its row where they can be.
pub(crate) struct Record<'a> {
    pub(crate) topic: String,
    pub(crate) key: &'a [u8],
    pub(crate) value: Option<&'a [u8]>,
    pub(crate) headers: OwnedHeaders,
}

/// The topic a row goes to: its own, else the template rendered with it.
pub(crate) fn topic(row: &OutboxRow, template: &TopicTemplate) -> String {
    match &row.topic {
        Some(topic) => topic.clone(),
        None => template.render(&row.aggregate_type, &row.event_type),
    }
}

/// The record for a row, or why Kafka could never accept it.
pub(crate) fn record<'a>(
    row: &'a OutboxRow,
    template: &TopicTemplate,
) -> Result<Record<'a>, Poison> {
    let topic = topic(row, template);
    if let Some(problem) = contract::topic_name_problem(&topic) {
        return Err(Poison::Topic(problem.to_string()));
    }
    let own = match &row.headers {
        None => BTreeMap::new(),
        Some(json) => parse_headers(json).map_err(Poison::Headers)?,
    };
    let mut headers = identity_headers(
        OwnedHeaders::new_with_capacity(contract::RESERVED_HEADERS.len() + own.len()),
        row,
    );
    if let Some(payload) = &row.payload {
        headers = headers.insert(text(header::CONTENT_TYPE, payload.content_type()));
    }
    for (name, value) in &own {
        headers = headers.insert(text(name, value));
    }
    Ok(Record {
        topic,
        key: row.aggregate_id.as_bytes(),
        value: row.payload.as_ref().map(Payload::as_bytes),
        headers,
    })
}

/// The dead-letter record for a poison row: the row's key, value (unless `payload` is
/// [`DeadLetterPayload::Omit`]) and headers (when they parse: they may be what made it poison),
/// plus `posthorn-error` and `posthorn-original-topic`.
pub(crate) fn dead_letter_record<'a>(
    row: &'a OutboxRow,
    reason: &Poison,
    dead_letter_topic: &str,
    template: &TopicTemplate,
    payload: DeadLetterPayload,
) -> Record<'a> {
    let original_topic = topic(row, template);
    let mut headers = identity_headers(OwnedHeaders::new(), row)
        .insert(text(header::POSTHORN_ERROR, &reason.to_string()))
        .insert(text(header::POSTHORN_ORIGINAL_TOPIC, &original_topic));
    if let Some(Ok(own)) = row.headers.as_deref().map(parse_headers) {
        for (name, value) in &own {
            headers = headers.insert(text(name, value));
        }
    }
    let value = match payload {
        DeadLetterPayload::Keep => row.payload.as_ref(),
        DeadLetterPayload::Omit => None,
    };
    if row.payload.is_some() && value.is_none() {
        headers = headers.insert(text(header::POSTHORN_PAYLOAD_OMITTED, "true"));
    }
    if let Some(value) = value {
        headers = headers.insert(text(header::CONTENT_TYPE, value.content_type()));
    }
    Record {
        topic: dead_letter_topic.to_owned(),
        key: row.aggregate_id.as_bytes(),
        value: value.map(Payload::as_bytes),
        headers,
    }
}

/// `event-id`, `event-type`, `aggregate-type`, `outbox-id`: who the record is.
fn identity_headers(headers: OwnedHeaders, row: &OutboxRow) -> OwnedHeaders {
    let event_id = row.event_id.hyphenated().to_string();
    let outbox_id = row.id.to_string();
    headers
        .insert(text(header::EVENT_ID, &event_id))
        .insert(text(header::EVENT_TYPE, &row.event_type))
        .insert(text(header::AGGREGATE_TYPE, &row.aggregate_type))
        .insert(text(header::OUTBOX_ID, &outbox_id))
}

fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

/// A row's `headers`: a JSON object of string → string, not using a reserved name.
pub(crate) fn parse_headers(json: &str) -> Result<BTreeMap<String, String>, String> {
    let map: BTreeMap<String, String> = serde_json::from_str(json)
        .map_err(|err| format!("headers are not a JSON object of strings ({err})"))?;
    if let Some(name) = map.keys().find(|k| contract::is_reserved_header(k)) {
        return Err(format!(
            "headers use the reserved name '{name}', which posthorn sets itself"
        ));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 7,
            event_id: uuid::Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "Shipped".into(),
            payload: Some(Payload::Json("{}".into())),
            topic: None,
            headers: Some(r#"{"traceparent": "t"}"#.into()),
            created_at_us: 0,
        }
    }

    fn names(headers: &OwnedHeaders) -> Vec<String> {
        headers.iter().map(|h| h.key.to_owned()).collect()
    }

    #[test]
    fn headers_must_be_an_object_of_strings() {
        assert_eq!(
            parse_headers(r#"{"a": "1", "b": "x"}"#).expect("valid")["b"],
            "x"
        );
        assert!(parse_headers(r#"{"a": 1}"#).is_err());
        assert!(parse_headers(r#"["a"]"#).is_err());
        let err = parse_headers(r#"{"event-id": "x"}"#).expect_err("reserved");
        assert!(err.contains("reserved name 'event-id'"), "{err}");
    }

    #[test]
    fn a_record_carries_the_reserved_headers_then_the_rows_own() {
        let template = TopicTemplate::parse("{aggregate_type}", "V").expect("valid");
        let row = row();
        let record = record(&row, &template).expect("valid");
        assert_eq!(record.topic, "order");
        assert_eq!(record.key, b"o-1");
        let mut expected: Vec<String> = contract::RESERVED_HEADERS.map(str::to_owned).to_vec();
        expected.push("traceparent".into());
        assert_eq!(names(&record.headers), expected);
    }

    #[test]
    fn a_row_with_a_bad_topic_or_headers_is_poison() {
        let template = TopicTemplate::parse("{aggregate_type}", "V").expect("valid");
        let mut row = row();
        row.topic = Some("a b".into());
        assert!(matches!(record(&row, &template), Err(Poison::Topic(_))));
        row.topic = None;
        row.headers = Some(r#"{"outbox-id": "1"}"#.into());
        assert!(matches!(record(&row, &template), Err(Poison::Headers(_))));
    }

    #[test]
    fn a_dead_letter_record_without_its_payload_says_so() {
        let template = TopicTemplate::parse("{aggregate_type}", "V").expect("valid");
        let row = row();
        let reason = Poison::Kafka("too large".into());
        let record = dead_letter_record(&row, &reason, "dlq", &template, DeadLetterPayload::Omit);
        assert_eq!(record.topic, "dlq");
        assert_eq!(record.value, None);
        let names = names(&record.headers);
        assert!(names.contains(&header::POSTHORN_PAYLOAD_OMITTED.to_owned()));
        assert!(!names.contains(&header::CONTENT_TYPE.to_owned()));
        let kept = dead_letter_record(&row, &reason, "dlq", &template, DeadLetterPayload::Keep);
        assert_eq!(kept.value, Some(&b"{}"[..]));
    }
}
