package testbed

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// The test guest's default image: scripts/guest-image.sh points these at
// its latest build (scripts/libvirt-up.sh runs it).
const (
	guestKernel = "/var/lib/libvirt/images/virtbus-guest/vmlinuz"
	guestInitrd = "/var/lib/libvirt/images/virtbus-guest/initrd.img"
)

// bootWait is how long a guest may take to boot: a few seconds alone under
// TCG, much longer on a 2-core machine busy with the other tests.
const bootWait = 3 * time.Minute

// Console lines of the test guest's init (scripts/guest-init.sh).
const (
	// GuestReady starts the line that says the guest has booted: from
	// then on it acts on the ACPI power button, unless deaf.
	GuestReady = "virtbus-guest: ready"
	// GuestPowerOff is the guest's line when it powers off for the power
	// button.
	GuestPowerOff = "virtbus-guest: power button: powering off"
)

// GuestOptions shape a test guest.
type GuestOptions struct {
	Running bool // start it and wait until it has booted
	// Deaf makes it ignore the ACPI power button (virtbus.deaf on its
	// kernel command line), as a hung or unwilling guest does.
	Deaf bool
}

// Guest is a test domain that boots a real, tiny Linux (the test guest):
// it powers off on the ACPI power button and releases a hot-unplugged
// virtio disk, where Domain's guest does neither.
type Guest struct {
	libvirt.Domain
	console string // the file its serial console writes to, across boots
	lv      *Live
}

// GuestImage is the test guest's kernel and initramfs: VIRTBUS_GUEST_KERNEL
// and VIRTBUS_GUEST_INITRD, both or neither, or else what
// scripts/guest-image.sh built last. Symlinks are resolved, so a domain's
// definition names the build it booted. A missing image skips the test
// (fails it under CI=true). Another image must keep the contract of
// scripts/guest-init.sh: its console lines and virtbus.deaf.
func GuestImage(t testing.TB) (kernel, initrd string) {
	t.Helper()
	kernel, initrd = os.Getenv("VIRTBUS_GUEST_KERNEL"), os.Getenv("VIRTBUS_GUEST_INITRD")
	if (kernel == "") != (initrd == "") {
		t.Fatalf("set both VIRTBUS_GUEST_KERNEL and VIRTBUS_GUEST_INITRD, or neither (kernel %q, initrd %q)", kernel, initrd)
	}
	if kernel == "" {
		kernel, initrd = guestKernel, guestInitrd
	}
	for _, p := range []*string{&kernel, &initrd} {
		resolved, err := filepath.EvalSymlinks(*p)
		if err != nil {
			Unavailable(t, "no test guest image: "+err.Error()+" (scripts/guest-image.sh builds it)")
		}
		*p = resolved
	}
	return kernel, initrd
}

// Guest defines a test guest under a unique name, with its console in a
// directory of the test's own, and with o.Running starts it and waits until
// it has booted. Like Domain's, it is destroyed and undefined when the test
// ends.
func (c *Live) Guest(purpose string, o GuestOptions) Guest {
	c.t.Helper()
	kernel, initrd := GuestImage(c.t)
	g := Guest{console: filepath.Join(Dir(c.t), "console.log"), lv: c}
	def := guestDef(Name(purpose), kernel, initrd, g.console, o.Deaf)
	g.Domain = c.define(def, DomainOptions{Running: o.Running})
	if o.Running {
		g.WaitReady(c.t, 1)
	}
	return g
}

// guestDef is Domain's definition booting kernel and initrd directly, with
// the first serial port (the guest's console) appended to console.
func guestDef(name, kernel, initrd, console string, deaf bool) libvirtxml.Domain {
	def := domainDef(name)
	// In 64 MiB this kernel does not get as far as its first message.
	def.Memory = &libvirtxml.DomainMemory{Value: 128, Unit: "MiB"}
	def.OS.Kernel, def.OS.Initrd = kernel, initrd
	// quiet: the kernel's messages slow a TCG boot and bury the init's.
	def.OS.Cmdline = "console=ttyS0 quiet"
	if deaf {
		def.OS.Cmdline += " virtbus.deaf"
	}
	def.Devices.Serials = []libvirtxml.DomainSerial{{
		Source: &libvirtxml.DomainChardevSource{
			// Appended, so a reboot's second boot follows the first.
			File: &libvirtxml.DomainChardevSourceFile{Path: console, Append: "on"},
		},
	}}
	return def
}

// Console is what the guest wrote to its console so far, over all its
// boots.
func (g Guest) Console(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(g.console)
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("read console of %s: %v", g.Name, err)
	}
	return string(b)
}

// Said counts the lines the guest wrote to its console, over all its boots,
// that start with prefix.
func (g Guest) Said(t testing.TB, prefix string) int {
	t.Helper()
	n := 0
	for _, l := range strings.Split(g.Console(t), "\n") {
		if strings.HasPrefix(l, prefix) {
			n++
		}
	}
	return n
}

// WaitSaid waits until the guest has written a line starting with prefix
// n times in all. A guest found shut off on three looks a second apart
// will not write it: that fails the test at once, not after bootWait.
func (g Guest) WaitSaid(t testing.TB, prefix string, n int) {
	t.Helper()
	deadline, look, off := time.Now().Add(bootWait), time.Now().Add(time.Second), 0
	for ; g.Said(t, prefix) < n; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not write %q %d times within %s; its console:\n%s", g.Name, prefix, n, bootWait, g.Console(t))
		}
		if time.Now().Before(look) {
			continue
		}
		look = time.Now().Add(time.Second)
		if off++; g.lv.State(g.Domain) != libvirt.DomainShutoff {
			off = 0
		}
		if off == 3 {
			t.Fatalf("%s is shut off and did not write %q %d times; its console:\n%s", g.Name, prefix, n, g.Console(t))
		}
	}
}

// WaitReady waits until the guest has said it is ready boots times in all,
// one for each boot since it was defined.
func (g Guest) WaitReady(t testing.TB, boots int) {
	t.Helper()
	start := time.Now()
	g.WaitSaid(t, GuestReady, boots)
	t.Logf("%s: boot %d ready after waiting %s", g.Name, boots, time.Since(start).Round(time.Millisecond))
}

// ShutoffReason is why libvirt says dom is shut off: shutdown when the
// guest powered itself off, destroyed when it was pulled. It fails the test
// when dom is not shut off.
func (c *Live) ShutoffReason(dom libvirt.Domain) libvirt.DomainShutoffReason {
	c.t.Helper()
	var st, reason int32
	c.call("state of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		st, reason, err = l.DomainGetState(dom, 0)
		return err
	})
	if libvirt.DomainState(st) != libvirt.DomainShutoff {
		c.t.Fatalf("%s is not shut off (state %d)", dom.Name, st)
	}
	return libvirt.DomainShutoffReason(reason)
}
