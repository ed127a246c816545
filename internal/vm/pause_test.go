package vm_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// pause, pause again (unchanged), resume, resume again (unchanged), each
// checked against the state libvirt reports.
func TestPauseResume(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("pause", testbed.DomainOptions{Running: true})
	h.ok(t, dom, vm.Pause, ``, true, "paused")
	wantState(t, h.lv, dom, libvirt.DomainPaused)
	h.ok(t, dom, vm.Pause, `{}`, false, "paused")
	wantState(t, h.lv, dom, libvirt.DomainPaused)

	h.ok(t, dom, vm.Resume, ``, true, "running")
	wantState(t, h.lv, dom, libvirt.DomainRunning)
	h.ok(t, dom, vm.Resume, `{}`, false, "running")
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// A domain paused behind virtbus's back (virsh suspend) is paused all the
// same: pause leaves it, resume runs it. By UUID, as a producer may name it.
func TestPauseResumeByUUIDAfterOutsidePause(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("pauseuuid", testbed.DomainOptions{Running: true})
	if err := h.lv.Conn().DomainSuspend(dom); err != nil {
		t.Fatal(err)
	}
	res, err := h.do(t, testbed.UUID(dom), vm.Pause, ``)
	if err != nil || res.Changed || res.State != "paused" {
		t.Fatalf("pause of a paused domain by UUID: %+v, %v", res, err)
	}
	res, err = h.do(t, testbed.UUID(dom), vm.Resume, ``)
	if err != nil || !res.Changed || res.State != "running" {
		t.Fatalf("resume by UUID: %+v, %v", res, err)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// A shut-off domain has nothing to pause, and resume does not boot it
// (start does): both are conflict, and the domain stays shut off.
func TestPauseResumeShutoffConflict(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("pauseoff", testbed.DomainOptions{})
	for _, a := range []vm.Action{vm.Pause, vm.Resume} {
		err := h.fails(t, dom.Name, a, ``, vm.ErrConflict)
		if !strings.Contains(err.Error(), "shutoff") {
			t.Fatalf("%s: error %q does not say the domain is shut off", a, err)
		}
		wantState(t, h.lv, dom, libvirt.DomainShutoff)
	}
}

func TestPauseResumeRefusals(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("pauseparams", testbed.DomainOptions{Running: true})
	missing := testbed.Name("missing")
	for _, a := range []vm.Action{vm.Pause, vm.Resume} {
		h.fails(t, dom.Name, a, `{"force":true}`, vm.ErrInvalid)
		h.fails(t, missing, a, ``, vm.ErrNotFound)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// Actions and ParseAction's error come from the one action table, so both
// know pause and resume (params_test.go checks each listed action parses).
func TestParseActionNamesTheTable(t *testing.T) {
	for _, want := range []vm.Action{vm.Pause, vm.Resume} {
		if !slices.Contains(vm.Actions, want) {
			t.Fatalf("Actions %v lacks %s", vm.Actions, want)
		}
	}
	_, err := vm.ParseAction("explode")
	if err == nil {
		t.Fatal("ParseAction(explode) succeeded")
	}
	for _, a := range vm.Actions {
		if !strings.Contains(err.Error(), string(a)) {
			t.Fatalf("error %q does not name %s", err, a)
		}
	}
}
