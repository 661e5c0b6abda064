-- posthorn outbox table, version 5: the writer side.
--
-- Binary payloads. payload_bytes (bytea) sits beside payload (jsonb); at most one of them is set,
-- and both NULL is a tombstone (a record with no value), as before. A bytes row must name its
-- content_type; a JSON or tombstone row has none. The relay publishes the bytes exactly as stored
-- and gives every record with a value a content-type header: application/json for JSON rows, the
-- row's content_type for bytes rows. Tombstones get no content-type header: there is no content.
--
-- Functions that write one event from any language, inside the caller's transaction, and return
-- its event id (the Kafka header event-id):
--
--   outbox_enqueue(aggregate_type, aggregate_id, event_type, payload jsonb,
--                  topic DEFAULT NULL, headers DEFAULT NULL)
--   outbox_enqueue_bytes(aggregate_type, aggregate_id, event_type, payload bytea, content_type,
--                        topic DEFAULT NULL, headers DEFAULT NULL)
--   outbox_enqueue_tombstone(aggregate_type, aggregate_id, event_type,
--                            topic DEFAULT NULL, headers DEFAULT NULL)
--
-- As in 0001, every occurrence of the word "outbox" in this file is the table's name, the
-- functions' names included: for POSTHORN_TABLE=order_events they are order_events_enqueue,
-- order_events_enqueue_bytes and order_events_enqueue_tombstone.
--
-- Every constraint here is added NOT VALID: Postgres then checks every row version written from
-- now on (inserts and updates) but does not scan the existing rows while holding the table's lock.
-- The new columns are NULL in them, so the payload checks hold anyway; delivered rows may keep a
-- content-type header of their own, as they were allowed to. A pending row with one could never
-- be marked (its update would break the new headers check), so this migration marks it failed,
-- saying why. An operator may run ALTER TABLE ... VALIDATE CONSTRAINT later; it does not block
-- writers.

ALTER TABLE outbox
    ADD COLUMN payload_bytes bytea NULL,          -- the Kafka record value, as stored
    ADD COLUMN content_type  text  NULL;          -- of payload_bytes: the content-type header

ALTER TABLE outbox ADD CONSTRAINT outbox_payload_check
    CHECK (payload IS NULL OR payload_bytes IS NULL) NOT VALID;

-- A media type (RFC 6838 names, optional parameters), required exactly for bytes rows.
ALTER TABLE outbox ADD CONSTRAINT outbox_content_type_check CHECK (
    (payload_bytes IS NULL AND content_type IS NULL)
    OR (payload_bytes IS NOT NULL AND content_type IS NOT NULL
        AND length(content_type) <= 255
        AND content_type ~ '^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*( *;[ -~]*)?$')
) NOT VALID;

-- The headers check, version 2: content-type is reserved too. The name 'outbox-id' is written in
-- two parts so that the table-name substitution leaves it alone (version 1 spelled it whole, so on
-- a renamed table it reserved '<table>-id' instead).
ALTER TABLE outbox DROP CONSTRAINT outbox_headers_check;
UPDATE outbox
SET failed_at = now(),
    last_error = 'headers use the reserved name ''content-type'', which posthorn sets itself since '
                 'migration 5: remove it from headers and set failed_at to NULL to publish the row'
WHERE delivered_at IS NULL AND failed_at IS NULL AND headers ? 'content-type';
ALTER TABLE outbox ADD CONSTRAINT outbox_headers_check CHECK (
    headers IS NULL OR (
        jsonb_typeof(headers) = 'object'
        AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')
        AND NOT headers ?| ARRAY['event-id', 'event-type', 'aggregate-type', 'out' || 'box-id',
                                 'content-type']
    )
) NOT VALID;

