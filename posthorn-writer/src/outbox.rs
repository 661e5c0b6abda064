//! `Outbox`: which table to write, and the one statement that writes a batch of events.

use std::sync::Arc;

use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::event::{Event, Payload};
use crate::WriteError;

/// The outbox table events are written to: `POSTHORN_SCHEMA`.`POSTHORN_TABLE` of the relay.
/// `Outbox::default()` is `public.outbox`.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: String,
    table: String,
    insert_sql: Arc<str>,
}

impl Outbox {
    /// The table `schema`.`table`; both must be lowercase SQL identifiers (a-z, 0-9, `_`, not
    /// starting with a digit, at most 63 bytes), as the relay requires.
    pub fn new(schema: &str, table: &str) -> Result<Outbox, WriteError> {
        check_identifier("schema", schema)?;
        check_identifier("table", table)?;
        let insert_sql = insert_sql(&format!("\"{schema}\".\"{table}\""));
        Ok(Outbox {
            schema: schema.to_owned(),
            table: table.to_owned(),
            insert_sql: insert_sql.into(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Writes `event` on `conn` and returns its event id (the record's `event-id` header).
    /// Pass your transaction (`&mut *tx`): the event commits or rolls back with it. This never
    /// begins, commits or rolls back anything itself.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        event: &Event,
    ) -> Result<Uuid, WriteError> {
        let ids = self
            .enqueue_batch(conn, std::slice::from_ref(event))
            .await?;
        Ok(ids[0])
    }

    /// Writes `events` in one statement and returns their event ids, in the order of `events`.
    /// Events of one aggregate are published in this order too. Nothing is sent for an empty
    /// slice.
    pub async fn enqueue_batch(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
    ) -> Result<Vec<Uuid>, WriteError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = events.len();
        let mut aggregate_types = Vec::with_capacity(n);
        let mut aggregate_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut payloads: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut payload_bytes: Vec<Option<&[u8]>> = Vec::with_capacity(n);
        let mut content_types: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        for event in events {
            aggregate_types.push(event.aggregate_type());
            aggregate_ids.push(event.aggregate_id());
            event_types.push(event.event_type());
            let (json, bytes, content_type) = match event.payload() {
                Payload::Json(json) => (Some(json.as_str()), None, None),
                Payload::Bytes {
                    bytes,
                    content_type,
                } => (None, Some(bytes.as_slice()), Some(content_type.as_str())),
                Payload::Tombstone => (None, None, None),
            };
            payloads.push(json);
            payload_bytes.push(bytes);
            content_types.push(content_type);
            topics.push(event.topic());
            headers.push(event.headers_json());
        }
        sqlx::query_scalar(AssertSqlSafe(self.insert_sql.clone()))
            .bind(aggregate_types)
            .bind(aggregate_ids)
            .bind(event_types)
            .bind(payloads)
            .bind(payload_bytes)
            .bind(content_types)
            .bind(topics)
            .bind(headers)
            .fetch_all(conn)
            .await
            .map_err(|source| WriteError::Database {
                table: format!("{}.{}", self.schema, self.table),
                source,
            })
    }
}

impl Default for Outbox {
    /// `public.outbox`, the relay's default.
    fn default() -> Outbox {
        Outbox::new("public", "outbox").expect("the default names are valid identifiers")
    }
}

/// One statement for any number of events: the arrays are unnested side by side, in order.
///
/// Event ids are drawn in the materialized CTE and returned from it, ordered by position, so the
/// returned ids are in input order by construction (RETURNING's row order is not specified). The
/// INSERT reads the CTE ordered by position too, so the identity `id`s (the relay's publishing
/// order within an aggregate) follow the input order.
fn insert_sql(table: &str) -> String {
    format!(
        "WITH event AS MATERIALIZED ( \
             SELECT gen_random_uuid() AS event_id, e.* \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], \
                         $6::text[], $7::text[], $8::text[]) \
                  WITH ORDINALITY AS e(aggregate_type, aggregate_id, event_type, payload, \
                                       payload_bytes, content_type, topic, headers, position) \
         ), inserted AS ( \
             INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload, \
                                  payload_bytes, content_type, topic, headers) \
             SELECT event_id, aggregate_type, aggregate_id, event_type, payload::jsonb, \
                    payload_bytes, content_type, topic, headers::jsonb \
             FROM event ORDER BY position \
         ) \
         SELECT event_id FROM event ORDER BY position"
    )
}

fn check_identifier(what: &'static str, name: &str) -> Result<(), WriteError> {
    if crate::contract::is_identifier(name) {
        return Ok(());
    }
    Err(WriteError::InvalidName(format!(
        "{what} '{name}' is not a lowercase SQL identifier (a-z, 0-9, _; at most 63 bytes; not \
         starting with a digit)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_lowercase_identifiers() {
        assert!(Outbox::new("sales", "order_events").is_ok());
        for (schema, table) in [
            ("Sales", "outbox"),
            ("public", "out\"box"),
            ("public", "1x"),
            ("", "t"),
        ] {
            let err = Outbox::new(schema, table).expect_err("invalid");
            assert!(
                err.to_string().starts_with("invalid outbox name: "),
                "{err}"
            );
        }
        assert_eq!(Outbox::default().table(), "outbox");
        assert_eq!(Outbox::default().schema(), "public");
    }

    #[test]
    fn the_statement_names_the_table_once_quoted() {
        let outbox = Outbox::new("sales", "order_events").expect("valid");
        assert!(outbox
            .insert_sql
            .contains("INSERT INTO \"sales\".\"order_events\" ("));
    }
}
