//! Integration tests against a real PostgreSQL and a real Kafka-protocol broker (see support).

mod cross_client;
mod delivery;
mod faults;
mod manifests;
mod poison;
mod process;
mod restarts;
mod role;
mod support;
