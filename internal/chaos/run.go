package chaos

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// settle is how long the run keeps listening after the last completion,
// for late re-publications.
const settle = 3 * time.Second

// Outcome is what a run produced, for the checks.
type Outcome struct {
	Plans     map[string][]Step // per VM, in publish order
	Ledger    *ledger
	Start     time.Time // publishing began
	Published time.Time // the last producer finished
}

// Run publishes every VM's plan from the producers while the faults are
// injected, then waits for the completions.
func (h *Harness) Run() *Outcome {
	o := &Outcome{Plans: map[string][]Step{}, Ledger: &ledger{byID: map[string]published{}}}
	producers := h.producers(o)
	faults := schedule(h.rng, h.S)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	o.Start = time.Now().Add(500 * time.Millisecond)
	var wg sync.WaitGroup
	for _, p := range producers {
		every := h.S.PublishFor / time.Duration(max(len(p.steps), 1))
		at := paced(h.rng, len(p.steps), o.Start, every)
		wg.Go(func() { p.run(ctx, at, o.Ledger) })
	}
	h.injectAll(o.Start, faults)
	wg.Wait()
	o.Published = time.Now()
	// A command whose publish failed is the producers' failure, in check
	// (f); waiting for it would only hold the run until the deadline.
	missing := h.col.waitEvents(sortedKeys(o.Ledger.byID), o.Published.Add(h.S.Deadline))
	if len(missing) > 0 {
		h.t.Logf("%d commands still without a completion after the %s deadline", len(missing), h.S.Deadline)
	}
	time.Sleep(settle)
	return o
}

// producers plans every VM's commands and deals the VMs out to the
// producers, each of which publishes its VMs' steps interleaved.
func (h *Harness) producers(o *Outcome) []*producer {
	perQEMU, perTest := h.S.perVM()
	owned := make([][][]Step, h.S.Producers)
	for i, v := range h.VMs {
		n := perTest
		if v.Kind == KindQEMU {
			n = perQEMU
		}
		steps := planVM(h.rng, v, n)
		o.Plans[v.Name] = steps
		owned[i%h.S.Producers] = append(owned[i%h.S.Producers], steps)
	}
	var out []*producer
	for i, plans := range owned {
		nc, err := dialProducer(h.nats.URL(), fmt.Sprintf("virtbus-chaos-producer-%d", i))
		if err != nil {
			h.t.Fatal(err)
		}
		h.t.Cleanup(nc.Close)
		js, err := jetstream.New(nc)
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, &producer{N: i, js: js, steps: interleave(h.rng, plans), reply: fmt.Sprintf("%s.%d", h.reply, i)})
	}
	return out
}
