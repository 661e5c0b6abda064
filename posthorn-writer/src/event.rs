//! `Event` and its builder: one outbox row, checked against the table's rules when it is built.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::contract;
use crate::WriteError;

/// One event, ready to be written: every field already satisfies the outbox table's rules (only
/// [`EventBuilder::build`] makes one), so writing it sends nothing the database would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Payload,
    topic: Option<String>,
    headers: BTreeMap<String, String>,
    /// `headers` as the JSON object the `headers` column stores; `None` when there are none.
    headers_json: Option<String>,
}

/// The Kafka record's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text, stored in the `payload` (jsonb) column; published with
    /// `content-type: application/json`.
    Json(String),
    /// Bytes, stored in `payload_bytes` and published exactly as given, with the
    /// `content-type` header set to `content_type`.
    Bytes {
        bytes: Vec<u8>,
        content_type: String,
    },
    /// No value (a Kafka tombstone, which deletes the key in a compacted topic); no content-type
    /// header.
    Tombstone,
}

impl Event {
    /// Starts an event on aggregate `aggregate_type`/`aggregate_id` (the Kafka key). Say what the
    /// value is with [`json`](EventBuilder::json), [`bytes`](EventBuilder::bytes) or
    /// [`tombstone`](EventBuilder::tombstone), then [`build`](EventBuilder::build).
    ///
    /// ```
    /// use posthorn_writer::Event;
    ///
    /// #[derive(serde::Serialize)]
    /// struct OrderShipped<'a> {
    ///     order_id: &'a str,
    ///     carrier: &'a str,
    /// }
    ///
    /// let event = Event::builder("order", "order-42", "OrderShipped")
    ///     .json(&OrderShipped { order_id: "order-42", carrier: "DHL" })
    ///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    ///     .build()?;
    /// assert_eq!(event.aggregate_id(), "order-42");
    ///
    /// // The table's rules are checked here, before anything is sent to Postgres.
    /// let err = Event::builder("order", "", "OrderShipped").tombstone().build().unwrap_err();
    /// assert_eq!(err.to_string(), "invalid event: aggregate_id must not be empty");
    /// # Ok::<(), posthorn_writer::WriteError>(())
    /// ```
    pub fn builder(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: None,
            topic: None,
            headers: BTreeMap::new(),
            #[cfg(feature = "opentelemetry")]
            trace_context: None,
        }
    }

    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// The topic, when the event overrides the relay's topic template.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// The event's own headers (posthorn adds its reserved ones on the record).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    pub(crate) fn headers_json(&self) -> Option<&str> {
        self.headers_json.as_deref()
    }
}

/// Builds an [`Event`]; see [`Event::builder`].
#[derive(Debug)]
#[must_use = "an event is only written once built and enqueued"]
pub struct EventBuilder {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    /// A JSON serialization error is reported by `build`, so that the builder chains.
    payload: Option<Result<Payload, serde_json::Error>>,
    topic: Option<String>,
    headers: BTreeMap<String, String>,
    #[cfg(feature = "opentelemetry")]
    trace_context: Option<opentelemetry::Context>,
}

impl EventBuilder {
    /// The value is `payload` serialized as JSON (stored as `jsonb`: Postgres' rendering, with
    /// its key order, is what Kafka receives).
    pub fn json<T: Serialize + ?Sized>(mut self, payload: &T) -> EventBuilder {
        self.payload = Some(serde_json::to_string(payload).map(Payload::Json));
        self
    }

    /// The value is `bytes`, published exactly as given (zero bytes is an empty value, not a
    /// tombstone), with header `content-type: <content_type>`, e.g. `application/x-protobuf`.
    pub fn bytes(
        mut self,
        bytes: impl Into<Vec<u8>>,
        content_type: impl Into<String>,
    ) -> EventBuilder {
        self.payload = Some(Ok(Payload::Bytes {
            bytes: bytes.into(),
            content_type: content_type.into(),
        }));
        self
    }

    /// No value: a Kafka tombstone.
    pub fn tombstone(mut self) -> EventBuilder {
        self.payload = Some(Ok(Payload::Tombstone));
        self
    }

    /// Sends this event to `topic` instead of the relay's `POSTHORN_TOPIC_TEMPLATE`.
    pub fn topic(mut self, topic: impl Into<String>) -> EventBuilder {
        self.topic = Some(topic.into());
        self
    }

    /// Adds a Kafka header (a later value for the same name replaces an earlier one). Pass a W3C
    /// `traceparent` here to continue a trace in the consumer.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> EventBuilder {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Takes the trace context from `cx` instead of the current OpenTelemetry context, e.g.
    /// `tracing::Span::current().context()` with `tracing-opentelemetry`.
    #[cfg(feature = "opentelemetry")]
    pub fn trace_context(mut self, cx: &opentelemetry::Context) -> EventBuilder {
        self.trace_context = Some(cx.clone());
        self
    }

