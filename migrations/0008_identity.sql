-- posthorn outbox table, version 8: the outbox's identity (POSTHORN_DELIVERY=exactly-once).
--
-- One row, made once, never changed: a random id that names this outbox in Kafka. With
-- exactly-once delivery the relay's default transactional.id is `posthorn-<id>` (every replica
-- reads the same one, so a new leader's producer fences the last leader's at the broker), and
-- the checkpoint records it commits with each batch are keyed by it. Two services whose outbox
-- tables share a schema and table name (and database name) still get two identities.
-- A dump/restore copies the row: the copy then shares the original's identity, so do not run
-- a relay on both (as with the checkpoint row of version 7).
-- As in 0001, every occurrence of the word "outbox" is the table's name.

CREATE TABLE outbox_identity (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox_identity DEFAULT VALUES;
