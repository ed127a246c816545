package chaos

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// countPublishes adds what the ledger and the event copies say to t.
func (t *tally) countPublishes(o *Outcome, e *evidence) {
	for _, p := range o.Ledger.byID {
		t.published++
		if p.Tries > 1 {
			t.pubRetries++
		}
		if p.Dup {
			t.pubDups++
		}
	}
	t.actions = map[string]int{}
	for _, s := range e.steps {
		t.actions[s.Action]++
	}
	for _, c := range e.events {
		t.events += len(c)
	}
	for _, c := range e.final {
		if c.Attempt > 1 {
			t.redelivered++
		}
	}
}

func (h *Harness) printOutcomes(b io.Writer, o *Outcome, e *evidence, t *tally) {
	t.countPublishes(o, e)
	elapsed := e.last.Sub(o.Start)
	qemu, test := 0, 0
	for _, v := range h.VMs {
		if v.Kind == KindQEMU {
			qemu++
		} else {
			test++
		}
	}
	fmt.Fprintf(b, "\n=== outcomes ===\n")
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', 0)
	rows := [][2]string{
		{"setting", fmt.Sprintf("%s, seed %d, %d QEMU + %d test-driver VMs, %d producers, concurrency %d, libvirt timeout %s",
			h.S.Name, h.S.Seed, qemu, test, h.S.Producers, h.S.Concurrency, h.S.LibvirtTimeout)},
		{"worker built from", h.build},
		{"commands", fmt.Sprintf("%d planned, %d published (%d needed more than one try, %d PubAcks said duplicate)",
			len(e.steps), t.published, t.pubRetries, t.pubDups)},
		{"commands by action", countList(t.actions)},
		{"answered on a redelivery", fmt.Sprintf("%d (attempt > 1)", t.redelivered)},
		{"completions on virtbus.evt.>", fmt.Sprintf("%d messages for %d ids", t.events, len(e.events))},
		{"identical re-publications", fmt.Sprintf("%d ids (%d extra copies)", t.identicalIDs, t.identicalCopies)},
		{"differing re-publications", fmt.Sprint(t.differing)},
		{"no completion on the event subject", fmt.Sprintf("%d (of which %d recorded in VIRTBUS_DONE)", t.missing+t.recordOnly, t.recordOnly)},
		{"reply subject", fmt.Sprintf("%d messages; %d of %d ids got a reply", t.replies, t.replyIDs, len(e.steps))},
		{"out of order", fmt.Sprint(t.outOfOrder)},
		{"final completions by code", countList(t.codes)},
		{"errors by reason", countList(t.explained)},
		{"final-state mismatches", fmt.Sprint(len(t.mismatches))},
		{"final state indeterminate", fmt.Sprintf("%d %s", len(t.unsure), strings.Join(t.unsure, "; "))},
		{"stream and consumers", t.stream},
		{"worker processes", h.incarnations()},
		{"elapsed", fmt.Sprintf("%s to the last completion (publishing %s)", elapsed.Round(100*time.Millisecond),
			o.Published.Sub(o.Start).Round(100*time.Millisecond))},
		{"throughput", fmt.Sprintf("%.1f commands/s", float64(len(e.final))/max(elapsed.Seconds(), 1e-3))},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	_ = tw.Flush()
	fmt.Fprintln(b)
}

func (h *Harness) incarnations() string {
	var parts []string
	for _, w := range h.work {
		w.mu.Lock()
		parts = append(parts, fmt.Sprintf("%s: %d started", w.Kind, len(w.all)))
		w.mu.Unlock()
	}
	return strings.Join(parts, ", ")
}

func countList(m map[string]int) string {
	var parts []string
	for _, k := range sortedKeys(m) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
