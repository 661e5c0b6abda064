"""Write posthorn outbox events from a service on psycopg 3, in the transaction that makes the
change.

An event is one row in the outbox table; the posthorn relay publishes each committed row to Kafka
(key: the aggregate id; value: the payload; headers: yours plus ``event-id``, ``event-type``,
``aggregate-type``, ``outbox-id`` and ``content-type``). Because the row is written in your
transaction, the event exists exactly when your change commits: a rolled-back transaction's
events are never published.

- :class:`Event` is checked against the table's rules when it is made, so writing it sends
  nothing Postgres would refuse (an error there would abort your transaction).
- :func:`enqueue` writes one event, :func:`enqueue_batch` many in one statement, on the
  connection or cursor you pass (``*_async`` for psycopg's async ones). They never begin, commit
  or roll back.
- :class:`Outbox` names another table than ``public.outbox``.
- With ``opentelemetry-api`` installed, the W3C trace context of the current span is written
  into each event's headers.

The Python twin of the Rust crate ``posthorn-writer``: the same rows, the same errors, checked by
the shared test vectors in ``writers/vectors``.
"""

from posthorn_writer._event import (
    RESERVED_HEADERS,
    Bytes,
    Event,
    InvalidEvent,
    Json,
    Payload,
    Tombstone,
    WriteError,
)
from posthorn_writer._outbox import (
    DEFAULT_OUTBOX,
    InvalidName,
    Outbox,
    enqueue,
    enqueue_async,
    enqueue_batch,
    enqueue_batch_async,
)

__all__ = [
    "DEFAULT_OUTBOX",
    "RESERVED_HEADERS",
    "Bytes",
    "Event",
    "InvalidEvent",
    "InvalidName",
    "Json",
    "Outbox",
    "Payload",
    "Tombstone",
    "WriteError",
    "enqueue",
    "enqueue_async",
    "enqueue_batch",
    "enqueue_batch_async",
]
