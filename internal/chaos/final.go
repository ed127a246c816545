package chaos

import (
	"context"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
)

// checkFinalState: libvirt's view of each VM matches what its commands,
// replayed in publish order, leave: running after start or reboot, shut
// off after stop, and for QEMU VMs the image attached or not. Only ok
// completions change the replayed model. When the last command that
// touched a part ended in error, what it did is unknown: that VM is
// listed as indeterminate, not as a mismatch. The replay takes in what
// stopped a VM behind its commands' back too (see stops).
func checkFinalState(h *Harness, e *evidence, t *tally) []string {
	var out []string
	for _, v := range h.VMs {
		want, unsure := e.expect(v)
		running, disk, err := h.actual(v)
		if err != nil {
			out = append(out, fmt.Sprintf("%s: %v", v.Name, err))
			continue
		}
		parts := []struct {
			what      string
			want, got bool
			unsure    string
		}{
			{"running", want.running, running, unsure[touchPower]},
			{"disk " + diskTarget + " attached", want.disk, disk, unsure[touchDisk]},
		}
		for _, p := range parts {
			if p.want == p.got {
				continue
			}
			msg := fmt.Sprintf("%s (%s): %s is %v, its commands leave %v", v.Name, v.Kind, p.what, p.got, p.want)
			if n := e.late(v); n > 0 {
				msg += fmt.Sprintf(" (%d of its commands ran late, see (b))", n)
			}
			if p.unsure != "" {
				t.unsure = append(t.unsure, msg+"; but "+p.unsure)
				continue
			}
			t.mismatches = append(t.mismatches, msg)
			out = append(out, msg)
		}
	}
	return out
}

// late is how many of v's commands check (b) found late.
func (e *evidence) late(v *VM) int {
	n := 0
	for _, s := range e.o.Plans[v.Name] {
		if _, ok := e.outOfOrder[s.ID]; ok {
			n++
		}
	}
	return n
}

// expect replays v's completions in publish order. unsure names, per part
// of the VM, the failed command that leaves it unknown.
func (e *evidence) expect(v *VM) (model, map[touch]string) {
	var m model
	unsure := map[touch]string{}
	stops, what := e.stops(v)
	for _, s := range e.o.Plans[v.Name] {
		a := actionNamed(s.Action)
		if a.touches == touchNothing {
			continue
		}
		c, ok := e.final[s.ID]
		if !ok {
			unsure[a.touches] = s.ID + " has no completion"
			continue
		}
		for len(stops) > 0 && stops[0].Before(c.StartedAt) {
			m.running, unsure[touchPower], stops = false, "", stops[1:]
		}
		switch {
		case len(stops) > 0 && stops[0].Before(c.FinishedAt):
			unsure[a.touches] = fmt.Sprintf("%s ran while %s", s.ID, what)
		case c.Error != nil:
			unsure[a.touches] = fmt.Sprintf("%s (%s) ended in %s", s.ID, s.Action, c.Error.Code)
		default:
			a.apply(&m)
			unsure[a.touches] = ""
		}
	}
	if len(stops) > 0 {
		m.running, unsure[touchPower] = false, ""
	}
	return m, unsure
}

// stops are the times v was stopped behind its commands' back, in order,
// and what stopped it: for a test-driver VM each reset of the driver (a
// libvirtd restart wipes it, and the holder defines its domains again,
// shut off), for a QEMU VM each time libvirtd stopped it as crashed.
func (e *evidence) stops(v *VM) ([]time.Time, string) {
	if v.Kind == KindQEMU {
		return e.crashes[v.Name], "libvirtd stopped it as crashed"
	}
	var at []time.Time
	for _, r := range e.resets {
		at = append(at, r.Lost)
	}
	return at, "the test driver was reset"
}

// actual is libvirt's view of v: running or not, the image attached or not.
func (h *Harness) actual(v *VM) (running, disk bool, err error) {
	if v.Kind == KindTest {
		st, err := h.td.State(v.Name)
		return st == libvirt.DomainRunning, false, err
	}
	dom := h.doms[v.Name]
	st := h.lv.State(dom)
	if st != libvirt.DomainRunning && st != libvirt.DomainShutoff {
		return false, false, fmt.Errorf("domain is %s, neither running nor shut off", stateName(st))
	}
	_, disk = h.lv.Disks(dom, false)[diskTarget]
	return st == libvirt.DomainRunning, disk, nil
}

// streamState says what the stream and the consumers still hold.
func (h *Harness) streamState() (violations []string, state string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := h.js.Stream(ctx, bus.StreamName)
	if err != nil {
		return []string{"stream: " + err.Error()}, "?"
	}
	info, err := s.Info(ctx)
	if err != nil {
		return []string{"stream info: " + err.Error()}, "?"
	}
	state = fmt.Sprintf("stream holds %d", info.State.Msgs)
	if info.State.Msgs != 0 {
		violations = append(violations, fmt.Sprintf("stream %s still holds %d commands", bus.StreamName, info.State.Msgs))
	}
	for _, w := range h.work {
		ci, err := h.consumer(w.Host)
		if err != nil {
			violations = append(violations, fmt.Sprintf("%s consumer: %v", w.Kind, err))
			continue
		}
		state += fmt.Sprintf("; %s consumer: %d pending, %d awaiting ack", w.Kind, ci.NumPending, ci.NumAckPending)
		if ci.NumPending != 0 || ci.NumAckPending != 0 {
			violations = append(violations, fmt.Sprintf("%s consumer %s: %d pending, %d awaiting ack",
				w.Kind, ci.Name, ci.NumPending, ci.NumAckPending))
		}
	}
	return violations, state
}
