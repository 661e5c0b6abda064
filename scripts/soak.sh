#!/usr/bin/env bash
# Soak: >= 1,000,000 rows through the real relay while it is SIGKILLed at random (>= 50 times)
# and restarted; prints rows lost, per-key order violations and duplicates, read from Kafka by
# a read_committed and a read_uncommitted consumer. Fails unless read_committed lost no row and
# reordered no key (and, with --delivery exactly-once, saw no duplicate either).
#   bash scripts/soak.sh                       # the full soak (release build), at least once
#   bash scripts/soak.sh --rows 20000 --kills 5  # any options of examples/soak.rs
#   bash scripts/soak.sh --tracking checkpoint   # POSTHORN_TRACKING (default rows)
#   bash scripts/soak.sh --delivery exactly-once # POSTHORN_DELIVERY: a Kafka transaction per
#                                                # batch; implies --tracking checkpoint (rows
#                                                # is refused)
# Not part of CI: scripts/test.sh runs smaller ones with the test build (20,000 rows and 5 kills
# at least once in each tracking mode; 200,000 rows and 50 kills exactly once).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
cargo build --release --locked --bin posthorn --example soak
exec target/release/examples/soak --posthorn target/release/posthorn "$@"
