package chaos

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/virtbus/virtbus/internal/testbed"
)

// faultKind is one row of the table that drives the faults: how many a
// run injects and how one is injected. inject runs on the test's own
// goroutine, so it may end the test.
type faultKind struct {
	name   string
	count  func(s Settings) int
	inject func(h *Harness, f *fault)
}

func once(Settings) int { return 1 }

var faultKinds = []faultKind{
	{"sigkill-worker", func(s Settings) int { return s.Kills }, (*Harness).killWorker},
	{"nats-restart", once, (*Harness).restartNATS},
	{"libvirtd-restart", once, (*Harness).restartLibvirtd},
	{"libvirtd-freeze", once, (*Harness).freezeLibvirtd},
}

// fault is what one injected fault did.
type fault struct {
	Kind     string
	Offset   time.Duration // planned moment, from the start of publishing
	At       time.Time     // injected
	Back     time.Time     // whole again: worker started, server up, daemon answering
	Affected []string      // hosts whose next completion measures the recovery
	What     string
	Err      error
	ready    chan string // sigkill: when the next worker said it was ready
}

// schedule draws each fault's moment at random between 5% and 85% of the
// publishing time, so every fault hits a run with commands in flight.
func schedule(rng *rand.Rand, s Settings) []*fault {
	var out []*fault
	for _, k := range faultKinds {
		for range k.count(s) {
			frac := 0.05 + 0.8*rng.Float64()
			out = append(out, &fault{Kind: k.name, Offset: time.Duration(frac * float64(s.PublishFor))})
		}
	}
	slices.SortFunc(out, func(a, b *fault) int { return int(a.Offset - b.Offset) })
	return out
}

// injectAll injects the faults at their moments, one after the other.
func (h *Harness) injectAll(start time.Time, faults []*fault) {
	for _, f := range faults {
		time.Sleep(time.Until(start.Add(f.Offset)))
		f.At = time.Now()
		for _, k := range faultKinds {
			if k.name == f.Kind {
				k.inject(h, f)
			}
		}
		if f.Back.IsZero() {
			f.Back = time.Now()
		}
		h.faults = append(h.faults, f)
		h.t.Logf("fault %-16s at +%-8s %s", f.Kind, f.At.Sub(start).Round(time.Millisecond), f.What)
	}
}

func (h *Harness) allHosts() []string {
	out := make([]string, 0, len(h.work))
	for _, w := range h.work {
		out = append(out, w.Host)
	}
	return out
}

// killWorker SIGKILLs one of the workers, picked at random, and starts it
// again once it is dead. What the consumer counted as unacked at that
// moment is what the next worker must take over in order.
func (h *Harness) killWorker(f *fault) {
	w := h.work[h.rng.IntN(len(h.work))]
	f.Affected = []string{w.Host}
	pending := "?"
	if info, err := h.consumer(w.Host); err == nil {
		pending = fmt.Sprint(info.NumAckPending)
	}
	old, next, err := w.kill()
	f.Back = time.Now()
	if err != nil {
		f.Err = err
		f.What = err.Error()
		return
	}
	f.What = fmt.Sprintf("%s worker pid %d killed holding %s unacked; restarted as pid %d", w.Kind, old.Pid, pending, next.Pid)
	f.ready = make(chan string, 1)
	go func() {
		d, err := w.waitReady(5 * time.Minute)
		if err != nil {
			f.ready <- "not ready in 5m"
			return
		}
		f.ready <- fmt.Sprintf("ready +%s", (f.Back.Sub(f.At) + d).Round(100*time.Millisecond))
	}()
}

func (h *Harness) restartNATS(f *fault) {
	f.Affected = h.allHosts()
	down, err := h.nats.restart()
	f.Back = time.Now()
	f.Err = err
	f.What = fmt.Sprintf("server shut down and started again on the same port and store: no server for %s", down.Round(time.Millisecond))
	if err != nil {
		f.What += ": " + err.Error()
	}
}

// restartLibvirtd stops the test bed's libvirtd and starts it again:
// QEMU domains keep running; the test driver forgets its domains.
func (h *Harness) restartLibvirtd(f *fault) {
	f.Affected = h.allHosts()
	oldPid, _ := testbed.LibvirtdPID()
	testbed.StopLibvirtd(h.t)
	stopped := time.Now()
	testbed.StartLibvirtd(h.t)
	f.Back = time.Now()
	newPid, _ := testbed.LibvirtdPID()
	f.What = fmt.Sprintf("pid %d stopped in %s; pid %d answering %s later", oldPid,
		stopped.Sub(f.At).Round(time.Millisecond), newPid, f.Back.Sub(stopped).Round(time.Millisecond))
}

// freezeLibvirtd stops libvirtd with SIGSTOP for twice the workers'
// libvirt timeout: calls in flight time out, and so do reconnects. The
// test bed thaws it in a cleanup too, and a watchdog of its own thaws it
// should the test binary die while it is frozen.
func (h *Harness) freezeLibvirtd(f *fault) {
	f.Affected = h.allHosts()
	hold := 2 * h.S.LibvirtTimeout
	pid, _ := testbed.LibvirtdPID()
	testbed.FreezeLibvirtd(h.t, hold+30*time.Second)
	time.Sleep(hold)
	testbed.ThawLibvirtd(h.t)
	f.Back = time.Now()
	f.What = fmt.Sprintf("pid %d SIGSTOP for %s, then SIGCONT", pid, hold)
}
