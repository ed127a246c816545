package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/testdriver"
)

// Row is one line of the table.
type Row struct {
	What   string
	S      sample
	Base   *Row    // the baseline it stands beside; nil for baselines and backlog rows
	Target *target // nil: none
	Worker *usage  // nil for baselines
	// CPU is the CPU time used during the measured part: by every
	// process of the machine (a row whose machine was busy near all its
	// CPUs was bound by them, not by waiting), by libvirtd, and by the
	// harness.
	CPU  rowCPU
	Note string
	// From and To bound the row, set-up included, to tell which rows a
	// libvirtd restart fell in.
	From, To time.Time
}

// usage is what the row's worker process used.
type usage struct {
	cpu time.Duration // during the measured part of the row
	rss uint64        // VmHWM: peak resident memory of the whole process
}

// target is a row's goal, as printed, and whether the row met it.
type target struct {
	text    string
	latency bool // it compares the median latency, not the rate
	met     func(r *Row) bool
}

func p50(r *Row) time.Duration { d, _ := r.S.quantile(0.5); return d }

// p50Within is met when the row's median is at most its baseline's plus d.
func p50Within(d time.Duration) *target {
	return &target{text: fmt.Sprintf("p50 ≤ baseline + %g ms", float64(d)/float64(time.Millisecond)), latency: true,
		met: func(r *Row) bool { return p50(r) <= p50(r.Base)+d }}
}

// rateAtLeast is met when the row's rate is at least f times its
// baseline's.
func rateAtLeast(f float64) *target {
	return &target{text: fmt.Sprintf("rate ≥ %.1f× baseline", f),
		met: func(r *Row) bool { return r.S.rate() >= f*r.Base.S.rate() }}
}

// rssAtMost is met when the worker's peak memory stays within limit, and,
// with a smaller row to compare, grew by at most a fifth over it.
func rssAtMost(limit uint64, smaller *Row) *target {
	t := &target{text: fmt.Sprintf("peak RSS ≤ %d MiB", limit>>20)}
	if smaller != nil {
		t.text += fmt.Sprintf(", ≤ 1.2× the %d row's", smaller.S.ops)
	}
	t.met = func(r *Row) bool {
		ok := r.Worker.rss <= limit
		if smaller != nil {
			ok = ok && float64(r.Worker.rss) <= 1.2*float64(smaller.Worker.rss)
		}
		return ok
	}
	return t
}

// baselineRow measures p on names by hand with go-libvirt.
func (b *Bench) baselineRow(what string, l *libvirt.Libvirt, names []string, ops int, p pair) (*Row, error) {
	if err := b.expectStates(); err != nil {
		return nil, err
	}
	m := startMachineMeter()
	s, err := direct(l, names, ops, p)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return &Row{What: what, S: s, CPU: m.used()}, nil
}

// liveRow runs cmds through a fresh worker that is ready before the clock
// starts, window commands in flight at most (1: each waits for the one
// before).
func (b *Bench) liveRow(what string, o workerOptions, cmds []command, window int) (*Row, error) {
	if err := b.expectStates(); err != nil {
		return nil, err
	}
	host := b.host(slug(what))
	w, err := b.startWorker(host, o)
	if err != nil {
		return nil, err
	}
	defer w.Kill()
	if err := w.ready(); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, w.Logs())
	}
	col, err := collect(b.nc, host, len(cmds), window)
	if err != nil {
		return nil, err
	}
	cpu0, _, err := w.usage()
	if err != nil {
		return nil, err
	}
	snd := &sender{js: b.js, host: host, col: col}
	profiled := w.profile(b.S.Profiles, slug(what), b.S.ProfileFor)
	m := startMachineMeter()
	start := time.Now()
	if window == 1 {
		err = snd.oneAtATime(cmds)
	} else if err = snd.windowed(cmds); err == nil {
		err = col.waitAll()
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", what, err, w.Logs())
	}
	use, cpu, err := b.endRow(what, w, col, m, profiled)
	if err != nil {
		return nil, err
	}
	use.cpu -= cpu0
	return &Row{What: what, S: col.sample(start), Worker: &use, CPU: cpu, Note: observed(w, col)}, nil
}

// endRow reads what the row's worker and machine used once its last
// completion is in, waits for the worker's profile, and stops the worker
// and checks the row (see finish).
func (b *Bench) endRow(what string, w *worker, col *collector, m machineMeter, profiled func() error) (usage, rowCPU, error) {
	used := m.used()
	cpu, rss, err := w.usage()
	if err != nil {
		return usage{}, rowCPU{}, err
	}
	if err := profiled(); err != nil {
		return usage{}, rowCPU{}, fmt.Errorf("%s: profile: %w", what, err)
	}
	if err := b.finish(w, col); err != nil {
		return usage{}, rowCPU{}, fmt.Errorf("%s: %w", what, err)
	}
	return usage{cpu: cpu, rss: rss}, used, nil
}

