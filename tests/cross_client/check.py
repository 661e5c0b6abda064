#!/usr/bin/env python3
"""End-to-end check of posthorn's contracts with clients posthorn did not write.

Writers: psycopg 3 (libpq), several threads, each event in its own transaction, serialized per
aggregate the way a service would (SELECT ... FOR UPDATE, bump the version, insert the outbox
row); about one transaction in 8 inserts its row and then rolls back.
Consumer: kafka-python, a pure-Python implementation of the Kafka protocol (not librdkafka),
with manual partition assignment from the beginning of every partition and no group commits.

The relay (`posthorn run`) must already be running against CHECK_DATABASE_URL.

Environment:
  CHECK_DATABASE_URL   a fresh database with the outbox table migrated (required)
  CHECK_KAFKA_BROKERS  bootstrap servers, e.g. 127.0.0.1:9092 (required)
  CHECK_TOPIC          the topic, already created (required); also the rows' aggregate_type
  CHECK_N              events to attempt (default 2000)
  CHECK_WRITERS        writer threads (default 4)
  CHECK_AGGREGATES     aggregates (default 40)
  CHECK_DEADLINE_S     deadline for consuming and for every row to be marked (default 120)
  CHECK_SEED           random seed (default: random; printed)
  CHECK_ISOLATION      the consumer's isolation level: read_uncommitted (default) or
                       read_committed (for a relay with POSTHORN_DELIVERY=exactly-once)

Prints one line per check, then `cross-client: N passed, M failed`; exits 1 if any failed.
"""

import json
import os
import random
import sys
import threading
import time
import traceback
import uuid
from collections import defaultdict

import psycopg
from psycopg.types.json import Jsonb
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

EVENT_TYPE = "Bumped"
ROLLBACK_ONE_IN = 8
EXPECTED_HEADERS = {"event-id", "event-type", "aggregate-type", "outbox-id", "content-type", "lang"}
EXAMPLES = 5  # failures listed per check


def log(msg):
    print(msg, flush=True)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, problems, ok_detail=""):
        """`problems`: a list of strings; empty means the check passed."""
        if problems:
            self.failed += 1
            shown = "; ".join(str(p) for p in problems[:EXAMPLES])
            more = f" (+{len(problems) - EXAMPLES} more)" if len(problems) > EXAMPLES else ""
            log(f"FAIL {name}: {len(problems)} problem(s): {shown}{more}")
        else:
            self.passed += 1
            log(f"ok   {name}" + (f": {ok_detail}" if ok_detail else ""))


class Config:
    def __init__(self, env):
        missing = [v for v in ("CHECK_DATABASE_URL", "CHECK_KAFKA_BROKERS", "CHECK_TOPIC") if not env.get(v)]
        if missing:
            raise SystemExit(f"check.py: missing environment variable(s): {', '.join(missing)}")
        self.database_url = env["CHECK_DATABASE_URL"]
        self.brokers = env["CHECK_KAFKA_BROKERS"].split(",")
        self.topic = env["CHECK_TOPIC"]
        self.n = int(env.get("CHECK_N", "2000"))
        self.writers = int(env.get("CHECK_WRITERS", "4"))
        self.aggregates = int(env.get("CHECK_AGGREGATES", "40"))
        self.deadline_s = float(env.get("CHECK_DEADLINE_S", "120"))
        self.seed = int(env["CHECK_SEED"]) if env.get("CHECK_SEED") else random.randrange(2**32)
        self.isolation = env.get("CHECK_ISOLATION", "read_uncommitted")


# ---------------------------------------------------------------------------------------------
# Writing


class Written:
    """What the writers did, keyed by the event's unique n."""

    def __init__(self):
        self.lock = threading.Lock()
        self.committed = {}  # n -> (aggregate id, version, outbox id, event_id)
        self.rolled_back = {}  # n -> aggregate id
        self.errors = []


