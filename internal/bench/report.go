package bench

import (
	"fmt"
	"io"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/virtbus/virtbus/internal/workerproc"
)

// revision is the commit a worker built now comes from, with "+dirty"
// when tracked files had uncommitted changes.
func revision() string {
	commit, changed, err := workerproc.Revision()
	switch {
	case err != nil:
		return "unknown (" + err.Error() + ")"
	case len(changed) > 0:
		return commit + "+dirty"
	}
	return commit
}

// Header says where and how the table was made: the commit the worker
// was built from, when, on what machine, by which command.
func (b *Bench) Header(command string) string {
	mem := "unknown"
	if m, err := memTotal(); err == nil {
		mem = fmt.Sprintf("%.1f GiB", float64(m)/(1<<30))
	}
	return fmt.Sprintf("commit %s, %s, nproc %d, memory %s, command: %s",
		b.build, b.started.Format("2006-01-02 15:04 MST"), runtime.NumCPU(), mem, command)
}

// Report prints the table, one line per row, and the notes under it.
func Report(w io.Writer, header string, rows []*Row, notes []string) {
	fmt.Fprintf(w, "%s\n\n", header)
	cols := []string{"what", "ops", "rate/s", "p50 ms", "p99 ms", "max ms", "vs baseline", "target", "worker CPU s/10k", "libvirtd CPU s/10k", "harness CPU s/10k", "machine CPU s/10k (busy)", "peak RSS MiB"}
	fmt.Fprintf(w, "| %s |\n", strings.Join(cols, " | "))
	fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(cols)))
	for _, r := range rows {
		fmt.Fprintf(w, "| %s |\n", strings.Join(r.cells(), " | "))
	}
	for _, n := range notes {
		fmt.Fprintf(w, "\n- %s", n)
	}
	if len(notes) > 0 {
		fmt.Fprintln(w)
	}
}

func (r *Row) cells() []string {
	c := []string{r.What, strconv.Itoa(r.S.ops), fmt.Sprintf("%.0f", r.S.rate())}
	for _, q := range []float64{0.5, 0.99, 1} {
		if d, ok := r.S.quantile(q); ok {
			c = append(c, MS(d))
		} else {
			c = append(c, "–")
		}
	}
	c = append(c, r.vsBaseline(), r.targetCell())
	worker, rss := "–", "–"
	if r.Worker != nil {
		worker = perTenK(r.Worker.cpu, r.S.ops)
		rss = fmt.Sprintf("%.1f", float64(r.Worker.rss)/(1<<20))
	}
	return append(c, worker, perTenK(r.CPU.libvirtd, r.S.ops), perTenK(r.CPU.harness, r.S.ops), r.machineCell(), rss)
}

// perTenK is d per 10,000 of ops operations, in seconds; "–" when d is
// unknown.
func perTenK(d time.Duration, ops int) string {
	if d <= 0 || ops <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", d.Seconds()/float64(ops)*10_000)
}

// machineCell is the machine's CPU time per 10k operations, and how busy
// its CPUs were: near 100 % the row was bound by CPU, shared by libvirtd,
// NATS, the load generator and the worker.
func (r *Row) machineCell() string {
	if r.CPU.machine <= 0 || r.S.elapsed <= 0 {
		return "–"
	}
	busy := r.CPU.machine.Seconds() / (r.S.elapsed.Seconds() * float64(runtime.NumCPU())) * 100
	return fmt.Sprintf("%s (%.0f %%)", perTenK(r.CPU.machine, r.S.ops), busy)
}

// vsBaseline compares the row with its baseline: the rate, and for a
// row one command at a time the median latency too (with many in flight,
// latency is mostly the wait behind the others).
func (r *Row) vsBaseline() string {
	if r.Base == nil {
		return "–"
	}
	rate := fmt.Sprintf("rate %.2f×", r.S.rate()/r.Base.S.rate())
	if r.Target == nil || !r.Target.latency {
		return rate
	}
	d, b := p50(r), p50(r.Base)
	return fmt.Sprintf("p50 %+.2f ms (%.1f×), %s", float64(d-b)/float64(time.Millisecond), float64(d)/float64(b), rate)
}

func (r *Row) targetCell() string {
	if r.Target == nil {
		return "–"
	}
	if r.Target.met(r) {
		return r.Target.text + ": met"
	}
	return r.Target.text + ": **missed**"
}

// MS prints a duration in milliseconds with three significant digits or
// so.
func MS(d time.Duration) string {
	v := float64(d) / float64(time.Millisecond)
	switch {
	case v < 1:
		return fmt.Sprintf("%.3f", v)
	case v < 10:
		return fmt.Sprintf("%.2f", v)
	case v < 100:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

// backlogName names a backlog row.
func backlogName(n int) string {
	return fmt.Sprintf("backlog of %s, drained (c1)", thousands(n))
}

// thousands writes n with commas: 100,000.
func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// Notes say how to read the rows, and what the run checked.
func (b *Bench) Notes(rows []*Row) []string {
	notes := []string{
		"baselines: go-libvirt by hand over one connection; each op is DomainLookupByName, then DomainCreate and DomainDestroy " +
			"(test driver) or DomainSuspend and DomainResume (QEMU) by turns; parallel: one goroutine per domain, " +
			fmt.Sprintf("%d test-driver domains", testDomains),
		"virtbus rows: a fresh worker process each, ready (/readyz) before the clock starts; latency from just before the " +
			"JetStream publish to the completion's arrival on virtbus.evt.<host>.>; " +
			fmt.Sprintf("c1 backlog and c8 keep %d commands in flight over %d domains; ", b.S.InFlight, testDomains) +
			"worker CPU is its utime+stime (/proc/<pid>/stat) over the row, peak RSS its VmHWM",
		"backlog rows: rate from the worker's exec to its last completion (startup included), CPU and peak RSS of the whole process",
		"CPU columns per 10,000 operations: the worker; libvirtd; the harness (this test process: the embedded NATS server and " +
			"the load generator in virtbus rows, the go-libvirt client in baseline rows); the machine, all CPUs, with how busy they were",
	}
	commands := 0
	for _, r := range rows {
		if r.Note != "" {
			notes = append(notes, r.What+": "+r.Note)
		}
		if r.Worker != nil {
			commands += r.S.ops
		}
	}
	notes = append(notes, fmt.Sprintf("checks: %s commands through virtbus, each exactly one completion, all ok, every consumer empty after; the run took %s",
		thousands(commands), time.Since(b.started).Round(time.Second)))
	resets, _ := b.td.History()
	for _, r := range resets {
		during := "between rows"
		for _, row := range rows {
			if !r.Lost.Before(row.From) && !r.Lost.After(row.To) {
				during = "during " + row.What + ", which measured the reconnect too"
			}
		}
		notes = append(notes, fmt.Sprintf("libvirtd restarted by someone else at %s, %s", r.Lost.Format("15:04:05"), during))
	}
	return notes
}
