//! One publisher per outbox: a lease row in Postgres (`<table>_lease`), held by one instance at a
//! time, with an epoch that grows with every change of owner and an expiry on the database's
//! clock.
//!
//! Why a lease row and not a session advisory lock: an advisory lock belongs to a session, and
//! behind PgBouncer in transaction pooling mode consecutive statements run on different server
//! sessions, so the lock is taken on one and "held" by nobody we can see; a lease row is plain
//! data and works through any pooler. It also gives an epoch to fence marks with.
//!
//! Timing, from `POSTHORN_LEASE_TTL` (the longest a standby waits for a dead leader):
//! - standbys try to acquire every `standby_poll` (TTL/10, at most 500 ms);
//! - the lease is written to last `lease` = TTL − `standby_poll`, so a standby that polls takes
//!   over within TTL of the leader's last renewal;
//! - the leader renews every `lease`/4, and stops publishing by its own monotonic clock at
//!   (moment it sent the last successful renewal) + `lease` − `margin` (`lease`/5): before the
//!   lease can expire on the database's clock, with room for records already on the wire.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::OutboxTable;
use crate::events;
use crate::retry::Backoff;
use crate::shutdown::{Shutdown, ShutdownTrigger};

/// The lease's timing, derived from the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub lease: Duration,
    pub renew_every: Duration,
    pub standby_poll: Duration,
    pub margin: Duration,
}

impl LeaseTiming {
    pub fn from_ttl(ttl: Duration) -> LeaseTiming {
        let standby_poll = (ttl / 10).min(Duration::from_millis(500));
        let lease = ttl - standby_poll;
        LeaseTiming {
            lease,
            renew_every: lease / 4,
            standby_poll,
            margin: lease / 5,
        }
    }
}

/// This instance leads with `epoch` until `valid_until` (its own monotonic clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub epoch: i64,
    pub valid_until: Instant,
}

impl Leadership {
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// The lease row of one outbox table.
pub struct Lease {
    pool: PgPool,
    owner: String,
    timing: LeaseTiming,
    acquire_sql: String,
    renew_sql: String,
    release_sql: String,
    holder_sql: String,
}

/// Who holds the lease, as the database sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub owner: String,
    pub epoch: i64,
    /// Whether the lease has not expired.
    pub live: bool,
}

impl Lease {
    pub fn new(pool: PgPool, outbox: &OutboxTable, owner: &str, ttl: Duration) -> Lease {
        let t = lease_table(outbox);
        Lease {
            pool,
            owner: owner.to_owned(),
            timing: LeaseTiming::from_ttl(ttl),
            // Takes a free (expired or released) lease with the next epoch. A lease held under
            // our own name is taken over at once too: it is this instance's previous
            // incarnation (restarted with the same POSTHORN_INSTANCE_ID), and the new epoch
            // fences its marks.
            acquire_sql: format!(
                "INSERT INTO {t} AS l (owner, epoch, acquired_at, expires_at) \
                 VALUES ($1, 1, now(), now() + make_interval(secs => $2)) \
                 ON CONFLICT (singleton) DO UPDATE \
                   SET owner = EXCLUDED.owner, epoch = l.epoch + 1, \
                       acquired_at = now(), expires_at = EXCLUDED.expires_at \
                   WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner \
                 RETURNING epoch"
            ),
            renew_sql: format!(
                "UPDATE {t} SET expires_at = now() + make_interval(secs => $3) \
                 WHERE owner = $1 AND epoch = $2 AND expires_at > now() RETURNING epoch"
            ),
            release_sql: format!(
                "UPDATE {t} SET expires_at = now() WHERE owner = $1 AND epoch = $2"
            ),
            holder_sql: format!("SELECT owner, epoch, expires_at > now() FROM {t}"),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    fn lease_secs(&self) -> f64 {
        self.timing.lease.as_secs_f64()
    }

    /// The leadership a statement sent at `sent` grants: valid until `lease` − `margin` after
    /// it was sent (the database's expiry is `lease` after it ran, which is later).
    fn granted(&self, epoch: i64, sent: Instant) -> Leadership {
        Leadership {
            epoch,
            valid_until: sent + self.timing.lease - self.timing.margin,
        }
    }

    /// Takes the lease if it is free. `None`: another instance holds it.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>, sqlx::Error> {
        let sent = Instant::now();
        let epoch: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.acquire_sql.clone()))
            .bind(&self.owner)
            .bind(self.lease_secs())
            .fetch_optional(&self.pool)
            .await?;
        Ok(epoch.map(|e| self.granted(e, sent)))
    }

    /// Extends the lease held with `epoch`. `None`: it expired or another instance took it.
    pub async fn renew(&self, epoch: i64) -> Result<Option<Leadership>, sqlx::Error> {
        let sent = Instant::now();
        let renewed: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.renew_sql.clone()))
            .bind(&self.owner)
            .bind(epoch)
            .bind(self.lease_secs())
            .fetch_optional(&self.pool)
            .await?;
        Ok(renewed.map(|e| self.granted(e, sent)))
    }

    /// Gives the lease up at once, so a standby takes over at its next poll.
    pub async fn release(&self, epoch: i64) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.release_sql.clone()))
            .bind(&self.owner)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The current holder, if the lease was ever taken.
    pub async fn holder(&self) -> Result<Option<Holder>, sqlx::Error> {
        let row: Option<(String, i64, bool)> =
            sqlx::query_as(AssertSqlSafe(self.holder_sql.clone()))
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(owner, epoch, live)| Holder { owner, epoch, live }))
    }
}

/// `"schema"."<table>_lease"`.
pub fn lease_table(outbox: &OutboxTable) -> String {
    format!("\"{}\".\"{}_lease\"", outbox.schema, outbox.table)
}

