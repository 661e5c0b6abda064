#!/usr/bin/env bash
# The whole test suite, against real services that this script installs and starts if needed.
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/services.sh up)"
cargo fmt --check
cargo test --locked
