package vm_test

import (
	"errors"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// cutReboot runs a soft reboot of the running dom that ends after its
// shutdown, before the start, as a worker that crashed there would leave
// it; the guest "goes down" by the test pulling the plug, as a guest that
// honours ACPI would. It leaves dom shut off with the reboot's intent.
func cutReboot(t *testing.T, dom libvirt.Domain) {
	t.Helper()
	crashing := newHarness(t)
	vm.CutRebootsAfterShutdown(crashing.ex)
	go func() {
		time.Sleep(time.Second)
		_ = crashing.lv.Conn().DomainDestroy(dom)
	}()
	crashing.fails(t, dom.Name, vm.Reboot, `{"timeout":"60s"}`, vm.ErrUnavailable)
	wantState(t, crashing.lv, dom, libvirt.DomainShutoff)
	if !hasIntent(t, crashing.lv.Conn(), dom, libvirt.DomainAffectConfig) {
		t.Fatalf("the cut-off reboot left no intent in the config of %s", dom.Name)
	}
}

// hasIntent reports whether dom carries a reboot intent in the definition
// flags name (live or config).
func hasIntent(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, flags libvirt.DomainModificationImpact) bool {
	t.Helper()
	_, err := l.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{vm.IntentURI}, flags)
	if err == nil {
		return true
	}
	var lerr libvirt.Error
	if errors.As(err, &lerr) && libvirt.ErrorNumber(lerr.Code) == libvirt.ErrNoDomainMetadata {
		return false
	}
	t.Fatalf("metadata of %s: %v", dom.Name, err)
	return false
}

// A soft reboot delivered again after the first was cut off between its
// shutdown and its start finds the domain shut off with the intent, and
// finishes the reboot.
func TestRebootSoftFinishesAfterCrash(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("rebootcut", testbed.DomainOptions{Running: true})
	cutReboot(t, dom)

	res := h.ok(t, dom, vm.Reboot, `{"timeout":"60s"}`, true, "running")
	if res.Detail["method"] != "shutdown" || res.Detail["continued"] != true {
		t.Fatalf("detail %v, want method=shutdown continued=true", res.Detail)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
	for _, flags := range []libvirt.DomainModificationImpact{libvirt.DomainAffectLive, libvirt.DomainAffectConfig} {
		if hasIntent(t, h.lv.Conn(), dom, flags) {
			t.Fatalf("intent left in %s (flags %d) after the reboot ended", dom.Name, flags)
		}
	}
	// Without the intent, a shut off domain is no reboot's business.
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff")
	h.fails(t, dom.Name, vm.Reboot, ``, vm.ErrConflict)
	wantState(t, h.lv, dom, libvirt.DomainShutoff)
}

// An operator's start or stop after a cut-off reboot settles it: the intent
// is gone, and a later reboot of the shut off domain is a conflict again
// rather than a start nobody asked for.
func TestStartStopClearRebootIntent(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		action vm.Action
		params string
		state  string
	}{
		{vm.Stop, `{"mode":"force"}`, "shutoff"},
		{vm.Start, ``, "running"},
	} {
		t.Run(string(c.action), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			dom := h.lv.Domain("intent"+string(c.action), testbed.DomainOptions{Running: true})
			cutReboot(t, dom)
			h.ok(t, dom, c.action, c.params, c.action == vm.Start, c.state)
			for _, flags := range []libvirt.DomainModificationImpact{libvirt.DomainAffectCurrent, libvirt.DomainAffectConfig} {
				if hasIntent(t, h.lv.Conn(), dom, flags) {
					t.Fatalf("intent left in %s (flags %d) after %s", dom.Name, flags, c.action)
				}
			}
			if c.action == vm.Stop {
				h.fails(t, dom.Name, vm.Reboot, ``, vm.ErrConflict)
				wantState(t, h.lv, dom, libvirt.DomainShutoff)
			}
		})
	}
}

// With a view, an executor remembers the domains it found without a
// reboot intent and does not read it again on their next start or stop:
// but never past an intent its own soft reboot wrote, nor past a new
// definition, which may bring one.
func TestIntentFreeIsForgotten(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	w := runWatcher(t, h)
	dom := h.lv.Domain("intentfree", testbed.DomainOptions{Running: true})
	waitInView(t, w, dom)
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff") // reads it: none
	before := h.conn.Calls()
	h.ok(t, dom, vm.Start, ``, true, "running")
	if n := h.conn.Calls() - before; n != 1 {
		t.Errorf("start of a domain known without an intent made %d libvirt calls, want 1 (the create)", n)
	}

	// Its own soft reboot, cut off after the shutdown, leaves an intent.
	vm.CutRebootsAfterShutdown(h.ex)
	go func() {
		time.Sleep(time.Second)
		_ = h.lv.Conn().DomainDestroy(dom)
	}()
	h.fails(t, dom.Name, vm.Reboot, `{"timeout":"60s"}`, vm.ErrUnavailable)
	if !hasIntent(t, h.lv.Conn(), dom, libvirt.DomainAffectConfig) {
		t.Fatal("the cut-off reboot left no intent")
	}
	h.ok(t, dom, vm.Start, ``, true, "running")
	if hasIntent(t, h.lv.Conn(), dom, libvirt.DomainAffectConfig) {
		t.Fatal("start left the intent its own reboot wrote")
	}

	// A definition that carries an intent, as an operator's virsh define
	// of a saved XML could.
	l := h.lv.Conn()
	def := w.Definition(dom.UUID)
	if err := l.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{`<reboot since="2026-01-01T00:00:00Z"/>`},
		libvirt.OptString{"virtbus"}, libvirt.OptString{vm.IntentURI}, libvirt.DomainAffectConfig); err != nil {
		t.Fatal(err)
	}
	xml, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.DomainDefineXML(xml); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); w.Definition(dom.UUID) == def; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the watcher never heard of the new definition")
		}
	}
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff")
	if hasIntent(t, h.lv.Conn(), dom, libvirt.DomainAffectConfig) {
		t.Fatal("stop left the intent a new definition brought")
	}
}
