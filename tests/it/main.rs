//! Integration tests against a real PostgreSQL and a real Kafka-protocol broker (see support).

mod delivery;
mod process;
mod support;
