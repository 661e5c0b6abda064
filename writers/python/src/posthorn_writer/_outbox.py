"""``Outbox``: which table to write, and the one statement that writes a batch of events."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from posthorn_writer._event import Bytes, Event, Json, WriteError
from posthorn_writer._trace import trace_headers

_NOT_MIGRATED = "the table needs posthorn's migration 5 or later: run `posthorn migrate`"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# One statement for any number of events: the arrays are unnested side by side, in order (the
# Rust writer's statement). Event ids are drawn in the materialized CTE and returned from it
# ordered by position, so they are in input order by construction (RETURNING's order is not
# specified); the INSERT reads the CTE by position too, so the rows' identity ids, the relay's
# publishing order within an aggregate, follow the input order. The arrays go as binary
# parameters (%b), which Postgres reads without parsing array literals.
_INSERT = """\
WITH event AS MATERIALIZED (
    SELECT gen_random_uuid() AS event_id, e.*
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[],
                %b::text[], %b::text[], %b::text[])
         WITH ORDINALITY AS e(aggregate_type, aggregate_id, event_type, payload,
                              payload_bytes, content_type, topic, headers, position)
), inserted AS (
    INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload,
                         payload_bytes, content_type, topic, headers)
    SELECT event_id, aggregate_type, aggregate_id, event_type, payload::jsonb,
           payload_bytes, content_type, topic, headers::jsonb
    FROM event ORDER BY position
)
SELECT event_id FROM event ORDER BY position"""


class InvalidName(WriteError, ValueError):
    """An outbox schema or table name that is not a lowercase SQL identifier."""


Conn = psycopg.Connection[Any] | psycopg.Cursor[Any]
AsyncConn = psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any]


class Outbox:
    """The outbox table events are written to: the relay's ``POSTHORN_SCHEMA``.``POSTHORN_TABLE``.

    ``schema`` and ``table`` must be lowercase SQL identifiers (a-z, 0-9, ``_``, not starting
    with a digit, at most 63 bytes), as the relay requires.
    """

    def __init__(self, schema: str = "public", table: str = "outbox") -> None:
        for what, name in (("schema", schema), ("table", table)):
            if not _IDENTIFIER.fullmatch(name):
                raise InvalidName(
                    f"invalid outbox name: {what} '{name}' is not a lowercase SQL identifier "
                    "(a-z, 0-9, _; at most 63 bytes; not starting with a digit)"
                )
        self.schema = schema
        self.table = table
        self._insert = sql.SQL(_INSERT).format(table=sql.Identifier(schema, table))

    def __repr__(self) -> str:
        return f"Outbox({self.schema!r}, {self.table!r})"

    def enqueue(self, conn: Conn, event: Event) -> UUID:
        """Writes ``event`` on ``conn`` (a connection or cursor in your transaction) and returns
        its event id (the record's ``event-id`` header). Never begins, commits or rolls back."""
        return self.enqueue_batch(conn, [event])[0]

    def enqueue_batch(self, conn: Conn, events: Sequence[Event]) -> list[UUID]:
        """Writes ``events`` in one statement and returns their event ids in input order. Events
        of one aggregate are published in this order too. Nothing is sent for no events."""
        if not events:
            return []
        connection = conn.connection if isinstance(conn, psycopg.Cursor) else conn
        with connection.cursor(row_factory=tuple_row) as cur:
            try:
                cur.execute(self._insert, _columns(events))
            except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as err:
                err.add_note(_NOT_MIGRATED)
                raise
            return [row[0] for row in cur.fetchall()]

    async def enqueue_async(self, conn: AsyncConn, event: Event) -> UUID:
        """:meth:`enqueue` on an async connection or cursor."""
        return (await self.enqueue_batch_async(conn, [event]))[0]

    async def enqueue_batch_async(self, conn: AsyncConn, events: Sequence[Event]) -> list[UUID]:
        """:meth:`enqueue_batch` on an async connection or cursor."""
        if not events:
            return []
        connection = conn.connection if isinstance(conn, psycopg.AsyncCursor) else conn
        async with connection.cursor(row_factory=tuple_row) as cur:
            try:
                await cur.execute(self._insert, _columns(events))
            except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as err:
                err.add_note(_NOT_MIGRATED)
                raise
            return [row[0] for row in await cur.fetchall()]


def _columns(events: Sequence[Event]) -> list[list[Any]]:
    """The events side by side, one list per column; ``None`` is NULL. Each event gets the
    current span's trace context unless it has a ``traceparent`` of its own."""
    trace = trace_headers()
    columns: list[list[Any]] = [[] for _ in range(8)]
    (
        aggregate_types,
        aggregate_ids,
        event_types,
        payloads,
        payload_bytes,
        content_types,
        topics,
        headers,
    ) = columns
    for event in events:
        aggregate_types.append(event.aggregate_type)
        aggregate_ids.append(event.aggregate_id)
        event_types.append(event.event_type)
        payload = event.payload
        payloads.append(payload.text if isinstance(payload, Json) else None)
        payload_bytes.append(payload.data if isinstance(payload, Bytes) else None)
        content_types.append(payload.content_type if isinstance(payload, Bytes) else None)
        topics.append(event.topic)
        own = event.headers
        merged = dict(own) if not trace or "traceparent" in own else {**trace, **own}
        headers.append(json.dumps(merged, ensure_ascii=False) if merged else None)
    return columns


DEFAULT_OUTBOX = Outbox()
"""``public.outbox``, the relay's default."""


def enqueue(conn: Conn, event: Event) -> UUID:
    """Writes ``event`` to ``public.outbox``; see :meth:`Outbox.enqueue`."""
    return DEFAULT_OUTBOX.enqueue(conn, event)


def enqueue_batch(conn: Conn, events: Sequence[Event]) -> list[UUID]:
    """Writes ``events`` to ``public.outbox`` in one statement; see :meth:`Outbox.enqueue_batch`."""
    return DEFAULT_OUTBOX.enqueue_batch(conn, events)


async def enqueue_async(conn: AsyncConn, event: Event) -> UUID:
    """:func:`enqueue` on an async connection or cursor."""
    return await DEFAULT_OUTBOX.enqueue_async(conn, event)


async def enqueue_batch_async(conn: AsyncConn, events: Sequence[Event]) -> list[UUID]:
    """:func:`enqueue_batch` on an async connection or cursor."""
    return await DEFAULT_OUTBOX.enqueue_batch_async(conn, events)