    /// Checks the event against the outbox table's rules. With the `opentelemetry` feature, also
    /// copies `traceparent` and `tracestate` of the current (or given) OpenTelemetry context into
    /// the headers, unless a `traceparent` header was set explicitly.
    pub fn build(self) -> Result<Event, WriteError> {
        #[cfg_attr(not(feature = "opentelemetry"), allow(unused_mut))]
        let mut headers = self.headers;
        #[cfg(feature = "opentelemetry")]
        crate::trace::inject(self.trace_context.as_ref(), &mut headers);

        let payload = match self.payload {
            None => {
                return Err(invalid(
                    "payload",
                    "no payload: call .json(..), .bytes(..) or .tombstone() before .build()"
                        .to_owned(),
                ))
            }
            Some(Err(err)) => return Err(WriteError::Json(err)),
            Some(Ok(payload)) => payload,
        };
        check_text("aggregate_type", &self.aggregate_type)?;
        check_text("aggregate_id", &self.aggregate_id)?;
        check_text("event_type", &self.event_type)?;
        if let Some(topic) = &self.topic {
            check_topic(topic)?;
        }
        check_headers(&headers)?;
        match &payload {
            Payload::Json(json) if has_nul_escape(json) => {
                return Err(invalid(
                    "payload",
                    "the JSON payload contains the character U+0000, which Postgres' jsonb \
                     cannot store"
                        .to_owned(),
                ))
            }
            Payload::Bytes { content_type, .. } => check_content_type(content_type)?,
            _ => {}
        }
        let headers_json = if headers.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&headers).map_err(WriteError::Json)?)
        };
        Ok(Event {
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            payload,
            topic: self.topic,
            headers,
            headers_json,
        })
    }
}

fn invalid(field: &'static str, message: String) -> WriteError {
    WriteError::InvalidEvent { field, message }
}

fn check_text(field: &'static str, value: &str) -> Result<(), WriteError> {
    if value.is_empty() {
        return Err(invalid(field, format!("{field} must not be empty")));
    }
    check_no_nul(field, value)
}

fn check_no_nul(field: &'static str, value: &str) -> Result<(), WriteError> {
    if value.contains('\0') {
        return Err(invalid(
            field,
            format!("{field} contains the character U+0000, which Postgres text cannot store"),
        ));
    }
    Ok(())
}

/// Kafka's rule for topic names, as the SQL functions and the relay check it.
fn check_topic(topic: &str) -> Result<(), WriteError> {
    if contract::topic_name_problem(topic).is_some() {
        return Err(invalid(
            "topic",
            format!(
                "topic '{topic}' is not a Kafka topic name (use 1 to 249 of a-z, A-Z, 0-9, '.', \
                 '_' and '-', not '.' or '..')"
            ),
        ));
    }
    Ok(())
}

fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), WriteError> {
    for (name, value) in headers {
        if contract::is_reserved_header(name) {
            return Err(invalid(
                "headers",
                format!("header name '{name}' is reserved: posthorn sets it on every record"),
            ));
        }
        check_no_nul("headers", name)?;
        check_no_nul("headers", value)?;
    }
    Ok(())
}

/// A media type: RFC 6838 type and subtype names, then optional `;` parameters in printable
/// ASCII; at most 255 bytes. The same rule as the table's `content_type` CHECK.
fn check_content_type(content_type: &str) -> Result<(), WriteError> {
    if is_media_type(content_type) {
        return Ok(());
    }
    Err(invalid(
        "content_type",
        format!(
            "content_type '{content_type}' is not a media type (for example \
             'application/x-protobuf' or 'text/plain; charset=utf-8')"
        ),
    ))
}

fn is_media_type(s: &str) -> bool {
    if s.len() > 255 {
        return false;
    }
    let (essence, parameters) = match s.split_once(';') {
        Some((essence, parameters)) => (essence.trim_end_matches(' '), Some(parameters)),
        None => (s, None),
    };
    let Some((type_name, subtype_name)) = essence.split_once('/') else {
        return false;
    };
    is_restricted_name(type_name)
        && is_restricted_name(subtype_name)
        && parameters.is_none_or(|p| p.bytes().all(|b| (b' '..=b'~').contains(&b)))
}

/// RFC 6838 `restricted-name`.
fn is_restricted_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
}

