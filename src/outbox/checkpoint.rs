//! Snapshot-window tracking (`POSTHORN_TRACKING=checkpoint`): instead of writing
//! `delivered_at` on every row, the relay keeps one checkpoint row per outbox.
//!
//! A *window* is the set of rows whose inserting transaction (`txid`, 64-bit) is visible in
//! snapshot `to` but not in snapshot `from`: whole committed transactions. A window is read in
//! id order, a page (a batch) at a time; its rows are all committed, so paging by id cannot skip
//! one. A transaction still in progress at `to` is in `to`'s in-progress list, so it is left out
//! and read in a later window once it commits; a rolled-back one is never visible. After a page
//! is acknowledged, one fenced UPDATE of the checkpoint row records where publishing stands
//! ([`Position`]).
//!
//! The window's transaction ids go into the query as literals (`window_condition`), as PgQ's
//! `batch_event_sql` does: `pg_visible_in_snapshot` itself cannot use an index. The query is
//! sent unprepared, so Postgres plans it with the values each time.
//!
//! The relay's reads go past the pages it has sent and not yet recorded ([`Pages`]); a read from
//! the oldest row starts again from the checkpoint row.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use sqlx::{AssertSqlSafe, Row};

use crate::acks::Deliverable;
use crate::config::PoisonPolicy;
use crate::events;
use crate::row::OutboxRow;

use super::{decode_rows, Outbox, OutboxError};

