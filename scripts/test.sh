#!/usr/bin/env bash
# The whole test suite, against real services that this script installs and starts if needed.
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
cargo fmt --check
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
# posthorn-writer's opentelemetry feature (off by default), followed to a Kafka header.
cargo test --locked -p posthorn-writer --features opentelemetry --test opentelemetry 2>&1 |
  tee -a "$log"
# A small soak with the test build: the relay SIGKILLed and restarted under writers (the full
# one, 1,000,000 rows and 50 kills, is scripts/soak.sh).
target/debug/examples/soak --posthorn target/debug/posthorn --rows 20000 --keys 100 --kills 5 \
  --max-kill-interval-ms 800
# One closing line for the whole run (cargo prints one per test binary, the last being the
# doc-tests').
awk '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
