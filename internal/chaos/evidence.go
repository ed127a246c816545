package chaos

import (
	"context"
	"encoding/json"
	"slices"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/testdriver"
)

// evidence is what the checks look at, gathered once after the run.
type evidence struct {
	o          *Outcome
	steps      map[string]Step           // by id
	events     map[string][]arrival      // copies on the event subject, by id, in arrival order
	replies    map[string][]arrival      // copies on the reply subject
	foreign    []arrival                 // completions of ids the harness never published
	bad        []string                  // messages that were no completion
	final      map[string]bus.Completion // the first event copy, else the record
	fromRecord map[string]bool           // final came from VIRTBUS_DONE: never seen on the event subject
	outOfOrder map[string]string         // id -> the later-published id that arrived before it
	resets     []testdriver.Reset
	crashes    map[string][]time.Time // per QEMU VM, when libvirtd stopped it as crashed
	driverErrs []string
	last       time.Time // the last first copy arrived
}

func (h *Harness) gather(o *Outcome) *evidence {
	e := &evidence{o: o, steps: map[string]Step{}, events: map[string][]arrival{}, replies: map[string][]arrival{},
		final: map[string]bus.Completion{}, fromRecord: map[string]bool{}, outOfOrder: map[string]string{}}
	for _, steps := range o.Plans {
		for _, s := range steps {
			e.steps[s.ID] = s
		}
	}
	all, bad := h.col.snapshot()
	e.bad = bad
	for _, a := range all {
		switch _, ours := e.steps[a.C.ID]; {
		case !ours:
			e.foreign = append(e.foreign, a)
		case a.Reply:
			e.replies[a.C.ID] = append(e.replies[a.C.ID], a)
		default:
			if len(e.events[a.C.ID]) == 0 {
				e.final[a.C.ID] = a.C
				e.last = maxTime(e.last, a.At)
			}
			e.events[a.C.ID] = append(e.events[a.C.ID], a)
		}
	}
	h.fillFromRecords(e)
	e.resets, e.driverErrs = h.td.History()
	e.crashes = h.crashes(o.Start)
	return e
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// fillFromRecords looks up, in the worker's record bucket, every command
// that no completion on the event subject answered: a record means the
// worker did answer it (and acked it) but the event never reached the
// harness.
func (h *Harness) fillFromRecords(e *evidence) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := h.js.KeyValue(ctx, bus.RecordBucket)
	if err != nil {
		h.t.Logf("open %s: %v", bus.RecordBucket, err)
		return
	}
	for id, s := range e.steps {
		if _, ok := e.final[id]; ok {
			continue
		}
		// The harness's ids and host ids are made of [a-z0-9-] only, so the
		// key is the plain "<host>.<id>" the bus writes for such ids.
		entry, err := kv.Get(ctx, s.VM.Host+"."+id)
		if err != nil {
			continue
		}
		var c bus.Completion
		if json.Unmarshal(entry.Value(), &c) == nil {
			e.final[id] = c
			e.fromRecord[id] = true
		}
	}
}

// first is the first copy of id's completion on the event subject.
func (e *evidence) first(id string) (arrival, bool) {
	if c := e.events[id]; len(c) > 0 {
		return c[0], true
	}
	return arrival{}, false
}

// vmNames lists the VMs in a stable order.
func (e *evidence) vmNames() []string {
	var out []string
	for name := range e.o.Plans {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}
