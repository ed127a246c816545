# virtbus worker image (with the publish CLI).
#
#   docker build -t virtbus .
#
# The worker runs as an unprivileged user (virtbus, uid and gid 10001) and
# reaches the host's libvirtd through its socket, which is root:libvirt 0770:
# mount the host's /run/libvirt directory and add the container to the host's
# libvirt group by number (--group-add "$(stat -c %g /run/libvirt/libvirt-sock)";
# a group name would be looked up in this image, which has no libvirt group,
# and the gid differs from host to host). See docker-compose.yml.

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
# A fixed uid and gid, numeric below, so a runtime can tell the user is not
# root without reading /etc/passwd (Kubernetes' runAsNonRoot) and a host can
# grant it files by number.
RUN groupadd --system --gid 10001 virtbus \
 && useradd --system --uid 10001 --gid virtbus --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin virtbus \
 && install -d -o virtbus -g virtbus -m 0700 /var/lib/virtbus
COPY --from=build /out/ /usr/local/bin/
# The embedded NATS server's store, when VIRTBUS_NATS_URL is empty. Owned by
# virtbus above, so a new volume mounted here starts out writable by it (the
# runtime copies the ownership), also with a read-only root file system.
ENV VIRTBUS_STATE_DIR=/var/lib/virtbus
VOLUME ["/var/lib/virtbus"]
# Metrics, health and readiness (VIRTBUS_METRICS_ADDR, read-only, every
# interface by default).
EXPOSE 9480
# The command API (VIRTBUS_API_ADDR) listens on the container's loopback by
# default. To reach it from outside, set VIRTBUS_API_ADDR=:9481 and
# VIRTBUS_API_TOKEN_FILE (mount the token file read-only) and publish 9481.
USER 10001:10001
STOPSIGNAL SIGTERM
# Healthy while /readyz answers 200: NATS and libvirt connected (a worker
# standing by for another one holding the host's lease is not ready, so it
# shows as unhealthy). The image has no curl: the worker asks itself, on
# VIRTBUS_METRICS_ADDR. The start period covers a slow first connect, as the
# systemd unit's TimeoutStartSec=2min does; the check's own timeout is 3s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
  CMD ["/usr/local/bin/virtbus-worker", "-healthcheck"]
ENTRYPOINT ["/usr/local/bin/virtbus-worker"]
