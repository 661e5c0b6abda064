//! The backlog gauges and the periodic summary line, on a task of their own: one cheap query
//! every few seconds (it reads the partial indexes of pending and failed rows), never on the
//! relay's path and never per scrape.

use std::time::Duration;

use tokio::time::Instant;

use crate::events;
use crate::metrics;
use crate::outbox::{Backlog, Outbox};
use crate::shutdown::Shutdown;

/// How often the backlog gauges are refreshed.
pub const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);
/// How often the summary is logged at info.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);
/// A backlog query that takes longer is abandoned (and tried again at the next interval).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Refreshes the backlog gauges every [`BACKLOG_INTERVAL`] and logs a summary every
/// [`SUMMARY_INTERVAL`], until `shutdown`.
pub async fn run(outbox: Outbox, mut shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(BACKLOG_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut period_start = Instant::now();
    let mut delivered_at_start = metrics::rows_delivered_total();
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = ticks.tick() => {}
        }
        let latest: Option<Backlog> =
            match tokio::time::timeout(QUERY_TIMEOUT, outbox.backlog()).await {
                Ok(Ok(backlog)) => {
                    events::BacklogMeasured {
                        n_pending: backlog.n_pending,
                        oldest_pending_age: backlog.oldest_pending_age,
                        n_failed: backlog.n_failed,
                    }
                    .emit();
                    failing = false;
                    Some(backlog)
                }
                Ok(Err(err)) => {
                    events::BacklogFailed {
                        error: &err,
                        again: failing,
                    }
                    .emit();
                    failing = true;
                    None
                }
                Err(_) => {
                    let error = format!("no answer within {}s", QUERY_TIMEOUT.as_secs());
                    events::BacklogFailed {
                        error: &error,
                        again: failing,
                    }
                    .emit();
                    failing = true;
                    None
                }
            };
        let period = period_start.elapsed();
        if period >= SUMMARY_INTERVAL {
            let delivered = metrics::rows_delivered_total();
            events::Summary {
                period,
                n_delivered: delivered.saturating_sub(delivered_at_start),
                n_pending: latest.map(|b| b.n_pending),
                oldest_pending_age: latest.map(|b| b.oldest_pending_age),
                n_failed: latest.map(|b| b.n_failed),
            }
            .emit();
            period_start = Instant::now();
            delivered_at_start = delivered;
        }
    }
}
