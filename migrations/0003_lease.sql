-- posthorn outbox table, version 3: one publisher at a time.
--
-- Several posthorn replicas may watch one outbox; only the holder of this lease publishes. The
-- lease is a single row: its owner, an epoch that grows with every change of owner, and an
-- expiry on the database's clock. Standbys take it over once it has expired (or was released).
-- Marks carry the leader's epoch and only apply while that epoch holds the lease, so a deposed
-- leader cannot mark rows. As in 0001, every occurrence of the word "outbox" is the table's name.

CREATE TABLE outbox_lease (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- The epoch of the leader that marked the row delivered (or failed).
ALTER TABLE outbox ADD COLUMN delivered_epoch bigint NULL;
