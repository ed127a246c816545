#!/usr/bin/env bash
# Builds the test guest the integration tests and the demo boot: Debian's
# cloud kernel and an initramfs of busybox-static, with scripts/guest-init.sh
# as its /init, booted directly by QEMU (<kernel>, <initrd>, <cmdline>). It
# prints the kernel's path, then the initramfs's.
#
# Both packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a cache, never installed: installing a kernel would
# run the host's /boot and initramfs hooks, and busybox-static conflicts
# with the busybox an initramfs-tools host has. So the host gains nothing
# but the files below.
#
# The files' names carry a hash of the inputs (the packages' versions, the
# guest's init, this script), so a change to any of them builds anew and
# an unchanged one is reused: a second run takes a few milliseconds and
# downloads nothing. The cached packages stay until $DEBS is removed, which
# is how to move to a newer kernel. vmlinuz and initrd.img in $OUT point at
# the current pair; that is where the tests look (internal/testbed/guest.go).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
INIT=$HERE/guest-init.sh
# World-readable, for QEMU (user libvirt-qemu).
OUT=${VIRTBUS_GUEST_DIR:-/var/lib/libvirt/images/virtbus-guest}
DEBS=${VIRTBUS_GUEST_CACHE:-/var/cache/virtbus-guest}
# What the guest's init loads: virtio PCI devices and disks (the hot-plugged
# disk it must release), the ACPI power button and the event device acpid
# reads it from. PCI hot-plug through ACPI is built into this kernel.
MODULES=(virtio_pci virtio_blk button evdev)

log() { printf 'guest-image: %s\n' "$*" >&2; }

# Cached package files, by name pattern.
KERNEL_DEB='linux-image-*-cloud-amd64_*.deb'
BUSYBOX_DEB='busybox-static_*.deb'

# cached_deb PATTERN: the newest cached .deb whose name matches PATTERN.
cached_deb() {
	find "$DEBS" -maxdepth 1 -name "$1" -printf '%f\n' 2>/dev/null | sort -V | tail -n 1
}

# kernel_package is the cloud kernel's versioned package, which the
# metapackage linux-image-cloud-amd64 depends on; empty when apt's lists
# lack it.
kernel_package() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
}

# download_missing [ERRORS]: downloads the packages the cache lacks; apt's
# complaints go to the file ERRORS (default standard error).
download_missing() {
	local errors=${1:-/dev/stderr} want=()
	[[ -n $(cached_deb "$KERNEL_DEB") ]] || want+=("$(kernel_package)")
	[[ -n $(cached_deb "$BUSYBOX_DEB") ]] || want+=(busybox-static)
	((${#want[@]})) || return 0
	install -d -m 0755 "$DEBS"
	log "downloading ${want[*]}"
	# As root into root's directory: apt's sandbox user could not write it.
	(cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${want[@]}" >/dev/null 2>"$errors")
}

# inputs_hash hashes what the image is made of.
inputs_hash() {
	{
		dpkg-deb -f "$DEBS/$kdeb" Package Version
		dpkg-deb -f "$DEBS/$bdeb" Package Version
		sha256sum <"$INIT"
		sha256sum <"${BASH_SOURCE[0]}"
	} | sha256sum | cut -c1-12
}

# apt's lists may be missing (a fresh machine) or stale (the version they
# name is gone from the archive): then update them and try once more.
download_missing /dev/null || {
	apt-get update -qq
	download_missing
}
kdeb=$(cached_deb "$KERNEL_DEB")
bdeb=$(cached_deb "$BUSYBOX_DEB")
hash=$(inputs_hash)
kernel=$OUT/vmlinuz-$hash
initrd=$OUT/initrd-$hash.img

# add_module NAME: copies module NAME into the image after the modules it
# depends on (read from its .modinfo), and lists it in /etc/modules in that
# order. A module built into the kernel needs nothing.
add_module() {
	local name=$1 ko dep
	[[ -z ${added[$name]:-} ]] || return 0
	added[$name]=1
	if grep -qE "/${name//_/[_-]}\.ko$" "$kdir"/modules.builtin; then
		return
	fi
	ko=$(find "$kdir/kernel" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n 1)
	[[ -n $ko ]] || { log "module $name is not in $kdeb"; exit 1; }
	for dep in $(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '); do
		add_module "$dep"
	done
	cp "$ko" "$root/lib/modules/$name.ko"
	echo "$name" >>"$root/etc/modules"
}

# build unpacks the packages into $work and writes the kernel and the
# initramfs under their final names, each through a temporary file so that
# a cut-off build leaves nothing half-written behind.
build() {
	dpkg-deb -x "$DEBS/$kdeb" "$work/kernel"
	dpkg-deb -x "$DEBS/$bdeb" "$work/busybox"
	kdir=$(echo "$work"/kernel/lib/modules/*)
	root=$work/root
	mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules}
	cp "$work/busybox/bin/busybox" "$root/bin/"
	for applet in $("$root/bin/busybox" --list); do
		[[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
	done
	install -m 0755 "$INIT" "$root/init"
	: >"$root/etc/modules"
	declare -gA added=()
	for m in "${MODULES[@]}"; do add_module "$m"; done

	install -d -m 0755 "$OUT"
	(cd "$root" && find . | sort | "$root/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
		gzip -9n >"$initrd.$$"
	install -m 0644 "$work"/kernel/boot/vmlinuz-* "$kernel.$$"
	chmod 0644 "$initrd.$$"
	mv "$kernel.$$" "$kernel"
	mv "$initrd.$$" "$initrd"
}

if [[ ! -f $kernel || ! -f $initrd ]]; then
	log "building $(basename "$kernel") and $(basename "$initrd") from $kdeb, $bdeb"
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	build
	# Earlier builds: a domain reads its kernel when it starts, so these are
	# no running domain's.
	find "$OUT" -maxdepth 1 \( -name 'vmlinuz-*' -o -name 'initrd-*' \) \
		! -name "$(basename "$kernel")" ! -name "$(basename "$initrd")" -delete
fi
ln -sfn "$(basename "$kernel")" "$OUT/vmlinuz"
ln -sfn "$(basename "$initrd")" "$OUT/initrd.img"
echo "$kernel"
echo "$initrd"
