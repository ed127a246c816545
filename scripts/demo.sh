#!/usr/bin/env bash
# The whole job end to end on this machine: a demo domain booting the test
# guest (scripts/demo-domain.xml) and a deaf copy of it, the worker on an
# embedded NATS server, every action sent through `publish`, each completion
# printed; then everything the demo made is removed. Needs root, a running
# libvirtd and the test guest (`make demo` runs scripts/libvirt-up.sh first,
# which builds the guest).
set -euo pipefail
cd "$(dirname "$0")/.."

VM=virtbus-demo
DEAF=virtbus-demo-deaf
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
	for vm in "$VM" "$DEAF"; do
		if [[ -e $WORK/defined-$vm ]]; then
			"${VIRSH[@]}" destroy "$vm" >/dev/null 2>&1
			"${VIRSH[@]}" undefine "$vm" >/dev/null 2>&1
		fi
	done
	rm -rf "$IMAGES" "$WORK"
}
trap cleanup EXIT

for vm in "$VM" "$DEAF"; do
	if "${VIRSH[@]}" dominfo "$vm" >/dev/null 2>&1; then
		echo "demo: a domain named $vm already exists and the demo did not make it; remove it first" >&2
		exit 1
	fi
done
if [[ ! -e /var/lib/libvirt/images/virtbus-guest/vmlinuz ]]; then
	echo "demo: no test guest image; scripts/libvirt-up.sh (or scripts/guest-image.sh) builds it" >&2
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

say "define $VM, its deaf copy $DEAF, and two 16 MiB disk images"
"${VIRSH[@]}" define scripts/demo-domain.xml >/dev/null
touch "$WORK/defined-$VM"
# The deaf copy: its own name and console, and virtbus.deaf for the init.
sed -e "s|<name>$VM</name>|<name>$DEAF</name>|" -e 's|quiet</cmdline>|quiet virtbus.deaf</cmdline>|' \
	-e 's|console.log|console-deaf.log|' scripts/demo-domain.xml >"$WORK/deaf.xml"
"${VIRSH[@]}" define "$WORK/deaf.xml" >/dev/null
touch "$WORK/defined-$DEAF"
install -d -m 0755 "$IMAGES"
truncate -s 16M "$IMAGES/data.img" "$IMAGES/virtio.img"
echo "domains $VM and $DEAF, images $IMAGES/data.img and $IMAGES/virtio.img"
echo "guest consoles: $IMAGES/console.log and $IMAGES/console-deaf.log"

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

# console VM: the file VM's guest writes its console to.
console() {
	if [[ $1 == "$DEAF" ]]; then echo "$IMAGES/console-deaf.log"; else echo "$IMAGES/console.log"; fi
}

# guest_says VM TEXT N: waits until VM's guest has written a line starting
# with TEXT N times in all, then shows that line.
guest_says() {
	local log
	log=$(console "$1")
	for _ in $(seq 1 1200); do
		if (($(grep -c "^$2" "$log" 2>/dev/null) >= $3)); then
			echo "($1's console: $(grep "^$2" "$log" | tail -n 1))"
			return
		fi
		sleep 0.1
	done
	echo "demo: $1's guest did not write \"$2\" within 2 minutes; its console:" >&2
	cat "$log" >&2
	exit 1
}

say "every action through publish"
pub start "$VM"
pub start "$VM"
guest_says "$VM" "virtbus-guest: ready" 1
pub status "$VM"
pub attach-disk "$VM" path="$IMAGES/data.img" bus=scsi
pub attach-disk "$VM" path="$IMAGES/data.img" bus=scsi
pub detach-disk "$VM" target=sda
pub pause "$VM"
pub pause "$VM"
pub resume "$VM"
pub reboot "$VM" mode=hard
guest_says "$VM" "virtbus-guest: ready" 2

say "the guest cooperates: it releases a virtio disk, and powers off on ACPI"
pub attach-disk "$VM" path="$IMAGES/virtio.img"
guest_says "$VM" "virtbus-guest: disk vda: add" 1
pub detach-disk "$VM" target=vda
guest_says "$VM" "virtbus-guest: disk vda: remove" 1
pub reboot "$VM" timeout=60s
guest_says "$VM" "virtbus-guest: power button" 1
guest_says "$VM" "virtbus-guest: ready" 3
pub stop "$VM" timeout=60s
guest_says "$VM" "virtbus-guest: power button" 2
pub stop "$VM"

say "a deaf guest ignores ACPI: the reboot falls back to a reset, the stop is forced"
pub start "$DEAF"
guest_says "$DEAF" "virtbus-guest: ready" 1
pub reboot "$DEAF" timeout=3s
pub stop "$DEAF" timeout=3s

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
