package vm_test

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// Detaches on two domains at once through one Executor (a worker with more
// than one command in flight) share its connection's device event
// subscription: libvirtd takes one per event and connection, and a second
// one made the later detach fail. Several rounds, so that one catches the
// two side by side; each round's disks must be gone as libvirt reports.
func TestDetachConcurrentSCSI(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	doms := []libvirt.Domain{
		h.lv.Domain("concurrent-a", testbed.DomainOptions{Running: true}),
		h.lv.Domain("concurrent-b", testbed.DomainOptions{Running: true}),
	}
	targets := []string{"sda", "sdb", "sdc"}
	for _, dom := range doms {
		for _, target := range targets {
			img := testbed.DiskImage(t, 1)
			h.ok(t, dom, vm.AttachDisk, `{"path":"`+img+`","bus":"scsi","target":"`+target+`"}`, true, "running")
		}
	}
	for _, target := range targets {
		errs := make([]error, len(doms))
		results := make([]vm.Result, len(doms))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, dom := range doms {
			wg.Go(func() {
				<-start
				results[i], errs[i] = h.do(t, dom.Name, vm.DetachDisk, `{"target":"`+target+`","timeout":"20s"}`)
			})
		}
		close(start)
		wg.Wait()
		for i, dom := range doms {
			if errs[i] != nil || !results[i].Changed || results[i].State != "running" {
				t.Fatalf("detach %s from %s: %+v, %v", target, dom.Name, results[i], errs[i])
			}
			for _, inactive := range []bool{false, true} {
				if src, still := h.lv.Disks(dom, inactive)[target]; still {
					t.Fatalf("%s (inactive=%v) still on %s after its detach: %s", target, inactive, dom.Name, src)
				}
			}
		}
	}
}

// A detach whose request libvirtd does not answer (frozen here, as a
// deadlock would leave it) ends unavailable, which the worker retries in
// place, within about the call timeout; not timeout, which blames the
// guest, after the detach timeout. The disks are virtio-scsi, which the
// guest releases at once: only the freeze keeps the request unanswered
// (libvirt holds a virtio detach for 5s, longer than this call timeout).
// Then a detach on the next connection subscribes there afresh and works;
// and Run ends within its bound with a live subscription on a frozen
// daemon, leaving nothing in go-libvirt's unsubscribe.
func TestDetachLibvirtdFrozen(t *testing.T) {
	testbed.OwnLibvirtd(t)
	const timeout = 2 * time.Second
	const bound = 3 * timeout // generous: the outcome matters, not the timing
	h := newHarnessWith(t, timeout, testbed.ImageRoot())
	dom := h.lv.Domain("detachfrozen", testbed.DomainOptions{Running: true})
	// The setup answers within the short timeout unless libvirtd is still
	// busy with an earlier test's domain: then it is asked again.
	for _, target := range []string{"sda", "sdb"} {
		img := testbed.DiskImage(t, 1)
		params := `{"path":"` + img + `","bus":"scsi","target":"` + target + `","persistent":false}`
		untilAnswered(t, "attach "+target, func() (vm.Result, error) { return h.do(t, dom.Name, vm.AttachDisk, params) })
		if _, ok := h.lv.Disks(dom, false)[target]; !ok {
			t.Fatalf("%s not in the live domain after its attach", target)
		}
	}
	detach := func(target string) (vm.Result, error) {
		return h.do(t, dom.Name, vm.DetachDisk, `{"target":"`+target+`","timeout":"20s","persistent":false}`)
	}

	took, err := detachFrozenAtRequest(t, h, timeout, func() error { _, err := detach("sda"); return err })
	switch {
	case err == nil && took <= bound:
		// The keepalive timed out first and dropped the connection, so the
		// request went to the next one, which the thaw let through.
		t.Logf("detach with libvirtd frozen at the request went through on the next connection after %s", took)
	case !errors.Is(err, vm.ErrUnavailable) || took > bound:
		t.Fatalf("detach with libvirtd frozen at the request: %v after %s, want unavailable (or done after the thaw) within %s", err, took, bound)
	case strings.Contains(err.Error(), "guest"):
		t.Errorf("error %q blames the guest for a daemon that did not answer", err)
	}
	// The worker retries an unavailable command; here the test does, until
	// the connection is back. The daemon may have run the request it got
	// before the freeze, so sda may be gone already.
	untilAnswered(t, "detach sda after the thaw", func() (vm.Result, error) { return detach("sda") })
	if res, err := detach("sdb"); err != nil || !res.Changed {
		t.Fatalf("detach sdb on the next connection: %+v, %v", res, err)
	}
	for _, target := range []string{"sda", "sdb"} {
		if src, still := h.lv.Disks(dom, false)[target]; still {
			t.Fatalf("%s still in the live domain after its detach: %s", target, src)
		}
	}

	testbed.FreezeLibvirtd(t, 30*time.Second)
	within(t, bound, "Run to return with a subscription on a frozen libvirtd", h.stop)
	noneBlockedIn(t, "go-libvirt.(*Libvirt).unsubscribeEvents(", 5*time.Second)
	testbed.ThawLibvirtd(t)
}

