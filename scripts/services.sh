#!/usr/bin/env bash
# Installs (when absent) and starts the services posthorn talks to, on loopback:
#   - PostgreSQL (Debian package), postgres://postgres:postgres@127.0.0.1:5432
#   - Apache Kafka 4.4.0 (KRaft: one combined broker + controller) on 127.0.0.1:9092, its jars
#     fetched from Maven Central by Maven, run on Java 17 (both from Debian's packages if absent)
# Idempotent: what is installed is reused, what is running is left running.
#
# Usage: scripts/services.sh up      install + start, then print the environment to use
#        scripts/services.sh env     print the environment only (export lines)
#        scripts/services.sh down    stop the broker this script started and delete its data
#                                    (the next `up` starts an empty one)
#
# Environment (all optional):
#   POSTHORN_TOOLS_DIR   where Kafka's jars are kept between runs (default /opt/posthorn-tools
#                        as root, ~/.local/share/posthorn-tools otherwise)
#   POSTHORN_STATE_DIR   the broker's data and log, pid files (default /tmp/posthorn-services)
#   POSTHORN_PG_PORT     PostgreSQL port (default 5432)
#   POSTHORN_BROKER_PORT broker port (default 9092)
#   POSTHORN_CONTROLLER_PORT the broker's KRaft controller port (default 9093)
#   POSTHORN_RESTART_PG_PORT port of a second PostgreSQL cluster, "posthorn_restart", that tests
#                        stop and start (default 5433): restarting it disturbs no other test
set -euo pipefail
cd "$(dirname "$0")/.."

KAFKA_VERSION=4.4.0
LOG4J_VERSION=2.25.5
if [ "$(id -u)" = 0 ]; then default_tools=/opt/posthorn-tools; else default_tools="$HOME/.local/share/posthorn-tools"; fi
TOOLS_DIR=${POSTHORN_TOOLS_DIR:-$default_tools}
STATE_DIR=${POSTHORN_STATE_DIR:-/tmp/posthorn-services}
PG_PORT=${POSTHORN_PG_PORT:-5432}
BROKER_PORT=${POSTHORN_BROKER_PORT:-9092}
CONTROLLER_PORT=${POSTHORN_CONTROLLER_PORT:-9093}
RESTART_PG_PORT=${POSTHORN_RESTART_PG_PORT:-5433}
RESTART_CLUSTER=posthorn_restart
KAFKA_HOME="$TOOLS_DIR/kafka-$KAFKA_VERSION"

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

java_major() { # the major version of `java`, 0 if there is none
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == 1 ? v[2] : v[1]); exit }'
}

ensure_java() {
  [ "$(java_major)" -ge 17 ] || apt_install openjdk-17-jre-headless
  [ "$(java_major)" -ge 17 ] || die "Kafka $KAFKA_VERSION needs Java 17 or later; java is $(java_major)"
}

# Apache Kafka's jars with their runtime dependencies, from Maven Central: the distribution's
# tarball is in no registry these machines reach, and its scripts only wrap `java -cp libs/*`.
ensure_kafka_installed() {
  if [ -f "$KAFKA_HOME/libs/.complete" ]; then return 0; fi
  command -v mvn >/dev/null 2>&1 || apt_install maven
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once)"
  mkdir -p "$KAFKA_HOME"
  cat >"$KAFKA_HOME/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>posthorn.tools</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- The broker logs through slf4j 1.7: this routes it to log4j2 (to a file). -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  rm -rf "$KAFKA_HOME/libs"
  mvn -q -B -Dstyle.color=never -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$KAFKA_HOME/libs" >&2 || die "fetching Kafka's jars with Maven failed"
  touch "$KAFKA_HOME/libs/.complete"
}

broker_ready() { # timeout in seconds
  python3 scripts/kafka-ready.py "127.0.0.1:$BROKER_PORT" 1 "$1"
}

ensure_broker_running() {
  if port_open "$BROKER_PORT" && broker_ready 2 2>/dev/null; then return 0; fi
  local node=$STATE_DIR/kafka
  mkdir -p "$node"
  [ -s "$node/cluster-id" ] ||
    POSTHORN_TEST_KAFKA_HOME=$KAFKA_HOME bash scripts/kafka-node.sh random-uuid >"$node/cluster-id"
  log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$BROKER_PORT (log: $node/server.log)"
  POSTHORN_TEST_KAFKA_HOME=$KAFKA_HOME nohup bash scripts/kafka-node.sh "$node" 1 "$BROKER_PORT" \
    "$CONTROLLER_PORT" "1@127.0.0.1:$CONTROLLER_PORT" "$(cat "$node/cluster-id")" \
    >"$node/stdout.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/broker.pid"
  if ! broker_ready 90; then
    tail -n 20 "$node/stdout.log" "$node/server.log" >&2 2>/dev/null || true
    die "Kafka did not answer a metadata request within 90 s"
  fi
}

print_env() {
  cat <<EOF
export POSTHORN_TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$PG_PORT/postgres
export POSTHORN_TEST_KAFKA_BROKERS=127.0.0.1:$BROKER_PORT
export POSTHORN_TEST_KAFKA_HOME=$KAFKA_HOME
export POSTHORN_TEST_RESTARTABLE_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$RESTART_PG_PORT/postgres
export POSTHORN_TEST_RESTART_POSTGRES="pg_ctlcluster --skip-systemctl-redirect $(pg_version) $RESTART_CLUSTER"
EOF
}

case "${1:-up}" in
  up)
    ensure_build_deps
    ensure_postgres
    ensure_restartable_postgres
    ensure_java
    ensure_kafka_installed
    ensure_broker_running
    log "PostgreSQL on 127.0.0.1:$PG_PORT and the broker on 127.0.0.1:$BROKER_PORT are up"
    print_env
    ;;
  env) print_env ;;
  down)
    if [ -f "$STATE_DIR/broker.pid" ]; then
      pid=$(cat "$STATE_DIR/broker.pid")
      kill "$pid" 2>/dev/null || true
      for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$STATE_DIR/broker.pid"
      log "broker stopped"
    fi
    rm -rf "$STATE_DIR/kafka"
    ;;
  *) die "usage: $0 [up|env|down]" ;;
esac
