-- Least-privilege database roles for posthorn.
--
--   posthorn_relay     what `posthorn run` and `posthorn check` connect as: reads the outbox,
--                      marks rows delivered or failed (UPDATE), deletes delivered rows (DELETE,
--                      for retention), and keeps the leader-election lease. No DDL: it owns
--                      nothing and cannot create, alter or drop tables.
--   posthorn_migrator  what `posthorn migrate` connects as (the migrate Job only): owner of the
--                      outbox table, its migrations bookkeeping table, the lease table and the
--                      notify trigger function.
--
-- Run it as a superuser (or a role with CREATEROLE that may also grant on the objects),
-- connected to the service's database, e.g.
--
--   psql "postgres://admin@db:5432/orders" -v ON_ERROR_STOP=1 -f deploy/sql/relay-role.sql
--   psql "postgres://admin@db:5432/orders" -c '\password posthorn_relay' -c '\password posthorn_migrator'
--
-- Order: run this file, then `posthorn migrate` as posthorn_migrator, then this file again. It is
-- idempotent. Grants on a table only take effect once the table exists, so run it again after
-- every migration that adds a table (the leader election adds the lease table, checkpoint
-- tracking the checkpoint table, version 8 the identity table). If the outbox
-- was first migrated by another role, this file hands its objects to posthorn_migrator.
--
-- Written for the defaults (POSTHORN_SCHEMA=public, POSTHORN_TABLE=outbox). For other names
-- replace, throughout: the schema "public"; the table "outbox"; and the derived names
-- "outbox_lease" (<table>_lease), "outbox_checkpoint" (<table>_checkpoint),
-- "outbox_identity" (<table>_identity) and
-- "posthorn_outbox_migrations" (posthorn_<table>_migrations).
--
-- With POSTHORN_TRACKING=checkpoint, `posthorn redeliver` re-queues a row by deleting it and
-- inserting it again: run it as a role that may INSERT into the outbox (the service's own role,
-- or posthorn_migrator), not as posthorn_relay.
--
-- No passwords here: set them with \password (above) or ALTER ROLE ... PASSWORD from your secret
-- store. LISTEN (how posthorn wakes up) and the NOTIFY sent by the outbox trigger need no grant.
-- The service itself needs only INSERT on the outbox table (example at the end).

-- The roles. Attributes are (re)asserted even if the roles existed before.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'posthorn_migrator') THEN
        CREATE ROLE posthorn_migrator;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'posthorn_relay') THEN
        CREATE ROLE posthorn_relay;
    END IF;
END
$$;
ALTER ROLE posthorn_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE posthorn_relay LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- Connecting (PUBLIC usually may already; some databases revoke that). The migrator also gets
-- CREATE on the database: `posthorn migrate` runs CREATE SCHEMA IF NOT EXISTS, which Postgres
-- checks for that privilege even when the schema exists.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO posthorn_relay', current_database());
    EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO posthorn_migrator', current_database());
END
$$;

-- The schema: the migrator creates objects in it, the relay only resolves names in it.
GRANT USAGE, CREATE ON SCHEMA public TO posthorn_migrator;
GRANT USAGE ON SCHEMA public TO posthorn_relay;

-- Table-level grants and ownership, for whichever of the objects exist by now.
DO $$
BEGIN
    IF to_regclass('public.outbox') IS NOT NULL THEN
        ALTER TABLE public.outbox OWNER TO posthorn_migrator;
        -- SELECT: read pending rows and count them (`check`). UPDATE: delivered_at, failed_at,
        -- attempts, last_error, ... DELETE: retention of delivered rows.
        GRANT SELECT, UPDATE, DELETE ON public.outbox TO posthorn_relay;
        -- Nothing else, whatever was granted before (the relay never inserts rows).
        REVOKE INSERT, TRUNCATE, REFERENCES, TRIGGER ON public.outbox FROM posthorn_relay;
    ELSE
        RAISE NOTICE 'public.outbox does not exist yet: run `posthorn migrate`, then this file again';
    END IF;

    -- Leader election's lease (<table>_lease), added by a later posthorn migration: one row,
    -- taken with INSERT ... ON CONFLICT DO UPDATE, renewed and released with UPDATE.
    IF to_regclass('public.outbox_lease') IS NOT NULL THEN
        ALTER TABLE public.outbox_lease OWNER TO posthorn_migrator;
        GRANT SELECT, INSERT, UPDATE ON public.outbox_lease TO posthorn_relay;
        REVOKE DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.outbox_lease FROM posthorn_relay;
    END IF;

    -- Checkpoint tracking's checkpoint row (<table>_checkpoint, migration 7): created with
    -- INSERT, moved with UPDATE; in rows mode a checkpoint left by checkpoint mode is read and
    -- DELETEd when rows mode takes over.
    IF to_regclass('public.outbox_checkpoint') IS NOT NULL THEN
        ALTER TABLE public.outbox_checkpoint OWNER TO posthorn_migrator;
        GRANT SELECT, INSERT, UPDATE, DELETE ON public.outbox_checkpoint TO posthorn_relay;
        REVOKE TRUNCATE, REFERENCES, TRIGGER ON public.outbox_checkpoint FROM posthorn_relay;
    END IF;

    -- The outbox's identity (<table>_identity, migration 8): read by an exactly-once relay,
    -- whose transactional.id and checkpoint records it names. Never written by the relay.
    IF to_regclass('public.outbox_identity') IS NOT NULL THEN
        ALTER TABLE public.outbox_identity OWNER TO posthorn_migrator;
        GRANT SELECT ON public.outbox_identity TO posthorn_relay;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.outbox_identity
            FROM posthorn_relay;
    END IF;

    -- posthorn migrate's own bookkeeping: the migrator's only; the relay never reads it.
    IF to_regclass('public.posthorn_outbox_migrations') IS NOT NULL THEN
        ALTER TABLE public.posthorn_outbox_migrations OWNER TO posthorn_migrator;
    END IF;

    -- The trigger function (run by the service's INSERTs; EXECUTE on functions is PUBLIC's by
    -- default). Owned by the migrator so that a later migration may replace it.
    IF to_regprocedure('public.posthorn_notify()') IS NOT NULL THEN
        ALTER FUNCTION public.posthorn_notify() OWNER TO posthorn_migrator;
    END IF;
END
$$;

-- A check, not a grant: on PostgreSQL 14 and older every role may CREATE in schema public
-- (through PUBLIC), so the relay could create tables there. PostgreSQL 15 revoked that by
-- default. Where it still holds, revoke it from PUBLIC (mind other roles that rely on it):
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    IF has_schema_privilege('posthorn_relay', 'public', 'CREATE') THEN
        RAISE WARNING 'posthorn_relay can CREATE in schema public (through PUBLIC?): consider REVOKE CREATE ON SCHEMA public FROM PUBLIC';
    END IF;
END
$$;

-- The service's own role (not created here) needs to write outbox rows, nothing more:
--   GRANT USAGE ON SCHEMA public TO orders_service;
--   GRANT INSERT ON public.outbox TO orders_service;
