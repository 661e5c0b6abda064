#!/usr/bin/env bash
# Runs one Apache Kafka node (KRaft, combined broker + controller) in the foreground: the one
# place that knows how to configure, format and start a node. scripts/services.sh starts the
# shared broker with it; the tests' `KafkaCluster` (tests/it/support.rs) starts clusters of
# their own with it.
#
#   scripts/kafka-node.sh DIR NODE_ID BROKER_PORT CONTROLLER_PORT VOTERS CLUSTER_ID
#
#   DIR          the node's directory: server.properties, log4j2.properties, server.log,
#                meta/ (the KRaft metadata log) and data/ (partitions). Kept between runs: a
#                restart keeps the node's records. Remove data/ to give it an empty disk.
#   VOTERS       the controller quorum, `1@127.0.0.1:9093` or `1@...,2@...,3@...`; its size
#                sets the replication defaults (3 or more: factor 3, min.insync.replicas 2).
#   CLUSTER_ID   the same for every node of a cluster (`... random-uuid` prints one).
#
#   scripts/kafka-node.sh random-uuid
#
# Environment: POSTHORN_TEST_KAFKA_HOME (required; its libs/ holds the jars that
# scripts/services.sh fetched from Maven Central), POSTHORN_KAFKA_HEAP (default 512m),
# JAVA (default java).
#
# Notes, learnt on these machines (Kafka 4.4.0, OpenJDK 17, 2 cores):
# - Kafka 4 has no ZooKeeper mode. A static quorum (`controller.quorum.voters`) is formatted
#   without `--standalone`, by the same command on every node.
# - The metadata log lives apart from the partitions (`metadata.log.dir`), so wiping a
#   broker's data (a lost disk) leaves its controller's Raft log intact; the data directory is
#   formatted again (`--ignore-formatted` formats only what is not) before the node starts.
# - A node takes about 3-5 s from `java` to answering requests, and ~350 MB of memory.
set -euo pipefail

die() { echo "kafka-node: error: $*" >&2; exit 2; }

: "${POSTHORN_TEST_KAFKA_HOME:?POSTHORN_TEST_KAFKA_HOME must name the Kafka directory (scripts/services.sh env prints it)}"
JAVA=${JAVA:-java}
CLASSPATH="$POSTHORN_TEST_KAFKA_HOME/libs/*"

if [ "${1:-}" = random-uuid ]; then
  exec "$JAVA" -cp "$CLASSPATH" kafka.tools.StorageTool random-uuid
fi
[ $# -eq 6 ] || die "usage: $0 DIR NODE_ID BROKER_PORT CONTROLLER_PORT VOTERS CLUSTER_ID"
dir=$1 node_id=$2 broker_port=$3 controller_port=$4 voters=$5 cluster_id=$6

n_voters=$(tr ',' '\n' <<<"$voters" | grep -c .)
if [ "$n_voters" -ge 3 ]; then replication=3 min_isr=2; else replication=1 min_isr=1; fi

mkdir -p "$dir/meta" "$dir/data"
cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$broker_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$broker_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
metadata.log.dir=$dir/meta
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$replication
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replication
transaction.state.log.replication.factor=$replication
transaction.state.log.min.isr=$min_isr
group.initial.rebalance.delay.ms=0
# Small machines: fewer threads than the defaults, and no fsync beyond the OS's.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
EOF
cat >"$dir/log4j2.properties" <<EOF
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
EOF

"$JAVA" -cp "$CLASSPATH" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
  kafka.tools.StorageTool format --ignore-formatted --cluster-id="$cluster_id" \
  --config="$dir/server.properties" \
  >>"$dir/format.log" 2>&1 || die "formatting $dir failed: see $dir/format.log"

heap=${POSTHORN_KAFKA_HEAP:-512m}
exec "$JAVA" "-Xms$heap" "-Xmx$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
  -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/log4j2.properties" \
  -cp "$CLASSPATH" kafka.Kafka "$dir/server.properties"
