"""The writer against real Postgres, through the real relay, to real Kafka."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Services, header, unique
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from order_shipped import handle_ship_request
from protobuf_event import CONTENT_TYPE, OrderShipped, order_shipped_event

from posthorn_writer import (
    Bytes,
    Event,
    InvalidEvent,
    InvalidName,
    Json,
    Outbox,
    Tombstone,
    enqueue,
    enqueue_async,
    enqueue_batch,
)

REPO = Path(__file__).resolve().parents[3]


def json_event(aggregate_type: str, value: Any) -> Event:
    return Event(aggregate_type, "order-42", "OrderShipped", Json(value))


def test_a_committed_event_is_published(services: Services, conn: psycopg.Connection[Any]) -> None:
    topic = unique("py_commit")
    with conn.transaction():
        event_id = enqueue(conn, json_event(topic, {"carrier": "DHL"}))
    (record,) = services.records(topic, 1)
    assert header(record, "event-id") == str(event_id)
    assert (record.key(), record.value()) == (b"order-42", b'{"carrier": "DHL"}')


async def test_a_committed_event_is_published_from_an_async_connection(
    services: Services,
) -> None:
    topic = unique("py_async")
    async with await psycopg.AsyncConnection.connect(services.url) as aconn, aconn.transaction():
        event_id = await enqueue_async(aconn, json_event(topic, [1, 2]))
    (record,) = services.records(topic, 1)
    assert (header(record, "event-id"), record.value()) == (str(event_id), b"[1, 2]")


def test_a_rolled_back_event_is_never_published(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    topic = unique("py_rollback")
    enqueue(conn, json_event(topic, "rolled back"))
    conn.rollback()
    # A later committed event on the same topic: once it is there, the rolled-back one, which
    # would have come first, is known never to come.
    with conn.transaction():
        enqueue(conn, json_event(topic, "committed"))
    services.wait_delivered(topic, 1)
    (record,) = services.records(topic, 1)
    assert record.value() == b'"committed"'


def test_a_batch_of_1000_is_one_statement_and_arrives_in_input_order(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    # Counts inserting statements per aggregate type: a statement-level trigger sees all the
    # rows one statement inserted.
    with conn.transaction():
        conn.execute("""
            CREATE TABLE IF NOT EXISTS insert_statements (aggregate_type text, n_rows bigint);
            CREATE OR REPLACE FUNCTION count_insert_statement() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO insert_statements
                SELECT aggregate_type, count(*) FROM new_rows GROUP BY 1;
                RETURN NULL;
            END $$;
            CREATE OR REPLACE TRIGGER count_insert_statement AFTER INSERT ON outbox
                REFERENCING NEW TABLE AS new_rows
                FOR EACH STATEMENT EXECUTE FUNCTION count_insert_statement();
        """)
    topic = unique("py_batch")
    # Five aggregates interleaved: input order holds within each and across the partition.
    events = [Event(topic, f"order-{i % 5}", "OrderShipped", Json({"seq": i})) for i in range(1000)]
    with conn.transaction():
        ids = enqueue_batch(conn, events)
    statements = conn.execute(
        "SELECT count(*), sum(n_rows) FROM insert_statements WHERE aggregate_type = %s", (topic,)
    ).fetchone()
    assert statements == (1, 1000)
    records = services.records(topic, 1000)
    assert [json.loads(r.value())["seq"] for r in records] == list(range(1000))
    assert [header(r, "event-id") for r in records] == [str(i) for i in ids]


def test_bytes_arrive_byte_exact(services: Services, conn: psycopg.Connection[Any]) -> None:
    topic = unique("py_bytes")
    services.create_topic(topic)
    values = [b"\xff\xfe\x00\xc3\x28\x80", b"", os.urandom(1 << 20)]
    events = [
        Event(topic, "order-42", "LabelPrinted", Bytes(v, "application/octet-stream"))
        for v in values
    ]
    with conn.transaction():
        enqueue_batch(conn, events)
    records = services.records(topic, len(values))
    assert [r.value() for r in records] == values
    assert all(header(r, "content-type") == "application/octet-stream" for r in records)


@pytest.fixture
def span() -> Any:
    """A current span of the SDK's tracer, child of a remote parent that has a tracestate."""
    parent = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("posthorn", "t61rcWkgMzE")]),
    )
    tracer = TracerProvider().get_tracer("posthorn-writer-test")
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    with tracer.start_as_current_span("ship order", context=context) as current:
        yield current


def test_the_trace_context_of_the_current_span_reaches_the_kafka_headers(
    services: Services, conn: psycopg.Connection[Any], span: Any
) -> None:
    topic = unique("py_trace")
    with conn.transaction():
        enqueue(conn, json_event(topic, 1))
    (record,) = services.records(topic, 1)
    context = span.get_span_context()
    assert context.span_id != 0x00F067AA0BA902B7, "a child span"
    assert header(record, "traceparent") == (
        f"00-4bf92f3577b34da6a3ce929d0e0e4736-{context.span_id:016x}-01"
    )
    assert header(record, "tracestate") == "posthorn=t61rcWkgMzE"


