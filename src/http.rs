//! `/metrics`, `/healthz` and `/readyz` on `POSTHORN_HTTP_ADDR` (axum).
//!
//! Every answer comes from memory: the metrics registry, the relay's heartbeat, and the
//! readiness state a background task keeps current. So a scrape or a probe never waits for
//! Postgres or Kafka, and never adds load to them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::events;
use crate::heartbeat::{Heartbeat, Liveness};
use crate::metrics;
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;

/// What the handlers read.
#[derive(Clone)]
pub struct Probes {
    pub heartbeat: Heartbeat,
    pub readiness: Readiness,
    /// `POSTHORN_HEALTH_STALL_SECONDS`.
    pub stall: Duration,
}

/// Serves the endpoints on `listener` until `shutdown`; then stops accepting and finishes the
/// requests in progress.
pub async fn serve(
    listener: TcpListener,
    probes: Probes,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        events::HttpListening { addr }.emit();
    }
    axum::serve(listener, router(probes))
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await
}

fn router(probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
        .with_state(Arc::new(probes))
}

async fn get_metrics() -> Response {
    match metrics::encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            events::MetricsEncodeFailed { error: &err }.emit();
            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()
        }
    }
}

async fn get_healthz(State(probes): State<Arc<Probes>>) -> Response {
    let liveness = Liveness::of(&probes.heartbeat, probes.stall);
    (status(liveness.alive), Json(liveness)).into_response()
}

async fn get_readyz(State(probes): State<Arc<Probes>>) -> Response {
    let report = probes.readiness.report();
    (status(report.ready), Json(report)).into_response()
}

/// Kubernetes probes read the status: 200 passes, 503 fails.
fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