/// Whether JSON text holds a `\u0000` escape (serde_json writes U+0000 that way). Outside strings
/// JSON has no backslashes, and inside them every backslash starts an escape, so skipping each
/// escape's first two characters finds exactly the real ones.
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1..i + 6) == Some(b"u0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RESERVED_HEADERS;

    fn message(builder: EventBuilder) -> String {
        builder.build().expect_err("invalid").to_string()
    }

    #[test]
    fn a_json_event_keeps_its_fields_and_serializes_headers_once() {
        let event = Event::builder("order", "o-1", "OrderShipped")
            .json(&serde_json::json!({"carrier": "DHL"}))
            .topic("orders.v1")
            .header("traceparent", "00-abc-def-01")
            .build()
            .expect("valid");
        assert_eq!(
            event.payload(),
            &Payload::Json("{\"carrier\":\"DHL\"}".into())
        );
        assert_eq!(event.topic(), Some("orders.v1"));
        assert_eq!(
            event.headers_json(),
            Some("{\"traceparent\":\"00-abc-def-01\"}")
        );
        let plain = Event::builder("order", "o-1", "OrderShipped")
            .tombstone()
            .build()
            .expect("valid");
        assert_eq!(plain.headers_json(), None, "no headers: a NULL column");
    }

    #[test]
    fn required_text_must_be_present_and_storable() {
        let m = message(Event::builder("", "o-1", "E").tombstone());
        assert_eq!(m, "invalid event: aggregate_type must not be empty");
        let m = message(Event::builder("order", "o-1", "").tombstone());
        assert_eq!(m, "invalid event: event_type must not be empty");
        let m = message(Event::builder("order", "o\0", "E").tombstone());
        assert!(
            m.contains("aggregate_id contains the character U+0000"),
            "{m}"
        );
    }

    #[test]
    fn an_event_without_a_payload_is_refused_with_what_to_call() {
        let m = message(Event::builder("order", "o-1", "E"));
        assert!(
            m.contains("call .json(..), .bytes(..) or .tombstone()"),
            "{m}"
        );
    }

    #[test]
    fn reserved_and_unstorable_headers_are_refused() {
        for name in RESERVED_HEADERS {
            let m = message(
                Event::builder("order", "o-1", "E")
                    .tombstone()
                    .header(name, "x"),
            );
            assert_eq!(
                m,
                format!("invalid event: header name '{name}' is reserved: posthorn sets it on every record")
            );
        }
        let m = message(
            Event::builder("o", "o-1", "E")
                .tombstone()
                .header("a", "b\0"),
        );
        assert!(m.contains("U+0000"), "{m}");
    }

    #[test]
    fn topics_follow_kafka_rules() {
        for bad in ["", ".", "..", "has space", "ü", &"x".repeat(250)] {
            let m = message(Event::builder("o", "o-1", "E").tombstone().topic(bad));
            assert!(m.contains("is not a Kafka topic name"), "{bad}: {m}");
        }
        Event::builder("o", "o-1", "E")
            .tombstone()
            .topic("a.B_c-9")
            .build()
            .expect("valid topic");
    }

    #[test]
    fn content_types_must_be_media_types() {
        for good in [
            "application/x-protobuf",
            "text/plain; charset=utf-8",
            "text/plain;charset=utf-8",
            "application/vnd.acme+json",
            "application/octet-stream",
        ] {
            assert!(is_media_type(good), "{good}");
        }
        for bad in [
            "", "protobuf", "/x", "a/", "a/b/c", "a b/c", "a/b ", "a/b; é", "a/b\n",
        ] {
            assert!(!is_media_type(bad), "{bad:?}");
        }
        let m = message(Event::builder("o", "o-1", "E").bytes(vec![1], "protobuf"));
        assert!(
            m.starts_with("invalid event: content_type 'protobuf' is not a media type"),
            "{m}"
        );
    }

    #[test]
    fn json_that_jsonb_cannot_store_is_refused_but_an_escaped_backslash_is_not() {
        let m = message(Event::builder("o", "o-1", "E").json("nul \0 here"));
        assert!(m.contains("U+0000"), "{m}");
        // The text `\u0000` (a backslash, then "u0000") is fine: serde_json writes `\\u0000`.
        Event::builder("o", "o-1", "E")
            .json("\\u0000")
            .build()
            .expect("an escaped backslash is storable");
        assert!(has_nul_escape(r#""\\\u0000""#));
        assert!(!has_nul_escape(r#""\\\\u0000""#));
    }

    #[test]
    fn a_payload_that_cannot_be_json_is_reported_by_build() {
        let map: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let err = Event::builder("o", "o-1", "E")
            .json(&map)
            .build()
            .expect_err("bad");
        assert!(matches!(err, WriteError::Json(_)), "{err:?}");
    }
}
