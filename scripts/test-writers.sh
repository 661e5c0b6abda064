#!/usr/bin/env bash
# The Go and Python writers (writers/go, writers/python): their linters and their tests against
# the running services, the shared vectors (writers/vectors) included. scripts/test.sh runs it;
# on its own:
#
#   eval "$(bash scripts/services.sh up)"; cargo build --bin posthorn; bash scripts/test-writers.sh
#
# Needs POSTHORN_TEST_DATABASE_URL and POSTHORN_TEST_KAFKA_BROKERS (scripts/services.sh prints
# them) and the relay binary POSTHORN_BIN (default target/debug/posthorn). Go modules come from
# the module proxy, Python packages from PyPI into a venv under target/writers-venv (reinstalled
# only when writers/python/pyproject.toml changes). The last line is
# `writers: N passed, N failed`, over go test and pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${POSTHORN_TEST_DATABASE_URL:?not set: eval \"\$(bash scripts/services.sh up)\" first}"
: "${POSTHORN_TEST_KAFKA_BROKERS:?not set: eval \"\$(bash scripts/services.sh up)\" first}"
export POSTHORN_BIN="${POSTHORN_BIN:-$PWD/target/debug/posthorn}"
if [[ ! -x "$POSTHORN_BIN" ]]; then
  echo "test-writers: no relay binary at $POSTHORN_BIN (cargo build --bin posthorn)" >&2
  echo "writers: 0 passed, 1 failed"
  exit 1
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
checks_failed=0
check() { # check NAME COMMAND...: runs a linter; a failure fails the run
  if ! "${@:2}" >"$logs/$1.log" 2>&1; then
    echo "test-writers: $1 failed:" >&2
    cat "$logs/$1.log" >&2
    checks_failed=$((checks_failed + 1))
  fi
}

# Go.
(cd writers/go && go mod download) || checks_failed=$((checks_failed + 1))
unformatted=$(cd writers/go && gofmt -l .)
if [[ -n "$unformatted" ]]; then
  echo "test-writers: gofmt -l lists: $unformatted" >&2
  checks_failed=$((checks_failed + 1))
fi
check go-vet bash -c 'cd writers/go && go vet ./...'
(cd writers/go && go test -count=1 -json ./... >"$logs/go-test.json" 2>"$logs/go-test.err")
read -r go_passed go_failed < <(python3 - "$logs/go-test.json" <<'PY'
import json, sys
passed = failed = 0
for line in open(sys.argv[1]):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if event.get("Action") == "output" and event.get("Test") is None:
        continue
    if event.get("Test") and event.get("Action") == "pass":
        passed += 1
    elif event.get("Action") == "fail" and (event.get("Test") or not passed):
        failed += 1
print(passed, failed)
PY
)
if ((go_failed > 0)) || [[ ! -s "$logs/go-test.json" ]]; then
  python3 - "$logs/go-test.json" <<'PY' >&2
import json, sys
for line in open(sys.argv[1]):
    try:
        event = json.loads(line)
    except ValueError:
        print(line, end="")
        continue
    if event.get("Action") == "output":
        print(event["Output"], end="")
PY
  cat "$logs/go-test.err" >&2
  ((go_failed > 0)) || go_failed=1
fi
echo "test-writers: go test: $go_passed passed, $go_failed failed" >&2

# Python.
venv=target/writers-venv
stamp="$venv/.pyproject.$(sha256sum writers/python/pyproject.toml | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q -e 'writers/python[test]' &&
    touch "$stamp" || checks_failed=$((checks_failed + 1))
fi
check ruff-check bash -c "cd writers/python && ../../$venv/bin/ruff check --no-cache ."
check ruff-format bash -c "cd writers/python && ../../$venv/bin/ruff format --no-cache --check ."
check mypy bash -c "cd writers/python && ../../$venv/bin/mypy --no-incremental"
(cd writers/python && "../../$venv/bin/pytest" -q -p no:cacheprovider >"$logs/pytest.log" 2>&1)
summary=$(tail -n 1 "$logs/pytest.log")
py_passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
py_failed=$(($(grep -oE '[0-9]+ (failed|error|errors)' <<<"$summary" | grep -oE '[0-9]+' | paste -sd+ - || echo 0) + 0))
if ((py_failed > 0)) || ((py_passed == 0)); then
  cat "$logs/pytest.log" >&2
  ((py_failed > 0)) || py_failed=1
fi
echo "test-writers: pytest: $py_passed passed, $py_failed failed" >&2

passed=$((go_passed + py_passed))
failed=$((go_failed + py_failed))
echo "writers: $passed passed, $((failed + checks_failed)) failed"
((failed + checks_failed == 0))