/// A Postgres snapshot (`pg_snapshot`): transactions below `xmin` are finished, those at or
/// above `xmax` had not started, and `xip` lists those in progress in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    /// Whether a committed transaction `txid` is visible in this snapshot.
    #[cfg(test)]
    fn is_visible(&self, txid: u64) -> bool {
        txid < self.xmin || (txid < self.xmax && !self.xip.contains(&txid))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a pg_snapshot (xmin:xmax:xip,...)")]
pub(crate) struct SnapshotParseError(String);

impl FromStr for Snapshot {
    type Err = SnapshotParseError;

    fn from_str(text: &str) -> Result<Snapshot, SnapshotParseError> {
        let bad = || SnapshotParseError(text.to_owned());
        let mut parts = text.trim().splitn(3, ':');
        let mut next = || parts.next().ok_or_else(bad);
        let xmin = next()?.parse().map_err(|_| bad())?;
        let xmax = next()?.parse().map_err(|_| bad())?;
        let xip = next()?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().map_err(|_| bad()))
            .collect::<Result<Vec<u64>, _>>()?;
        if xmin > xmax || xip.iter().any(|x| *x < xmin || *x >= xmax) {
            return Err(bad());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

/// How rows recorded as done ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Done {
    /// Kafka acknowledged them.
    Published,
    /// Set aside as failed (poison): `failed_at` is written.
    SetAside,
}

/// Where publishing stands, as the checkpoint row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    /// Every transaction visible in the snapshot is published.
    Between(Snapshot),
    /// Every transaction visible in `from` is published, and in the window from `from` to
    /// `to`, every row with an id up to `after`.
    Within {
        from: Snapshot,
        to: Snapshot,
        after: i64,
    },
}

/// The SQL condition on `txid` that selects the window from `from` to `to`: transactions
/// visible in `to` and not in `from`. Literals only (the ids are numbers), so the planner sees
/// the bounds and can use the txid index.
pub(crate) fn window_condition(from: &Snapshot, to: &Snapshot) -> String {
    let list = |xs: &[u64]| {
        xs.iter()
            .map(|x| format!("'{x}'::xid8"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (lo, hi) = (from.xmax, to.xmax);
    let mut terms = Vec::new();
    if lo < hi {
        // Started at or after `from` was taken, and finished before `to` was.
        let running: Vec<u64> = to.xip.iter().copied().filter(|x| *x >= lo).collect();
        let mut range = format!("(txid >= '{lo}'::xid8 AND txid < '{hi}'::xid8");
        if !running.is_empty() {
            range.push_str(&format!(" AND txid NOT IN ({})", list(&running)));
        }
        range.push(')');
        terms.push(range);
    }
    // In progress when `from` was taken, finished before `to` was.
    let finished: Vec<u64> = from
        .xip
        .iter()
        .copied()
        .filter(|x| !to.xip.contains(x) && *x < hi)
        .collect();
    if !finished.is_empty() {
        terms.push(format!("txid IN ({})", list(&finished)));
    }
    if terms.is_empty() {
        return "false".to_owned();
    }
    format!("({})", terms.join(" OR "))
}

/// The SQL condition on `txid` selecting the transactions not visible in `from`. A statement
/// sees only transactions visible in its own snapshot, so with it a read takes the window from
/// `from` to that snapshot, and says which it was (`pg_current_snapshot()` in the select list).
pub(crate) fn since_condition(from: &Snapshot) -> String {
    let mut condition = format!("(txid >= '{}'::xid8", from.xmax);
    if !from.xip.is_empty() {
        let list: Vec<String> = from.xip.iter().map(|x| format!("'{x}'::xid8")).collect();
        condition.push_str(&format!(" OR txid IN ({})", list.join(", ")));
    }
    condition.push(')');
    condition
}

/// A page of a window the relay has read: its rows' ids in order, which of them are done
/// (acknowledged, or set aside as failed), and whether it was the window's last page.
#[derive(Debug, Clone)]
struct Page {
    from: Snapshot,
    to: Snapshot,
    ids: Vec<i64>,
    done: Vec<bool>,
    /// Rows of the page already covered by the checkpoint row.
    n_recorded: usize,
    last_of_window: bool,
}

impl Page {
    fn end(&self) -> Position {
        if self.last_of_window {
            Position::Between(self.to.clone())
        } else {
            Position::Within {
                from: self.from.clone(),
                to: self.to.clone(),
                after: self.ids.last().copied().unwrap_or(0),
            }
        }
    }
}

/// The pages read and not yet wholly recorded in the checkpoint row, oldest first; and the
/// position this leader last read from or wrote to the checkpoint row (a leader is its only
/// writer, so while it leads that is what the row holds).
#[derive(Debug, Default, Clone)]
pub(crate) struct Pages {
    pages: VecDeque<Page>,
    recorded: Option<Position>,
}

/// What recording some rows as done changes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Advance {
    /// The checkpoint's new position, if it moved.
    pub(crate) position: Option<Position>,
    /// Rows the new position covers that it did not before.
    pub(crate) n_recorded: usize,
    /// The last of them.
    pub(crate) last_id: Option<i64>,
    /// Rows done but beyond the position (an earlier row of their page is not done): they get
    /// `delivered_at`, so that reading the window again skips them.
    pub(crate) beyond: Vec<i64>,
}

impl Pages {
    /// A new epoch: another leader may have moved the checkpoint meanwhile.
    pub(crate) fn forget(&mut self) {
        *self = Pages::default();
    }

    fn push(&mut self, page: Page) {
        self.pages.push_back(page);
    }

    /// Where a read past the rows sent starts: after the page holding the last row sent
    /// (pages read after it were not sent, and are forgotten). None if no page holds it: then
    /// the read starts from the checkpoint row.
    fn end_after(&mut self, last_sent: i64) -> Option<Position> {
        let i = self
            .pages
            .iter()
            .position(|p| p.ids.binary_search(&last_sent).is_ok())?;
        self.pages.truncate(i + 1);
        self.pages.back().map(Page::end)
    }

    /// Records `ids` as done and moves the position over the pages' done prefix.
    pub(crate) fn advance(&mut self, ids: &[i64]) -> Advance {
        for id in ids {
            if let Some(page) = self
                .pages
                .iter_mut()
                .find(|p| p.ids.binary_search(id).is_ok())
            {
                if let Ok(i) = page.ids.binary_search(id) {
                    page.done[i] = true;
                }
            }
        }
        let mut position = None;
        let mut n_recorded = 0;
        let mut last_id = None;
        while let Some(page) = self.pages.front_mut() {
            let prefix = page.done.iter().take_while(|d| **d).count();
            if prefix > page.n_recorded {
                n_recorded += prefix - page.n_recorded;
                page.n_recorded = prefix;
                last_id = Some(page.ids[prefix - 1]);
                position = Some(if prefix == page.ids.len() {
                    page.end()
                } else {
                    Position::Within {
                        from: page.from.clone(),
                        to: page.to.clone(),
                        after: page.ids[prefix - 1],
                    }
                });
            }
            if prefix < page.ids.len() {
                break;
            }
            self.pages.pop_front();
        }
        let beyond = ids
            .iter()
            .copied()
            .filter(|id| {
                self.pages.iter().any(|p| {
                    p.ids
                        .binary_search(id)
                        .is_ok_and(|i| i >= p.n_recorded && p.done[i])
                })
            })
            .collect();
        Advance {
            position,
            n_recorded,
            last_id,
            beyond,
        }
    }
}

impl Outbox {
    /// The checkpoint row's position; created first if there is none (a first start in
    /// checkpoint mode, or a switch from rows mode): then every row still pending is in a later
    /// window, from the oldest pending row's transaction on.
    async fn load_position(&self) -> Result<Position, OutboxError> {
        let cp = self.checkpoint_table();
        let t = self.table.qualified();
        let select = format!("SELECT snapshot::text, window_end::text, position FROM {cp}");
        let row = sqlx::query(AssertSqlSafe(select.clone()))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the outbox checkpoint"))?;
        let row = match row {
            Some(row) => row,
            None => {
                // One statement, one snapshot `s`. A transaction that committed before it either
                // left pending rows (its txid at or above the oldest pending one, `x`) or none;
                // one still in progress (in `s`'s list) or not yet started is not visible in the
                // snapshot stored, so its rows are in a later window. Stored: `s` itself when
                // nothing is pending, else `s` cut at `x`.
                let create = format!(
                    "INSERT INTO {cp} (snapshot, epoch) \
                     SELECT CASE WHEN m.x IS NULL THEN c.s ELSE ( \
                                least(pg_snapshot_xmin(c.s), m.x)::text || ':' || m.x::text \
                                || ':' || coalesce((SELECT string_agg(r::text, ',' ORDER BY r) \
                                                    FROM pg_snapshot_xip(c.s) AS r \
                                                    WHERE r < m.x), '') \
                            )::pg_snapshot END, 0 \
                     FROM (SELECT pg_current_snapshot() AS s) AS c, \
                          (SELECT min(txid) AS x FROM {t} \
                           WHERE delivered_at IS NULL AND failed_at IS NULL) AS m \
                     ON CONFLICT DO NOTHING"
                );
                let created = sqlx::query(AssertSqlSafe(create))
                    .execute(&self.pool)
                    .await
                    .map_err(OutboxError::query("creating the outbox checkpoint"))?;
                let row = sqlx::query(AssertSqlSafe(select))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(OutboxError::query("reading the outbox checkpoint"))?;
                if created.rows_affected() > 0 {
                    let snapshot: String = row
                        .try_get(0)
                        .map_err(OutboxError::query("reading the outbox checkpoint"))?;
                    events::CheckpointCreated {
                        table: &self.table.qualified(),
                        snapshot: &snapshot,
                    }
                    .emit();
                }
                row
            }
        };
        decode_position(&row)
    }

    /// The next `limit` rows of checkpoint mode: past the pages in `pages` when `past` is not
    /// empty, else from the checkpoint row.
    pub(super) async fn fetch_window(
        &self,
        limit: usize,
        past: &[i64],
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let resume = match past.last() {
            None => None,
            Some(&last_sent) => self.pages_lock().end_after(last_sent),
        };
        let mut position = match resume {
            Some(position) => position,
            None => {
                // From the checkpoint row: what this leader last wrote or read there, or the row.
                let recorded = {
                    let mut pages = self.pages_lock();
                    pages.pages.clear();
                    pages.recorded.clone()
                };
                match recorded {
                    Some(position) => position,
                    None => {
                        let position = self.load_position().await?;
                        self.pages_lock().recorded = Some(position.clone());
                        position
                    }
                }
            }
        };
        // At most two windows: the rest of the current one (maybe empty), then a new one.
        loop {
            let (from, to, after) = match position {
                Position::Between(from) => (from, None, None),
                Position::Within { from, to, after } => (from, Some(to), Some(after)),
            };
            let page = self.read_page(&from, to.as_ref(), after, limit).await?;
            let n_read = page.rows.len() + page.held.len();
            let Some(to) = page.window_end.or(to) else {
                // A new window with nothing in it.
                return Ok(Vec::new());
            };
            if n_read == 0 {
                // The window is done: go on with the next one.
                position = Position::Between(to);
                continue;
            }
            let mut ids: Vec<i64> = page
                .rows
                .iter()
                .map(|r| r.id)
                .chain(page.held.iter().copied())
                .collect();
            ids.sort_unstable();
            let done = ids.iter().map(|id| page.held.contains(id)).collect();
            self.pages_lock().push(Page {
                from,
                to,
                ids,
                done,
                n_recorded: 0,
                last_of_window: n_read < limit,
            });
            return Ok(page.rows);
        }
    }

    /// One page of the window from `from` to `to`, or, with no `to`, to the read's own snapshot
    /// (then `window_end` says which it was; none if the page is empty). Held rows (under
    /// halt-key, behind a failed row of their aggregate) are set aside as failed here.
    async fn read_page(
        &self,
        from: &Snapshot,
        to: Option<&Snapshot>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<WindowPage, OutboxError> {
        let decode = OutboxError::query("decoding an outbox row");
        let mut sql = match to {
            Some(to) => format!(
                "{}, NULL::text AS window_end {} AND {}",
                self.window_select,
                self.window_from,
                window_condition(from, to)
            ),
            None => format!(
                "{}, (SELECT pg_current_snapshot()::text) AS window_end {} AND {}",
                self.window_select,
                self.window_from,
                since_condition(from)
            ),
        };
        if let Some(after) = after {
            sql.push_str(&format!(" AND id > {after}"));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
        let found = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::query("reading an outbox window"))?;
        let window_end = match found.first() {
            Some(row) => match row
                .try_get::<Option<String>, _>("window_end")
                .map_err(decode)?
            {
                Some(text) => Some(parse_snapshot(&text)?),
                None => None,
            },
            None => None,
        };
        let mut held = Vec::new();
        let mut rows = Vec::with_capacity(found.len());
        for row in found {
            let is_held: bool = row
                .try_get("held")
                .map_err(OutboxError::query("decoding an outbox row"))?;
            if is_held {
                held.push(
                    row.try_get("id")
                        .map_err(OutboxError::query("decoding an outbox row"))?,
                );
            } else {
                rows.push(row);
            }
        }
        if !held.is_empty() {
            self.set_aside_held(&held).await?;
        }
        Ok(WindowPage {
            rows: decode_rows(&rows)?,
            held,
            window_end,
        })
    }

    /// Under halt-key, rows behind a failed row of their aggregate cannot wait in a window the
    /// checkpoint moves past: they are marked failed, naming why, and `posthorn redeliver` of
    /// the failed row re-queues them with it.
    async fn set_aside_held(&self, ids: &[i64]) -> Result<(), OutboxError> {
        debug_assert_eq!(self.policy, PoisonPolicy::HaltKey);
        let t = self.table.qualified();
        let sql = format!(
            "UPDATE {t} AS o SET failed_at = now(), last_attempt_at = now(), \
                    last_error = 'held behind failed row ' || ( \
                        SELECT min(h.id) FROM {t} AS h \
                        WHERE h.failed_at IS NOT NULL AND h.delivered_at IS NULL \
                          AND h.aggregate_type = o.aggregate_type \
                          AND h.aggregate_id = o.aggregate_id AND h.id < o.id) \
             WHERE o.id = ANY($1) AND o.failed_at IS NULL"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query(
                "setting aside rows held behind a failed row",
            ))?;
        for id in ids {
            events::RowHeld { outbox_id: *id }.emit();
        }
        Ok(())
    }

    /// Records `ids` as done: moves the checkpoint over the done prefix, and writes
    /// `delivered_at` on published rows beyond it (rows set aside already have `failed_at`,
    /// which keeps a re-read off them). Fenced by `epoch`; returns how many rows it recorded (0
    /// for a deposed leader). The pages change only once the write succeeded, so a retried call
    /// records the same rows.
    pub(super) async fn record_done(
        &self,
        ids: &[i64],
        done: Done,
        epoch: i64,
    ) -> Result<u64, OutboxError> {
        let mut plan = self.pages_lock().clone();
        let advance = plan.advance(ids);
        let mut n_recorded = 0;
        if done == Done::Published && !advance.beyond.is_empty() {
            let beyond = Deliverable::from_ids(advance.beyond.clone());
            n_recorded += self.mark_rows_delivered(&beyond, epoch).await?;
        }
        if let Some(position) = &advance.position {
            if !self
                .write_position(position, advance.last_id, epoch)
                .await?
            {
                // Deposed: whoever leads now moves the checkpoint.
                self.pages_lock().forget();
                return Ok(0);
            }
            n_recorded += advance.n_recorded as u64;
        }
        let mut pages = self.pages_lock();
        pages.advance(ids);
        if let Some(position) = advance.position {
            pages.recorded = Some(position);
        }
        Ok(n_recorded)
    }

    /// Writes the checkpoint row if `epoch` still holds the lease. Whether it did.
    async fn write_position(
        &self,
        position: &Position,
        last_id: Option<i64>,
        epoch: i64,
    ) -> Result<bool, OutboxError> {
        let cp = self.checkpoint_table();
        let lease = crate::lease::lease_table(&self.table);
        let sql = format!(
            "UPDATE {cp} SET snapshot = $1::pg_snapshot, window_end = $2::pg_snapshot, \
                    position = $3, epoch = $4, advanced_at = now(), \
                    last_id = coalesce($5, last_id) \
             WHERE EXISTS (SELECT 1 FROM {lease} WHERE epoch = $4 AND expires_at > now())"
        );
        let (snapshot, window_end, after) = match position {
            Position::Between(s) => (s.to_string(), None, None),
            Position::Within { from, to, after } => {
                (from.to_string(), Some(to.to_string()), Some(*after))
            }
        };
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(snapshot)
            .bind(window_end)
            .bind(after)
            .bind(epoch)
            .bind(last_id)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::query("advancing the outbox checkpoint"))?;
        Ok(done.rows_affected() > 0)
    }

    /// In rows mode, a checkpoint row left by checkpoint mode: every row it covers is marked
    /// delivered and the row deleted, in one transaction, so that rows mode publishes none of
    /// them again. Returns how many rows it marked, if there was a checkpoint.
    pub(super) async fn hand_back_checkpoint(&self) -> Result<Option<u64>, OutboxError> {
        let cp = self.checkpoint_table();
        let t = self.table.qualified();
        let what = "handing the outbox checkpoint back to rows tracking";
        let mut tx = self.pool.begin().await.map_err(OutboxError::query(what))?;
        let found = sqlx::query(AssertSqlSafe(format!(
            "SELECT snapshot::text FROM {cp} FOR UPDATE"
        )))
        .fetch_optional(&mut *tx)
        .await
        .map_err(OutboxError::query(what))?;
        if found.is_none() {
            return Ok(None);
        }
        let marked = sqlx::query(AssertSqlSafe(format!(
            "UPDATE {t} AS o SET delivered_at = now() \
             FROM {cp} AS c \
             WHERE o.delivered_at IS NULL AND o.failed_at IS NULL AND {}",
            covered("o", "c")
        )))
        .execute(&mut *tx)
        .await
        .map_err(OutboxError::query(what))?;
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {cp}")))
            .execute(&mut *tx)
            .await
            .map_err(OutboxError::query(what))?;
        tx.commit().await.map_err(OutboxError::query(what))?;
        Ok(Some(marked.rows_affected()))
    }

    /// The condition "not visible in the checkpoint's snapshot" with its txids as literals,
    /// for a query that should read the txid index; none without a checkpoint row.
    pub(super) async fn checkpoint_snapshot(&self) -> Result<Option<String>, OutboxError> {
        let sql = format!("SELECT snapshot::text FROM {}", self.checkpoint_table());
        let text: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(OutboxError::query("reading the outbox checkpoint"))?;
        text.map(|t| parse_snapshot(&t).map(|s| since_condition(&s)))
            .transpose()
    }

    /// A new epoch begins: what this handle remembers of the checkpoint may be stale.
    pub(crate) fn begin_epoch(&self) {
        self.pages_lock().forget();
    }

    fn pages_lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        // A panic while holding the lock leaves the pages as they were: still usable.
        self.pages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn checkpoint_table(&self) -> String {
        checkpoint_table(&self.table)
    }
}

/// `<schema>.<table>_checkpoint`, quoted.
pub(crate) fn checkpoint_table(table: &crate::config::OutboxTable) -> String {
    format!("\"{}\".\"{}_checkpoint\"", table.schema, table.table)
}

/// The SQL condition "row `o` is covered by checkpoint row `c`" (its transaction is visible in
/// the checkpoint's snapshot, or it lies inside the window up to the position).
pub(crate) fn covered(o: &str, c: &str) -> String {
    format!(
        "(pg_visible_in_snapshot({o}.txid, {c}.snapshot) \
          OR ({c}.window_end IS NOT NULL AND pg_visible_in_snapshot({o}.txid, {c}.window_end) \
              AND {o}.id <= {c}.position))"
    )
}

fn parse_snapshot(text: &str) -> Result<Snapshot, OutboxError> {
    text.parse()
        .map_err(|err: SnapshotParseError| OutboxError::Corrupt(err.to_string()))
}

/// What one read of a window found.
struct WindowPage {
    rows: Vec<OutboxRow>,
    /// Rows set aside as held (halt-key).
    held: Vec<i64>,
    /// The snapshot the window ends at, when the read chose it.
    window_end: Option<Snapshot>,
}

fn decode_position(row: &sqlx::postgres::PgRow) -> Result<Position, OutboxError> {
    let what = "reading the outbox checkpoint";
    let snapshot: String = row.try_get(0).map_err(OutboxError::query(what))?;
    let window_end: Option<String> = row.try_get(1).map_err(OutboxError::query(what))?;
    let after: Option<i64> = row.try_get(2).map_err(OutboxError::query(what))?;
    let from = parse_snapshot(&snapshot)?;
    Ok(match (window_end, after) {
        (Some(to), Some(after)) => Position::Within {
            from,
            to: parse_snapshot(&to)?,
            after,
        },
        _ => Position::Between(from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        text.parse().expect("snapshot")
    }

    #[test]
    fn snapshots_round_trip_their_text_past_the_32_bit_boundary() {
        for text in [
            "10:10:",
            "10:20:12,15",
            "4294967300:4294967310:4294967301,4294967305",
        ] {
            assert_eq!(snap(text).to_string(), text);
        }
        for bad in ["", "10", "10:9:", "10:20:25", "10:20:5", "a:b:", "10:20:x"] {
            assert!(bad.parse::<Snapshot>().is_err(), "{bad}");
        }
    }

    /// The condition, evaluated in Rust the way Postgres evaluates it.
    fn selects(condition_from: &Snapshot, to: &Snapshot, txid: u64) -> bool {
        !condition_from.is_visible(txid) && to.is_visible(txid)
    }

    #[test]
    fn the_window_is_what_the_later_snapshot_sees_and_the_earlier_does_not() {
        let cases = [
            ("10:10:", "15:15:"),
            ("10:14:11,13", "12:20:13,18"),
            ("10:14:11,13", "10:14:11,13"),
            (
                "4294967290:4294967300:4294967295",
                "4294967296:4294967310:4294967305",
            ),
            ("5:5:", "5:9:5,6,7,8"),
        ];
        for (from, to) in cases {
            let (from, to) = (snap(from), snap(to));
            let condition = window_condition(&from, &to);
            for txid in from.xmin.saturating_sub(3)..to.xmax + 3 {
                let in_condition = eval(&condition, txid);
                assert_eq!(
                    in_condition,
                    selects(&from, &to, txid),
                    "{from} → {to}, txid {txid}: {condition}"
                );
            }
        }
    }

    #[test]
    fn since_is_what_the_earlier_snapshot_does_not_see() {
        for from in ["10:10:", "10:14:11,13", "4294967290:4294967300:4294967295"] {
            let from = snap(from);
            let condition = since_condition(&from);
            for txid in from.xmin.saturating_sub(3)..from.xmax + 5 {
                assert_eq!(
                    eval(&condition, txid),
                    !from.is_visible(txid),
                    "{from}, txid {txid}: {condition}"
                );
            }
        }
    }

    /// A tiny evaluator for the conditions `window_condition` writes (ranges, IN, NOT IN, OR).
    fn eval(condition: &str, txid: u64) -> bool {
        if condition == "false" {
            return false;
        }
        let inner = condition.trim_start_matches('(').trim_end_matches(')');
        inner.split(" OR ").any(|term| {
            let term = term.trim_start_matches('(').trim_end_matches(')');
            term.split(" AND ").all(|clause| clause_holds(clause, txid))
        })
    }

    fn clause_holds(clause: &str, txid: u64) -> bool {
        let ids: Vec<u64> = clause
            .split('\'')
            .skip(1)
            .step_by(2)
            .map(|n| n.parse().expect("a literal"))
            .collect();
        if clause.starts_with("txid >= ") {
            txid >= ids[0]
        } else if clause.starts_with("txid < ") {
            txid < ids[0]
        } else if clause.starts_with("txid NOT IN") {
            !ids.contains(&txid)
        } else if clause.starts_with("txid IN") {
            ids.contains(&txid)
        } else {
            panic!("unexpected clause {clause}")
        }
    }

    fn page(from: &str, to: &str, ids: &[i64], last_of_window: bool) -> Page {
        Page {
            from: snap(from),
            to: snap(to),
            ids: ids.to_vec(),
            done: vec![false; ids.len()],
            n_recorded: 0,
            last_of_window,
        }
    }

    #[test]
    fn a_whole_page_moves_the_checkpoint_to_its_end() {
        let mut pages = Pages::default();
        pages.push(page("10:10:", "20:20:", &[1, 2, 3], false));
        pages.push(page("10:10:", "20:20:", &[4, 5], true));
        let advance = pages.advance(&[1, 2, 3]);
        assert_eq!(
            advance.position,
            Some(Position::Within {
                from: snap("10:10:"),
                to: snap("20:20:"),
                after: 3
            })
        );
        assert_eq!((advance.n_recorded, advance.beyond.len()), (3, 0));
        let advance = pages.advance(&[4, 5]);
        assert_eq!(advance.position, Some(Position::Between(snap("20:20:"))));
        assert!(pages.pages.is_empty());
    }

    #[test]
    fn a_row_not_done_stops_the_checkpoint_and_rows_after_it_are_marked_one_by_one() {
        let mut pages = Pages::default();
        pages.push(page("10:10:", "20:20:", &[1, 2, 3, 4], true));
        let advance = pages.advance(&[1, 3, 4]);
        assert_eq!(
            advance.position,
            Some(Position::Within {
                from: snap("10:10:"),
                to: snap("20:20:"),
                after: 1
            })
        );
        assert_eq!(advance.n_recorded, 1);
        assert_eq!(advance.beyond, vec![3, 4]);
        // The failed row is set aside later (poison): the checkpoint passes the whole page.
        let advance = pages.advance(&[2]);
        assert_eq!(advance.position, Some(Position::Between(snap("20:20:"))));
        assert_eq!((advance.n_recorded, advance.beyond.len()), (3, 0));
    }

    #[test]
    fn nothing_done_at_the_front_moves_nothing() {
        let mut pages = Pages::default();
        pages.push(page("10:10:", "20:20:", &[1, 2], false));
        pages.push(page("10:10:", "20:20:", &[3, 4], true));
        let advance = pages.advance(&[3, 4]);
        assert_eq!(advance.position, None);
        assert_eq!(advance.beyond, vec![3, 4]);
        assert_eq!(
            pages.end_after(4),
            Some(Position::Between(snap("20:20:"))),
            "the next read still goes past every page sent"
        );
    }

    #[test]
    fn a_page_read_and_not_sent_is_forgotten_and_read_again() {
        let mut pages = Pages::default();
        pages.push(page("10:10:", "20:20:", &[1, 2], false));
        pages.push(page("10:10:", "20:20:", &[3, 4], false));
        assert_eq!(
            pages.end_after(2),
            Some(Position::Within {
                from: snap("10:10:"),
                to: snap("20:20:"),
                after: 2
            })
        );
        assert_eq!(pages.pages.len(), 1);
        assert_eq!(
            pages.end_after(99),
            None,
            "no page holds it: from the checkpoint row"
        );
    }

    #[test]
    fn recording_again_what_was_recorded_changes_nothing() {
        let mut pages = Pages::default();
        pages.push(page("10:10:", "20:20:", &[1, 2], false));
        pages.advance(&[1, 2]);
        let again = pages.advance(&[1, 2]);
        assert_eq!(again.position, None);
        assert_eq!((again.n_recorded, again.beyond.len()), (0, 0));
    }
}
