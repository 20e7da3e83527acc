# mqfleet: one small non-root image holding every binary — mqfleet-proxy (the default
# entrypoint), mqfleet-shard and mqfleet-loadtest. Build: `docker build -t mqfleet:dev .`
#
# Stage 1 compiles with the pinned toolchain; stage 2 is a slim Debian with only the C library
# the binaries link (TLS is rustls: no OpenSSL) and an unprivileged user. The Helm chart runs it
# with a read-only root filesystem; state lives in Redis and on the shards' volumes.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p proxy -p broker-shard -p loadtest --bins \
 && mkdir -p /out \
 && cp target/release/mqfleet-proxy target/release/mqfleet-shard target/release/mqfleet-loadtest /out/

FROM debian:${DEBIAN_RELEASE}-slim
RUN groupadd --gid 10001 mqfleet \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mqfleet \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /data
# MQTT, MQTT/TLS, WebSocket, secure WebSocket, HTTP (health, metrics), shard link.
EXPOSE 1883 8883 8083 8084 18083 7883
ENTRYPOINT ["/usr/local/bin/mqfleet-proxy"]
