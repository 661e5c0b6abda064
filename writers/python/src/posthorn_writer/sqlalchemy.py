"""Write events in a SQLAlchemy session's transaction (``postgresql+psycopg`` engines)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from sqlalchemy.orm import Session

from posthorn_writer._event import Event
from posthorn_writer._outbox import DEFAULT_OUTBOX, Outbox


def _psycopg_connection(session: Session) -> psycopg.Connection[Any]:
    # session.connection() begins the session's transaction if needed; the DBAPI connection
    # under it is psycopg's, in that same transaction.
    driver = session.connection().connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(f"the session's driver is not psycopg 3 but {type(driver).__name__}")
    return driver


def enqueue(session: Session, event: Event, outbox: Outbox = DEFAULT_OUTBOX) -> UUID:
    """Writes ``event`` in the session's transaction; it commits with ``session.commit()``."""
    session.flush()  # the ORM changes first, so that the event follows them in the transaction
    return outbox.enqueue(_psycopg_connection(session), event)


def enqueue_batch(
    session: Session, events: Sequence[Event], outbox: Outbox = DEFAULT_OUTBOX
) -> list[UUID]:
    """Writes ``events`` in one statement in the session's transaction."""
    session.flush()
    return outbox.enqueue_batch(_psycopg_connection(session), events)
