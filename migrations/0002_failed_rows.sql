-- posthorn outbox table, version 2: rows that can never be published.
--
-- A row Kafka will never accept (too large, a topic that does not exist, ...) is marked failed
-- instead of being retried forever: failed_at is set, last_error says why, and the row stays in
-- the table. POSTHORN_ON_POISON decides what happens to later rows of its aggregate. To re-queue
-- failed rows: UPDATE outbox SET failed_at = NULL WHERE failed_at IS NOT NULL AND delivered_at IS NULL;
-- As in 0001, every occurrence of the word "outbox" is the table's name.

ALTER TABLE outbox ADD COLUMN failed_at timestamptz NULL;

-- The relay's read path now skips failed rows.
DROP INDEX outbox_undelivered_idx;
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE delivered_at IS NULL AND failed_at IS NULL;

-- Failed rows per aggregate: the halt-key policy's "does an earlier row of this aggregate wait
-- for an operator?" probe, and the operator's own queries. Empty while nothing fails.
CREATE INDEX outbox_failed_idx ON outbox (aggregate_type, aggregate_id, id)
    WHERE failed_at IS NOT NULL AND delivered_at IS NULL;
