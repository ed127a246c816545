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
	"github.com/nats-io/nuid"

	"github.com/virtbus/virtbus/internal/bus"
)

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

// runLoad sends the batch, prints its summary and returns the exit its
// worst outcome calls for. All completions come to the client's one reply
// inbox.
func runLoad(ctx context.Context, nc *nats.Conn, c *config, stdout io.Writer) error {
	client, err := bus.NewClient(nc, c.host, bus.Core(c.core))
	if err != nil {
		return err
	}
	defer client.Close()
	refused, err := checkStreams(ctx, c)
	if err != nil {
		return err
	}
	start := time.Now()
	outs := sendAll(ctx, c, func(id, vm string) outcome {
		if err := refused[vm]; err != nil {
			return outcome{}.ended(ctx, err, vm, c)
		}
		return send(ctx, client, c, id, vm)
	})
	s := summarize(c, outs, time.Since(start))
	if err := s.print(stdout, c.json); err != nil {
		return err
	}
	return s.exitError(ctx, c)
}

// checkStreams looks up, once per VM and before anything is sent, whether
// a stream takes its commands (see streamChecker), and returns the refusal
// for each VM that has none. The batch then fails those commands as it
// fails a refused publish, and sends nothing to them.
func checkStreams(ctx context.Context, c *config) (map[string]error, error) {
	refused := map[string]error{}
	if c.checkStream == nil {
		return refused, nil
	}
	for _, vm := range c.vms {
		if _, seen := refused[vm]; seen {
			continue
		}
		err := c.checkStream(ctx, bus.CommandSubject(c.host, vm, c.action))
		var ee *exitError
		if errors.As(err, &ee) {
			return nil, err // interrupted
		}
		refused[vm] = err
	}
	return refused, nil
}

// sendAll runs send for each command of the batch, at most -concurrency at
// once, and stops launching once the run is interrupted or a publish
// failed: the next ones would fail the same way.
func sendAll(ctx context.Context, c *config, send func(id, vm string) outcome) []outcome {
	var (
		mu     sync.Mutex
		outs   = make([]outcome, 0, c.count)
		failed atomic.Bool
		wg     sync.WaitGroup
		sem    = make(chan struct{}, c.concurrency)
	)
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
		id, vm := nuidOr(c.id, i), c.vms[i%len(c.vms)]
		wg.Go(func() {
			defer func() { <-sem }()
			o := send(id, vm)
			if o.pubErr != nil {
				failed.Store(true)
			}
			mu.Lock()
			outs = append(outs, o)
			mu.Unlock()
		})
	}
	wg.Wait()
	return outs
}

// nuidOr is the id of the i-th command: <prefix>-<i+1> when -id was given,
// so a rerun with the same -id exercises deduplication, else a fresh NUID.
func nuidOr(prefix string, i int) string {
	if prefix != "" {
		return fmt.Sprintf("%s-%d", prefix, i+1)
	}
	return nuid.Next()
}

// send sends one command of the batch and, unless -wait=false, waits for
// its completion; a command the stream dropped as a duplicate gets the
// recorded completion of the first one with its id.
func send(ctx context.Context, client *bus.Client, c *config, id, vm string) (o outcome) {
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	cmd := c.command(vm, id)
	begin := time.Now()
	if !c.wait {
		ack, err := client.Send(tctx, cmd)
		if err != nil {
			return o.ended(ctx, err, vm, c)
		}
		o.published, o.duplicate, o.latency = true, ack != nil && ack.Duplicate, time.Since(begin)
		return o
	}
	p, err := client.Start(tctx, cmd)
	if err != nil {
		return o.ended(ctx, err, vm, c)
	}
	defer p.Close()
	// Core NATS acknowledges nothing: there a command counts as sent once
	// it is answered.
	o.published, o.duplicate = !c.core, p.Duplicate()
	res, err := p.Wait(tctx)
	if err != nil {
		return o.ended(ctx, err, vm, c)
	}
	o.published, o.comp, o.latency = true, res.Completion, time.Since(begin)
	return o
}

// ended records how the command of o failed.
func (o outcome) ended(ctx context.Context, err error, vm string, c *config) outcome {
	subject := bus.CommandSubject(c.host, vm, c.action)
	switch {
	case ctx.Err() != nil:
		o.interrupted = true
	case errors.Is(err, bus.ErrTimeout):
		o.timedOut = true
	case errors.Is(err, bus.ErrNoWorker):
		o.pubErr = fmt.Errorf("request %s: no worker is subscribed (core mode)", subject)
	case errors.Is(err, bus.ErrBadReply):
		o.published, o.pubErr = true, fmt.Errorf("reply to %s: %w", subject, err)
	default:
		o.pubErr = publishError(ctx, err, vm, c)
	}
	return o
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
		// A timeout has no latency; without -wait the latency is the PubAck's.
		if s.count(o) && (o.comp != nil || !c.wait && o.published) {
			lat = append(lat, o.latency)
		}
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

// count adds o to the tallies. It reports false for a publish failure,
// which counts as nothing else.
func (s *summary) count(o outcome) bool {
	switch {
	case o.pubErr != nil:
		s.PublishFailures++
		if s.firstPubErr == nil {
			s.firstPubErr = o.pubErr
		}
		return false
	case o.interrupted:
		s.Interrupted++
	case o.timedOut:
		s.Timeouts++
	}
	if o.published {
		s.Sent++
	}
	if o.duplicate {
		s.Duplicates++
	}
	switch {
	case o.comp == nil:
	case o.comp.Status == bus.StatusOK:
		s.OK++
	default:
		s.Errors++
		code := "unknown"
		if o.comp.Error != nil {
			code = o.comp.Error.Code
		}
		s.ErrorsByCode[code]++
	}
	return true
}

// exitError is the exit the batch's worst outcome calls for.
func (s summary) exitError(ctx context.Context, c *config) error {
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
