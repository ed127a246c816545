package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/virtbus/virtbus/internal/bus"
)

// loader sends the commands of load mode. All completions arrive on one
// inbox and are matched to their command by id.
type loader struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	c     *config
	inbox string

	mu      sync.Mutex
	waiting map[string]chan *bus.Completion
}

// outcome is what happened to one command of the batch.
type outcome struct {
	published   bool
	duplicate   bool
	timedOut    bool
	interrupted bool
	pubErr      error
	comp        *bus.Completion
	latency     time.Duration // publish to completion (to PubAck with -wait=false)
}

func runLoad(ctx context.Context, nc *nats.Conn, c *config, stdout, stderr io.Writer) error {
	l := &loader{nc: nc, c: c, waiting: make(map[string]chan *bus.Completion)}
	if !c.core {
		js, err := jetstream.New(nc)
		if err != nil {
			return fmt.Errorf("jetstream: %w", err)
		}
		l.js = js
		if c.wait {
			l.inbox = nc.NewInbox()
			sub, err := nc.Subscribe(l.inbox, l.deliver)
			if err != nil {
				return fmt.Errorf("subscribe to reply inbox: %w", err)
			}
			defer sub.Unsubscribe()
		}
	}

	var (
		mu     sync.Mutex
		outs   = make([]outcome, 0, c.count)
		failed atomic.Bool // a publish failed: stop sending, it would fail again
		wg     sync.WaitGroup
		sem    = make(chan struct{}, c.concurrency)
	)
	start := time.Now()
launch:
	for i := range c.count {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break launch
		}
		if failed.Load() {
			break
		}
		id := nuidOr(c.id, i)
		vm := c.vms[i%len(c.vms)]
		wg.Go(func() {
			defer func() { <-sem }()
			o := l.send(ctx, id, vm)
			if o.pubErr != nil {
				failed.Store(true)
			}
			mu.Lock()
			outs = append(outs, o)
			mu.Unlock()
		})
	}
	wg.Wait()
	if c.core && !c.wait {
		if err := nc.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}

	s := summarize(c, outs, time.Since(start))
	if err := s.print(stdout, c.json); err != nil {
		return err
	}
	switch {
	case s.Interrupted > 0 || ctx.Err() != nil:
		return stopped(ctx, "sending "+c.action+" commands")
	case s.firstPubErr != nil:
		return &exitError{code: exitFailed, err: fmt.Errorf("stopped sending after a publish failed: %w", s.firstPubErr)}
	case s.Timeouts > 0:
		return &exitError{code: exitTimeout, err: fmt.Errorf("%d of %d commands had no completion within %s", s.Timeouts, s.Count, c.timeout)}
	case s.Errors > 0:
		return &exitError{code: exitFailed, err: fmt.Errorf("%d of %d commands ended in an error completion", s.Errors, s.Count)}
	}
	return nil
}

// nuidOr is the id of the i-th command: <prefix>-<i+1> when -id was given,
// so a rerun with the same -id exercises deduplication, else a fresh NUID.
func nuidOr(prefix string, i int) string {
	if prefix != "" {
		return fmt.Sprintf("%s-%d", prefix, i+1)
	}
	return nuid.Next()
}

// deliver routes a completion from the shared inbox to its waiting command.
// Others (late, repeated, not ours) are dropped.
func (l *loader) deliver(m *nats.Msg) {
	var comp bus.Completion
	if err := json.Unmarshal(m.Data, &comp); err != nil {
		return
	}
	l.mu.Lock()
	ch := l.waiting[comp.ID]
	l.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case ch <- &comp:
	default: // a second completion for the id: the first one counts
	}
}

func (l *loader) expect(id string) chan *bus.Completion {
	ch := make(chan *bus.Completion, 1)
	l.mu.Lock()
	l.waiting[id] = ch
	l.mu.Unlock()
	return ch
}

func (l *loader) forget(id string) {
	l.mu.Lock()
	delete(l.waiting, id)
	l.mu.Unlock()
}

func (l *loader) send(ctx context.Context, id, vm string) (o outcome) {
	c := l.c
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	subject := bus.CommandSubject(c.host, vm, c.action)
	msg := withDeadline(commandMsg(subject, id, c.params), c.expires)
	begin := time.Now()
	ended := func(err error) outcome {
		switch {
		case ctx.Err() != nil:
			o.interrupted = true
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
			o.timedOut = true
		default:
			o.pubErr = publishError(ctx, err, subject, c)
		}
		return o
	}

	if c.core {
		if !c.wait {
			if err := l.nc.PublishMsg(msg); err != nil {
				return ended(err)
			}
			o.published, o.latency = true, time.Since(begin)
			return o
		}
		resp, err := l.nc.RequestMsgWithContext(tctx, msg)
		if errors.Is(err, nats.ErrNoResponders) {
			o.pubErr = fmt.Errorf("request %s: no worker is subscribed (core mode)", subject)
			return o
		}
		if err != nil {
			return ended(err)
		}
		o.published, o.latency = true, time.Since(begin)
		comp, err := decodeCoreReply(resp.Data)
		if err != nil {
			o.pubErr = fmt.Errorf("reply to %s: %w", subject, err)
			return o
		}
		o.comp = comp
		return o
	}

	var ch chan *bus.Completion
	if c.wait {
		ch = l.expect(id)
		defer l.forget(id)
		msg.Header.Set(bus.HeaderReply, l.inbox)
	}
	ack, err := l.js.PublishMsg(tctx, msg)
	if err != nil {
		return ended(err)
	}
	o.published, o.duplicate = true, ack.Duplicate
	if !c.wait {
		o.latency = time.Since(begin)
		return o
	}
	select {
	case comp := <-ch:
		o.comp, o.latency = comp, time.Since(begin)
		return o
	case <-tctx.Done():
		return ended(tctx.Err())
	}
}

