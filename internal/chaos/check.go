package chaos

import (
	"fmt"
	"reflect"
	"slices"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
)

// tally is the outcome counts the report prints.
type tally struct {
	published, pubRetries, pubDups int
	events, replies, replyIDs      int
	identicalIDs, identicalCopies  int
	differing, missing, recordOnly int
	outOfOrder, redelivered        int
	actions                        map[string]int // planned commands by action
	codes                          map[string]int // final completions by code ("ok" for success)
	explained                      map[string]int // error completions by the reason the harness found
	mismatches, unsure             []string
	stream                         string
}

// check is one row of the table of checks: each returns its violations.
type check struct {
	name string
	run  func(h *Harness, e *evidence, t *tally) []string
}

var checks = []check{
	{"(a) every command has exactly one completion", checkOnePerID},
	{"(b) each VM's completions arrive in publish order", checkOrder},
	{"(c) libvirt's final state matches each VM's last command", checkFinalState},
	{"(d) stream empty, no pending acks", checkStream},
	{"(e) no error completion that no fault explains", checkErrors},
	{"(f) publishes confirmed, workers never died by themselves", checkHarness},
}

// checkOnePerID: every published id has one completion on the event
// subject; copies of it (a redelivery answered from the record) must be
// identical, and the reply subject must carry the same.
func checkOnePerID(_ *Harness, e *evidence, t *tally) []string {
	var out []string
	for _, id := range sortedKeys(e.o.Ledger.byID) {
		copies := e.events[id]
		switch {
		case len(copies) == 0 && e.fromRecord[id]:
			t.recordOnly++
			out = append(out, fmt.Sprintf("%s: no completion on %s.>, but the worker recorded one (%s): the event was lost", id, bus.EventPrefix, brief(e.final[id])))
		case len(copies) == 0:
			t.missing++
			out = append(out, fmt.Sprintf("%s (%s %s): no completion at all", id, e.steps[id].Action, e.steps[id].VM.Name))
		}
		differs := false
		for _, c := range copies[min(1, len(copies)):] {
			if !reflect.DeepEqual(c.Raw, copies[0].Raw) {
				differs = true
				out = append(out, fmt.Sprintf("%s: completions differ:\n    first  %s\n    later  %s", id, brief(copies[0].C), brief(c.C)))
			}
		}
		if differs {
			t.differing++
		} else if len(copies) > 1 {
			t.identicalIDs++
			t.identicalCopies += len(copies) - 1
		}
		out = append(out, checkReplies(id, e, t)...)
	}
	for _, a := range e.foreign {
		out = append(out, "completion of an id the harness never published: "+brief(a.C))
	}
	for _, b := range e.bad {
		out = append(out, "not a completion: "+b)
	}
	return out
}

// checkReplies counts the reply-subject copies of id: each must equal the
// event. A missing reply is counted, not a violation: replies are core
// NATS, like events, and the event check covers loss.
func checkReplies(id string, e *evidence, t *tally) []string {
	reps := e.replies[id]
	t.replies += len(reps)
	if len(reps) > 0 {
		t.replyIDs++
	}
	first, ok := e.first(id)
	if !ok {
		return nil
	}
	for _, r := range reps {
		if !reflect.DeepEqual(r.Raw, first.Raw) {
			return []string{fmt.Sprintf("%s: reply differs from event:\n    event %s\n    reply %s", id, brief(first.C), brief(r.C))}
		}
	}
	return nil
}

