# virtbus worker image (with the publish CLI).
#
#   docker build -t virtbus .
#
# The worker must reach the host's libvirtd: mount its socket and run as root
# (the socket is root:libvirt 0770; add the container to the host's libvirt
# group with --group-add <gid> and a non-root --user to avoid root). See
# docker-compose.yml.

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static binaries: the runtime image has no Go and needs no libc match.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/virtbus-worker ./cmd/worker \
 && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/virtbus-publish ./cmd/publish

FROM debian:12-slim
# CA certificates for NATS over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The embedded NATS server's store, when VIRTBUS_NATS_URL is empty.
ENV VIRTBUS_STATE_DIR=/var/lib/virtbus
VOLUME ["/var/lib/virtbus"]
# Metrics, health and readiness (VIRTBUS_METRICS_ADDR, read-only, every
# interface by default).
EXPOSE 9480
# The command API (VIRTBUS_API_ADDR) listens on the container's loopback by
# default. To reach it from outside, set VIRTBUS_API_ADDR=:9481 and
# VIRTBUS_API_TOKEN_FILE (mount the token file read-only) and publish 9481.
# Root by default: see the top of this file.
USER root
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/virtbus-worker"]
