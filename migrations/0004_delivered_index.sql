-- posthorn outbox table, version 4: finding delivered rows by delivery time.
--
-- Retention (POSTHORN_RETENTION) deletes delivered rows oldest delivery first, and
-- `posthorn status` shows the last delivery. With this index both cost the rows they find,
-- not a scan of the table. Marks were already not HOT updates (delivered_at is in the pending
-- index's predicate), so the index adds one index entry per delivered row.
--
-- CREATE INDEX blocks writes to the table while it builds. On a large existing table, build it
-- beforehand without blocking writers, and this migration finds it in place:
--   CREATE INDEX CONCURRENTLY outbox_delivered_idx ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
-- As in 0001, every occurrence of the word "outbox" is the table's name.

CREATE INDEX IF NOT EXISTS outbox_delivered_idx ON outbox (delivered_at)
    WHERE delivered_at IS NOT NULL;
