#!/usr/bin/env bash
# Builds the container image from the Dockerfile on a machine without a Docker engine or an
# image registry, then runs it against the local services (scripts/services.sh):
#   `posthorn check` on a fresh database, `posthorn migrate`, `posthorn run` in the background
#   while a writer commits outbox rows, delivery checked in Postgres (delivered_at) and in Kafka
#   (records consumed back), then SIGTERM. Prints the image size and the delivered-row count.
#
#   bash scripts/image.sh           build + smoke test (as root: debootstrap and chroot need it)
#   bash scripts/image.sh build     build only
#
# How, without Docker: Debian's buildah (vfs storage, chroot isolation: the container shares
# the host's network, so 127.0.0.1 reaches Postgres and the broker). Base images cannot be
# pulled, so this makes them with debootstrap and passes them through the Dockerfile's ARGs:
#   localhost/debian:bookworm-slim   minbase bookworm, slimmed like Docker's debian:*-slim
#   localhost/rust:bookworm-host     minbase bookworm + C toolchain and -dev packages; the Rust
#                                    toolchain is the host's, mounted read-only at build time
# Each is made once and reused while it exists (remove it with
# `buildah --storage-driver vfs rmi <name>` to remake it).
#
# Environment (all optional):
#   POSTHORN_IMAGE        the image to build (default localhost/posthorn:dev)
#   POSTHORN_IMAGE_CACHE  cargo registry and target dir kept between builds, mounted into the
#                         build stage (default /var/cache/posthorn-image; delete it for a
#                         build from nothing)
#   SMOKE_ROWS            rows the smoke test's writer commits (default 200)
#
# Layers are cached (--layers) and vfs stores each one whole: reclaim the space of superseded
# builds with `buildah --storage-driver vfs rmi --prune`.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${POSTHORN_IMAGE:-localhost/posthorn:dev}
CACHE_DIR=${POSTHORN_IMAGE_CACHE:-/var/cache/posthorn-image}
RUNTIME_BASE=localhost/debian:bookworm-slim
RUST_BASE=localhost/rust:bookworm-host
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SMOKE_ROWS=${SMOKE_ROWS:-200}

log() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
die() { echo "image: error: $*" >&2; exit 1; }
bh() { buildah --storage-driver vfs "$@"; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's chroot isolation need it)"

apt_updated=
apt_install() { # packages...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "Installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

image_exists() { bh inspect --type image "$1" >/dev/null 2>&1; }

# Slims a debootstrapped root like Docker's debian:*-slim images (debuerreotype): no manuals,
# documentation or translations, now or in packages installed later; apt keeps no .debs, no
# binary caches and no translated indexes. Also applies the suite's updates.
slim_rootfs() { # dir
  local root=${1:?}
  mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'APT::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # The same sources as the official image: the release, its updates and security.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # debootstrap installs the release as first published: bring it up to date with its
  # updates and security suites, as the official image is.
  # (Without /dev/pts in the chroot apt says it "Can not write log": harmless.)
  { chroot "$root" apt-get update -qq \
      && chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq; } \
    >>"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; die "apt-get upgrade in $root failed"; }
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/*
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  rm -rf "$root"/var/log/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
  # Device nodes are the runtime's to provide; a tar of them would not unpack unprivileged.
  rm -rf "$root"/dev/* "$root"/proc/* "$root"/sys/* "$root"/run/* "$root"/tmp/*
}

# debootstrap → slim → one-layer image. Extra packages go in at debootstrap time.
make_base_image() { # name [--include=...]
  local name=$1 include=${2:-} root tarball c
  root="$CACHE_DIR/rootfs-$(echo "$name" | tr '/:' '__')"
  tarball="$root.tar"
  log "Making base image $name with debootstrap ($SUITE${include:+, $include})"
  rm -rf "${root:?}" "$tarball"
  # shellcheck disable=SC2086  # $include is one optional word
  debootstrap --variant=minbase $include "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  slim_rootfs "$root"
  if [ "$name" = "$RUST_BASE" ]; then
    mkdir -p "$root/usr/local/rustup" "$root/usr/local/cargo/bin" "$root/usr/local/cargo/registry"
    # cargo fetches crates over HTTPS from inside the build stage. A host behind a
    # TLS-inspecting proxy trusts an extra CA (in /usr/local/share/ca-certificates): the local
    # build image trusts the same ones. The runtime image keeps Debian's trust store only.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
      chroot "$root" update-ca-certificates >/dev/null
    fi
  fi
  tar --numeric-owner --xattrs -C "$root" -cf "$tarball" .
  c=$(bh from scratch)
  bh add "$c" "$tarball" / >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$c"
  if [ "$name" = "$RUST_BASE" ]; then
    # The layout of the official rust image; the toolchain itself is mounted at build time.
    bh config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
      --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  fi
  bh commit --quiet --rm "$c" "$name" >/dev/null
  rm -rf "${root:?}" "$tarball" "$root.log"
}

build_image() {
  apt_install buildah debootstrap
  mkdir -p "$CACHE_DIR/cargo-registry" "$CACHE_DIR/target"
  image_exists "$RUNTIME_BASE" || make_base_image "$RUNTIME_BASE"
  image_exists "$RUST_BASE" || make_base_image "$RUST_BASE" \
    --include=build-essential,pkg-config,libssl-dev,zlib1g-dev,perl,python3,ca-certificates

  local rustup_home=${RUSTUP_HOME:-$HOME/.rustup} cargo_home=${CARGO_HOME:-$HOME/.cargo}
  [ -x "$cargo_home/bin/cargo" ] && [ -d "$rustup_home/toolchains" ] \
    || die "no Rust toolchain in $cargo_home and $rustup_home (install Rust with rustup first)"
  log "Building $IMAGE (Dockerfile, RUST_IMAGE=$RUST_BASE, RUNTIME_IMAGE=$RUNTIME_BASE)"
  local started=$SECONDS
  # The toolchain is the host's, read-only. The registry and target dir are host directories so
  # that a rebuild recompiles only what changed; they never end up in a layer.
  bh bud --isolation chroot --layers \
    --build-arg RUST_IMAGE="$RUST_BASE" --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    -v "$rustup_home:/usr/local/rustup:ro" \
    -v "$cargo_home/bin:/usr/local/cargo/bin:ro" \
    -v "$CACHE_DIR/cargo-registry:/usr/local/cargo/registry" \
    -v "$CACHE_DIR/target:/src/target" \
    -t "$IMAGE" . >&2
  log "Built $IMAGE in $((SECONDS - started)) s"
}

image_size() { bh images --format '{{.Size}}' "$IMAGE" | head -n 1; }

# --- the smoke test -----------------------------------------------------------------------

# Pids of the processes below $1 (children first, then theirs).
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1"); do
    echo "$child"
    descendants "$child"
  done
}

# Runs posthorn from the image the way a container runtime would: the image's ENTRYPOINT with
# the given arguments, as the image's USER, with the environment set on the container.
in_image() { # container args...
  local c=$1
  shift
  bh run --isolation chroot "$c" -- "${entrypoint[@]}" "$@"
}

# The working container and the relay, for cleanup on any exit.
c="" relay="" relay_pid=""

# SIGTERM goes to posthorn itself (the process buildah runs in the chroot, below $relay), as a
# container runtime would deliver it.
find_relay_pid() {
  local pid
  for pid in $(descendants "$relay"); do
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = posthorn ]; then
      relay_pid=$pid
      return 0
    fi
  done
  return 1
}

cleanup() {
  if [ -n "$relay" ] && [ -z "$relay_pid" ]; then find_relay_pid || true; fi
  if [ -n "$relay_pid" ]; then kill -TERM "$relay_pid" 2>/dev/null || true; fi
  if [ -n "$relay" ]; then wait "$relay" 2>/dev/null || true; fi
  if [ -n "$c" ]; then bh rm "$c" >/dev/null 2>&1 || true; fi
}

psql_q() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

smoke_test() {
  log "Services: PostgreSQL and the broker on loopback"
  eval "$(bash scripts/services.sh up)"
  command -v psql >/dev/null || apt_install postgresql-client
  python3 -c 'import kafka' 2>/dev/null \
    || python3 -m pip install -q -r tests/cross_client/requirements.txt

  local run_id db db_url topic
  run_id=$(date +%s)-$$
  db="posthorn_image_${run_id//-/_}"
  db_url="postgres://postgres:postgres@127.0.0.1:5432/$db"
  topic="posthorn-image-$run_id.order"

  log "Image configuration"
  local config
  config=$(bh inspect --type image --format \
    'user={{.OCIv1.Config.User}} entrypoint={{.OCIv1.Config.Entrypoint}} cmd={{.OCIv1.Config.Cmd}} exposed={{range $p, $_ := .OCIv1.Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")
  echo "$config"
  mapfile -t entrypoint < <(bh inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
  [ "${entrypoint[*]}" = /usr/local/bin/posthorn ] || die "unexpected ENTRYPOINT: ${entrypoint[*]}"
  case "$config" in
    *"user=10001:10001 "*"cmd=[run] exposed=9187/tcp"*) ;;
    *) die "unexpected image configuration: $config" ;;
  esac

  psql_q "$POSTHORN_TEST_DATABASE_URL" -c "CREATE DATABASE $db"
  c=$(bh from --quiet --name "posthorn-smoke-$run_id" "$IMAGE")
  trap cleanup EXIT
  bh config --env POSTHORN_DATABASE_URL="$db_url" \
    --env POSTHORN_KAFKA_BROKERS="$POSTHORN_TEST_KAFKA_BROKERS" \
    --env POSTHORN_TOPIC_TEMPLATE="posthorn-image-$run_id.{aggregate_type}" \
    --env POSTHORN_POLL_INTERVAL_MS=250 "$c"
  echo "runs as: $(bh run --isolation chroot "$c" -- id)"

  log "posthorn check (fresh database: the table is missing, so this must fail)"
  local status=0
  in_image "$c" check || status=$?
  [ "$status" = 1 ] || die "posthorn check on an unmigrated database exited $status, expected 1"
  echo "(exit status $status, as expected)"

  log "posthorn migrate"
  in_image "$c" migrate

  log "posthorn check"
  in_image "$c" check

  log "Creating topic $topic (3 partitions)"
  python3 - "$POSTHORN_TEST_KAFKA_BROKERS" "$topic" <<'PY'
import sys
from kafka.admin import KafkaAdminClient, NewTopic
admin = KafkaAdminClient(bootstrap_servers=sys.argv[1])
admin.create_topics([NewTopic(sys.argv[2], num_partitions=3, replication_factor=1)])
admin.close()
PY

  log "posthorn run (from the image, in the background)"
  local relay_log="$CACHE_DIR/smoke-$run_id.log"
  in_image "$c" run 2>"$relay_log" &
  relay=$!
  local i
  for ((i = 0; i < 100; i++)); do
    find_relay_pid && break
    sleep 0.1
  done
  [ -n "$relay_pid" ] || die "posthorn did not start (log: $relay_log)"
  echo "posthorn is pid $relay_pid (below buildah pid $relay)"

  log "A writer commits $SMOKE_ROWS outbox rows in transactions of 10 (and rolls one back)"
  local n_tx=$((SMOKE_ROWS / 10))
  {
    for ((t = 0; t < n_tx; t++)); do
      echo "BEGIN;"
      echo "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
            SELECT 'order', 'order-' || (n % 7), 'OrderPlaced',
                   jsonb_build_object('tx', $t, 'n', n)
            FROM generate_series(1, 10) AS n;"
      echo "COMMIT;"
      if [ "$t" = 3 ]; then
        echo "BEGIN; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
              VALUES ('order', 'order-rolled-back', 'Never', '{}'); ROLLBACK;"
      fi
    done
  } | psql_q "$db_url"
  local committed=$((n_tx * 10))

  log "Waiting for every row to be marked delivered"
  local delivered=0
  for ((i = 0; i < 600; i++)); do
    delivered=$(psql_q "$db_url" -c "SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL")
    [ "$delivered" = "$committed" ] && break
    sleep 0.1
  done
  psql -X "$db_url" -c "SELECT count(*) AS rows, count(delivered_at) AS delivered,
                               count(*) FILTER (WHERE delivered_at IS NULL) AS pending
                        FROM outbox"
  [ "$delivered" = "$committed" ] || die "only $delivered of $committed rows delivered (log: $relay_log)"

  log "Consuming $topic from the beginning (kafka-python)"
  local consumed
  consumed=$(python3 - "$POSTHORN_TEST_KAFKA_BROKERS" "$topic" "$committed" <<'PY'
import sys, time
from kafka import KafkaConsumer, TopicPartition
brokers, topic, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
consumer = KafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False)
tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
consumer.assign(tps)
consumer.seek_to_beginning(*tps)
event_ids, keys, records = set(), set(), 0
deadline = time.monotonic() + 60
while len(event_ids) < expected and time.monotonic() < deadline:
    for batch in consumer.poll(timeout_ms=200).values():
        for record in batch:
            records += 1
            keys.add(record.key)
            event_ids.update(v for k, v in record.headers if k == "event-id")
consumer.close()
print(f"{records} records, {len(event_ids)} distinct event-ids, {len(keys)} keys", file=sys.stderr)
if b"order-rolled-back" in keys:
    sys.exit("a rolled-back row was published")
print(len(event_ids))
PY
)
  [ "$consumed" = "$committed" ] || die "consumed $consumed distinct events, expected $committed"

  log "Stopping posthorn with SIGTERM"
  kill -TERM "$relay_pid"
  status=0
  wait "$relay" || status=$?
  tail -n 3 "$relay_log"
  relay="" relay_pid=""
  [ "$status" = 0 ] || die "posthorn exited $status after SIGTERM (log: $relay_log)"
  grep -q "Relay stopped." "$relay_log" || die "no 'Relay stopped.' in $relay_log"
  echo "exit status 0"

  psql_q "$POSTHORN_TEST_DATABASE_URL" -c "DROP DATABASE $db"
  rm -f "$relay_log"

  log "Result"
  echo "image $IMAGE: $(image_size)"
  local mnt
  mnt=$(bh mount "$c")
  echo "largest parts of the image's filesystem:"
  du -sh "$mnt/usr/local/bin/posthorn" "$mnt/usr/lib/x86_64-linux-gnu" "$mnt/usr/bin" \
    "$mnt/usr/sbin" "$mnt/usr/share" "$mnt/usr/lib/locale" "$mnt/var/lib/dpkg" "$mnt/etc" \
    2>/dev/null | sed "s|$mnt||"
  du -sh "$mnt"/usr/lib/x86_64-linux-gnu/{libcrypto,libssl}.so.3 "$mnt"/usr/lib/x86_64-linux-gnu/libc.so.6 \
    2>/dev/null | sed "s|$mnt||"
  bh umount "$c" >/dev/null
  echo "delivered rows: $delivered of $committed committed (Postgres), $consumed consumed from Kafka"
}

case "${1:-all}" in
  build) build_image; echo "image $IMAGE: $(image_size)" ;;
  all) build_image; smoke_test ;;
  *) die "usage: $0 [all|build]" ;;
esac
