//go:build fleet

package fleet

import (
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bench"
	"github.com/virtbus/virtbus/internal/workerproc"
)

// report is what one fleet run measured.
type report struct {
	settings
	began   time.Time
	node    string        // the node restarted
	restart time.Duration // node down, up and caught up

	sent, retried, duplicates, copied int

	hosts       []string                   // in order
	lat         map[string][]time.Duration // by host: first publish to first completion
	pubAck      []time.Duration            // first publish to PubAck
	first, last map[string]time.Time       // by host: first publish, last completion
	workers     map[string]map[string]float64
	cpu         time.Duration // all workers'
	rss         []uint64      // each worker's peak
	libvirtLost map[string]bool
}

// latencies takes each command's time from its first publish to its first
// completion's arrival.
func (r *report) latencies(vms []*VM, p *Publisher, arrived func(string) (time.Time, bool)) {
	r.lat, r.first, r.last = map[string][]time.Duration{}, map[string]time.Time{}, map[string]time.Time{}
	for _, v := range vms {
		if _, ok := r.lat[v.Host]; !ok {
			r.hosts = append(r.hosts, v.Host)
		}
		for _, c := range v.Cmds {
			sent, acked := p.Times(c.ID)
			r.pubAck = append(r.pubAck, acked.Sub(sent))
			at, ok := arrived(c.ID)
			if !ok {
				continue // Check reports it
			}
			r.lat[v.Host] = append(r.lat[v.Host], at.Sub(sent))
			if f, ok := r.first[v.Host]; !ok || sent.Before(f) {
				r.first[v.Host] = sent
			}
			if at.After(r.last[v.Host]) {
				r.last[v.Host] = at
			}
		}
	}
}

// readWorkers reads every worker's counters, CPU time and peak memory,
// and checks that each ran exactly its own host's commands, once each.
func (r *report) readWorkers(t *testing.T, workers []*workerproc.Proc, vms []*VM) {
	t.Helper()
	want := map[string]int{}
	for _, v := range vms {
		want[v.Host] += len(v.Cmds)
	}
	r.workers, r.libvirtLost = map[string]map[string]float64{}, map[string]bool{}
	for _, w := range workers {
		c, err := Counters(w.Metrics)
		if err != nil {
			t.Errorf("worker %s: %v", w.Host, err)
			continue
		}
		r.workers[w.Host] = c
		if ran := Ran(c); ran != want[w.Host] {
			t.Errorf("worker %s ran %d commands, want its host's %d", w.Host, ran, want[w.Host])
		}
		// Its test driver started again from the file: the states after
		// that are not the plan's.
		if c[`virtbus_reconnects_total{target="libvirt"}`] > 0 {
			r.libvirtLost[w.Host] = true
			t.Logf("worker %s reconnected to libvirtd: its domains were reset", w.Host)
		}
		cpu, err := bench.CPUTime(w.Pid)
		if err == nil {
			var rss uint64
			rss, err = bench.PeakRSS(w.Pid)
			r.cpu += cpu
			r.rss = append(r.rss, rss)
		}
		if err != nil {
			t.Errorf("worker %s: %v", w.Host, err)
		}
	}
}

// row is one line of the table: a host's, or all hosts' when host is "".
func (r *report) row(host string) []string {
	var lat []time.Duration
	var first, last time.Time
	var ran int
	var redelivered, fromRecord, reconnects float64
	for _, h := range r.hosts {
		if host != "" && h != host {
			continue
		}
		lat = append(lat, r.lat[h]...)
		if first.IsZero() || r.first[h].Before(first) {
			first = r.first[h]
		}
		if r.last[h].After(last) {
			last = r.last[h]
		}
		c := r.workers[h]
		ran += Ran(c)
		redelivered += c["virtbus_redeliveries_total"]
		fromRecord += c["virtbus_duplicates_suppressed_total"]
		reconnects += c[`virtbus_reconnects_total{target="nats"}`]
	}
	name := "**all " + fmt.Sprint(len(r.hosts)) + " hosts**"
	if host != "" {
		name = host[strings.LastIndexByte(host, '-')+1:] // the hNN of the run's host id
	}
	if len(lat) == 0 {
		return []string{name, "0", "-", "-", "-", "-", "-", "-", "-", "-"}
	}
	slices.Sort(lat)
	rate := float64(len(lat)) / last.Sub(first).Seconds()
	return []string{name, fmt.Sprint(len(lat)), fmt.Sprint(ran), fmt.Sprintf("%.1f", rate),
		bench.MS(bench.Quantile(lat, 0.5)), bench.MS(bench.Quantile(lat, 0.99)), bench.MS(lat[len(lat)-1]),
		fmt.Sprint(redelivered), fmt.Sprint(fromRecord), fmt.Sprint(reconnects)}
}

// write prints the run's header, notes and table as markdown.
func (r *report) write(w io.Writer) {
	commit, changed, _ := workerproc.Revision()
	if len(changed) > 0 {
		commit += " with uncommitted changes to " + strings.Join(changed, ", ")
	}
	total := r.Hosts * r.VMs * r.Commands
	fmt.Fprintf(w, "Fleet simulation at %s, %s, %d CPUs: `make fleet`\n\n", commit, r.began.UTC().Format("2006-01-02 15:04 MST"), runtime.NumCPU())
	fmt.Fprintf(w, "- %d worker processes (hosts) × %d test-driver domains × %d commands = %d commands (start, forced stop, pause, resume, status), from %d producers, each VM's one after the other with %s between them.\n",
		r.Hosts, r.VMs, r.Commands, total, r.Producers, r.Pace)
	fmt.Fprintf(w, "- NATS: 3 nodes on loopback, stream and buckets with 3 replicas. Halfway through, node %s, the command stream's leader, was shut down for %s, started again on its store, and caught up: %s in all.\n",
		r.node, r.Down, r.restart.Round(100*time.Millisecond))
	slices.Sort(r.pubAck)
	fmt.Fprintf(w, "- PubAck (first publish to PubAck; a producer tries again after 5 s without one): p50 %s ms, p99 %s ms, max %s ms.\n",
		bench.MS(bench.Quantile(r.pubAck, 0.5)), bench.MS(bench.Quantile(r.pubAck, 0.99)), bench.MS(r.pubAck[len(r.pubAck)-1]))
	fmt.Fprintf(w, "- Publishing: %d commands; needing a second try: %d; PubAcks saying duplicate: %d. Commands whose completion came more than once (identical copies, sent again after a reconnect): %d.\n",
		r.sent, r.retried, r.duplicates, r.copied)
	var maxRSS, sumRSS uint64
	for _, v := range r.rss {
		maxRSS, sumRSS = max(maxRSS, v), sumRSS+v
	}
	fmt.Fprintf(w, "- Workers: %.1f s CPU in all (%.2f s per 1,000 commands); peak RSS %d MiB at most, %d MiB summed.\n",
		r.cpu.Seconds(), r.cpu.Seconds()*1000/float64(max(total, 1)), maxRSS>>20, sumRSS>>20)
	fmt.Fprintf(w, "- Latency: from a command's first publish to its completion's arrival on the event subject. Rate: commands over first publish to last completion.\n\n")
	fmt.Fprintln(w, "| host | completed | ran | rate /s | p50 ms | p99 ms | max ms | redelivered | from record | NATS reconnects |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	fmt.Fprintln(w, "| "+strings.Join(r.row(""), " | ")+" |")
	for _, h := range r.hosts {
		fmt.Fprintln(w, "| "+strings.Join(r.row(h), " | ")+" |")
	}
}
