//! Write [posthorn](https://crates.io/crates/posthorn) outbox events from a service on sqlx, in
//! the transaction that makes the change.
//!
//! An event is one row in the outbox table; the posthorn relay publishes each committed row to
//! Kafka (key: the aggregate id; value: the payload; headers: yours plus `event-id`,
//! `event-type`, `aggregate-type`, `outbox-id` and `content-type`). Because the row is written in
//! your transaction, the event exists exactly when your change commits: a rolled-back
//! transaction's events are never published.
//!
//! - [`Event::builder`] makes an event and checks it against the table's rules, so that writing
//!   it sends nothing Postgres would refuse (an error there would abort your transaction).
//! - [`enqueue`] writes one event, [`enqueue_batch`] many in one statement, on the connection you
//!   pass: `&mut *tx` for your `sqlx::Transaction`. They never begin, commit or roll back.
//! - [`Outbox`] names another table than `public.outbox` (the relay's `POSTHORN_SCHEMA` and
//!   `POSTHORN_TABLE`).
//! - [`tcp_nodelay`] works around sqlx 0.9.0's missing `TCP_NODELAY`, which costs a large
//!   [`enqueue_batch`] 40 ms over TCP.
//!
//! The table needs posthorn's migration 5 (`migrations/0005_writer.sql`, applied by
//! `posthorn migrate`): events use its `payload_bytes` and `content_type` columns.
//!
//! With the `opentelemetry` feature, [`EventBuilder::build`] copies the W3C `traceparent` and
//! `tracestate` of the current OpenTelemetry context into the headers, so a consumer continues
//! the trace. Without it, pass `traceparent` as a header yourself.
//!
//! # Example
//!
//! A small service that ships an order and writes its `OrderShipped` event in one transaction
//! (`examples/order_shipped.rs`; posthorn's integration tests run this same file against a real
//! database and broker):
//!
//! ```no_run
#![doc = include_str!("../examples/order_shipped.rs")]
//! ```

pub mod contract;
mod event;
mod outbox;
pub mod tcp_nodelay;
#[cfg(feature = "opentelemetry")]
mod trace;

use std::sync::LazyLock;

use sqlx::postgres::PgConnection;
use uuid::Uuid;

pub use contract::RESERVED_HEADERS;
pub use event::{Event, EventBuilder, Payload};
pub use outbox::Outbox;

/// Why an event was not written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The event breaks one of the outbox table's rules; nothing was sent to Postgres.
    #[error("invalid event: {message}")]
    InvalidEvent {
        /// The offending part: `aggregate_type`, `aggregate_id`, `event_type`, `payload`,
        /// `content_type`, `topic` or `headers`.
        field: &'static str,
        message: String,
    },
    /// The payload could not be serialized as JSON (e.g. a map with non-string keys).
    #[error("invalid event: the payload cannot be serialized as JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// An [`Outbox`] schema or table name that is not a plain lowercase identifier.
    #[error("invalid outbox name: {0}")]
    InvalidName(String),
    /// Postgres refused or failed the statement. Your transaction is then aborted, as after any
    /// failed statement: roll it back (or to a savepoint).
    #[error("writing events to {table}: {source}{}", not_migrated_hint(.source))]
    Database {
        table: String,
        #[source]
        source: sqlx::Error,
    },
}

/// A missing table or column means the outbox is not (fully) migrated: say what to run.
fn not_migrated_hint(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "42703")) => {
            " (the table needs posthorn's migration 5 or later: run `posthorn migrate`)"
        }
        _ => "",
    }
}

static DEFAULT_OUTBOX: LazyLock<Outbox> = LazyLock::new(Outbox::default);

/// Writes `event` to `public.outbox` on `conn` (your transaction: `&mut *tx`); returns its event
/// id. See [`Outbox::enqueue`].
pub async fn enqueue(conn: &mut PgConnection, event: &Event) -> Result<Uuid, WriteError> {
    DEFAULT_OUTBOX.enqueue(conn, event).await
}

/// Writes `events` to `public.outbox` in one statement on `conn`; returns their event ids in
/// order. See [`Outbox::enqueue_batch`].
pub async fn enqueue_batch(
    conn: &mut PgConnection,
    events: &[Event],
) -> Result<Vec<Uuid>, WriteError> {
    DEFAULT_OUTBOX.enqueue_batch(conn, events).await
}
