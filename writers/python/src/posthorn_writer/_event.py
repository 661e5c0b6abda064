"""Events and their payloads: one outbox row, checked against the table's rules when made."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

RESERVED_HEADERS = ("event-id", "event-type", "aggregate-type", "outbox-id", "content-type")
"""Header names posthorn sets on every record; an event's own headers may not use them."""


class WriteError(Exception):
    """Why an event was not written (database errors are psycopg's own)."""


class InvalidEvent(WriteError, ValueError):
    """The event breaks one of the outbox table's rules; nothing was sent to Postgres.

    ``field`` is the offending part (``aggregate_type``, ``aggregate_id``, ``event_type``,
    ``payload``, ``content_type``, ``topic`` or ``headers``); ``message`` is the same sentence the
    Rust writer reports.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid event: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Json:
    """The value is ``value`` as JSON, stored as ``jsonb``: Postgres' rendering, with its key
    order, is what Kafka receives (``content-type: application/json``). Serialized when made, so
    a value that is not JSON fails here."""

    value: Any
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            text = json.dumps(
                self.value, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            )
        except (TypeError, ValueError) as err:
            raise InvalidEvent(
                "payload", f"the payload cannot be serialized as JSON: {err}"
            ) from err
        object.__setattr__(self, "text", text)


@dataclass(frozen=True)
class Bytes:
    """The value is ``data``, published exactly as given (empty is an empty value, not a
    tombstone), with header ``content-type: <content_type>``, e.g. ``application/x-protobuf``."""

    data: bytes
    content_type: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", bytes(self.data))  # a bytearray or memoryview too


@dataclass(frozen=True)
class Tombstone:
    """No value: a Kafka tombstone (it deletes the key in a compacted topic), no content-type."""


Payload = Json | Bytes | Tombstone


@dataclass(frozen=True)
class Event:
    """One event, ready to be written: checked against the outbox table's rules when made
    (raising :class:`InvalidEvent` for the first problem, in the Rust writer's order), so writing
    it sends nothing the database would refuse.

    ``headers`` are Kafka headers; a ``traceparent`` here wins over the current span's.
    ``topic`` overrides the relay's ``POSTHORN_TOPIC_TEMPLATE``.
    """

    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Payload
    topic: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.payload, (Json, Bytes, Tombstone)):
            raise TypeError("payload must be Json(...), Bytes(...) or Tombstone()")
        for name in ("aggregate_type", "aggregate_id", "event_type"):
            value = getattr(self, name)
            if value == "":
                raise InvalidEvent(name, f"{name} must not be empty")
            _check_storable(name, value)
        if self.topic is not None and not _is_topic_name(self.topic):
            raise InvalidEvent(
                "topic",
                f"topic '{self.topic}' is not a Kafka topic name (use 1 to 249 of a-z, A-Z, 0-9, "
                "'.', '_' and '-', not '.' or '..')",
            )
        headers = dict(self.headers)
        # Name order, as the Rust writer's BTreeMap: the first problem is the same one.
        for name in sorted(headers):
            if name in RESERVED_HEADERS:
                raise InvalidEvent(
                    "headers",
                    f"header name '{name}' is reserved: posthorn sets it on every record",
                )
            _check_storable("headers", name)
            _check_storable("headers", headers[name])
        object.__setattr__(self, "headers", MappingProxyType(headers))  # frozen, as the rest
        if isinstance(self.payload, Json):
            if _has_nul_escape(self.payload.text):
                raise InvalidEvent(
                    "payload",
                    "the JSON payload contains the character U+0000, which Postgres' jsonb "
                    "cannot store",
                )
            _check_utf8("payload", self.payload.text, "the JSON payload")
        elif isinstance(self.payload, Bytes) and not _is_media_type(self.payload.content_type):
            raise InvalidEvent(
                "content_type",
                f"content_type '{self.payload.content_type}' is not a media type (for "
                "example 'application/x-protobuf' or 'text/plain; charset=utf-8')",
            )


def _check_storable(field_name: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field_name} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise InvalidEvent(
            field_name,
            f"{field_name} contains the character U+0000, which Postgres text cannot store",
        )
    _check_utf8(field_name, value, field_name)


def _check_utf8(field_name: str, value: str, what: str) -> None:
    """A Python str may hold lone surrogates, which UTF-8 (and so Postgres) cannot encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(
            field_name, f"{what} is not valid UTF-8, which Postgres text requires"
        ) from None


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("!#$&^_.+-")


def _is_topic_name(topic: str) -> bool:
    """Kafka's rule for topic names, as the SQL functions and the relay check it."""
    return 1 <= len(topic) <= 249 and topic not in (".", "..") and set(topic) <= _TOPIC_CHARS


def _is_media_type(content_type: str) -> bool:
    """RFC 6838 type and subtype names, then optional ``;`` parameters in printable ASCII; at
    most 255 bytes. The same rule as the table's ``content_type`` CHECK."""
    if len(content_type.encode("utf-8", "surrogatepass")) > 255:
        return False
    essence, semicolon, parameters = content_type.partition(";")
    if semicolon:
        essence = essence.rstrip(" ")
    type_name, slash, subtype_name = essence.partition("/")
    return (
        bool(slash)
        and _is_restricted_name(type_name)
        and _is_restricted_name(subtype_name)
        and all(" " <= c <= "~" for c in parameters)
    )


def _is_restricted_name(name: str) -> bool:
    """RFC 6838 ``restricted-name``."""
    return bool(name) and name[0] in _NAME_FIRST and set(name[1:]) <= _NAME_REST


def _has_nul_escape(text: str) -> bool:
    """Whether JSON text holds a ``\\u0000`` escape (``json.dumps`` writes U+0000 that way).
    Outside strings JSON has no backslashes, and inside them every backslash starts an escape, so
    skipping each escape's first two characters finds exactly the real ones."""
    i = text.find("\\")
    while i >= 0:
        if text.startswith("u0000", i + 1):
            return True
        i = text.find("\\", i + 2)
    return False
