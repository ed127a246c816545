#!/usr/bin/env bash
# Checks deploy/ with the real tools (make lint-deploy):
#   promtool check rules / test rules   deploy/alerts.yml, deploy/alerts_test.yml
#   promtool check config               deploy/prometheus.yml (and its rule_files)
#   nats-server -t                      deploy/nats-server.conf
#   systemd-analyze verify              deploy/virtbus-worker.service
#   docker compose config -q            docker-compose.yml, where docker compose exists
#
# Missing tools are fetched once into a cache outside the repository
# (VIRTBUS_TOOLS, default ~/.cache/virtbus-lint-deploy):
#   promtool     from Debian's prometheus package, unpacked rather than
#                installed, so no Prometheus daemon is enabled on the host;
#   nats-server  built from the Go module proxy at the version in go.mod.
# Later runs reuse the cache and print only the checks' results.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PATH="$PATH:/usr/local/go/bin"
GO=${GO:-go}
tools=${VIRTBUS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/virtbus-lint-deploy}
mkdir -p "$tools"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log() { echo "lint-deploy: $*"; }
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

# promtool: on PATH, or from the cache, or unpacked from Debian's package.
promtool=$(command -v promtool || true)
if [[ -z $promtool ]]; then
	promtool=$tools/prometheus/usr/bin/promtool
	if [[ ! -x $promtool ]]; then
		log "fetching promtool (Debian package prometheus)"
		if ! apt-cache show prometheus >/dev/null 2>&1; then
			as_root apt-get update -qq
		fi
		# apt fetches as the user _apt, which needs to write there.
		chmod 0711 "$tmp"
		mkdir -m 0777 "$tmp/deb"
		# Stale package lists name a .deb the mirror may have dropped: update, retry.
		(cd "$tmp/deb" && apt-get download -qq prometheus) ||
			{ as_root apt-get update -qq && (cd "$tmp/deb" && apt-get download -qq prometheus); }
		rm -rf "$tools/prometheus" "$tools/prometheus.new"
		dpkg-deb -x "$tmp"/deb/prometheus_*.deb "$tools/prometheus.new"
		mv "$tools/prometheus.new" "$tools/prometheus"
	fi
fi

# nats-server: the version go.mod requires, so the check parses the config
# exactly as cmd/publish's tests (which embed that server) do.
nats_version=$(cd "$repo" && $GO list -m -f '{{.Version}}' github.com/nats-io/nats-server/v2)
nats_server=$tools/nats-server-$nats_version/nats-server
if [[ ! -x $nats_server ]]; then
	log "building nats-server $nats_version (Go module proxy)"
	GOBIN="$tools/nats-server-$nats_version" GOFLAGS= \
		$GO install "github.com/nats-io/nats-server/v2@$nats_version"
fi

# systemd-analyze comes with systemd; install it only if it is missing.
if ! command -v systemd-analyze >/dev/null; then
	log "installing systemd (systemd-analyze)"
	as_root apt-get update -qq
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# Prometheus: the rules, their unit tests, and the scrape config. The config
# names its rule file relative to itself, so check it from deploy/.
(cd deploy && "$promtool" check rules alerts.yml)
(cd deploy && "$promtool" test rules alerts_test.yml)
# ...and the tests cover every alert: a new one needs its own.
untested=$(comm -23 \
	<(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\).*/\1/p' deploy/alerts.yml | sort -u) \
	<(sed -n 's/^ *alertname: *\([A-Za-z0-9_]*\).*/\1/p' deploy/alerts_test.yml | sort -u))
if [[ -n $untested ]]; then
	log "alerts without a test in deploy/alerts_test.yml:" $untested
	exit 1
fi
(cd deploy && "$promtool" check config prometheus.yml)

# NATS: -t parses the config, resolves its variables and permissions and
# exits; it opens no port and creates no store_dir.
# It prints "configuration file ... is valid" itself.
"$nats_server" -t -c deploy/nats-server.conf 2>&1

# systemd: verify a copy whose ExecStart= names a binary that exists here
# (the unit installs to /usr/local/bin/virtbus-worker, absent on a build
# machine); every other line is verified as shipped. The copy keeps the
# unit's name, which verify uses to resolve its type and %-specifiers.
unit=virtbus-worker.service
mkdir -p "$tmp/units"
sed 's|^ExecStart=/usr/local/bin/virtbus-worker$|ExecStart=/bin/true|' "deploy/$unit" >"$tmp/units/$unit"
if cmp -s "deploy/$unit" "$tmp/units/$unit"; then
	log "deploy/$unit: ExecStart=/usr/local/bin/virtbus-worker not found; update $0"
	exit 1
fi
# verify prints its complaints and exits 0 for some of them: any output fails.
out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$tmp/units/$unit" 2>&1) || {
	echo "$out"
	exit 1
}
if [[ -n $out ]]; then
	echo "$out" | sed "s|$tmp/units/|deploy/|g"
	log "systemd-analyze verify deploy/$unit: warnings above"
	exit 1
fi
echo "systemd-analyze verify deploy/$unit: OK"

# Compose, where a compose tool exists.
if docker compose version >/dev/null 2>&1; then
	docker compose -f docker-compose.yml config -q && echo "docker compose config: OK"
elif command -v docker-compose >/dev/null; then
	docker-compose -f docker-compose.yml config -q && echo "docker-compose config: OK"
else
	echo "docker compose config: skipped (neither docker compose nor docker-compose is installed)"
fi
