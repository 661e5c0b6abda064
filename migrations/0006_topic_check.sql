-- posthorn outbox table, version 6: the topic CHECK refuses '.' and '..', as Kafka does.
--
-- Migration 1's CHECK let them in, while the enqueue functions, posthorn-writer and the relay
-- refuse them (the relay set such a row aside as poison). Now the table says what the rest say
-- (`posthorn::contract`; tests/it/contract.rs checks the four agree).
--
-- NOT VALID: rows already in the table are not re-checked, so the table is not scanned under the
-- lock; a row with such a topic is already poison to the relay. The constraint still holds for
-- every row inserted or updated from now on. Run `ALTER TABLE outbox VALIDATE CONSTRAINT
-- outbox_topic_check` later to check the old rows without blocking writers.
-- As in 0001, every occurrence of the word "outbox" is the table's name.

ALTER TABLE outbox
    DROP CONSTRAINT outbox_topic_check,
    ADD CONSTRAINT outbox_topic_check
        CHECK (topic IS NULL OR (topic ~ '^[A-Za-z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')))
        NOT VALID;
