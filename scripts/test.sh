#!/usr/bin/env bash
# The whole test suite, against real services that this script installs and starts if needed
# (PostgreSQL and Apache Kafka; see scripts/services.sh).
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
cargo fmt --check
cargo clippy --locked --all-targets --workspace -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
# posthorn-writer's opentelemetry feature (off by default), followed to a Kafka header.
cargo test --locked -p posthorn-writer --features opentelemetry --test opentelemetry 2>&1 |
  tee -a "$log"
# A small soak with the test build: the relay SIGKILLed and restarted under writers (the full
# one, 1,000,000 rows and 50 kills, is scripts/soak.sh).
for tracking in rows checkpoint; do
  target/debug/examples/soak --posthorn target/debug/posthorn --rows 20000 --keys 100 --kills 5 \
    --max-kill-interval-ms 800 --tracking "$tracking"
done
# And exactly once (a Kafka transaction per batch; checkpoint tracking), 50 SIGKILLs: its
# read_committed consumer must see no duplicate either (about 100 s).
target/debug/examples/soak --posthorn target/debug/posthorn --rows 200000 --keys 1000 --kills 50 \
  --delivery exactly-once
# The Go and Python writers (writers/), against the same services and the relay built above;
# its last line is `writers: N passed, N failed`.
POSTHORN_BIN="$PWD/target/debug/posthorn" bash scripts/test-writers.sh 2>&1 | tee -a "$log"
# One closing line for the whole run (cargo prints one per test binary, the last being the
# doc-tests').
awk '/^test result:/ { p += $4; f += $6 }
     /^writers: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
