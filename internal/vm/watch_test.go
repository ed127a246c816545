package vm_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// watchTimeout bounds each wait for the watcher to see something; it only
// turns a hang into a readable failure.
const watchTimeout = time.Minute

// recorder keeps what a watcher reported. The daemon is shared, so tests
// look only at the domains they made.
type recorder struct {
	mu      sync.Mutex
	changes []change
	taken   int // changes before this one were matched already
	resyncs int
	last    []vm.DomainInfo // OnResync's latest
}

type change struct {
	d     vm.DomainInfo
	event string
}

func (c change) String() string {
	return fmt.Sprintf("%s %s/%s (%s)", c.d.Name, c.d.State, c.d.Reason, c.event)
}

// watch runs a watcher on h's connection until the test ends, and waits
// for its first resync.
func watch(t *testing.T, h harness) (*vm.Watcher, *recorder) {
	t.Helper()
	w, rec, _ := watchWith(t, h, func(*vm.Watcher) {})
	return w, rec
}

// watchWith is watch with setup run on the watcher before it starts, and
// stop, which stops it before the test ends.
func watchWith(t *testing.T, h harness, setup func(*vm.Watcher)) (w *vm.Watcher, rec *recorder, stop func()) {
	t.Helper()
	rec = &recorder{}
	w = vm.NewWatcher(h.conn, testLog())
	setup(w)
	w.OnChange = func(d vm.DomainInfo, event string) {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		rec.changes = append(rec.changes, change{d, event})
	}
	w.OnResync = func(all []vm.DomainInfo) {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		rec.resyncs++
		rec.last = all
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	stop = sync.OnceFunc(func() { cancel(); <-done })
	t.Cleanup(stop)
	rec.waitResyncs(t, 1)
	return w, rec, stop
}

func (r *recorder) waitResyncs(t *testing.T, n int) {
	t.Helper()
	eventually(t, fmt.Sprintf("%d resyncs", n), func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.resyncs >= n
	})
}

// next waits for the first change of dom after those matched before that
// match accepts, and returns it.
func (r *recorder) next(t *testing.T, dom string, what string, match func(change) bool) change {
	t.Helper()
	var got change
	deadline := time.Now().Add(watchTimeout)
	for {
		r.mu.Lock()
		for i := r.taken; i < len(r.changes); i++ {
			if c := r.changes[i]; c.d.Name == dom && match(c) {
				r.taken, got = i+1, c
				r.mu.Unlock()
				return got
			}
		}
		seen := r.of(dom)
		r.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no change of %s: %s within %s; seen: %v", dom, what, watchTimeout, seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// of lists the changes of dom; r.mu is held.
func (r *recorder) of(dom string) []change {
	var out []change
	for _, c := range r.changes {
		if c.d.Name == dom {
			out = append(out, c)
		}
	}
	return out
}

func is(state, reason, event string) func(change) bool {
	return func(c change) bool { return c.d.State == state && c.d.Reason == reason && c.event == event }
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(watchTimeout); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s", what, watchTimeout)
		}
	}
}

func testLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// wantView checks what the watcher's view holds for dom, by name and by
// UUID, and that Domains lists the same.
func wantView(t *testing.T, w *vm.Watcher, dom libvirt.Domain, state, reason string) {
	t.Helper()
	eventually(t, fmt.Sprintf("%s %s/%s in the view", dom.Name, state, reason), func() bool {
		d, ok := w.Lookup(dom.Name)
		return ok && d.State == state && d.Reason == reason
	})
	d, ok := w.Lookup(strings.ToUpper(testbed.UUID(dom)))
	if !ok || d.Name != dom.Name || d.UUID != testbed.UUID(dom) {
		t.Errorf("Lookup by UUID %s: %+v, %v", testbed.UUID(dom), d, ok)
	}
	if i := slices.IndexFunc(w.Domains(), func(x vm.DomainInfo) bool { return x.Name == dom.Name }); i < 0 {
		t.Errorf("%s not among Domains()", dom.Name)
	}
}

