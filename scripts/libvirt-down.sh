#!/usr/bin/env bash
# Stop the daemons that scripts/libvirt-up.sh started, and only those: a
# libvirtd that was already running before it (a real hypervisor's) is left
# alone. Packages and users stay installed.
set -euo pipefail

MARK_DIR=${VIRTBUS_TESTBED_DIR:-/run/virtbus-testbed}

# alive: the process exists and is not a zombie nobody reaped.
alive() {
	local state
	state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
	[[ -n $state && $state != Z ]]
}

stop() {
	local name=$1 pidfile=$2
	[[ -e $MARK_DIR/$name ]] || return 0
	if [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null; then
		for _ in $(seq 1 100); do
			alive "$(cat "$pidfile" 2>/dev/null)" || break
			sleep 0.1
		done
		printf 'libvirt-down: stopped %s\n' "$name" >&2
	fi
	rm -f "$MARK_DIR/$name"
}

stop libvirtd /run/libvirtd.pid
stop virtlogd /run/virtlogd.pid
