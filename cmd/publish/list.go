package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// errNoStateBucket: the state bucket does not exist, which is no failure:
// no worker on this bus has published a domain state yet.
var errNoStateBucket = errors.New("no state bucket")

// runList prints the domains of c.host as the state bucket has them.
// -timeout bounds the reads.
func runList(ctx context.Context, nc *nats.Conn, c *config, stdout, stderr io.Writer) error {
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	states, err := readStates(tctx, nc, c.host, stderr)
	switch {
	case errors.Is(err, errNoStateBucket):
		fmt.Fprintf(stderr, "publish: no domain states: bucket %s does not exist (no worker has published one yet)\n", bus.StateBucket)
	case err != nil:
		return readError(ctx, err, "reading bucket "+bus.StateBucket, c.timeout)
	case len(states) == 0:
		fmt.Fprintf(stderr, "publish: no domains of host %s in bucket %s\n", c.host, bus.StateBucket)
	}
	if c.json {
		if states == nil {
			states = []bus.DomainState{} // [], not null, for scripts
		}
		return json.NewEncoder(stdout).Encode(states)
	}
	return printStates(stdout, states, time.Now())
}

// readStates returns the states of host's domains (every host's when host
// is empty), sorted by name. One pass of a KV watch reads every value at
// once, where listing the keys would cost a request per key. The filter is
// "<host>.>" rather than "<host>.*" so that a domain whose name holds a
// dot is not left out.
func readStates(ctx context.Context, nc *nats.Conn, host string, stderr io.Writer) ([]bus.DomainState, error) {
	filter := ">"
	if host != "" {
		filter = host + ".>"
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, bus.StateBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, errNoStateBucket
	}
	if err != nil {
		return nil, err
	}
	w, err := kv.Watch(ctx, filter, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, err
	}
	defer func() { _ = w.Stop() }()
	var states []bus.DomainState
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("the watch ended before it had all keys")
			}
			if e == nil { // every value there was at the start has come
				slices.SortFunc(states, func(a, b bus.DomainState) int { return cmp.Compare(a.VM, b.VM) })
				return states, nil
			}
			var s bus.DomainState
			if err := json.Unmarshal(e.Value(), &s); err != nil {
				fmt.Fprintf(stderr, "publish: key %s is not a domain state, left out: %v\n", oneLine(e.Key()), err)
				continue
			}
			if s.VM == "" && host != "" {
				s.VM = strings.TrimPrefix(e.Key(), host+".")
			}
			states = append(states, s)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// printStates prints the table of list, its header even when empty.
func printStates(w io.Writer, states []bus.DomainState, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tSTATE\tREASON\tSINCE\tUUID")
	for _, s := range states {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", oneLine(s.VM), dash(s.State), dash(s.Reason), since(s.At, now), dash(s.UUID))
	}
	return tw.Flush()
}

// since is "3m12s ago (15:04:05)": how long a domain has been in its
// state, and from when; the date too when that is not today.
func since(at, now time.Time) string {
	if at.IsZero() {
		return "-"
	}
	at = at.In(now.Location())
	layout := "15:04:05"
	if y, m, d := at.Date(); y != now.Year() || m != now.Month() || d != now.Day() {
		layout = "2006-01-02 15:04:05"
	}
	return ago(now.Sub(at)) + " ago (" + at.Format(layout) + ")"
}

// ago rounds d to what a person reads at a glance: 45s, 3m12s, 5h3m, 2d4h.
// A negative d (the worker's clock ahead of this one) reads as 0s.
func ago(d time.Duration) string {
	d = max(d, 0).Truncate(time.Second)
	switch {
	case d < time.Hour:
		return d.String()
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	}
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return oneLine(s)
}

// oneLine escapes control characters (newlines, tabs, terminal escapes):
// names, reasons and error messages come from libvirt and from clients,
// and must neither break a line or a table column nor drive the terminal.
func oneLine(s string) string {
	if !strings.ContainsFunc(s, unicode.IsControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// readError is the error of a read from NATS (list, get): the run's
// context ending is an interruption or a refusal (see run); anything
// else, -timeout included, is a failure, exit 1: exit 3 of get means
// "not recorded", which an unanswered read does not show.
func readError(ctx context.Context, err error, what string, timeout time.Duration) error {
	if ctx.Err() != nil {
		return stopped(ctx, what)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: no answer within -timeout %s: %w", what, timeout, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}
