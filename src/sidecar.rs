//! `posthorn run` as deployed: the relay loop plus what an operator needs beside it, all stopped
//! by one [`Shutdown`]:
//!
//! - the HTTP endpoints (`http`): `/metrics`, `/healthz`, `/readyz`;
//! - the readiness probes (`readiness::probe_readiness`) and the backlog gauges (`backlog`);
//! - retention (`retention`), unless `POSTHORN_RETENTION=off`.
//!
//! The background tasks share a small pool of their own, so the relay's connections are never
//! taken from it.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::events;
use crate::heartbeat::Heartbeat;
use crate::outbox::Outbox;
use crate::publisher::KafkaProbe;
use crate::readiness::{self, Readiness};
use crate::relay::{self, RelayError, RelayStats};
use crate::shutdown::Shutdown;
use crate::{backlog, http, retention};

/// How long the background tasks get to finish after the relay stopped.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the relay and its operator surface, serving HTTP on `listener`, until `shutdown`.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<RelayStats, RelayError> {
    let background =
        Outbox::connect_lazy_background(&config.database, &config.outbox, config.on_poison)?
            .tracked_by(config.tracking);
    let kafka_probe = KafkaProbe::new(&config.kafka)?;
    let heartbeat = Heartbeat::new();
    let readiness = Readiness::default();

    let mut tasks = JoinSet::new();
    let probes = http::Probes {
        heartbeat: heartbeat.clone(),
        readiness: readiness.clone(),
        stall: config.health_stall,
    };
    let http_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(error) = http::serve(listener, probes, http_shutdown).await {
            events::HttpFailed { error: &error }.emit();
        }
    });
    tasks.spawn(readiness::probe_readiness(
        background.clone(),
        kafka_probe,
        readiness,
        shutdown.clone(),
    ));
    tasks.spawn(backlog::run(background.clone(), shutdown.clone()));
    if let Some(retention) = config.retention {
        tasks.spawn(retention::run(
            background.clone(),
            retention,
            shutdown.clone(),
        ));
    }

    let result = relay::run_with_heartbeat(config, shutdown.clone(), &heartbeat).await;

    // After a stop signal every task is finishing; after a start-up error none is told to.
    if result.is_ok() {
        let _ = tokio::time::timeout(BACKGROUND_STOP_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    tasks.shutdown().await;
    background.pool().close().await;
    result
}