/// The task that acquires the lease when it is free and renews it while held. Its view of the
/// leadership is read with [`Keeper::current`].
pub struct Keeper {
    rx: watch::Receiver<Option<Leadership>>,
    stop: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl Keeper {
    pub fn spawn(lease: Arc<Lease>) -> Keeper {
        let (tx, rx) = watch::channel(None);
        let (stop, stopped) = Shutdown::new();
        let task = tokio::spawn(keep(lease, tx, stopped));
        Keeper { rx, stop, task }
    }

    /// The leadership, if this instance holds a lease that is still valid by its own clock.
    pub fn current(&self) -> Option<Leadership> {
        (*self.rx.borrow()).filter(Leadership::is_valid)
    }

    /// Whether this instance still leads with `epoch`.
    pub fn leads_with(&self, epoch: i64) -> bool {
        self.current().is_some_and(|l| l.epoch == epoch)
    }

    /// A view of the leadership for those who only check it (the batch being published).
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch {
            rx: self.rx.clone(),
        }
    }

    /// Resolves once this instance leads.
    pub async fn leadership(&mut self) -> Leadership {
        loop {
            if let Some(l) = self.current() {
                return l;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops acquiring and renewing (the lease itself is left as it is).
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = self.task.await;
    }
}

/// The keeper's view of the leadership, read-only: cheap to clone and check.
#[derive(Clone)]
pub struct LeaseWatch {
    rx: watch::Receiver<Option<Leadership>>,
}

impl LeaseWatch {
    /// Whether this instance still leads with `epoch`, by its own clock.
    pub fn leads_with(&self, epoch: i64) -> bool {
        (*self.rx.borrow())
            .filter(Leadership::is_valid)
            .is_some_and(|l| l.epoch == epoch)
    }

    /// Resolves once this instance no longer leads with `epoch`: the keeper gave it up, or it
    /// lapsed by this instance's clock.
    pub async fn lapsed(&self, epoch: i64) {
        let mut rx = self.rx.clone();
        loop {
            let current = *rx.borrow_and_update();
            let Some(leadership) = current.filter(|l| l.epoch == epoch && l.is_valid()) else {
                return;
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The keeper stopped: the leadership lasts until it lapses.
                        tokio::time::sleep_until(leadership.valid_until).await;
                    }
                }
                _ = tokio::time::sleep_until(leadership.valid_until) => {}
            }
        }
    }
}

async fn keep(lease: Arc<Lease>, tx: watch::Sender<Option<Leadership>>, mut stopped: Shutdown) {
    let timing = lease.timing();
    // A standby that cannot reach the database backs off (up to the TTL) rather than logging
    // every poll; a leader retries its renewal at once.
    let mut errors = Backoff::with_bounds(timing.standby_poll, timing.lease);
    let mut held: Option<Leadership> = None;
    let mut next_attempt = Instant::now();
    loop {
        tokio::select! {
            _ = stopped.triggered() => return,
            _ = tokio::time::sleep_until(next_attempt) => {}
        }
        match held {
            None => match lease.try_acquire().await {
                Ok(Some(l)) => {
                    errors.reset();
                    events::LeadershipAcquired {
                        owner: lease.owner(),
                        epoch: l.epoch,
                    }
                    .emit();
                    held = Some(l);
                    tx.send_replace(held);
                    next_attempt = Instant::now() + timing.renew_every;
                }
                Ok(None) => {
                    errors.reset();
                    next_attempt = Instant::now() + timing.standby_poll;
                }
                Err(err) => {
                    events::LeaseFailed { error: &err }.emit();
                    next_attempt = Instant::now() + errors.next_delay();
                }
            },
            Some(current) => {
                // A renewal that cannot answer before the leadership lapses is as good as lost.
                let remaining = current
                    .valid_until
                    .saturating_duration_since(Instant::now());
                let outcome = tokio::time::timeout(remaining, lease.renew(current.epoch)).await;
                match outcome {
                    Ok(Ok(Some(l))) => {
                        held = Some(l);
                        tx.send_replace(held);
                        next_attempt = Instant::now() + timing.renew_every;
                    }
                    Ok(Ok(None)) => {
                        events::LeadershipLost {
                            epoch: current.epoch,
                            reason: "the lease expired or another instance took it",
                        }
                        .emit();
                        held = None;
                        tx.send_replace(None);
                        next_attempt = Instant::now() + timing.standby_poll;
                    }
                    Ok(Err(err)) if current.is_valid() => {
                        // Try again soon: the pool reconnects; the lease is still ours for now.
                        events::LeaseFailed { error: &err }.emit();
                        next_attempt = Instant::now() + timing.standby_poll.min(timing.renew_every);
                    }
                    Ok(Err(_)) | Err(_) => {
                        events::LeadershipLost {
                            epoch: current.epoch,
                            reason: "could not renew the lease in time",
                        }
                        .emit();
                        held = None;
                        tx.send_replace(None);
                        next_attempt = Instant::now() + timing.standby_poll;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_lets_a_standby_take_over_within_the_ttl_and_the_leader_stop_before_expiry() {
        let t = LeaseTiming::from_ttl(Duration::from_secs(10));
        assert_eq!(t.standby_poll, Duration::from_millis(500));
        assert_eq!(t.lease + t.standby_poll, Duration::from_secs(10));
        assert!(
            t.renew_every * 3 < t.lease - t.margin,
            "several renewals before lapsing"
        );
        let t = LeaseTiming::from_ttl(Duration::from_secs(2));
        assert_eq!(t.standby_poll, Duration::from_millis(200));
        assert_eq!(t.lease, Duration::from_millis(1800));
    }
}
