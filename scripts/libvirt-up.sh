#!/usr/bin/env bash
# Bring up a working libvirtd with the QEMU driver on a Debian machine, as root.
#
# Idempotent: installs only the packages that are missing, creates only what
# is missing, starts only the daemons that are not running, then waits until
# the libvirt socket answers; it builds the test guest when its inputs
# changed (scripts/guest-image.sh). A second run on a machine where all is
# up takes about a second. What this script started is written under
# $MARK_DIR so that scripts/libvirt-down.sh stops exactly that and nothing
# else.
set -euo pipefail

MARK_DIR=${VIRTBUS_TESTBED_DIR:-/run/virtbus-testbed}
SOCKET=/run/libvirt/libvirt-sock
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)

log() { printf 'libvirt-up: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
	log "must run as root (it installs packages and starts libvirtd)"
	exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU runs as libvirt-qemu; the package that usually creates that user
# (libvirt-daemon-system) pulls in systemd units we do not want here.
if ! getent group libvirt-qemu >/dev/null; then
	groupadd --system libvirt-qemu
fi
if ! id libvirt-qemu >/dev/null 2>&1; then
	useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
		--shell /usr/sbin/nologin libvirt-qemu
fi
# Where /dev/kvm exists but the QEMU user cannot open it (no udev rule, as
# in some sandboxes), libvirt finds its cached QEMU capabilities "probed
# with KVM, KVM gone now" and probes QEMU again on every lookup: each define
# then takes half a minute. A Debian host's udev gives /dev/kvm to group kvm
# and puts libvirt-qemu in it; do the same. Test domains are type='qemu'
# (TCG) either way.
if [[ -c /dev/kvm ]]; then
	getent group kvm >/dev/null || groupadd --system kvm
	if [[ $(stat -c %G /dev/kvm) != kvm ]]; then
		chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
	fi
	id -nG libvirt-qemu | grep -qw kvm || usermod -aG kvm libvirt-qemu
fi
install -d -m 0755 /var/log/libvirt /var/log/libvirt/qemu /run/libvirt /var/lib/libvirt
# The default disk root: world-traversable so QEMU (libvirt-qemu) can reach
# images in it.
install -d -m 0711 /var/lib/libvirt/images
mkdir -p "$MARK_DIR"
# The test guest the integration tests and the demo boot: built once from
# Debian's packages, then reused (a few milliseconds).
"$(dirname "$0")/guest-image.sh" >/dev/null

# A daemon that was stopped may linger as a zombie when nothing reaps it
# (a container's init); that one is not running.
running() {
	local pid
	for pid in $(pgrep -x "$1"); do
		[[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) != Z ]] && return 0
	done
	return 1
}

if ! running virtlogd; then
	log "starting virtlogd"
	virtlogd -d
	touch "$MARK_DIR/virtlogd"
fi
if ! running libvirtd; then
	log "starting libvirtd"
	# A stale socket from a daemon that died would make the wait below lie.
	rm -f "$SOCKET"
	libvirtd -d
	touch "$MARK_DIR/libvirtd"
fi

for _ in $(seq 1 300); do
	if [[ -S $SOCKET ]] && virsh -q -c qemu:///system list >/dev/null 2>&1; then
		exit 0
	fi
	sleep 0.1
done
log "libvirtd did not answer on $SOCKET within 30s"
exit 1
