#!/usr/bin/env bash
# Installs (when absent) and starts the services posthorn talks to, on loopback:
#   - PostgreSQL (Debian package), postgres://postgres:postgres@127.0.0.1:5432
#   - nisshi 0.8.1, a Kafka-protocol broker from crates.io, on 127.0.0.1:9092
# Idempotent: what is installed is reused, what is running is left running.
#
# Usage: scripts/services.sh up      install + start, then print the environment to use
#        scripts/services.sh env     print the environment only (export lines)
#        scripts/services.sh down    stop the broker this script started
#
# Environment (all optional):
#   POSTHORN_TOOLS_DIR   where the broker is installed (default /opt/posthorn-tools as root,
#                        ~/.local/share/posthorn-tools otherwise); kept between runs, because
#                        the first build takes about 15 minutes on 2 cores.
#   POSTHORN_STATE_DIR   logs and pid files (default /tmp/posthorn-services)
#   POSTHORN_PG_PORT     PostgreSQL port (default 5432)
#   POSTHORN_BROKER_PORT broker port (default 9092)
#   POSTHORN_RESTART_PG_PORT port of a second PostgreSQL cluster, "posthorn_restart", that tests
#                        stop and start (default 5433): restarting it disturbs no other test
set -euo pipefail

NISSHI_VERSION=0.8.1
if [ "$(id -u)" = 0 ]; then default_tools=/opt/posthorn-tools; else default_tools="$HOME/.local/share/posthorn-tools"; fi
TOOLS_DIR=${POSTHORN_TOOLS_DIR:-$default_tools}
STATE_DIR=${POSTHORN_STATE_DIR:-/tmp/posthorn-services}
PG_PORT=${POSTHORN_PG_PORT:-5432}
BROKER_PORT=${POSTHORN_BROKER_PORT:-9092}
RESTART_PG_PORT=${POSTHORN_RESTART_PG_PORT:-5433}
RESTART_CLUSTER=posthorn_restart
NISSHI="$TOOLS_DIR/bin/nisshi"

log() { echo "services: $*" >&2; }
die() { echo "services: error: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  die "$3 did not open port $1 within $2 s"
}

sudo_maybe() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() { # packages...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then sudo_maybe apt-get update -qq >&2; apt_updated=1; fi
  sudo_maybe env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

ensure_build_deps() {
  # What rdkafka's bundled librdkafka needs to build.
  apt_install build-essential pkg-config libssl-dev zlib1g-dev perl python3
}

ensure_postgres() {
  command -v pg_lsclusters >/dev/null 2>&1 || apt_install postgresql
  local line version cluster
  line=$(pg_lsclusters --no-header | head -n 1)
  [ -n "$line" ] || die "no PostgreSQL cluster found (pg_lsclusters printed nothing)"
  read -r version cluster _ <<<"$line"
  if ! pg_lsclusters --no-header | awk -v v="$version" -v c="$cluster" '$1==v && $2==c && $4=="online"' | grep -q .; then
    log "starting PostgreSQL $version/$cluster"
    sudo_maybe pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start >&2
  fi
  wait_port "$PG_PORT" 30 PostgreSQL
  # Tests and the demo log in with a password over TCP.
  sudo_maybe su postgres -c "psql -q -p $PG_PORT -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
}

pg_version() { pg_lsclusters --no-header | head -n 1 | awk '{print $1}'; }

ensure_restartable_postgres() {
  local version
  version=$(pg_version)
  if ! pg_lsclusters --no-header | awk -v c="$RESTART_CLUSTER" '$2==c' | grep -q .; then
    log "creating PostgreSQL cluster $version/$RESTART_CLUSTER on port $RESTART_PG_PORT (for restart tests)"
    sudo_maybe pg_createcluster "$version" "$RESTART_CLUSTER" --port "$RESTART_PG_PORT" >/dev/null
  fi
  if ! port_open "$RESTART_PG_PORT"; then
    sudo_maybe pg_ctlcluster --skip-systemctl-redirect "$version" "$RESTART_CLUSTER" start >&2
  fi
  wait_port "$RESTART_PG_PORT" 30 "PostgreSQL ($RESTART_CLUSTER)"
  sudo_maybe su postgres -c "psql -q -p $RESTART_PG_PORT -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
}

rustc_is_at_least() { # minor version of 1.x
  local v
  v=$(rustc --version | awk '{print $2}')
  [ "$(echo "$v" | cut -d. -f2)" -ge "$1" ]
}

ensure_broker_installed() {
  if [ -x "$NISSHI" ]; then return 0; fi
  command -v cargo >/dev/null 2>&1 || die "cargo is needed to install the broker (install Rust first)"
  local toolchain=()
  if ! rustc_is_at_least 96; then
    if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
      toolchain=(+nightly)
    else
      die "nisshi $NISSHI_VERSION needs rustc >= 1.96; install one (rustup toolchain install nightly)"
    fi
  fi
  log "installing nisshi $NISSHI_VERSION into $TOOLS_DIR (about 15 minutes the first time)"
  mkdir -p "$TOOLS_DIR"
  cargo "${toolchain[@]}" install nisshi --version "$NISSHI_VERSION" --locked \
    --no-default-features --features dynostore,postgres --root "$TOOLS_DIR" >&2
}

ensure_broker_running() {
  if port_open "$BROKER_PORT"; then return 0; fi
  mkdir -p "$STATE_DIR"
  log "starting nisshi on 127.0.0.1:$BROKER_PORT (log: $STATE_DIR/broker.log)"
  nohup "$NISSHI" broker \
    --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --storage-engine memory://nisshi/ \
    --group-initial-rebalance-delay 0s \
    >"$STATE_DIR/broker.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/broker.pid"
  wait_port "$BROKER_PORT" 30 nisshi
}

print_env() {
  cat <<EOF
export POSTHORN_TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$PG_PORT/postgres
export POSTHORN_TEST_KAFKA_BROKERS=127.0.0.1:$BROKER_PORT
export POSTHORN_NISSHI=$NISSHI
export POSTHORN_TEST_RESTARTABLE_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$RESTART_PG_PORT/postgres
export POSTHORN_TEST_RESTART_POSTGRES="pg_ctlcluster --skip-systemctl-redirect $(pg_version) $RESTART_CLUSTER"
EOF
}

case "${1:-up}" in
  up)
    ensure_build_deps
    ensure_postgres
    ensure_restartable_postgres
    ensure_broker_installed
    ensure_broker_running
    log "PostgreSQL on 127.0.0.1:$PG_PORT and the broker on 127.0.0.1:$BROKER_PORT are up"
    print_env
    ;;
  env) print_env ;;
  down)
    if [ -f "$STATE_DIR/broker.pid" ]; then
      kill "$(cat "$STATE_DIR/broker.pid")" 2>/dev/null || true
      rm -f "$STATE_DIR/broker.pid"
      log "broker stopped"
    fi
    ;;
  *) die "usage: $0 [up|env|down]" ;;
esac
