-- posthorn outbox table, version 1.
--
-- Plain SQL so a service's own migration tool can run it too. Names are unqualified: they
-- resolve through search_path (`posthorn migrate` sets it to POSTHORN_SCHEMA). Every occurrence
-- of the word "outbox" in this file is the table's name: `posthorn migrate` replaces it with
-- POSTHORN_TABLE when that is not "outbox".

CREATE TABLE outbox (
    -- Written by the service, inside its own business transaction.
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,               -- the Kafka record key
    event_type      text        NOT NULL,
    payload         jsonb       NULL,                   -- the Kafka record value (NULL: a tombstone)
    topic           text        NULL,                   -- overrides POSTHORN_TOPIC_TEMPLATE
    headers         jsonb       NULL,                   -- object of string -> string, copied to Kafka headers

    -- Owned by posthorn.
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz NULL,                   -- set once Kafka acknowledged the record
    attempts        integer     NOT NULL DEFAULT 0,     -- failed publish attempts
    last_error      text        NULL,
    last_attempt_at timestamptz NULL,

    CONSTRAINT outbox_topic_check CHECK (topic IS NULL OR topic ~ '^[A-Za-z0-9._-]{1,249}$'),
    CONSTRAINT outbox_headers_check CHECK (
        headers IS NULL OR (
            jsonb_typeof(headers) = 'object'
            AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')
            AND NOT headers ?| ARRAY['event-id', 'event-type', 'aggregate-type', 'outbox-id']
        )
    )
);

-- The relay's only read path: undelivered rows in id order. Stays small while the relay keeps up.
CREATE INDEX outbox_undelivered_idx ON outbox (id) WHERE delivered_at IS NULL;

-- Wakes the relay once per inserting statement. NOTIFY is delivered at COMMIT, and never for a
-- rolled-back transaction. The channel is posthorn.<schema>.<table>.
CREATE OR REPLACE FUNCTION posthorn_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('posthorn.' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION posthorn_notify();
