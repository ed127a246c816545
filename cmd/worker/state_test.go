package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// collectStates gathers the state messages of host's domains, by vm.
func collectStates(t *testing.T, nc *nats.Conn, host string) *bustest.Collector[bus.DomainState] {
	t.Helper()
	return bustest.Collect(t, nc, bus.StateSubject(host, "*"), waitTimeout, func(m *nats.Msg) (bus.DomainState, string, error) {
		var s bus.DomainState
		err := json.Unmarshal(m.Data, &s)
		if err == nil && (s.Host != host || m.Subject != bus.StateSubject(host, s.VM) || s.At.IsZero()) {
			err = fmt.Errorf("state %+v on %s", s, m.Subject)
		}
		return s, s.VM, err
	})
}

// takeState waits for the next state message of dom that is in state (one
// of several, separated by |) and has an event and, unless undefined, a
// reason.
func takeState(t *testing.T, c *bustest.Collector[bus.DomainState], dom libvirt.Domain, states string) bus.DomainState {
	t.Helper()
	return c.Take(t, dom.Name+" "+states, func(s bus.DomainState) bool {
		return s.VM == dom.Name && s.UUID == testbed.UUID(dom) && s.Event != "" &&
			(s.Reason != "" || s.State == "undefined") && strings.Contains("|"+states+"|", "|"+s.State+"|")
	})
}

// keyState is the state of host's vm in the bucket: "undefined" when it
// has no key, or what went wrong reading it.
func keyState(t *testing.T, js jetstream.JetStream, host, vm string) string {
	t.Helper()
	kv, err := js.KeyValue(t.Context(), bus.StateBucket)
	if err != nil {
		return err.Error()
	}
	e, err := kv.Get(t.Context(), bus.StateKey(host, vm))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return "undefined"
	}
	if err != nil {
		return err.Error()
	}
	var s bus.DomainState
	if err := json.Unmarshal(e.Value(), &s); err != nil {
		t.Fatalf("key %s: %s is not a domain state", e.Key(), e.Value())
	}
	return s.State
}

// waitKey polls the bucket until host's vm is in state want.
func waitKey(t *testing.T, js jetstream.JetStream, host, vm, want string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		got := keyState(t, js, host, vm)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %s: %s after %s, want %s", bus.StateKey(host, vm), got, waitTimeout, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Changes made around virtbus (go-libvirt straight to libvirtd, a QEMU
// killed) and through it reach the state subject and the bucket; an
// undefined domain's key goes; the gauge has every state.
func TestStateFollowsLibvirt(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	states := collectStates(t, nc, host)
	e := workerEnv(t, url, host)
	startWorker(t, e)
	for _, st := range []string{"running", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"} {
		if _, ok := metric(waitMetrics(t, "http://"+e["VIRTBUS_METRICS_ADDR"]+"/metrics", nil), `virtbus_domains{state="`+st+`"}`); !ok {
			t.Errorf("no virtbus_domains series for %s", st)
		}
	}

	dom := lv.Domain("state", testbed.DomainOptions{})
	takeState(t, states, dom, "shutoff")
	waitKey(t, js, host, dom.Name, "shutoff")

	lv.Call("start "+dom.Name, toState(dom, libvirt.DomainRunning, (*libvirt.Libvirt).DomainCreate))
	if s := takeState(t, states, dom, "running"); s.Reason != "booted" || s.Event != "started" {
		t.Errorf("after a start: %+v", s)
	}
	waitKey(t, js, host, dom.Name, "running")

	lv.Call("suspend "+dom.Name, toState(dom, libvirt.DomainPaused, (*libvirt.Libvirt).DomainSuspend))
	if s := takeState(t, states, dom, "paused"); s.Reason != "user" || s.Event != "suspended" {
		t.Errorf("after a suspend: %+v", s)
	}
	waitKey(t, js, host, dom.Name, "paused")

	// Through virtbus, for once: the command's change is seen the same way.
	command(t, js, host, dom.Name, "start", "state-resume", "", "")
	takeState(t, states, dom, "running")
	waitKey(t, js, host, dom.Name, "running")

	testbed.KillQEMU(t, dom.Name)
	s := takeState(t, states, dom, "crashed|shutoff")
	if s.Reason == "unknown" {
		t.Errorf("after SIGKILL: %+v, want a reason", s)
	}
	waitKey(t, js, host, dom.Name, s.State)

	lv.Call("undefine "+dom.Name, undefine(dom))
	if s := takeState(t, states, dom, "undefined"); s.Event != "undefined" {
		t.Errorf("after an undefine: %+v", s)
	}
	waitKey(t, js, host, dom.Name, "undefined")
}

// A worker that starts finds the bucket as the last one left it and puts
// it right: the key of a domain undefined while no worker ran is deleted
// (and reported on the subject), one defined meanwhile appears.
func TestStateResyncAfterWorkerRestart(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	states := collectStates(t, nc, host)
	e := workerEnv(t, url, host)

	gone := lv.Domain("stategone", testbed.DomainOptions{})
	first := startWorker(t, e)
	waitKey(t, js, host, gone.Name, "shutoff")
	if err := first.stop(t); err != nil {
		t.Fatalf("worker: %v", err)
	}
	takeState(t, states, gone, "shutoff") // the first worker's resync

	lv.Call("undefine "+gone.Name, undefine(gone))
	added := lv.Domain("stateadded", testbed.DomainOptions{})
	startWorker(t, e.with("VIRTBUS_METRICS_ADDR", freeAddr(t), "VIRTBUS_API_ADDR", freeAddr(t)))
	waitKey(t, js, host, gone.Name, "undefined")
	waitKey(t, js, host, added.Name, "shutoff")
	if s := takeState(t, states, gone, "undefined"); s.Event != "resync" {
		t.Errorf("swept key reported as %+v, want event resync", s)
	}
	if s := takeState(t, states, added, "shutoff"); s.Event != "resync" {
		t.Errorf("domain defined meanwhile reported as %+v, want event resync", s)
	}
}

// wantBucketAgrees checks, at the end of a test, that the worker's view of
// each domain on the bus agrees with what libvirt says now, whatever the
// test put the domains through.
func wantBucketAgrees(t *testing.T, url, host string, lv *testbed.Live, doms ...libvirt.Domain) {
	t.Helper()
	js := bustest.JetStream(t, bustest.Connect(t, url))
	for _, d := range doms {
		waitKey(t, js, host, d.Name, vm.StateName(lv.State(d)))
	}
}

// toState changes dom with op unless it is in want already: a call cut off
// by a libvirtd restart is made again, and its first try may have got
// through.
func toState(dom libvirt.Domain, want libvirt.DomainState, op func(*libvirt.Libvirt, libvirt.Domain) error) func(*libvirt.Libvirt) error {
	return func(l *libvirt.Libvirt) error {
		st, _, err := l.DomainGetState(dom, 0)
		if err != nil || libvirt.DomainState(st) == want {
			return err
		}
		return op(l, dom)
	}
}

// undefine undefines dom, done already counting as done.
func undefine(dom libvirt.Domain) func(*libvirt.Libvirt) error {
	return func(l *libvirt.Libvirt) error {
		if err := l.DomainUndefine(dom); err != nil && !libvirt.IsNotFound(err) {
			return err
		}
		return nil
	}
}
