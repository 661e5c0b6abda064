"""The shared test vectors (writers/vectors): this writer writes exactly the row each event case
lists, or refuses it with exactly the error, as the Rust writer and the SQL functions do; and the
relay publishes exactly the records of records.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Services, unique

from posthorn_writer import (
    Bytes,
    Event,
    InvalidEvent,
    Json,
    Tombstone,
    enqueue,
    enqueue_batch,
    enqueue_batch_async,
)

VECTORS = Path(__file__).resolve().parents[2] / "vectors"
# How every writer's tests read rows back, so that they compare the same text.
ROW_QUERY = (
    "SELECT aggregate_type, aggregate_id, event_type, payload::text AS payload, "
    "encode(payload_bytes, 'hex') AS payload_bytes_hex, content_type, topic, "
    "headers::text AS headers FROM outbox ORDER BY id"
)
ROW_FIELDS = [
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "payload_bytes_hex",
    "content_type",
    "topic",
    "headers",
]


def cases(file: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((VECTORS / file).read_text())["cases"]
    return cases


EVENT_CASES = cases("events.json")
VALID = [c for c in EVENT_CASES if "row" in c]


def build(event: dict[str, Any]) -> Event:
    payload = event["payload"]
    if payload == "tombstone":
        made: Json | Bytes | Tombstone = Tombstone()
    elif "json" in payload:
        made = Json(payload["json"])
    else:
        made = Bytes(bytes.fromhex(payload["bytes"]["hex"]), payload["bytes"]["content_type"])
    return Event(
        event["aggregate_type"],
        event["aggregate_id"],
        event["event_type"],
        made,
        topic=event.get("topic"),
        headers=dict(event.get("headers", [])),  # a later pair replaces an earlier one
    )


def rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [dict(zip(ROW_FIELDS, row, strict=True)) for row in conn.execute(ROW_QUERY)]


def test_the_vectors_cover_at_least_fifty_events() -> None:
    assert len(EVENT_CASES) >= 50
    assert len(VALID) >= 20


@pytest.mark.parametrize("case", EVENT_CASES, ids=[c["name"] for c in EVENT_CASES])
def test_every_event_is_made_or_refused_as_its_vector_says(case: dict[str, Any]) -> None:
    if "row" in case:
        build(case["event"])
        return
    with pytest.raises(InvalidEvent) as refused:
        build(case["event"])
    assert (refused.value.field, refused.value.message) == (
        case["error"]["field"],
        case["error"]["message"],
    )
    assert str(refused.value) == "invalid event: " + case["error"]["message"]


def test_enqueue_writes_exactly_each_vectors_row(conn: psycopg.Connection[Any]) -> None:
    for case in VALID:
        enqueue(conn, build(case["event"]))
        assert rows(conn) == [case["row"]], case["name"]
        conn.rollback()  # the relay never sees these rows


def test_enqueue_batch_on_a_cursor_writes_the_vectors_rows_in_input_order(
    conn: psycopg.Connection[Any],
) -> None:
    with conn.cursor() as cur:
        ids = enqueue_batch(cur, [build(c["event"]) for c in VALID])
    assert len(ids) == len(VALID)
    assert rows(conn) == [c["row"] for c in VALID]
    conn.rollback()


async def test_enqueue_batch_async_on_a_cursor_writes_the_vectors_rows_in_input_order(
    services: Services,
) -> None:
    async with await psycopg.AsyncConnection.connect(services.url) as aconn:
        async with aconn.cursor() as acur:
            ids = await enqueue_batch_async(acur, [build(c["event"]) for c in VALID])
        assert len(ids) == len(VALID)
        cur = await aconn.execute(ROW_QUERY)
        got = [dict(zip(ROW_FIELDS, row, strict=True)) for row in await cur.fetchall()]
        await aconn.rollback()
    assert got == [c["row"] for c in VALID]


def test_the_relay_publishes_exactly_the_vectors_records(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    record_cases = cases("records.json")
    topic = unique("python-vectors")
    # The topic is the test's own; it is not part of the record vectors.
    events = [build({**c["event"], "topic": topic}) for c in record_cases]
    with conn.transaction():
        ids = [str(i) for i in enqueue_batch(conn, events)]
    outbox_ids = dict(conn.execute("SELECT event_id::text, id::text FROM outbox").fetchall())
    records = services.records(topic, len(record_cases))
    for case, event_id, message in zip(record_cases, ids, records, strict=True):
        headers = []
        for name, value in message.headers() or []:
            text = value.decode()
            if name == "event-id" and text == event_id:
                text = "{event_id}"
            elif name == "outbox-id" and text == outbox_ids[event_id]:
                text = "{outbox_id}"
            headers.append([name, text])
        value = message.value()
        got = {
            "key": message.key().decode(),
            "value_hex": None if value is None else value.hex(),
            "headers": headers,
        }
        assert got == case["record"], case["name"]
