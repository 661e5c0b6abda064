#!/usr/bin/env bash
# The main job, end to end: services up, schema migrated, the relay running, a sample service
# writing outbox rows in its transactions, and a Kafka consumer showing them arrive in order.
#
#   bash scripts/demo.sh            (ORDERS=20 EVENTS_PER_ORDER=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."

ORDERS=${ORDERS:-20}
EVENTS_PER_ORDER=${EVENTS_PER_ORDER:-5}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Services: PostgreSQL and Apache Kafka on loopback"
eval "$(bash scripts/services.sh up)"

say "Building posthorn and the demo programs"
cargo build --locked --bins --examples 2>&1 | tail -n 1
bin=target/debug

run_id=$(date +%s)
db=posthorn_demo
export POSTHORN_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$db"
export POSTHORN_KAFKA_BROKERS="$POSTHORN_TEST_KAFKA_BROKERS"
export POSTHORN_TOPIC_TEMPLATE="posthorn-demo-$run_id.{aggregate_type}"
topic="posthorn-demo-$run_id.order"
psql -q "$POSTHORN_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>&1 | grep -v NOTICE || true
"$bin/examples/tail" --brokers "$POSTHORN_KAFKA_BROKERS" --topic "$topic" --create-partitions 3

say "posthorn migrate"
"$bin/posthorn" migrate

say "posthorn check"
"$bin/posthorn" check

say "posthorn run (in the background; log: target/demo-relay.log)"
"$bin/posthorn" run 2>target/demo-relay.log &
relay=$!
trap 'kill $relay 2>/dev/null || true' EXIT

say "A sample service writes $((ORDERS * EVENTS_PER_ORDER)) order events, one transaction each (every tenth rolls back)"
committed=$("$bin/examples/sample_writer" --orders "$ORDERS" --events-per-order "$EVENTS_PER_ORDER" | tee /dev/stderr | tail -n 1)

say "A Kafka consumer reads topic $topic"
"$bin/examples/tail" --brokers "$POSTHORN_KAFKA_BROKERS" --topic "$topic" --expect "$committed" --timeout-secs 60

say "Stopping the relay (SIGTERM)"
kill -TERM $relay
wait $relay
trap - EXIT
tail -n 3 target/demo-relay.log
psql -q "$POSTHORN_DATABASE_URL" -c "SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL) AS delivered, count(*) FILTER (WHERE delivered_at IS NULL) AS undelivered FROM outbox"
say "Done: $committed committed events were published and consumed in per-key order."
