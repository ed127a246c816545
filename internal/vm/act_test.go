package vm_test

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// A start whose QEMU dies while libvirtd starts it is tried once more; a
// QEMU that cannot start at all fails the second time too, and the error
// carries QEMU's own words.
func TestStartTriesOnceMoreWhenQEMUDies(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("unbootable", testbed.DomainOptions{Unbootable: true})
	before := qemuStarts(t, dom.Name)
	_, err := h.do(t, dom.Name, vm.Start, ``)
	if !errors.Is(err, vm.ErrLibvirt) || !strings.Contains(err.Error(), "no-such-option-virtbus-test") {
		t.Fatalf("start of a domain QEMU refuses: %v, want a libvirt error with QEMU's words", err)
	}
	if n := qemuStarts(t, dom.Name) - before; n != 2 {
		t.Errorf("QEMU was started %d times, want 2", n)
	}
	if st := h.lv.State(dom); st != libvirt.DomainShutoff {
		t.Errorf("domain is %v after the failed start, want shut off", st)
	}
}

// qemuStarts counts the QEMU processes libvirtd started for the domain
// name: one header in its QEMU log each.
func qemuStarts(t *testing.T, name string) int {
	t.Helper()
	data, err := os.ReadFile("/var/log/libvirt/qemu/" + name + ".log")
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(data), ": starting up libvirt version")
}