-- The checks the enqueue functions share, raising one clear error per problem. Shared by every
-- outbox table of the schema, like posthorn_notify(); `called` names the function for messages.
CREATE OR REPLACE FUNCTION posthorn_check_event(
    called         text,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    topic          text,
    headers        jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    bad_name text;
    bad_type text;
BEGIN
    IF aggregate_type IS NULL OR aggregate_id IS NULL OR event_type IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'null_value_not_allowed',
            MESSAGE = format('%s: %s must not be NULL', called,
                CASE WHEN aggregate_type IS NULL THEN 'aggregate_type'
                     WHEN aggregate_id IS NULL THEN 'aggregate_id'
                     ELSE 'event_type' END);
    END IF;
    IF aggregate_type = '' OR aggregate_id = '' OR event_type = '' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s: %s must not be empty', called,
                CASE WHEN aggregate_type = '' THEN 'aggregate_type'
                     WHEN aggregate_id = '' THEN 'aggregate_id'
                     ELSE 'event_type' END);
    END IF;
    IF topic IS NOT NULL AND (topic !~ '^[A-Za-z0-9._-]{1,249}$' OR topic IN ('.', '..')) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s: topic %L is not a Kafka topic name', called, topic),
            HINT = 'Use 1 to 249 of a-z, A-Z, 0-9, ''.'', ''_'' and ''-'' (not ''.'' or ''..''), '
                   'or NULL for the relay''s topic template.';
    END IF;
    IF headers IS NULL THEN
        RETURN;
    END IF;
    IF jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s: headers must be a JSON object of strings, not %s %s', called,
                CASE WHEN jsonb_typeof(headers) = 'array' THEN 'an' ELSE 'a' END,
                jsonb_typeof(headers)),
            HINT = 'For example ''{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}''.';
    END IF;
    SELECT h.key, jsonb_typeof(h.value) INTO bad_name, bad_type
    FROM jsonb_each(headers) AS h
    WHERE jsonb_typeof(h.value) <> 'string'
    ORDER BY h.key
    LIMIT 1;
    IF bad_name IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s: header %L must be a string, not %s %s', called, bad_name,
                CASE WHEN bad_type IN ('array', 'object') THEN 'an' ELSE 'a' END, bad_type);
    END IF;
    SELECT h.name INTO bad_name
    FROM jsonb_object_keys(headers) AS h(name)
    WHERE h.name IN ('event-id', 'event-type', 'aggregate-type', 'out' || 'box-id', 'content-type')
    ORDER BY h.name
    LIMIT 1;
    IF bad_name IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('%s: header name %L is reserved: posthorn sets it on every record',
                called, bad_name),
            HINT = 'The reserved names are event-id, event-type, aggregate-type, '
                   'out' || 'box-id and content-type.';
    END IF;
END
$$;

-- `SET search_path FROM CURRENT` pins the search_path this migration ran with (posthorn migrate:
-- POSTHORN_SCHEMA), so the function writes to this table whatever the caller's search_path is.

CREATE FUNCTION outbox_enqueue(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    topic          text  DEFAULT NULL,
    headers        jsonb DEFAULT NULL
) RETURNS uuid LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    new_event_id uuid;
BEGIN
    PERFORM posthorn_check_event('outbox_enqueue', aggregate_type, aggregate_id, event_type,
                                 topic, headers);
    IF payload IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'outbox_enqueue: payload must not be NULL',
            HINT = 'To write a tombstone (a record with no value), call outbox_enqueue_tombstone.';
    END IF;
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic, headers)
    VALUES (aggregate_type, aggregate_id, event_type, payload, topic, headers)
    RETURNING outbox.event_id INTO new_event_id;
    RETURN new_event_id;
END
$$;

CREATE FUNCTION outbox_enqueue_bytes(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        bytea,
    content_type   text,
    topic          text  DEFAULT NULL,
    headers        jsonb DEFAULT NULL
) RETURNS uuid LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    new_event_id uuid;
BEGIN
    PERFORM posthorn_check_event('outbox_enqueue_bytes', aggregate_type, aggregate_id,
                                 event_type, topic, headers);
    IF payload IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'outbox_enqueue_bytes: payload must not be NULL (an empty payload is ''''::bytea)',
            HINT = 'To write a tombstone (a record with no value), call outbox_enqueue_tombstone.';
    END IF;
    IF content_type IS NULL
       OR length(content_type) > 255
       OR content_type !~ '^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*( *;[ -~]*)?$'
    THEN
        RAISE EXCEPTION USING
            ERRCODE = CASE WHEN content_type IS NULL THEN 'null_value_not_allowed'
                           ELSE 'invalid_parameter_value' END,
            MESSAGE = format('outbox_enqueue_bytes: content_type %s is not a media type',
                             coalesce(quote_literal(content_type), 'NULL')),
            HINT = 'For example ''application/x-protobuf'' or ''text/plain; charset=utf-8''.';
    END IF;
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload_bytes, content_type,
                        topic, headers)
    VALUES (aggregate_type, aggregate_id, event_type, payload, content_type, topic, headers)
    RETURNING outbox.event_id INTO new_event_id;
    RETURN new_event_id;
END
$$;

CREATE FUNCTION outbox_enqueue_tombstone(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    topic          text  DEFAULT NULL,
    headers        jsonb DEFAULT NULL
) RETURNS uuid LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    new_event_id uuid;
BEGIN
    PERFORM posthorn_check_event('outbox_enqueue_tombstone', aggregate_type, aggregate_id,
                                 event_type, topic, headers);
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, topic, headers)
    VALUES (aggregate_type, aggregate_id, event_type, topic, headers)
    RETURNING outbox.event_id INTO new_event_id;
    RETURN new_event_id;
END
$$;
