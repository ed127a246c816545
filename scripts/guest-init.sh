#!/bin/sh
# /init of the virtbus test guest (scripts/guest-image.sh packs it with a
# static busybox into the initramfs), PID 1 of a guest with no disk. It
# loads the modules the image lists, then answers the ACPI power button by
# powering off, unless the kernel command line has virtbus.deaf: then it
# ignores it, as a hung or unwilling guest would. Its lines on the console
# (the domain's first serial port) say how far it got; "virtbus-guest:
# ready" means the power button is heard from now on, which the tests and
# the demo wait for.
export PATH=/bin

say() { echo "virtbus-guest: $*"; }

mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console, so the kernel opened none for us.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say "init"

# In dependency order: the image lists each module after those it needs.
while read -r m; do
	insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done </etc/modules

# power_button prints the event device of the ACPI power button, once the
# button driver and evdev have made it.
power_button() {
	for n in /sys/class/input/event*; do
		if [ "$(cat "$n/device/name" 2>/dev/null)" = "Power Button" ] && [ -e "/dev/input/${n##*/}" ]; then
			echo "/dev/input/${n##*/}"
			return
		fi
	done
}

# listening: whether acpid (pid $1) holds the device $2 open.
listening() {
	ls -l "/proc/$1/fd" 2>/dev/null | grep -q "$2"
}

# hear_power_button starts acpid and returns once it reads the power
# button's event device: only then is a press acted on.
hear_power_button() {
	# acpid runs /etc/acpi/<action>/<parameter> for the power button's event.
	mkdir -p /etc/acpi/PWRF
	cat >/etc/acpi/PWRF/00000080 <<-'EOF'
		#!/bin/sh
		echo "virtbus-guest: power button: powering off" >/dev/console
		poweroff -f
	EOF
	chmod 0755 /etc/acpi/PWRF/00000080
	dev=$(power_button)
	until [ -n "$dev" ]; do
		sleep 0.1
		dev=$(power_button)
	done
	acpid -f -l /dev/null &
	pid=$!
	until listening $pid "$dev"; do
		kill -0 $pid 2>/dev/null || return 1
		sleep 0.1
	done
}

# watch_disks says on the console when a disk comes or goes: a hot-plugged
# disk the guest saw, and one it released.
watch_disks() {
	cat >/etc/disk-event <<-'EOF'
		#!/bin/sh
		case "$SUBSYSTEM/$ACTION" in
		block/add | block/remove) echo "virtbus-guest: disk $DEVNAME: $ACTION" >/dev/console ;;
		esac
	EOF
	chmod 0755 /etc/disk-event
	uevent /etc/disk-event &
}

watch_disks
if grep -qw virtbus.deaf /proc/cmdline; then
	say "ready (deaf: the power button is ignored)"
elif hear_power_button; then
	say "ready"
else
	say "acpid died: the power button is not heard"
fi

# PID 1 must not exit; the power button's action powers the guest off.
while :; do sleep 3600; done