// backlogRow publishes n commands over the test-driver domains while the
// host's worker is stopped, then starts it and times the drain: from the
// worker's exec to its last completion, startup included, and the whole
// process's CPU time.
func (b *Bench) backlogRow(what string, n int) (*Row, error) {
	if err := b.expectStates(); err != nil {
		return nil, err
	}
	host := b.host(slug(what))
	o := workerOptions{uri: testdriver.URI, concurrency: 1}
	if err := b.prime(host, o); err != nil {
		return nil, err
	}
	cmds := alternate(b.names, n/len(b.names), startStop)
	col, err := collect(b.nc, host, len(cmds), 0)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := (&sender{js: b.js, host: host, col: col}).windowed(cmds); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	published := time.Since(t0)
	if err := b.expectPending(host, len(cmds)); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	m := startMachineMeter()
	w, err := b.startWorker(host, o)
	if err != nil {
		return nil, err
	}
	defer w.Kill()
	if err := w.ready(); err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", what, err, w.Logs())
	}
	profiled := w.profile(b.S.Profiles, slug(what), b.S.ProfileFor)
	if err := col.waitAll(); err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", what, err, w.Logs())
	}
	use, cpu, err := b.endRow(what, w, col, m, profiled)
	if err != nil {
		return nil, err
	}
	s := col.sample(w.Started)
	s.lat = nil // from publish to completion is mostly the wait for the worker
	return &Row{What: what, S: s, Worker: &use, CPU: cpu,
		Note: fmt.Sprintf("published in %s while no worker ran; %s", published.Round(10*time.Millisecond), observed(w, col))}, nil
}

// prime has a worker create what it creates at its first start (the
// stream, the host's consumer, the record bucket), then stop cleanly, as
// a host's worker that is down for a while would have.
func (b *Bench) prime(host string, o workerOptions) error {
	w, err := b.startWorker(host, o)
	if err != nil {
		return err
	}
	defer w.Kill()
	if err := w.ready(); err != nil {
		return fmt.Errorf("%w\n%s", err, w.Logs())
	}
	return w.stop()
}

// expectPending checks that host's consumer has exactly n commands
// waiting.
func (b *Bench) expectPending(host string, n int) error {
	info, err := b.consumerInfo(host)
	if err != nil {
		return err
	}
	if info.NumPending != uint64(n) || info.NumAckPending != 0 {
		return fmt.Errorf("consumer %s: %d pending and %d unacked, want %d and 0", info.Name, info.NumPending, info.NumAckPending, n)
	}
	return nil
}

// finish stops the row's worker cleanly and checks the row: every command
// exactly one completion, nothing else on the host's event subject, and
// the host's consumer empty.
func (b *Bench) finish(w *worker, col *collector) error {
	if err := w.stop(); err != nil {
		return fmt.Errorf("%w\n%s", err, w.Logs())
	}
	if err := col.settle(b.nc); err != nil {
		return err
	}
	return b.expectPending(w.Host, 0)
}

// observed says what else the row saw of its worker: the state changes
// it published, and its warnings and errors, if any.
func observed(w *worker, col *collector) string {
	s := fmt.Sprintf("%d state messages", col.states.Load())
	if lines := w.Warnings(); len(lines) > 0 {
		s += fmt.Sprintf("; the worker logged %d warnings, the first: %.300s", len(lines), lines[0])
	}
	return s
}

// slug is a row's name as a host-id fragment.
func slug(what string) string {
	out := make([]byte, 0, len(what))
	for i := 0; i < len(what) && len(out) < 16; i++ {
		switch c := what[i]; {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			out = append(out, c)
		case c >= 'A' && c <= 'Z':
			out = append(out, c+'a'-'A')
		case len(out) > 0 && out[len(out)-1] != '-':
			out = append(out, '-')
		}
	}
	return string(out)
}

// consumerInfo is host's consumer, as the server has it.
func (b *Bench) consumerInfo(host string) (*jetstream.ConsumerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := b.js.Consumer(ctx, bus.StreamName, bus.ConsumerName(host))
	if err != nil {
		return nil, fmt.Errorf("consumer of %s: %w", host, err)
	}
	return c.Info(ctx)
}
