//! The LISTEN task: one connection that LISTENs on the outbox's channel and wakes the relay.

use std::sync::Arc;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::events;
use crate::retry::Backoff;
use crate::shutdown::Shutdown;

use super::Outbox;

impl Outbox {
    /// Starts the task that LISTENs on the outbox's channel and wakes the relay.
    pub(crate) fn spawn_listener(&self, shutdown: Shutdown) -> Wakeups {
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(listen(
            self.pool.clone(),
            self.table.channel(),
            notify.clone(),
            shutdown,
        ));
        Wakeups { notify, task }
    }
}

/// Wake-ups from the listener task. Any number of notifications between two waits collapse into
/// one wake-up (`Notify` keeps at most one permit), so a burst of commits costs one read.
pub(crate) struct Wakeups {
    notify: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Wakeups {
    /// Resolves when a notification (or a listener reconnect) arrived since the last call.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns the LISTEN connection for the relay's lifetime. `PgListener::try_recv` is never
/// cancelled mid-message because only this task awaits it. After every (re)connect it wakes the
/// relay once, since notifications sent while it was disconnected are lost.
async fn listen(pool: PgPool, channel: String, notify: Arc<Notify>, mut shutdown: Shutdown) {
    let mut backoff = Backoff::new();
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.triggered() => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(err) => {
                    let delay = backoff.next_delay();
                    events::ListenFailed { error: &err, retry_in: delay }.emit();
                    tokio::select! {
                        _ = shutdown.triggered() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff.reset();
        events::Listening { channel: &channel }.emit();
        notify.notify_one();
        loop {
            let received = tokio::select! {
                _ = shutdown.triggered() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(_)) => notify.notify_one(),
                Ok(None) => {
                    // The connection was lost; try_recv re-connects and re-LISTENs on the next
                    // call. Anything sent meanwhile was missed, so read now.
                    events::ListenReconnecting.emit();
                    notify.notify_one();
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    events::ListenLost {
                        error: &err,
                        retry_in: delay,
                    }
                    .emit();
                    notify.notify_one();
                    tokio::select! {
                        _ = shutdown.triggered() => return,
                        _ = tokio::time::sleep(delay) => break,
                    }
                }
            }
        }
    }
}
