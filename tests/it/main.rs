//! Integration tests against a real PostgreSQL and a real Kafka-protocol broker (see support).

mod cross_client;
mod delivery;
mod ops;
mod poison;
mod process;
mod support;