// detachFrozenAtRequest runs detach with libvirtd frozen just before h's
// first unplug request, after the unplug registered for its events, and
// thaws the daemon past the call timeout: a detach that kept waiting would
// see it answer again. It returns how long detach took, and its error.
func detachFrozenAtRequest(t *testing.T, h harness, timeout time.Duration, detach func() error) (time.Duration, error) {
	t.Helper()
	asked, frozen := make(chan struct{}), make(chan struct{})
	var once sync.Once
	vm.BeforeUnplugAsk(h.ex, func() {
		once.Do(func() {
			close(asked)
			<-frozen
		})
	})
	type outcome struct {
		err  error
		took time.Duration
	}
	done := make(chan outcome, 1)
	go func() {
		start := time.Now()
		err := detach()
		done <- outcome{err, time.Since(start)}
	}()
	<-asked
	testbed.FreezeLibvirtd(t, 30*time.Second) // the test goroutine: it may fail the test
	close(frozen)
	time.Sleep(timeout + timeout/2)
	testbed.ThawLibvirtd(t)
	got := <-done
	return got.took, got.err
}

// An earlier request whose answer got lost may already have taken the
// disk out of the config while the live one is still there. libvirt checks
// the config first, so a LIVE|CONFIG request then fails there ("no target
// device") and never reaches QEMU: the detach asks for the live disk alone
// and ends ok, instead of waiting out its timeout.
func TestDetachWhenTheConfigAlreadyLostTheDisk(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("cfglost", testbed.DomainOptions{Running: true})
	img := testbed.DiskImage(t, 1)
	h.ok(t, dom, vm.AttachDisk, `{"path":"`+img+`","bus":"scsi","target":"sda"}`, true, "running")
	disk := libvirtxml.DomainDisk{
		Device: "disk",
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: img}},
		Target: &libvirtxml.DomainDiskTarget{Dev: "sda", Bus: "scsi"},
	}
	doc, err := disk.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	vm.BeforeUnplugAsk(h.ex, func() {
		once.Do(func() {
			if err := h.lv.Conn().DomainDetachDeviceFlags(dom, doc, uint32(libvirt.DomainDeviceModifyConfig)); err != nil {
				t.Errorf("take sda out of the config: %v", err)
			}
		})
	})
	res, err := h.do(t, dom.Name, vm.DetachDisk, `{"target":"sda","timeout":"6s"}`)
	if err != nil || !res.Changed {
		t.Fatalf("detach: %+v, %v", res, err)
	}
	for _, inactive := range []bool{false, true} {
		if src, still := h.lv.Disks(dom, inactive)["sda"]; still {
			t.Errorf("sda (inactive=%v) still on %s: %s", inactive, dom.Name, src)
		}
	}
}
