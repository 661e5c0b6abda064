//! Integration tests against a real PostgreSQL and real Apache Kafka (see support).

mod checkpoint;
mod cluster;
mod connections;
mod contract;
mod cross_client;
mod delivery;
mod exactly_once;
mod faults;
mod leader;
mod manifests;
mod ops;
mod outage;
mod poison;
mod process;
mod restarts;
mod role;
mod support;
mod switch;
mod transactions;
mod txn_faults;
mod writer;
