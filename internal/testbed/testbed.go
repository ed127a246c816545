// Package testbed gives tests a real libvirtd to work against: a connection,
// QEMU domains and disk images of their own under unique names, removed when
// the test ends. Nothing here touches what a test did not create, so the
// tests may run on a real hypervisor.
//
// A test that needs libvirtd calls Require and works through the Live it
// returns, the package's one way to libvirtd. Where libvirtd is missing it
// skips with the reason, unless CI=true, where a skip would hide a broken
// test bed and it fails instead.
package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"
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
	// Unbootable passes QEMU an option it refuses, so that QEMU exits at
	// every start while libvirtd connects to its monitor.
	Unbootable bool
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

// UUID is dom's UUID in libvirt's 36-character form: what a test expects
// where virtbus reports one. It is written here, apart from the code under
// test, so that a test never checks that code against itself.
func UUID(dom libvirt.Domain) string {
	u := dom.UUID
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
