#!/usr/bin/env bash
# posthorn-bench: throughput, latency and footprint next to the physical limit (not part of CI).
#   bash scripts/bench.sh                                  # everything, 1,000,000 rows, 3 runs
#   bash scripts/bench.sh --scenarios drain,limits --rows 200000 --runs 5
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
exec cargo bench --locked --bench posthorn-bench -- "$@"
