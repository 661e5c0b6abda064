"""A small service: ship an order and write its OrderShipped event in the same transaction.

DATABASE_URL=postgres://... python3 order_shipped.py order-42 DHL
"""

import os
import sys
from uuid import UUID

import psycopg

from posthorn_writer import Event, Json, enqueue


def ship_order(conn: psycopg.Connection, order_id: str, carrier: str) -> UUID:
    """Marks the order shipped and writes its event, both in the caller's transaction; returns
    the event id. The trace context of the current OpenTelemetry span goes into the headers."""
    # The UPDATE locks the order's row, so events of one order are written, and published, in
    # the order their transactions commit.
    cur = conn.execute(
        "UPDATE orders SET status = 'shipped', carrier = %s, version = version + 1 "
        "WHERE id = %s AND status = 'placed'",
        (carrier, order_id),
    )
    if cur.rowcount != 1:
        raise LookupError(f"order {order_id} is not waiting to be shipped")
    event = Event(
        "order", order_id, "OrderShipped", Json({"order_id": order_id, "carrier": carrier})
    )
    return enqueue(conn, event)


def handle_ship_request(conn: psycopg.Connection, order_id: str, carrier: str) -> UUID:
    """What a request handler does: one transaction for the order's change and its event."""
    with conn.transaction():  # both or neither: the order is shipped and its event exists
        return ship_order(conn, order_id, carrier)


def main() -> None:
    order_id, carrier = sys.argv[1], sys.argv[2]
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        event_id = handle_ship_request(conn, order_id, carrier)
    print(f"{order_id} shipped; event {event_id}")


if __name__ == "__main__":
    main()