def write_events(cfg, agg_ids):
    written = Written()
    counter = iter(range(1, cfg.n + 1))
    counter_lock = threading.Lock()

    def next_n():
        with counter_lock:
            return next(counter, None)

    def writer(w):
        rng = random.Random(cfg.seed * 1000 + w)
        try:
            with psycopg.connect(cfg.database_url) as conn:
                while (n := next_n()) is not None:
                    agg = rng.choice(agg_ids)
                    roll_back = rng.randrange(ROLLBACK_ONE_IN) == 0
                    with conn.cursor() as cur:
                        # psycopg opens a transaction at the first statement (autocommit off).
                        cur.execute("SELECT version FROM aggregates WHERE id = %s FOR UPDATE", (agg,))
                        (current,) = cur.fetchone()
                        version = current + 1
                        cur.execute("UPDATE aggregates SET version = %s WHERE id = %s", (version, agg))
                        cur.execute(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) "
                            "VALUES (%s, %s, %s, %s, %s) RETURNING id, event_id",
                            (cfg.topic, agg, EVENT_TYPE, Jsonb({"version": version, "n": n}), Jsonb({"lang": "python"})),
                        )
                        outbox_id, event_id = cur.fetchone()
                    if roll_back:
                        conn.rollback()
                        with written.lock:
                            written.rolled_back[n] = agg
                    else:
                        conn.commit()
                        with written.lock:
                            written.committed[n] = (agg, version, outbox_id, event_id)
        except Exception as e:  # reported as a failed check
            with written.lock:
                written.errors.append(f"writer {w}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=writer, args=(w,), name=f"writer-{w}") for w in range(cfg.writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return written


# ---------------------------------------------------------------------------------------------
# Consuming


def consume(cfg, expected_ns, deadline):
    """Reads the topic from the beginning of every partition until every n in `expected_ns` was
    seen and then every partition is read to the end offset it had at that moment; or until
    `deadline`. Returns (records in consumption order, partitions, notes)."""
    consumer = KafkaConsumer(
        bootstrap_servers=cfg.brokers,
        client_id="posthorn-cross-client-check",
        group_id=None,  # manual assignment, nothing committed anywhere
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=cfg.isolation,
    )
    notes = []
    try:
        while True:
            partitions = consumer.partitions_for_topic(cfg.topic)
            if partitions:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {cfg.topic} has no partitions in the broker's metadata")
            time.sleep(0.1)
        tps = [TopicPartition(cfg.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        begins = consumer.beginning_offsets(tps)
        if any(o != 0 for o in begins.values()):
            notes.append(f"beginning offsets are not 0: {begins}")

        records = []
        seen_ns = set()
        ends = None
        while True:
            if ends is None and expected_ns <= seen_ns:
                ends = consumer.end_offsets(tps)
            if ends is not None and all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                notes.append(
                    "deadline reached while consuming: "
                    + ("not every committed event arrived" if ends is None else f"end offsets {ends} not reached")
                )
                break
            batch = consumer.poll(timeout_ms=200)
            for tp in sorted(batch, key=lambda tp: tp.partition):
                for rec in batch[tp]:
                    records.append(rec)
                    try:
                        seen_ns.add(json.loads(rec.value)["n"])
                    except Exception:
                        pass  # reported by the value check
        return records, sorted(partitions), notes
    finally:
        consumer.close()


# ---------------------------------------------------------------------------------------------
# Checking


def parse_record(rec):
    """(n or None, decoded key, header dict, header problems, value problem)."""
    key = rec.key.decode("utf-8") if rec.key is not None else None
    headers = {}
    header_problems = []
    for name, value in rec.headers or []:
        if name in headers:
            header_problems.append(f"header {name!r} repeated")
        headers[name] = value.decode("utf-8") if value is not None else None
    n, value_problem = None, None
    if rec.value is None:
        value_problem = "no value"
    else:
        try:
            value = json.loads(rec.value)
            n = value.get("n") if isinstance(value, dict) else None
            if not isinstance(n, int):
                value_problem = f"value has no integer n: {rec.value!r}"
                n = None
        except ValueError:
            value_problem = f"value is not JSON: {rec.value!r}"
    return n, key, headers, header_problems, value_problem


def at(rec):
    return f"{rec.partition}@{rec.offset}"


def run_checks(cfg, checks, written, rows, records, partitions, notes):
    committed, rolled_back = written.committed, written.rolled_back
    parsed = [(rec,) + parse_record(rec) for rec in records]

    # What was consumed: every committed event, nothing rolled back or unknown, once each.
    arrivals = defaultdict(list)  # n -> [record]
    unknown = []
    for rec, n, *_ in parsed:
        if n is None or (n not in committed and n not in rolled_back):
            unknown.append(f"record {at(rec)} (n={n})")
        if n is not None:
            arrivals[n].append(rec)
    missing = sorted(set(committed) - set(arrivals))
    checks.check(
        "every committed event arrived",
        notes + [f"n={n} (aggregate {committed[n][0]} version {committed[n][1]})" for n in missing],
        f"{len(committed)} of {len(committed)}",
    )
    invented = sorted(n for n in arrivals if n in rolled_back)
    checks.check(
        "no rolled-back event arrived",
        [f"n={n} (aggregate {rolled_back[n]}) at {at(arrivals[n][0])}" for n in invented]
        + [f"unknown {u}" for u in unknown],
        f"none of {len(rolled_back)} rolled-back events, no unknown records",
    )
    dups = sorted(n for n, recs in arrivals.items() if len(recs) > 1)
    checks.check(
        "no duplicates",
        [f"n={n} arrived {len(arrivals[n])} times at {', '.join(at(r) for r in arrivals[n])}" for n in dups],
        f"{len(records)} records, {len(arrivals)} distinct events",
    )

    # Per aggregate: versions exactly 1, 2, 3, ... in consumption order, all in one partition.
    per_key = defaultdict(list)  # key -> [(partition, version as the record's value says)]
    for rec, n, key, *_ in parsed:
        if n in committed:
            per_key[key].append((rec.partition, json.loads(rec.value).get("version")))
    expected_counts = defaultdict(int)
    for agg, _, _, _ in committed.values():
        expected_counts[agg] += 1
    order_problems = []
    for agg in sorted(set(per_key) | set(expected_counts), key=str):
        seq = [v for _, v in per_key.get(agg, [])]
        want = list(range(1, expected_counts.get(agg, 0) + 1))
        if seq != want:
            first = next((i for i, (a, b) in enumerate(zip(seq, want)) if a != b), min(len(seq), len(want)))
            order_problems.append(
                f"aggregate {agg}: {len(seq)} versions, want 1..{len(want)}, first difference at position "
                f"{first}: {seq[max(0, first - 2):first + 3]}"
            )
        parts = {p for p, _ in per_key.get(agg, [])}
        if len(parts) > 1:
            order_problems.append(f"aggregate {agg} spread over partitions {sorted(parts)}")
    checks.check(
        "per aggregate, versions arrive as exactly 1,2,3,... in order",
        order_problems,
        f"{len(expected_counts)} aggregates, {min(expected_counts.values(), default=0)}.."
        f"{max(expected_counts.values(), default=0)} versions each",
    )

    # Each record against the row it came from, as psycopg reads it back.
    key_problems, value_problems, header_problems, partition_problems = [], [], [], []
    for rec, n, key, headers, hp, vp in parsed:
        if vp:
            value_problems.append(f"record {at(rec)}: {vp}")
        row = rows.get(n) if n is not None else None
        if row is None:
            continue  # unknown or rolled back: reported above
        if rec.topic != cfg.topic:
            key_problems.append(f"record {at(rec)} on topic {rec.topic!r}")
        if key != row["aggregate_id"]:
            key_problems.append(f"record {at(rec)} n={n}: key {key!r}, aggregate id {row['aggregate_id']!r}")
        if vp is None:
            value = json.loads(rec.value)
            agg, version, _, _ = committed[n]
            if value != {"version": version, "n": n}:
                value_problems.append(f"record {at(rec)}: value {value}, written {{'version': {version}, 'n': {n}}}")
            if rec.value.decode("utf-8") != row["payload_text"]:
                value_problems.append(
                    f"record {at(rec)}: value bytes {rec.value!r} differ from Postgres's rendering "
                    f"{row['payload_text']!r}"
                )
        problems = list(hp)
        if set(headers) != EXPECTED_HEADERS:
            problems.append(f"header names {sorted(headers)}, want {sorted(EXPECTED_HEADERS)}")
        event_id = headers.get("event-id")
        try:
            if event_id is None or str(uuid.UUID(event_id)) != event_id:
                problems.append(f"event-id {event_id!r} is not a UUID in canonical form")
        except ValueError:
            problems.append(f"event-id {event_id!r} is not a UUID")
        want = {
            "event-id": str(row["event_id"]),
            "event-type": EVENT_TYPE,
            "aggregate-type": cfg.topic,
            "outbox-id": str(row["id"]),
            "content-type": "application/json",
            "lang": "python",
        }
        for name, value in want.items():
            if headers.get(name) != value:
                problems.append(f"{name} {headers.get(name)!r}, want {value!r}")
        header_problems.extend(f"record {at(rec)} n={n}: {p}" for p in problems)
        if key is not None:
            java_partition = partitions[(murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % len(partitions)]
            if rec.partition != java_partition:
                partition_problems.append(
                    f"key {key!r} on partition {rec.partition}, Java's default partitioner says {java_partition}"
                )
    checks.check("key == aggregate id, on the topic", key_problems, "every record")
    checks.check(
        "value parses as the JSON written (and is Postgres's jsonb text)", value_problems, "every record"
    )
    checks.check(
        "headers: event-id (= row's event_id), event-type, aggregate-type, outbox-id (= row's id), "
        "content-type=application/json, lang=python",
        header_problems,
        "every record",
    )
    checks.check(
        "partition == Java default (murmur2) partitioner's choice for the key",
        sorted(set(partition_problems)),
        f"{len(partitions)} partitions",
    )


# Rows neither marked (POSTHORN_TRACKING=rows) nor covered by the checkpoint row
# (POSTHORN_TRACKING=checkpoint): the same definition in either mode.
UNDELIVERED = (
    "SELECT id, aggregate_id, attempts, last_error FROM outbox AS o "
    "WHERE o.delivered_at IS NULL AND NOT EXISTS ("
    " SELECT 1 FROM outbox_checkpoint AS c"
    " WHERE pg_visible_in_snapshot(o.txid, c.snapshot)"
    " OR (c.window_end IS NOT NULL AND pg_visible_in_snapshot(o.txid, c.window_end)"
    " AND o.id <= c.position)) "
    "ORDER BY id"
)


def read_rows(conn):
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::text, headers, "
            "delivered_at FROM outbox ORDER BY id"
        )
        rows = {}
        extra = []
        for id_, event_id, agg_type, agg_id, event_type, payload_text, headers, delivered_at in cur:
            try:
                n = json.loads(payload_text)["n"]
            except Exception:
                extra.append(id_)
                continue
            rows[n] = {
                "id": id_,
                "event_id": event_id,
                "aggregate_type": agg_type,
                "aggregate_id": agg_id,
                "event_type": event_type,
                "payload_text": payload_text,
                "headers": headers,
                "delivered_at": delivered_at,
            }
        return rows, extra


def main():
    cfg = Config(os.environ)
    checks = Checks()
    started = time.monotonic()
    log(
        f"cross-client check: topic {cfg.topic}, {cfg.n} events, {cfg.writers} writer threads, "
        f"{cfg.aggregates} aggregates, seed {cfg.seed}; psycopg {psycopg.__version__} "
        f"(libpq {psycopg.pq.version()}, {psycopg.pq.__impl__}), kafka-python {__import__('kafka').__version__}"
    )
    try:
        agg_ids = [f"py-agg-{i:02d}" for i in range(cfg.aggregates)]
        with psycopg.connect(cfg.database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE aggregates (id text PRIMARY KEY, version int NOT NULL DEFAULT 0)")
            conn.execute("INSERT INTO aggregates (id) SELECT unnest(%s::text[])", (agg_ids,))

        t0 = time.monotonic()
        written = write_events(cfg, agg_ids)
        log(
            f"info wrote {len(written.committed)} committed and {len(written.rolled_back)} rolled-back "
            f"events in {time.monotonic() - t0:.1f} s"
        )

        with psycopg.connect(cfg.database_url, autocommit=True) as conn:
            # The writers' own bookkeeping and the table agree (checked before the relay's work).
            rows, extra = read_rows(conn)
            write_problems = list(written.errors)
            if len(written.committed) + len(written.rolled_back) != cfg.n and not written.errors:
                write_problems.append(
                    f"{len(written.committed)} + {len(written.rolled_back)} transactions, want {cfg.n}"
                )
            if not written.rolled_back:
                write_problems.append("no transaction rolled back: the check would prove nothing about them")
            if set(rows) != set(written.committed) or extra:
                write_problems.append(
                    f"outbox holds {len(rows)} rows (+{len(extra)} unparsable), {len(written.committed)} committed; "
                    f"rolled back but present: {sorted(set(rows) & set(written.rolled_back))[:EXAMPLES]}"
                )
            for n, (agg, version, outbox_id, event_id) in written.committed.items():
                row = rows.get(n)
                if row and (row["id"], row["event_id"], row["aggregate_id"]) != (outbox_id, event_id, agg):
                    write_problems.append(f"n={n}: row {row} differs from what INSERT ... RETURNING said")
            final_versions = dict(conn.execute("SELECT id, version FROM aggregates").fetchall())
            counts = defaultdict(int)
            for agg, _, _, _ in written.committed.values():
                counts[agg] += 1
            for agg in agg_ids:
                if final_versions[agg] != counts[agg]:
                    write_problems.append(f"aggregate {agg}: version {final_versions[agg]}, {counts[agg]} commits")
            checks.check(
                "writes: the outbox holds exactly the committed events",
                write_problems,
                f"{len(rows)} rows; {len(written.rolled_back)} rolled back "
                f"(1 in {cfg.n / max(1, len(written.rolled_back)):.1f})",
            )

            deadline = time.monotonic() + cfg.deadline_s
            t0 = time.monotonic()
            records, partitions, notes = consume(cfg, set(written.committed), deadline)
            log(
                f"info consumed {len(records)} records from {len(partitions)} partitions "
                f"in {time.monotonic() - t0:.1f} s"
            )

            run_checks(cfg, checks, written, rows, records, partitions, notes)

            # The relay marks a row after Kafka acknowledged it: allow it to catch up.
            while True:
                undelivered = conn.execute(UNDELIVERED).fetchall()
                if not undelivered or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            (total,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
            checks.check(
                "every outbox row ends delivered (delivered_at set, or covered by the checkpoint)",
                [f"row id={i} aggregate {a} attempts={att} last_error={err!r}" for i, a, att, err in undelivered],
                f"{total} of {total}",
            )
    except Exception:
        traceback.print_exc()
        checks.check("the check ran to completion", ["exception (traceback above)"])

    log(f"info took {time.monotonic() - started:.1f} s")
    log(f"cross-client: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
