//! posthorn: a transactional-outbox relay.
//!
//! A service writes an outbox row in the same Postgres transaction as its business change;
//! posthorn publishes each committed row to Kafka with an idempotent producer and marks it
//! delivered. Modules in reading order:
//!
//! - [`config`]: every `POSTHORN_*` variable, validated, secrets redacted.
//! - [`outbox`]: the only SQL on the outbox table (read, mark, record failures, LISTEN).
//! - [`publisher`]: the only rdkafka code (row → record, pipelined send, delivery reports).
//! - [`acks`]: which acknowledged rows may be marked (per-aggregate order).
//! - [`lease`]: one publisher per outbox (a lease row with an epoch).
//! - [`checkpoint_record`]: exactly-once's checkpoint record, committed in each Kafka
//!   transaction.
//! - [`relay`]: the loop that ties them together.
//! - [`migrate`]: the outbox schema, applied by `posthorn migrate`.
//! - [`sidecar`]: `posthorn run` as deployed: the relay plus [`http`] (`/metrics`, `/healthz`,
//!   `/readyz`), [`heartbeat`], [`readiness`], [`backlog`] and [`retention`], stopped together.
//! - [`cli`], [`events`] (with [`outage`]: dependency failures logged as state changes),
//!   [`metrics`], [`retry`], [`shutdown`]: the edges; [`tcp_nodelay`]: a
//!   workaround for sqlx 0.9.0.
//!
//! See ARCHITECTURE.md for the invariants.

pub mod acks;
pub(crate) mod backlog;
pub mod checkpoint_record;
pub mod cli;
pub mod config;
pub(crate) mod events;
pub(crate) mod heartbeat;
pub(crate) mod http;
pub mod lease;
pub(crate) mod metrics;
pub mod migrate;
pub mod outage;
pub mod outbox;
pub mod publisher;
pub(crate) mod readiness;
pub mod relay;
pub mod retention;
pub(crate) mod retry;
pub(crate) mod row;
pub mod shutdown;
pub(crate) mod sidecar;

/// `TCP_NODELAY` on Postgres connections (sqlx 0.9.0 sets none), shared with services through
/// `posthorn-writer`.
pub use posthorn_writer::tcp_nodelay;

/// The outbox contract's rules (header names, topic names, identifiers), one home shared with
/// `posthorn-writer`.
pub use posthorn_writer::contract;