// summary is load mode's report; -json prints it as is.
type summary struct {
	Action          string         `json:"action"`
	VMs             []string       `json:"vms"`
	Count           int            `json:"count"`
	Sent            int            `json:"sent"`
	OK              int            `json:"ok"`
	Errors          int            `json:"errors"`
	ErrorsByCode    map[string]int `json:"errors_by_code"`
	Timeouts        int            `json:"timeouts"`
	Duplicates      int            `json:"duplicates"`
	PublishFailures int            `json:"publish_failures"`
	Interrupted     int            `json:"interrupted"`
	WallMS          float64        `json:"wall_ms"`
	PerSecond       float64        `json:"per_second"`
	LatencyOf       string         `json:"latency_of"` // "completion" or "puback"
	Latency         latencies      `json:"latency_ms"`

	firstPubErr error
}

type latencies struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func summarize(c *config, outs []outcome, wall time.Duration) summary {
	s := summary{
		Action:       c.action,
		VMs:          c.vms,
		Count:        c.count,
		ErrorsByCode: map[string]int{},
		WallMS:       ms(wall),
		LatencyOf:    "completion",
	}
	if !c.wait {
		s.LatencyOf = "puback"
	}
	var lat []time.Duration
	for _, o := range outs {
		switch {
		case o.pubErr != nil:
			s.PublishFailures++
			if s.firstPubErr == nil {
				s.firstPubErr = o.pubErr
			}
			continue
		case o.interrupted:
			s.Interrupted++
		case o.timedOut:
			s.Timeouts++
		}
		if o.published {
			s.Sent++
		}
		// A timeout has no latency; without -wait the latency is the PubAck's.
		if o.comp != nil || !c.wait && o.published {
			lat = append(lat, o.latency)
		}
		if o.duplicate {
			s.Duplicates++
		}
		if o.comp == nil {
			continue
		}
		if o.comp.Status == bus.StatusOK {
			s.OK++
			continue
		}
		s.Errors++
		code := "unknown"
		if o.comp.Error != nil {
			code = o.comp.Error.Code
		}
		s.ErrorsByCode[code]++
	}
	done := s.OK + s.Errors
	if !c.wait {
		done = s.Sent
	}
	if wall > 0 {
		s.PerSecond = float64(done) / wall.Seconds()
	}
	slices.Sort(lat)
	s.Latency = latencies{P50: ms(percentile(lat, 50)), P90: ms(percentile(lat, 90)), P99: ms(percentile(lat, 99)), Max: ms(percentile(lat, 100))}
	return s
}

// percentile is the nearest-rank percentile of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 1e2 }

func (s summary) print(w io.Writer, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(s)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "action\t%s\n", s.Action)
	fmt.Fprintf(tw, "vms\t%s\n", strings.Join(s.VMs, ","))
	fmt.Fprintf(tw, "sent\t%d/%d\n", s.Sent, s.Count)
	fmt.Fprintf(tw, "ok\t%d\n", s.OK)
	codes := make([]string, 0, len(s.ErrorsByCode))
	for code, n := range s.ErrorsByCode {
		codes = append(codes, fmt.Sprintf("%s=%d", code, n))
	}
	sort.Strings(codes)
	if len(codes) > 0 {
		fmt.Fprintf(tw, "errors\t%d (%s)\n", s.Errors, strings.Join(codes, " "))
	} else {
		fmt.Fprintf(tw, "errors\t%d\n", s.Errors)
	}
	fmt.Fprintf(tw, "timeouts\t%d\n", s.Timeouts)
	if s.Duplicates > 0 {
		fmt.Fprintf(tw, "duplicates\t%d (dropped by the stream's duplicate window)\n", s.Duplicates)
	}
	if s.PublishFailures > 0 {
		fmt.Fprintf(tw, "publish failures\t%d\n", s.PublishFailures)
	}
	if s.Interrupted > 0 {
		fmt.Fprintf(tw, "interrupted\t%d\n", s.Interrupted)
	}
	fmt.Fprintf(tw, "wall\t%s\n", fmtMS(s.WallMS))
	what := "completions"
	if s.LatencyOf == "puback" {
		what = "published"
	}
	fmt.Fprintf(tw, "throughput\t%.1f cmd/s (%s)\n", s.PerSecond, what)
	fmt.Fprintf(tw, "latency\tp50=%s p90=%s p99=%s max=%s (publish to %s)\n",
		fmtMS(s.Latency.P50), fmtMS(s.Latency.P90), fmtMS(s.Latency.P99), fmtMS(s.Latency.Max), s.LatencyOf)
	return tw.Flush()
}

func fmtMS(v float64) string {
	return time.Duration(v * float64(time.Millisecond)).Round(10 * time.Microsecond).String()
}
