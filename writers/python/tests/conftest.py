"""Test support: a database of this test run's own, migrated by the real posthorn binary, one
``posthorn run`` relaying it to the real Kafka, and a confluent-kafka consumer to read what
arrived. Every test writes to topics of its own, so tests do not see each other's records."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[3]
# The relay's largest record: the 1 MiB tests need more than librdkafka's default.
MAX_MESSAGE_BYTES = 2097152


def unique(prefix: str) -> str:
    """``prefix_<random hex>``: a database or topic name no other run uses."""
    return f"{prefix}_{secrets.token_hex(6)}"


def posthorn_bin() -> str:
    return os.environ.get("POSTHORN_BIN", str(REPO / "target" / "debug" / "posthorn"))


def required(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f'{var} is not set: eval "$(bash scripts/services.sh up)"', pytrace=False)
    return value


@dataclass
class Services:
    url: str
    brokers: str

    def relay_env(self, **extra: str) -> dict[str, str]:
        # Without the tests' own POSTHORN_TEST_* variables, which the relay would warn about.
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTHORN_")}
        env.update(
            POSTHORN_DATABASE_URL=self.url,
            POSTHORN_KAFKA_BROKERS=self.brokers,
            POSTHORN_LOG="warn",
            **extra,
        )
        return env

    def migrate(self, schema: str = "public", table: str = "outbox") -> None:
        subprocess.run(
            [posthorn_bin(), "migrate"],
            env=self.relay_env(POSTHORN_SCHEMA=schema, POSTHORN_TABLE=table),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url)

    def wait_delivered(self, aggregate_type: str, n: int) -> None:
        """Waits until the relay marked n rows of aggregate_type delivered and none is pending."""
        deadline = time.monotonic() + 60
        with self.connect() as conn:
            while True:
                delivered, pending = conn.execute(
                    "SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL), "
                    "count(*) FILTER (WHERE delivered_at IS NULL) "
                    "FROM outbox WHERE aggregate_type = %s",
                    (aggregate_type,),
                ).fetchone() or (0, 0)
                conn.rollback()
                if delivered >= n and pending == 0:
                    return
                assert time.monotonic() < deadline, f"{delivered} of {n} delivered in 60 s"
                time.sleep(0.05)

    def records(self, topic: str, n: int) -> list[Message]:
        """The first n records of topic's only partition; fails after 60 s."""
        return self._read(topic, lambda records: len(records) >= n)[:n]

    def record_with_event_id(self, topic: str, event_id: str) -> Message:
        """Reads topic from its start until the record with header event-id: event_id."""
        records = self._read(topic, lambda rs: bool(rs) and header(rs[-1], "event-id") == event_id)
        return records[-1]

    def _read(self, topic: str, done: Callable[[list[Message]], bool]) -> list[Message]:
        """Records of topic's only partition from its start until done says so; fails after
        60 s."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.brokers,
                "group.id": unique("posthorn-writer-python"),
                "enable.auto.commit": False,
                "topic.metadata.refresh.interval.ms": 200,
            }
        )
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records: list[Message] = []
        deadline = time.monotonic() + 60
        try:
            while not done(records):
                assert time.monotonic() < deadline, f"{len(records)} records of {topic} in 60 s"
                message = consumer.poll(0.1)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    # The relay has not created the topic yet.
                    assert error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART, error
                    continue
                records.append(message)
        finally:
            consumer.close()
        return records

    def create_topic(self, topic: str) -> None:
        """A one-partition topic whose records may be up to MAX_MESSAGE_BYTES."""
        admin = AdminClient({"bootstrap.servers": self.brokers})
        new = NewTopic(topic, 1, 1, config={"max.message.bytes": str(MAX_MESSAGE_BYTES)})
        admin.create_topics([new])[topic].result(timeout=30)


def header(message: Message, name: str) -> str | None:
    for key, value in message.headers() or []:
        if key == name:
            return None if value is None else value.decode()
    return None


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    admin_url = required("POSTHORN_TEST_DATABASE_URL")
    brokers = required("POSTHORN_TEST_KAFKA_BROKERS")
    name = unique("posthorn_t_python")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    s = Services(url=admin_url.rsplit("/", 1)[0] + "/" + name, brokers=brokers)
    s.migrate()
    relay = subprocess.Popen(
        [posthorn_bin(), "run"],
        env=s.relay_env(
            POSTHORN_TOPIC_TEMPLATE="{aggregate_type}",
            POSTHORN_POLL_INTERVAL_MS="100",
            POSTHORN_HTTP_ADDR="127.0.0.1:0",
            POSTHORN_KAFKA_MESSAGE_MAX_BYTES=str(MAX_MESSAGE_BYTES),
        ),
    )
    try:
        yield s
    finally:
        relay.kill()
        relay.wait()


@pytest.fixture
def conn(services: Services) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose transaction the test commits or rolls back itself."""
    with services.connect() as c:
        yield c
