package vm_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// A start, forced stop, pause or resume acts on the state the view knows,
// which is behind libvirtd for a moment after every change. These tests
// put the view behind on purpose and check, with libvirt, that no action
// answers from a state that is gone.

// laggingView is a watcher whose view tells some domains' states wrong,
// as it does between a change and its event; events come as they do.
type laggingView struct {
	*vm.Watcher
	lies map[string]string // domain name → the state the view tells
}

func (v laggingView) Lookup(name string) (vm.DomainInfo, bool) {
	d, ok := v.Watcher.Lookup(name)
	if st, lie := v.lies[name]; ok && lie {
		d.State, d.Reason = st, ""
	}
	return d, ok
}

// Whatever the view says, libvirtd's state decides: an answer without a
// request is checked first, and a request libvirtd refuses as conflict
// sends the action to the state libvirtd reads.
func TestLaggingViewIsChecked(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	w := runWatcher(t, h)
	cases := []struct {
		name    string
		real    libvirt.DomainState // the domain's state
		view    string              // the state the view tells
		action  vm.Action
		params  string
		changed bool
		want    libvirt.DomainState // afterwards
		refused bool                // conflict
	}{
		{"forced stop, view says shut off", libvirt.DomainRunning, "shutoff", vm.Stop, `{"mode":"force"}`, true, libvirt.DomainShutoff, false},
		{"start, view says running", libvirt.DomainShutoff, "running", vm.Start, ``, true, libvirt.DomainRunning, false},
		{"pause, view says paused", libvirt.DomainRunning, "paused", vm.Pause, ``, true, libvirt.DomainPaused, false},
		{"resume, view says running", libvirt.DomainPaused, "running", vm.Resume, ``, true, libvirt.DomainRunning, false},
		{"pause, view says shut off", libvirt.DomainRunning, "shutoff", vm.Pause, ``, true, libvirt.DomainPaused, false},
		{"start, view says shut off", libvirt.DomainRunning, "shutoff", vm.Start, ``, false, libvirt.DomainRunning, false},
		{"forced stop, view says running", libvirt.DomainShutoff, "running", vm.Stop, `{"mode":"force"}`, false, libvirt.DomainShutoff, false},
		{"resume, view says paused", libvirt.DomainShutoff, "paused", vm.Resume, ``, false, libvirt.DomainShutoff, true},
	}
	doms := make([]libvirt.Domain, len(cases))
	lies := map[string]string{}
	for i, c := range cases {
		doms[i] = h.lv.Domain(fmt.Sprintf("lag%d", i), testbed.DomainOptions{Running: c.real != libvirt.DomainShutoff})
		if c.real == libvirt.DomainPaused {
			h.lv.Call("suspend "+doms[i].Name, func(l *libvirt.Libvirt) error { return l.DomainSuspend(doms[i]) })
		}
		waitInView(t, w, doms[i])
		lies[doms[i].Name] = c.view
	}
	vm.SetView(h.ex, laggingView{Watcher: w, lies: lies})
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dom := doms[i]
			if c.refused {
				h.fails(t, dom.Name, c.action, c.params, vm.ErrConflict)
			} else {
				h.ok(t, dom, c.action, c.params, c.changed, vm.StateName(c.want))
			}
			wantState(t, h.lv, dom, c.want)
		})
	}
}

// The view hears of a change made around virtbus only after libvirtd's
// event: a forced stop sent right after a start (and a start right after a
// destroy) acts, and does not answer from the state before.
func TestViewBehindChangeAroundVirtbus(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	w := runWatcher(t, h)
	dom := h.lv.Domain("behind", testbed.DomainOptions{})
	create := func(l *libvirt.Libvirt) error { return l.DomainCreate(dom) }
	steps := []struct {
		around  func(l *libvirt.Libvirt) error // nil: nothing
		before  string                         // the state the view shows before
		action  vm.Action
		params  string
		changed bool
		want    libvirt.DomainState
	}{
		{create, "shutoff", vm.Stop, `{"mode":"force"}`, true, libvirt.DomainShutoff},
		{create, "shutoff", vm.Start, ``, false, libvirt.DomainRunning},
		{func(l *libvirt.Libvirt) error { return l.DomainDestroy(dom) }, "running", vm.Start, ``, true, libvirt.DomainRunning},
		{func(l *libvirt.Libvirt) error { return l.DomainSuspend(dom) }, "running", vm.Resume, ``, true, libvirt.DomainRunning},
		{nil, "running", vm.Pause, ``, true, libvirt.DomainPaused},
		{func(l *libvirt.Libvirt) error { return l.DomainResume(dom) }, "paused", vm.Pause, ``, true, libvirt.DomainPaused},
	}
	for _, s := range steps {
		waitViewState(t, w, dom, s.before)
		if s.around != nil {
			if err := s.around(h.lv.Conn()); err != nil {
				t.Fatal(err)
			}
		}
		seen, _ := w.Lookup(dom.Name)
		res := h.ok(t, dom, s.action, s.params, s.changed, vm.StateName(s.want))
		t.Logf("%s %s with the view at %s a moment before: changed=%v", s.action, s.params, seen.State, res.Changed)
		wantState(t, h.lv, dom, s.want)
	}
}

