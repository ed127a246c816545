package vm_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// callStep is one action TestLibvirtCallsPerAction measures, with the
// most libvirt calls it may make with the view (0: no ceiling).
type callStep struct {
	action  vm.Action
	params  string
	ceiling uint64
}

// callSteps are the actions TestLibvirtCallsPerAction measures, in an
// order that leaves each one something to do. With the view, a start, a
// forced stop, a pause and a resume act on the view's state: the request
// is their one call, and its event confirms it; start and stop read the
// reboot intent besides. An answer of "nothing to do" is checked with one
// read. An attach has no ceiling: it reads every other domain of the host
// (checkShared), and tests running beside this one make some.
func callSteps(img string) []callStep {
	return []callStep{
		{vm.Start, ``, 2},
		{vm.Start, ``, 2},
		{vm.Status, ``, 2},
		{vm.Pause, ``, 1},
		{vm.Resume, ``, 1},
		{vm.AttachDisk, `{"path":"` + img + `","bus":"scsi","target":"sda"}`, 0},
		{vm.DetachDisk, `{"target":"sda"}`, 9},
		{vm.Reboot, `{"mode":"hard"}`, 4},
		{vm.Stop, `{"mode":"force"}`, 2},
		{vm.Stop, `{"mode":"force"}`, 2},
	}
}

// TestLibvirtCallsPerAction measures how many libvirt calls each action
// makes on a real QEMU domain, without and with the watcher's view of the
// domains (`go test -run TestLibvirtCallsPerAction -v ./internal/vm`
// prints them). It fails when an action makes no call at all (the count is
// broken), goes round in circles, makes more calls with the view than its
// ceiling, or when the actions make more calls with the view than without.
// With the view the counts do not depend on timing: waits end on events.
// Only an event slower than vm.EventPoll, on a loaded machine, lets the
// wait ask libvirtd once, so an action that took that long may make one
// call more.
func TestLibvirtCallsPerAction(t *testing.T) {
	t.Parallel()
	plain, viewed := newHarness(t), newHarness(t)
	view := runWatcher(t, viewed)
	img := testbed.DiskImage(t, 1)
	counts := map[string][]uint64{}
	for _, h := range []struct {
		name string
		harness
	}{{"lookup", plain}, {"view", viewed}} {
		dom := h.lv.Domain("calls", testbed.DomainOptions{})
		waitInView(t, view, dom)
		for _, s := range callSteps(img) {
			before, began := h.conn.Calls(), time.Now()
			res, err := h.do(t, dom.Name, s.action, s.params)
			if err != nil {
				t.Fatalf("%s: %s %s: %v", h.name, s.action, s.params, err)
			}
			n, took := h.conn.Calls()-before, time.Since(began)
			counts[h.name] = append(counts[h.name], n)
			t.Logf("%-6s %-12s changed=%-5v %3d libvirt calls", h.name, s.action, res.Changed, n)
			if n == 0 || n > 40 {
				t.Errorf("%s: %s made %d libvirt calls", h.name, s.action, n)
			}
			if ceiling := s.ceiling; h.name == "view" && ceiling > 0 {
				if took >= vm.EventPoll {
					ceiling++
				}
				if n > ceiling {
					t.Errorf("view: %s %s made %d libvirt calls in %s, want at most %d", s.action, s.params, n, took, ceiling)
				}
			}
		}
	}
	var plainSum, viewSum uint64
	for i := range counts["lookup"] {
		plainSum, viewSum = plainSum+counts["lookup"][i], viewSum+counts["view"][i]
	}
	if viewSum >= plainSum {
		t.Errorf("with the view the actions made %d calls, without it %d", viewSum, plainSum)
	}
}

// runWatcher runs a watcher on a connection of its own, so that its calls
// are not counted as the executor's, and gives it to h's executor as its
// view.
func runWatcher(t *testing.T, h harness) *vm.Watcher {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	conn := vm.NewConn(testbed.Socket(), "qemu:///system", 15*time.Second, log)
	w := vm.NewWatcher(conn, log)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { conn.Run(ctx); done <- struct{}{} }()
	go func() { w.Run(ctx); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	vm.SetView(h.ex, w)
	return w
}

// waitInView waits until the watcher knows dom.
func waitInView(t *testing.T, w *vm.Watcher, dom libvirt.Domain) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, ok := w.Lookup(dom.Name); ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watcher never saw %s", dom.Name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