def headers_written(conn: psycopg.Connection[Any], event: Event) -> Any:
    event_id = enqueue(conn, event)
    row = conn.execute("SELECT headers FROM outbox WHERE event_id = %s", (event_id,)).fetchone()
    conn.rollback()
    return row[0] if row else "no row"


def test_an_explicit_traceparent_wins_over_the_current_span(
    conn: psycopg.Connection[Any], span: Any
) -> None:
    explicit = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = Event("order", "order-42", "E", Tombstone(), headers={"traceparent": explicit})
    # No tracestate of another trace.
    assert headers_written(conn, event) == {"traceparent": explicit}


def test_without_a_current_span_no_trace_headers_are_written(
    conn: psycopg.Connection[Any],
) -> None:
    assert headers_written(conn, Event("order", "order-42", "E", Tombstone())) is None


def test_events_are_written_to_the_configured_schema_and_table(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    services.migrate("sales", "order_events")
    event_id = Outbox("sales", "order_events").enqueue(conn, json_event("order", 1))
    found = conn.execute(
        "SELECT count(*) FROM sales.order_events WHERE event_id = %s", (event_id,)
    ).fetchone()
    conn.rollback()
    assert found == (1,)


@pytest.mark.parametrize(
    ("schema", "table"), [("Sales", "outbox"), ("public", 'out"box'), ("public", "1x"), ("", "t")]
)
def test_outbox_names_must_be_lowercase_identifiers(schema: str, table: str) -> None:
    with pytest.raises(InvalidName, match="is not a lowercase SQL identifier"):
        Outbox(schema, table)


def test_a_missing_table_says_to_run_posthorn_migrate(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.UndefinedTable) as missing:
        Outbox("public", "no_such_outbox").enqueue(conn, json_event("order", 1))
    conn.rollback()
    assert "run `posthorn migrate`" in " ".join(missing.value.__notes__)


def test_a_payload_that_cannot_be_json_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match="cannot be serialized as JSON") as refused:
        Json({"not json": object()})
    assert refused.value.field == "payload"
    with pytest.raises(InvalidEvent, match="cannot be serialized as JSON"):
        Json(float("nan"))


def test_text_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidEvent) as refused:
        Event("order", "order-\ud800", "E", Tombstone())
    assert str(refused.value) == (
        "invalid event: aggregate_id is not valid UTF-8, which Postgres text requires"
    )


def test_the_sqlalchemy_helper_writes_in_the_sessions_transaction(services: Services) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from posthorn_writer import sqlalchemy as outbox_session

    engine = create_engine(services.url.replace("postgres://", "postgresql+psycopg://", 1))
    topic = unique("py_sqlalchemy")
    with Session(engine) as session:
        outbox_session.enqueue(session, json_event(topic, "rolled back"))
        session.rollback()
        event_id = outbox_session.enqueue(session, json_event(topic, "committed"))
        assert (
            session.execute(
                text("SELECT count(*) FROM outbox WHERE aggregate_type = :t"), {"t": topic}
            ).scalar_one()
            == 1
        )
        session.commit()
    engine.dispose()
    (record,) = services.records(topic, 1)
    assert (header(record, "event-id"), record.value()) == (str(event_id), b'"committed"')


def test_the_order_shipped_example_is_published(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    order_id = unique("order")
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL, "
            "carrier text, version int NOT NULL DEFAULT 0)"
        )
        conn.execute("INSERT INTO orders (id, status) VALUES (%s, 'placed')", (order_id,))
    event_id = handle_ship_request(conn, order_id, "UPS")
    with pytest.raises(LookupError):
        handle_ship_request(conn, order_id, "UPS")
    record = services.record_with_event_id("order", str(event_id))
    assert record.key() == order_id.encode()
    assert json.loads(record.value()) == {"order_id": order_id, "carrier": "UPS"}


def test_the_protobuf_example_writes_the_vectors_bytes_and_is_published(
    services: Services, conn: psycopg.Connection[Any]
) -> None:
    event = order_shipped_event("order-42", "DHL", 2)
    # The bytes of the vector "protobuf bytes of OrderShipped{...}", as prost writes them.
    assert isinstance(event.payload, Bytes)
    assert event.payload.data.hex() == "0a086f726465722d3432120344484c1802"
    with conn.transaction():
        event_id = enqueue(conn, event)
    record = services.record_with_event_id("order", str(event_id))
    assert header(record, "content-type") == CONTENT_TYPE
    assert OrderShipped.FromString(record.value()).carrier == "DHL"


@pytest.mark.parametrize("example", ["order_shipped.py", "protobuf_event.py"])
def test_the_docs_quote_every_python_example_verbatim(example: str) -> None:
    docs = (REPO / "docs" / "writing-events.md").read_text()
    text = (REPO / "writers" / "python" / "examples" / example).read_text()
    assert text.rstrip("\n") in docs, f"docs/writing-events.md does not quote {example} as it is"


def test_an_events_headers_cannot_change_after_it_is_checked() -> None:
    headers = {"x-retry": "1"}
    event = Event("order", "order-42", "E", Tombstone(), headers=headers)
    headers["event-id"] = "sneaked in"
    assert dict(event.headers) == {"x-retry": "1"}
    with pytest.raises(TypeError):
        event.headers["event-id"] = "sneaked in"  # type: ignore[index]
