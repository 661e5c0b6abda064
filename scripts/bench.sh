#!/usr/bin/env bash
# posthorn-bench: throughput, latency and footprint next to the physical limit (not part of CI).
#   bash scripts/bench.sh                                  # everything, 1,000,000 rows, 3 runs
#   bash scripts/bench.sh --scenarios drain,limits --rows 200000 --runs 5
#   bash scripts/bench.sh --scenarios wal,drain,limits,steady,plan --rates 1000 --rows 200000 --runs 3
# Each scenario runs per tracking mode (--tracking rows,checkpoint, the default), the modes'
# runs interleaved. It needs its own databases (posthorn_bench_*, dropped after each run) and
# superuser rights for CHECKPOINT and pg_walinspect (the wal scenario).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
exec cargo bench --locked --bench posthorn-bench -- "$@"
