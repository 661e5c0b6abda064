"""Ship an order and write its OrderShipped event in the same transaction, with psycopg 3.

    DATABASE_URL=postgres://... python3 order_shipped.py order-42 DHL
"""

import os
import sys

import psycopg
from psycopg.types.json import Jsonb


def ship_order(conn, order_id, carrier, traceparent=None):
    """Marks the order shipped and writes its event in the caller's transaction; returns the
    event id (the Kafka header event-id)."""
    cur = conn.execute(
        "UPDATE orders SET status = 'shipped', carrier = %s, version = version + 1 "
        "WHERE id = %s AND status = 'placed'",
        (carrier, order_id),
    )
    if cur.rowcount != 1:
        raise LookupError(f"order {order_id} is not waiting to be shipped")
    headers = {"traceparent": traceparent} if traceparent else None
    (event_id,) = conn.execute(
        "SELECT outbox_enqueue(%s, %s, %s, %s, headers => %s)",
        (
            "order",
            order_id,
            "OrderShipped",
            Jsonb({"order_id": order_id, "carrier": carrier}),
            Jsonb(headers) if headers else None,
        ),
    ).fetchone()
    return event_id


def main():
    order_id, carrier = sys.argv[1], sys.argv[2]
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        with conn.transaction():  # both or neither: the order's change and its event
            event_id = ship_order(conn, order_id, carrier, os.environ.get("TRACEPARENT"))
    print(f"{order_id} shipped; event {event_id}")


if __name__ == "__main__":
    main()
