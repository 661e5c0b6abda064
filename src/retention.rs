//! Retention: delivered rows are deleted once they are older than `POSTHORN_RETENTION`, on a task
//! of its own with its own connection, so the relay never waits for it.
//!
//! A sweep deletes in chunks of [`CHUNK_ROWS`], each its own short transaction, with a pause
//! between chunks: no statement holds locks for long, and the relay's reads and marks go on
//! between them. Failed rows are never deleted: they wait for an operator.

use std::time::Duration;

use tokio::time::Instant;

use crate::events;
use crate::outbox::{Outbox, OutboxError};
use crate::shutdown::Shutdown;

/// Rows deleted per statement.
pub const CHUNK_ROWS: i64 = 5000;
/// Pause between two chunks of one sweep.
pub const CHUNK_PAUSE: Duration = Duration::from_millis(100);
/// Time between the starts of two sweeps (the first one runs at start).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("{source} (after deleting {n_deleted} rows)")]
pub struct SweepError {
    pub n_deleted: u64,
    #[source]
    pub source: OutboxError,
}

/// Sweeps every [`SWEEP_INTERVAL`] until `shutdown`.
pub async fn run(outbox: Outbox, retention: Duration, mut shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        match sweep(&outbox, retention, CHUNK_ROWS, CHUNK_PAUSE, &mut shutdown).await {
            Ok(n_deleted) => events::RetentionSwept {
                n_deleted,
                retention,
                elapsed: started.elapsed(),
            }
            .emit(),
            Err(err) => events::RetentionFailed {
                error: &err.source,
                n_deleted: err.n_deleted,
                retry_in: SWEEP_INTERVAL,
            }
            .emit(),
        }
    }
}

/// Deletes every row delivered more than `retention` ago, `chunk_rows` per statement with
/// `pause` between statements, until none is left (or `shutdown`). Returns how many it deleted.
pub async fn sweep(
    outbox: &Outbox,
    retention: Duration,
    chunk_rows: i64,
    pause: Duration,
    shutdown: &mut Shutdown,
) -> Result<u64, SweepError> {
    let mut n_deleted = 0;
    loop {
        let n = outbox
            .delete_delivered(retention, chunk_rows)
            .await
            .map_err(|source| SweepError { n_deleted, source })?;
        n_deleted += n;
        if n < chunk_rows as u64 || shutdown.is_triggered() {
            return Ok(n_deleted);
        }
        tokio::select! {
            _ = shutdown.triggered() => return Ok(n_deleted),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
