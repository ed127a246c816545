#!/usr/bin/env bash
# The whole job end to end on this machine: a demo domain, the worker on an
# embedded NATS server, every action sent through `publish`, each completion
# printed; then everything the demo made is removed. Needs root and a running
# libvirtd (`make demo` runs scripts/libvirt-up.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."

VM=virtbus-demo
HOST=demo
IMAGES=/var/lib/libvirt/images/virtbus-demo
VIRSH=(virsh -q -c qemu:///system)
WORK=$(mktemp -d)
WORKER_PID=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
	set +e
	if [[ -n $WORKER_PID ]]; then
		kill -TERM "$WORKER_PID" 2>/dev/null && wait "$WORKER_PID" 2>/dev/null
	fi
	if [[ -e $WORK/defined ]]; then
		"${VIRSH[@]}" destroy "$VM" >/dev/null 2>&1
		"${VIRSH[@]}" undefine "$VM" >/dev/null 2>&1
	fi
	rm -rf "$IMAGES" "$WORK"
}
trap cleanup EXIT

if "${VIRSH[@]}" dominfo "$VM" >/dev/null 2>&1; then
	echo "demo: a domain named $VM already exists and the demo did not make it; remove it first" >&2
	exit 1
fi
if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
	echo "demo: something already listens on 127.0.0.1:4222, where the worker's embedded NATS goes" >&2
	exit 1
fi
for port in 9480 9481; do
	if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
		echo "demo: something already listens on 127.0.0.1:$port, where the worker's HTTP listeners go" >&2
		exit 1
	fi
done

say "build worker and publish"
CGO_ENABLED=0 go build -o "$WORK/" ./cmd/worker ./cmd/publish

say "define $VM and a 16 MiB disk image"
"${VIRSH[@]}" define scripts/demo-domain.xml >/dev/null
touch "$WORK/defined"
install -d -m 0755 "$IMAGES"
truncate -s 16M "$IMAGES/data.img"
echo "domain $VM, image $IMAGES/data.img"

say "start the worker (embedded NATS on 127.0.0.1:4222, metrics on :9480, command API on 127.0.0.1:9481)"
VIRTBUS_HOST=$HOST VIRTBUS_STATE_DIR="$WORK/state" VIRTBUS_CONCURRENCY=2 \
	"$WORK/worker" >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
for _ in $(seq 1 100); do
	curl -fs http://127.0.0.1:9480/readyz >/dev/null 2>&1 && break
	sleep 0.1
done
curl -fs http://127.0.0.1:9480/readyz

pub() {
	echo "\$ publish $*"
	"$WORK/publish" -host "$HOST" "$@" || echo "(exit $?)"
}

say "every action through publish"
pub start "$VM"
pub start "$VM"
pub status "$VM"
pub attach-disk "$VM" path="$IMAGES/data.img" bus=scsi
pub attach-disk "$VM" path="$IMAGES/data.img" bus=scsi
pub detach-disk "$VM" target=sda
pub pause "$VM"
pub pause "$VM"
pub resume "$VM"
pub reboot "$VM" mode=hard
pub reboot "$VM" timeout=3s
pub stop "$VM" timeout=3s
pub stop "$VM"

say "the host's domains as the worker sees them in libvirt (VIRTBUS_VMS)"
sleep 1 # a change reaches the bucket a moment after libvirt's event
pub list

say "bad input ends in one error completion each; the worker keeps running"
pub start no-such-vm
pub explode "$VM"
pub stop "$VM" mode=gentle
pub attach-disk "$VM" path=/etc/shadow
echo "\$ curl -X POST 'http://127.0.0.1:9481/v1/vms/$VM/stop?wait=10s' -H 'Content-Type: application/json' -d '{\"timeout\":'   # malformed JSON"
curl -s -X POST "http://127.0.0.1:9481/v1/vms/$VM/stop?wait=10s" -H 'Content-Type: application/json' -d '{"timeout":'
echo "\$ curl -X POST 'http://127.0.0.1:9481/v1/vms/$VM/stop' -H 'Content-Type: text/plain' -d '{}'   # what a web page could send"
curl -s -X POST "http://127.0.0.1:9481/v1/vms/$VM/stop" -H 'Content-Type: text/plain' -d '{}'

say "the completion as JSON"
pub -json start "$VM"

say "the same through the HTTP API"
echo "\$ curl -X POST 'http://127.0.0.1:9481/v1/vms/$VM/stop?wait=30s' -H 'Content-Type: application/json' -d '{\"mode\":\"force\"}'"
curl -s -X POST "http://127.0.0.1:9481/v1/vms/$VM/stop?wait=30s" -H 'Content-Type: application/json' -d '{"mode":"force"}'

say "a small load: 40 status commands"
pub -count 40 -vms "$VM" -concurrency 8 status

say "metrics (excerpt; every known label set exists from start, these are the ones above zero)"
curl -s http://127.0.0.1:9480/metrics | grep -E '^virtbus_(commands_completed_total|command_errors_total|queue_depth|queue_capacity|libvirt_up|nats_up)' | grep -v ' 0$' | sort

say "libvirt's view of $VM"
"${VIRSH[@]}" domstate "$VM"

say "stop the worker (SIGTERM) and clean up"
kill -TERM "$WORKER_PID" && wait "$WORKER_PID" && echo "worker exited 0"
WORKER_PID=
echo "worker log: $(grep -c 'command done\|command failed' "$WORK/worker.log") commands logged"
