"""Batch rate: transactions of 1,000 small JSON events with a traceparent header (building the
events, enqueue_batch and commit) over TCP, as the Rust writer's measurement in
docs/writing-events.md. Writes to a table no relay reads, in a database of its own.

    eval "$(bash scripts/services.sh up)"
    target/writers-venv/bin/python writers/python/bench/batch_rate.py   # prints the median
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import time

import psycopg

from posthorn_writer import Event, Json, Outbox

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def batch() -> list[Event]:
    return [
        Event(
            "order",
            f"order-{i % 50}",
            "OrderShipped",
            Json({"order_id": i, "carrier": "DHL"}),
            headers={"traceparent": TRACEPARENT},
        )
        for i in range(1000)
    ]


def main() -> None:
    admin_url = os.environ["POSTHORN_TEST_DATABASE_URL"]
    name = f"posthorn_t_python_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTHORN_")}
    env.update(
        POSTHORN_DATABASE_URL=url,
        POSTHORN_KAFKA_BROKERS="127.0.0.1:9092",
        POSTHORN_TABLE="bench_outbox",
        POSTHORN_LOG="warn",
    )
    posthorn = os.environ.get("POSTHORN_BIN", "target/debug/posthorn")
    subprocess.run([posthorn, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    outbox = Outbox("public", "bench_outbox")
    overall, writes = [], []
    with psycopg.connect(url) as conn:
        for run in range(10):  # the first is a warm-up
            start = time.perf_counter()
            events = batch()
            built = time.perf_counter()
            with conn.transaction():
                outbox.enqueue_batch(conn, events)
            done = time.perf_counter()
            if run > 0:
                overall.append(len(events) / (done - start))
                writes.append(len(events) / (done - built))
    print(
        f"python: 9 transactions of 1000 events: median {statistics.median(overall):.0f} "
        f"events/s (build + enqueue_batch + commit; min {min(overall):.0f}, max "
        f"{max(overall):.0f}), median {statistics.median(writes):.0f} events/s "
        "(enqueue_batch + commit)"
    )


if __name__ == "__main__":
    main()
