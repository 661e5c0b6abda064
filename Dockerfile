# posthorn's container image: a build stage that compiles the relay, and a small Debian runtime
# stage with only the binary, the shared libraries it links (OpenSSL, zlib, glibc) and the CA
# certificates it needs for TLS to Postgres and Kafka.
#
#   docker build -t posthorn .
#   docker run --rm -e POSTHORN_DATABASE_URL=... -e POSTHORN_KAFKA_BROKERS=... posthorn check
#
# Both base images are build arguments, so a mirror or a locally made image can stand in for
# them (scripts/image.sh builds this file with buildah from images it makes with debootstrap).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# What rdkafka's bundled librdkafka needs to compile. The official rust image already has all
# of it (so nothing is installed there); a leaner Debian-based Rust image gets what it lacks.
RUN set -eux; \
    missing=""; \
    for p in build-essential pkg-config libssl-dev zlib1g-dev perl python3; do \
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $missing; \
        rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
# --locked: the dependencies are exactly Cargo.lock's. The release profile keeps line tables
# for backtraces; the image gets the binary without debug sections (66 MB -> 11 MB), its
# symbols kept so that a backtrace still names functions.
RUN cargo build --release --locked --bin posthorn \
    && strip --strip-debug -o /usr/local/bin/posthorn target/release/posthorn

FROM ${RUNTIME_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# libssl3: OpenSSL (sqlx's native TLS and librdkafka's SSL/SASL); zlib1g and libc are already
# in every Debian image. ca-certificates: the trust store for sslmode=require / SASL_SSL.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates libssl3; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    groupadd --gid 10001 posthorn; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin posthorn
COPY --from=build /usr/local/bin/posthorn /usr/local/bin/posthorn
LABEL org.opencontainers.image.title="posthorn" \
      org.opencontainers.image.description="Transactional-outbox relay: publishes committed Postgres outbox rows to Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# /metrics, /healthz and /readyz.
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/posthorn"]
CMD ["run"]
