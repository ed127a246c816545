package chaos

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/virtbus/virtbus/internal/testdriver"
)

// maxShown bounds the violations printed per check.
const maxShown = 40

type result struct {
	name       string
	violations []string
}

// Report runs the checks and prints the table of faults, the outcomes and
// every violation (all of it before the caller fails the test), and
// returns the violations.
func (h *Harness) Report(o *Outcome) []string {
	e := h.gather(o)
	t := &tally{}
	var results []result
	for _, c := range checks {
		results = append(results, result{c.name, c.run(h, e, t)})
	}
	var b strings.Builder
	h.printFaults(&b, o, e)
	h.printOutcomes(&b, o, e, t)
	var all []string
	for _, r := range results {
		all = append(all, r.violations...)
		printResult(&b, r)
	}
	fmt.Print(b.String())
	return all
}

func (h *Harness) printFaults(b io.Writer, o *Outcome, e *evidence) {
	fmt.Fprintf(b, "\n=== chaos %s, seed %d: faults ===\n", h.S.Name, h.S.Seed)
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tkind\tat\ttook\twhat happened\tnext completion after")
	for i, f := range h.faults {
		what := f.What
		if f.ready != nil {
			select {
			case r := <-f.ready:
				what += ", " + r
			default:
				what += ", not ready yet"
			}
		}
		if f.Kind == "libvirtd-restart" {
			what += h.resetsNear(e, f)
		}
		fmt.Fprintf(tw, "%d\t%s\t+%s\t%s\t%s\t%s\n", i+1, f.Kind, f.At.Sub(o.Start).Round(100*time.Millisecond),
			f.Back.Sub(f.At).Round(10*time.Millisecond), what, h.recovery(f))
	}
	for _, r := range h.resetsUnplanned() {
		fmt.Fprintf(tw, "-\tunplanned reset\t+%s\t\tlibvirtd restarted by someone else: the test-driver holder lost its connection; %d domains defined again\t\n",
			r.Lost.Sub(o.Start).Round(100*time.Millisecond), r.Missing)
	}
	for _, vm := range slices.Sorted(maps.Keys(e.crashes)) {
		for _, at := range e.crashes[vm] {
			fmt.Fprintf(tw, "-\tqemu crashed\t+%s\t\tlibvirtd stopped %s as crashed (reason=crashed in its QEMU log), which no command does\t\n",
				at.Sub(o.Start).Round(100*time.Millisecond), vm)
		}
	}
	_ = tw.Flush()
}

// recovery is, per affected host, how long after the fault the first
// completion came that arrived once the system was whole again.
func (h *Harness) recovery(f *fault) string {
	var parts []string
	for _, w := range h.work {
		if !slices.Contains(f.Affected, w.Host) {
			continue
		}
		at, ok := h.col.nextAfter(w.Host, f.Back)
		if !ok {
			parts = append(parts, string(w.Kind)+" none")
			continue
		}
		parts = append(parts, fmt.Sprintf("%s +%s", w.Kind, at.Sub(f.At).Round(100*time.Millisecond)))
	}
	return strings.Join(parts, ", ")
}

func (h *Harness) resetsNear(e *evidence, f *fault) string {
	s := ""
	for _, r := range e.resets {
		if !r.Lost.Before(f.At.Add(-time.Second)) && r.Lost.Before(f.Back.Add(30*time.Second)) {
			s += fmt.Sprintf("; test driver wiped, %d domains defined again +%s", r.Missing, r.Recreated.Sub(f.At).Round(10*time.Millisecond))
		}
	}
	return s
}

// resetsUnplanned are the test driver's resets that the run's own
// libvirtd restart does not account for: someone else restarted libvirtd.
func (h *Harness) resetsUnplanned() []testdriver.Reset {
	resets, _ := h.td.History()
	var out []testdriver.Reset
	for _, r := range resets {
		planned := false
		for _, f := range h.faults {
			if f.Kind == "libvirtd-restart" && !r.Lost.Before(f.At.Add(-time.Second)) && r.Lost.Before(f.Back.Add(30*time.Second)) {
				planned = true
			}
		}
		if !planned {
			out = append(out, r)
		}
	}
	return out
}

func printResult(b io.Writer, r result) {
	verdict := "ok"
	if len(r.violations) > 0 {
		verdict = fmt.Sprintf("VIOLATED (%d)", len(r.violations))
	}
	fmt.Fprintf(b, "%-58s %s\n", r.name, verdict)
	for i, v := range r.violations {
		if i == maxShown {
			fmt.Fprintf(b, "    … and %d more\n", len(r.violations)-maxShown)
			break
		}
		fmt.Fprintf(b, "  - %s\n", v)
	}
}