// checkOrder: each VM's completions (first copies) arrive in the order
// its commands were published (the PubAck sequences confirm that order).
// A command is late when a command published after it arrived first;
// only the late ones count, not every command that overtook them.
func checkOrder(h *Harness, e *evidence, t *tally) []string {
	var out []string
	for _, name := range e.vmNames() {
		steps := e.o.Plans[name]
		out = append(out, e.checkPubOrder(steps)...)
		minSeq, minID, overtook := int(^uint(0)>>1), "", 0
		for i := len(steps) - 1; i >= 0; i-- {
			s := steps[i]
			a, ok := e.first(s.ID)
			if !ok {
				continue
			}
			if a.Seq < minSeq {
				minSeq, minID = a.Seq, s.ID
			}
			if a.Seq <= minSeq {
				overtook++
				continue
			}
			t.outOfOrder++
			e.outOfOrder[s.ID] = minID
			out = append(out, h.describeLate(e, s, a, minID))
		}
	}
	return out
}

// checkPubOrder: the stream took one VM's commands in publish order.
func (e *evidence) checkPubOrder(steps []Step) []string {
	var out []string
	last := uint64(0)
	for _, s := range steps {
		p, ok := e.o.Ledger.byID[s.ID]
		if !ok {
			continue
		}
		if p.Seq < last {
			out = append(out, fmt.Sprintf("%s: stream sequence %d below its predecessor's %d", s.ID, p.Seq, last))
		}
		last = max(last, p.Seq)
	}
	return out
}

// describeLate is the evidence of one late command: when it was
// published, what overtook it, and the faults in between.
func (h *Harness) describeLate(e *evidence, s Step, a arrival, ahead string) string {
	p := e.o.Ledger.byID[s.ID]
	n := 0
	for _, later := range e.o.Plans[s.VM.Name][s.Index+1:] {
		if b, ok := e.first(later.ID); ok && b.Seq < a.Seq {
			n++
		}
	}
	return fmt.Sprintf("%s (%s on %s) arrived after %d commands published after it, the first of them %s\n"+
		"    late  %s; published %s (stream seq %d)\n    ahead %s\n    faults from its publish to its completion: %s",
		s.ID, s.Action, s.VM.Kind, n, ahead, brief(a.C), p.At.Format("15:04:05.000"), p.Seq,
		brief(e.final[ahead]), h.faultsBetween(p.At, a.At))
}

// checkStream: every command acked, nothing pending in either consumer.
// Acks follow completions, so this waits a little for the last ones.
func checkStream(h *Harness, _ *evidence, t *tally) []string {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, state := h.streamState()
		t.stream = state
		if len(out) == 0 || time.Now().After(deadline) {
			return out
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func checkHarness(h *Harness, e *evidence, _ *tally) []string {
	out := slices.Clone(e.o.Ledger.errs)
	for _, w := range h.work {
		out = append(out, w.unexpectedExits()...)
	}
	for _, err := range e.driverErrs {
		out = append(out, "test driver: "+err)
	}
	for _, f := range h.faults {
		if f.Err != nil {
			out = append(out, fmt.Sprintf("fault %s: %v", f.Kind, f.Err))
		}
	}
	return out
}

// stateName is how the completions name libvirt's states.
func stateName(st libvirt.DomainState) string {
	names := map[libvirt.DomainState]string{libvirt.DomainRunning: "running", libvirt.DomainShutoff: "shutoff",
		libvirt.DomainPaused: "paused", libvirt.DomainShutdown: "shutdown", libvirt.DomainCrashed: "crashed",
		libvirt.DomainBlocked: "blocked", libvirt.DomainPmsuspended: "pmsuspended"}
	if n, ok := names[st]; ok {
		return n
	}
	return fmt.Sprintf("state %d", st)
}

// brief is one line about a completion.
func brief(c bus.Completion) string {
	s := fmt.Sprintf("%s %s %s attempt=%d %s", c.ID, c.Action, c.Status, c.Attempt, c.State)
	if c.Error != nil {
		s += fmt.Sprintf(" error=%s %q", c.Error.Code, clipText(c.Error.Message, 160))
	}
	return s + fmt.Sprintf(" started=%s finished=%s", c.StartedAt.Local().Format("15:04:05.000"),
		c.FinishedAt.Local().Format("15:04:05.000"))
}

func clipText(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