// waitViewState waits until the watcher's view shows dom in state.
func waitViewState(t *testing.T, w *vm.Watcher, dom libvirt.Domain, state string) {
	t.Helper()
	eventually(t, dom.Name+" "+state+" in the view", func() bool {
		d, ok := w.Lookup(dom.Name)
		return ok && d.State == state
	})
}

// staleView knows one domain under a UUID libvirtd no longer has: what the
// watcher holds for the moment between an undefine and its event.
type staleView struct{ info vm.DomainInfo }

func (v staleView) Lookup(name string) (vm.DomainInfo, bool) { return v.info, name == v.info.Name }

// Await hears nothing, as a view whose subscription is down.
func (staleView) Await(libvirt.UUID) *vm.Awaiting { return nil }

func (staleView) Definition(libvirt.UUID) uint64 { return 0 }

// A domain undefined and defined again under the same name has another
// UUID; a view that has not heard of it yet costs a lookup, not a wrong
// answer: the request libvirtd does not know the old UUID for, and the
// check of an answer without one, both find the new domain.
func TestStaleViewFallsBackToLibvirt(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		running bool   // the new domain's state
		view    string // the old one's, as the view tells it
		action  vm.Action
		params  string
		want    libvirt.DomainState
	}{
		{"start", false, "shutoff", vm.Start, ``, libvirt.DomainRunning},
		{"start, view says running", false, "running", vm.Start, ``, libvirt.DomainRunning},
		{"forced stop", true, "running", vm.Stop, `{"mode":"force"}`, libvirt.DomainShutoff},
		{"pause", true, "running", vm.Pause, ``, libvirt.DomainPaused},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			old := h.lv.Domain("stale", testbed.DomainOptions{})
			h.lv.Remove(old)
			dom := h.lv.DomainNamed(old.Name, testbed.DomainOptions{Running: c.running})
			if dom.UUID == old.UUID {
				t.Fatal("the domain defined again kept its UUID; the test needs a new one")
			}
			vm.SetView(h.ex, staleView{vm.DomainInfo{Name: old.Name, UUID: testbed.UUID(old), State: c.view}})

			h.ok(t, dom, c.action, c.params, true, vm.StateName(c.want))
			wantState(t, h.lv, dom, c.want)
			res := h.ok(t, dom, vm.Status, ``, false, vm.StateName(c.want))
			if got, want := res.Detail["uuid"], testbed.UUID(dom); got != want {
				t.Errorf("status reports uuid %v, want the new domain's %s", got, want)
			}
		})
	}
}

// deafView is a watcher whose subscription looks live, yet no event of
// it ever arrives: every event lost.
type deafView struct{ *vm.Watcher }

func (deafView) Await(libvirt.UUID) *vm.Awaiting { return new(vm.Awaiting) }

// An event that never comes costs a wait of vm.EventPoll, after which
// libvirtd is asked: each action ends, well within its 5 s bound, with
// the state libvirtd reports.
func TestLostEventFallsBackToAsking(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	w := runWatcher(t, h)
	vm.SetView(h.ex, deafView{w})
	dom := h.lv.Domain("deaf", testbed.DomainOptions{})
	waitInView(t, w, dom)
	for _, s := range []struct {
		action vm.Action
		params string
		want   libvirt.DomainState
	}{
		{vm.Start, ``, libvirt.DomainRunning},
		{vm.Pause, ``, libvirt.DomainPaused},
		{vm.Resume, ``, libvirt.DomainRunning},
		{vm.Stop, `{"mode":"force"}`, libvirt.DomainShutoff},
	} {
		began := time.Now()
		h.ok(t, dom, s.action, s.params, true, vm.StateName(s.want))
		took := time.Since(began)
		t.Logf("%s without its event: %s", s.action, took)
		if took < vm.EventPoll {
			t.Errorf("%s ended after %s, before it could have asked: confirmed by what?", s.action, took)
		}
		if bound := 5 * time.Second; took >= bound {
			t.Errorf("%s took %s: the wait ran to its %s bound instead of asking", s.action, took, bound)
		}
		wantState(t, h.lv, dom, s.want)
	}
}
