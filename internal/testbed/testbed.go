// Package testbed gives tests a real libvirtd to work against: a connection,
// QEMU domains and disk images of their own under unique names, removed when
// the test ends. Nothing here touches what a test did not create, so the
// tests may run on a real hypervisor.
//
// A test that needs libvirtd calls Require. Where libvirtd is missing it
// skips with the reason, unless CI=true, where a skip would hide a broken
// test bed and it fails instead.
package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"
)

// Socket is the libvirt socket the tests use: VIRTBUS_LIBVIRT_SOCKET, or
// the system default.
func Socket() string {
	if s := os.Getenv("VIRTBUS_LIBVIRT_SOCKET"); s != "" {
		return s
	}
	return "/var/run/libvirt/libvirt-sock"
}

// ImageRoot is where test disk images go (VIRTBUS_TEST_IMAGE_ROOT, default
// /var/lib/libvirt/images): it must be a disk root QEMU can read.
func ImageRoot() string {
	if s := os.Getenv("VIRTBUS_TEST_IMAGE_ROOT"); s != "" {
		return s
	}
	return "/var/lib/libvirt/images"
}

// Unavailable skips the test with reason, or fails it under CI=true.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("integration test bed missing (CI=true makes this a failure): %s", reason)
	}
	t.Skipf("skipped: %s (run scripts/libvirt-up.sh as root, or set VIRTBUS_LIBVIRT_SOCKET)", reason)
}

// Require connects to libvirtd and returns the connection, closed when the
// test ends; it skips (or fails under CI) when there is none.
func Require(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(Socket()), dialers.WithLocalTimeout(5*time.Second)))
	if err := l.ConnectToURI(libvirt.QEMUSystem); err != nil {
		Unavailable(t, "no libvirtd at "+Socket()+": "+err.Error())
	}
	t.Cleanup(func() { _ = l.Disconnect() })
	return l
}

// Name returns a unique name with the given purpose in it.
func Name(purpose string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return "virtbus-test-" + purpose + "-" + hex.EncodeToString(b)
}

// DomainOptions shape a test domain.
type DomainOptions struct {
	Running   bool // start it after defining it
	Transient bool // create it without a persistent definition
}

// Domain defines a QEMU (TCG) domain with no OS under a unique name: it
// starts in about half a second and ignores ACPI shutdown and reboot. It is
// destroyed and undefined when the test ends.
func Domain(t testing.TB, l *libvirt.Libvirt, purpose string, o DomainOptions) libvirt.Domain {
	t.Helper()
	name := Name(purpose)
	def := domainDef(name)
	doc, err := def.Marshal()
	if err != nil {
		t.Fatalf("build domain XML: %v", err)
	}
	var dom libvirt.Domain
	if o.Transient {
		dom, err = l.DomainCreateXML(doc, 0)
	} else {
		dom, err = l.DomainDefineXML(doc)
	}
	if err != nil {
		t.Fatalf("define test domain %s: %v", name, err)
	}
	// Registered before the start, so a failed start leaves nothing behind.
	t.Cleanup(func() { Remove(t, l, dom) })
	if o.Running && !o.Transient {
		if err := l.DomainCreate(dom); err != nil {
			t.Fatalf("start test domain %s: %v", name, err)
		}
	}
	return dom
}

// Remove destroys and undefines dom, tolerating that it is already gone.
// It uses a fresh connection when l has died (a test that restarted
// libvirtd), so nothing is left behind.
func Remove(t testing.TB, l *libvirt.Libvirt, dom libvirt.Domain) {
	t.Helper()
	if !l.IsConnected() {
		fresh := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(Socket())))
		if err := fresh.ConnectToURI(libvirt.QEMUSystem); err != nil {
			t.Errorf("clean up %s: reconnect: %v", dom.Name, err)
			return
		}
		defer fresh.Disconnect()
		l = fresh
	}
	if st, _, err := l.DomainGetState(dom, 0); err == nil && libvirt.DomainState(st) != libvirt.DomainShutoff {
		_ = l.DomainDestroy(dom)
	}
	if err := l.DomainUndefine(dom); err != nil && !libvirt.IsNotFound(err) {
		t.Errorf("clean up %s: undefine: %v", dom.Name, err)
	}
}

// DiskImage creates a sparse raw image of size MiB in a directory of its own
// under ImageRoot (mode 0755, so QEMU's libvirt-qemu user can reach it) and
// removes the directory when the test ends. It returns the image's path.
func DiskImage(t testing.TB, sizeMiB int64) string {
	t.Helper()
	dir := Dir(t)
	p := filepath.Join(dir, "disk.img")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatalf("create disk image: %v", err)
	}
	if err := f.Truncate(sizeMiB << 20); err != nil {
		t.Fatalf("size disk image: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close disk image: %v", err)
	}
	return p
}

// Dir makes a directory of the test's own under ImageRoot, removed when the
// test ends.
func Dir(t testing.TB) string {
	t.Helper()
	root := ImageRoot()
	if _, err := os.Stat(root); err != nil {
		Unavailable(t, "image root "+root+" missing: "+err.Error())
	}
	dir := filepath.Join(root, Name(strings.ReplaceAll(strings.ToLower(t.Name()), "/", "-")))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("make test image dir: %v", err)
	}
	// Mkdir's mode is cut by the umask; QEMU needs to traverse it.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("chmod test image dir: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// State is dom's state as libvirt reports it.
func State(t testing.TB, l *libvirt.Libvirt, dom libvirt.Domain) libvirt.DomainState {
	t.Helper()
	st, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		t.Fatalf("state of %s: %v", dom.Name, err)
	}
	return libvirt.DomainState(st)
}

// Disks maps target to source file of dom's disks: the live definition
// (inactive=false) or the config.
func Disks(t testing.TB, l *libvirt.Libvirt, dom libvirt.Domain, inactive bool) map[string]string {
	t.Helper()
	var flags libvirt.DomainXMLFlags
	if inactive {
		flags = libvirt.DomainXMLInactive
	}
	doc, err := l.DomainGetXMLDesc(dom, flags)
	if err != nil {
		t.Fatalf("XML of %s: %v", dom.Name, err)
	}
	out, err := disksOf(doc)
	if err != nil {
		t.Fatalf("parse XML of %s: %v", dom.Name, err)
	}
	return out
}

// disksOf maps target to source file of the disks in a domain XML.
func disksOf(doc string) (map[string]string, error) {
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return nil, err
	}
	out := map[string]string{}
	if def.Devices != nil {
		for _, d := range def.Devices.Disks {
			src := ""
			if d.Source != nil && d.Source.File != nil {
				src = d.Source.File.File
			}
			if d.Target != nil {
				out[d.Target.Dev] = src
			}
		}
	}
	return out, nil
}
