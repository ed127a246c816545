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

// callSteps are the actions TestLibvirtCallsPerAction measures, in an
// order that leaves each one something to do.
func callSteps(img string) []struct {
	action vm.Action
	params string
} {
	return []struct {
		action vm.Action
		params string
	}{
		{vm.Start, ``},
		{vm.Start, ``},
		{vm.Status, ``},
		{vm.Pause, ``},
		{vm.Resume, ``},
		{vm.AttachDisk, `{"path":"` + img + `","bus":"scsi","target":"sda"}`},
		{vm.DetachDisk, `{"target":"sda"}`},
		{vm.Reboot, `{"mode":"hard"}`},
		{vm.Stop, `{"mode":"force"}`},
		{vm.Stop, `{"mode":"force"}`},
	}
}

// TestLibvirtCallsPerAction measures how many libvirt calls each action
// makes on a real QEMU domain, without and with the watcher's view of the
// domains (`go test -run TestLibvirtCallsPerAction -v ./internal/vm`
// prints them). The waits for a state poll, so the counts of the actions
// that change state vary a little with the machine's load. It fails when
// an action makes no call at all (the count is broken), goes round in
// circles, or makes more calls with the view than without.
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
			before := h.conn.Calls()
			res, err := h.do(t, dom.Name, s.action, s.params)
			if err != nil {
				t.Fatalf("%s: %s %s: %v", h.name, s.action, s.params, err)
			}
			n := h.conn.Calls() - before
			counts[h.name] = append(counts[h.name], n)
			t.Logf("%-6s %-12s changed=%-5v %3d libvirt calls", h.name, s.action, res.Changed, n)
			if n == 0 || n > 40 {
				t.Errorf("%s: %s made %d libvirt calls", h.name, s.action, n)
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

// staleView knows one domain under a UUID libvirtd no longer has: what the
// watcher holds for the moment between an undefine and its event.
type staleView struct{ info vm.DomainInfo }

func (v staleView) Lookup(name string) (vm.DomainInfo, bool) { return v.info, name == v.info.Name }

// A domain undefined and defined again under the same name has another
// UUID; a view that has not heard of it yet costs a lookup, not a wrong
// answer.
func TestStaleViewFallsBackToLibvirt(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	old := h.lv.Domain("stale", testbed.DomainOptions{})
	h.lv.Remove(old)
	dom := h.lv.DomainNamed(old.Name, testbed.DomainOptions{})
	if dom.UUID == old.UUID {
		t.Fatal("the domain defined again kept its UUID; the test needs a new one")
	}
	vm.SetView(h.ex, staleView{vm.DomainInfo{Name: old.Name, UUID: testbed.UUID(old), State: "shutoff"}})

	res := h.ok(t, dom, vm.Start, ``, true, "running")
	wantState(t, h.lv, dom, libvirt.DomainRunning)
	res = h.ok(t, dom, vm.Status, ``, false, "running")
	if got, want := res.Detail["uuid"], testbed.UUID(dom); got != want {
		t.Errorf("status reports uuid %v, want the new domain's %s", got, want)
	}
}
