package vm_test

import (
	"testing"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// TestLibvirtCallsPerAction measures how many libvirt calls each action
// makes on a real QEMU domain (`go test -run TestLibvirtCallsPerAction -v
// ./internal/vm` prints them). The waits for a state poll, so the counts
// of the actions that change state vary a little with the machine's load.
// It fails when an action makes no call at all (the count is broken) or
// goes round in circles.
func TestLibvirtCallsPerAction(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("calls", testbed.DomainOptions{})
	img := testbed.DiskImage(t, 1)
	for _, s := range []struct {
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
	} {
		before := h.conn.Calls()
		res, err := h.do(t, dom.Name, s.action, s.params)
		if err != nil {
			t.Fatalf("%s %s: %v", s.action, s.params, err)
		}
		n := h.conn.Calls() - before
		t.Logf("%-12s changed=%-5v %3d libvirt calls  %s", s.action, res.Changed, n, s.params)
		if n == 0 || n > 40 {
			t.Errorf("%s made %d libvirt calls", s.action, n)
		}
	}
}
