package vm_test

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// A libvirtd that accepts connections but answers nothing (frozen here with
// SIGSTOP, as a deadlock would leave it) holds nothing for good: a call ends
// in unavailable within about the call timeout, the Conn reports itself
// down, its Run returns when told to, and once the daemon answers again the
// Conn is back by itself. The daemon is shared with other tests, so the
// timeout is short and the frozen window a few seconds.
func TestLibvirtdFrozen(t *testing.T) {
	testbed.OwnLibvirtd(t)
	const timeout = 2 * time.Second
	const bound = 3 * timeout // generous: the outcome matters, not the timing
	calls := newHarnessWith(t, timeout, testbed.ImageRoot())
	closing := newHarnessWith(t, timeout, testbed.ImageRoot())
	dom := calls.lv.Domain("frozen", testbed.DomainOptions{Running: true})
	status := func(h harness) func() (vm.Result, error) {
		return func() (vm.Result, error) { return h.do(t, dom.Name, vm.Status, ``) }
	}
	// Both connections up and answering before the freeze; an earlier
	// test's domain going away may hold libvirtd past the short timeout.
	for _, h := range []harness{calls, closing} {
		if res := untilAnswered(t, "status before the freeze", status(h)); res.State != "running" {
			t.Fatalf("status before the freeze: state %q, want running", res.State)
		}
	}

	testbed.FreezeLibvirtd(t, 30*time.Second)
	// Both at once, while both connections still look alive: the call runs
	// into the silence, and the polite close at the end of Run gets no
	// answer either.
	stopped := make(chan struct{})
	go func() {
		within(t, bound, "Run to return after its context ended", closing.stop)
		close(stopped)
	}()
	start := time.Now()
	_, err := calls.do(t, dom.Name, vm.Status, ``)
	if took := time.Since(start); !errors.Is(err, vm.ErrUnavailable) || took > bound {
		t.Errorf("status with libvirtd frozen: %v after %s, want unavailable within %s", err, took, bound)
	}
	if calls.conn.Up() {
		t.Errorf("Up() = true with libvirtd frozen")
	}
	<-stopped
	if closing.conn.Up() {
		t.Errorf("Up() = true after Run returned")
	}
	noneBlockedIn(t, "go-libvirt.(*Libvirt).Disconnect(", 5*time.Second)
	testbed.ThawLibvirtd(t)

	// The worker retries an unavailable command; here the test does.
	if res := untilAnswered(t, "status after the thaw", status(calls)); res.State != "running" {
		t.Fatalf("status after the thaw: state %q, want running", res.State)
	}
	if !calls.conn.Up() {
		t.Errorf("Up() = false after a call succeeded")
	}
}

// untilAnswered runs fn until it ends in anything but unavailable, for up
// to 30 s, as the worker retries an unavailable command, and fails the
// test unless it succeeded.
func untilAnswered(t *testing.T, what string, fn func() (vm.Result, error)) vm.Result {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		res, err := fn()
		if err == nil {
			return res
		}
		if !errors.Is(err, vm.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

// within runs fn and fails the test (without ending it: it may run on a
// goroutine of its own) when fn takes longer than d.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { fn(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Errorf("waited %s for %s", d, what)
	}
}

// noneBlockedIn fails the test when, after d, a goroutine still runs the
// function whose stack frame begins with frame.
func noneBlockedIn(t *testing.T, frame string, d time.Duration) {
	t.Helper()
	buf := make([]byte, 1<<20)
	for deadline := time.Now().Add(d); ; time.Sleep(50 * time.Millisecond) {
		stacks := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, frame) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a goroutine is still in %s after %s:\n%s", frame, d, stacks)
		}
	}
}