// The view follows a domain through its life, made with go-libvirt around
// virtbus, and each change is reported once with the event that told it
// and the state and reason libvirt gives.
func TestWatcherFollowsLifecycle(t *testing.T) {
	h := newHarness(t)
	w, rec := watch(t, h)
	dom := h.lv.Domain("watch", testbed.DomainOptions{})
	rec.next(t, dom.Name, "defined", is("shutoff", "unknown", "defined"))
	wantView(t, w, dom, "shutoff", "unknown")

	steps := []struct {
		what                 string
		do                   func(l *libvirt.Libvirt) error
		state, reason, event string
	}{
		{"start", func(l *libvirt.Libvirt) error { return l.DomainCreate(dom) }, "running", "booted", "started"},
		{"suspend", func(l *libvirt.Libvirt) error { return l.DomainSuspend(dom) }, "paused", "user", "suspended"},
		{"resume", func(l *libvirt.Libvirt) error { return l.DomainResume(dom) }, "running", "unpaused", "resumed"},
		{"destroy", func(l *libvirt.Libvirt) error { return l.DomainDestroy(dom) }, "shutoff", "destroyed", "stopped"},
	}
	for _, s := range steps {
		if err := s.do(h.lv.Conn()); err != nil {
			t.Fatalf("%s: %v", s.what, err)
		}
		rec.next(t, dom.Name, s.what, is(s.state, s.reason, s.event))
		wantView(t, w, dom, s.state, s.reason)
	}

	if err := h.lv.Conn().DomainUndefine(dom); err != nil {
		t.Fatal(err)
	}
	c := rec.next(t, dom.Name, "undefined", is(vm.StateUndefined, "", "undefined"))
	if c.d.UUID != testbed.UUID(dom) {
		t.Errorf("undefined change %+v: want the domain's UUID", c.d)
	}
	if d, ok := w.Lookup(dom.Name); ok {
		t.Errorf("Lookup after undefine: %+v", d)
	}
	if d, ok := w.Lookup(testbed.UUID(dom)); ok {
		t.Errorf("Lookup by UUID after undefine: %+v", d)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if n := len(rec.of(dom.Name)); n != len(steps)+2 {
		t.Errorf("changes of %s: %v, want one per step", dom.Name, rec.of(dom.Name))
	}
}

// A QEMU that dies (SIGKILL) is seen with a reason; a transient domain
// that stops is gone.
func TestWatcherQEMUKilled(t *testing.T) {
	h := newHarness(t)
	w, rec := watch(t, h)
	dom := h.lv.Domain("watchkill", testbed.DomainOptions{Running: true})
	tmp := h.lv.Domain("watchtransient", testbed.DomainOptions{Transient: true})
	rec.next(t, dom.Name, "running", is("running", "booted", "started"))
	rec.next(t, tmp.Name, "running", is("running", "booted", "started"))

	testbed.KillQEMU(t, dom.Name)
	c := rec.next(t, dom.Name, "down", func(c change) bool { return c.d.State == "shutoff" || c.d.State == "crashed" })
	t.Logf("after SIGKILL: %v", c)
	if c.d.Reason == "" || c.d.Reason == "unknown" || c.event != "stopped" && c.event != "crashed" {
		t.Errorf("after SIGKILL: %v, want a reason and the stop or crash event", c)
	}
	wantView(t, w, dom, c.d.State, c.d.Reason)

	testbed.KillQEMU(t, tmp.Name)
	rec.next(t, tmp.Name, "gone", func(c change) bool { return c.d.State == vm.StateUndefined })
	if _, ok := w.Lookup(tmp.Name); ok {
		t.Errorf("transient %s still in the view after it stopped", tmp.Name)
	}
}

// libvirtd restarts, and a domain's QEMU dies meanwhile: the watcher
// subscribes again on the new connection, reads everything again (the
// view shows the domain down), and goes on hearing of events.
func TestWatcherLibvirtdRestart(t *testing.T) {
	h := newHarness(t)
	testbed.OwnLibvirtd(t)
	w, rec := watch(t, h)
	dom := h.lv.Domain("watchrestart", testbed.DomainOptions{Running: true})
	rec.next(t, dom.Name, "running", is("running", "booted", "started"))

	testbed.StopLibvirtd(t)
	testbed.KillQEMU(t, dom.Name)
	testbed.StartLibvirtd(t)
	rec.waitResyncs(t, 2)
	// libvirtd may notice the dead QEMU as it starts, before the watcher
	// subscribed (the resync finds it) or after (an event tells it).
	c := rec.next(t, dom.Name, "down", func(c change) bool { return c.d.State == "shutoff" })
	t.Logf("after the restart: %v", c)
	if c.event != vm.EventResync && c.event != "stopped" {
		t.Errorf("after the restart: %v, want it found by the resync or a stop event", c)
	}
	wantView(t, w, dom, "shutoff", c.d.Reason)

	if err := h.lv.Conn().DomainCreate(dom); err != nil {
		t.Fatal(err)
	}
	rec.next(t, dom.Name, "started on the new connection", is("running", "booted", "started"))
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if !slices.ContainsFunc(rec.last, func(d vm.DomainInfo) bool { return d.Name == dom.Name }) {
		t.Errorf("%s not in the last resync's view", dom.Name)
	}
}

func TestReasonAndEventNames(t *testing.T) {
	for _, c := range []struct {
		st     libvirt.DomainState
		reason int32
		want   string
	}{
		{libvirt.DomainShutoff, int32(libvirt.DomainShutoffDestroyed), "destroyed"},
		{libvirt.DomainShutoff, int32(libvirt.DomainShutoffFromSnapshot), "from-snapshot"},
		{libvirt.DomainShutoff, int32(libvirt.DomainShutoffDaemon), "daemon"},
		{libvirt.DomainRunning, int32(libvirt.DomainRunningUnpaused), "unpaused"},
		{libvirt.DomainRunning, int32(libvirt.DomainRunningPostcopyFailed), "postcopy-failed"},
		{libvirt.DomainPaused, int32(libvirt.DomainPausedUser), "user"},
		{libvirt.DomainPaused, int32(libvirt.DomainPausedAPIError), "api-error"},
		{libvirt.DomainShutdown, int32(libvirt.DomainShutdownUser), "user"},
		{libvirt.DomainCrashed, int32(libvirt.DomainCrashedPanicked), "panicked"},
		{libvirt.DomainPmsuspended, 0, "unknown"},
		{libvirt.DomainShutoff, 99, "unknown"},
		{libvirt.DomainShutoff, -1, "unknown"},
		{libvirt.DomainState(42), 1, "unknown"},
	} {
		if got := vm.ReasonName(c.st, c.reason); got != c.want {
			t.Errorf("ReasonName(%s, %d) = %q, want %q", vm.StateName(c.st), c.reason, got, c.want)
		}
	}
	for ev, want := range map[libvirt.DomainEventType]string{
		libvirt.DomainEventDefined: "defined", libvirt.DomainEventUndefined: "undefined",
		libvirt.DomainEventStarted: "started", libvirt.DomainEventSuspended: "suspended",
		libvirt.DomainEventResumed: "resumed", libvirt.DomainEventStopped: "stopped",
		libvirt.DomainEventShutdown: "shutdown", libvirt.DomainEventPmsuspended: "pmsuspended",
		libvirt.DomainEventCrashed: "crashed", 9: "unknown", -1: "unknown",
	} {
		if got := vm.EventName(int32(ev)); got != want {
			t.Errorf("EventName(%d) = %q, want %q", ev, got, want)
		}
	}
}

// A view left wrong with no event to come (an event libvirt never sent, a
// read made half way through a change) is put right by the next periodic
// resync, which reports the difference; one that finds nothing changed
// says nothing.
func TestWatcherResyncsPeriodically(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("resync", testbed.DomainOptions{})
	w, rec, _ := watchWith(t, h, func(w *vm.Watcher) { vm.ResyncEvery(w, 300*time.Millisecond) })
	wantView(t, w, dom, "shutoff", "unknown")
	rec.mu.Lock()
	resyncs, changes := rec.resyncs, len(rec.of(dom.Name))
	rec.mu.Unlock()
	// Three periodic resyncs that find this domain as the view has it (the
	// daemon is shared: other tests' domains may change meanwhile).
	time.Sleep(time.Second)
	rec.mu.Lock()
	still := len(rec.of(dom.Name))
	rec.mu.Unlock()
	if still != changes {
		t.Errorf("resyncs that found %s unchanged reported %d changes of it", dom.Name, still-changes)
	}

	vm.Misremember(w, dom.UUID, "running")
	rec.next(t, dom.Name, "shutoff again, from a resync", is("shutoff", "unknown", vm.EventResync))
	wantView(t, w, dom, "shutoff", "unknown")
	rec.waitResyncs(t, resyncs+1)
}

// A watcher that stops reads every domain once more, so that what it
// reported last is libvirt's state, even where a read made half way
// through a change had left its view behind.
func TestWatcherReadsEveryDomainAsItStops(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("laststop", testbed.DomainOptions{})
	w, rec, stop := watchWith(t, h, func(*vm.Watcher) {})
	wantView(t, w, dom, "shutoff", "unknown")
	rec.mu.Lock()
	before := len(rec.of(dom.Name))
	rec.mu.Unlock()
	vm.Misremember(w, dom.UUID, "paused")
	stop()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	got := rec.of(dom.Name)[before:]
	if len(got) != 1 || got[0].d.State != "shutoff" || got[0].event != vm.EventResync {
		t.Errorf("changes of %s at the stop: %v, want one, shutoff, from the resync at the stop", dom.Name, got)
	}
}
