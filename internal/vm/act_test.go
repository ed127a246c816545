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

// On QEMU, libvirtd sends a change's lifecycle event before it answers
// the request (it saves the domain's status in between): the action is
// done at the event, and the domain's next request waits for the answer.
// Each pause and resume ends in the state asked for, and some end while
// libvirtd's answer is still on its way.
func TestActionDoneAtItsEventBeforeTheAnswer(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	view := runWatcher(t, h)
	dom := h.lv.Domain("early", testbed.DomainOptions{Running: true})
	waitInView(t, view, dom)
	early := 0
	for i := range 20 {
		action, want := vm.Pause, libvirt.DomainPaused
		if i%2 == 1 {
			action, want = vm.Resume, libvirt.DomainRunning
		}
		res, err := h.do(t, dom.Name, action, ``)
		if err != nil || !res.Changed {
			t.Fatalf("%s %d: %+v %v", action, i, res, err)
		}
		if vm.Unanswered(h.ex, dom.UUID) {
			early++
		}
		if st := h.lv.State(dom); st != want {
			t.Fatalf("%s %d: domain is %v, want %v", action, i, st, want)
		}
	}
	if early == 0 {
		t.Error("no action ended before libvirtd's answer: each waited for it")
	}
	t.Logf("%d of 20 actions ended at their event, before libvirtd answered", early)
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
