package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus"
)

// watchBuffer is how many messages may wait for the terminal. Past it
// nats.go drops messages and reports a slow consumer on stderr, rather
// than let the server cut the connection.
const watchBuffer = 4096

// runWatch prints the state changes and completions of c.vm (every VM
// when empty) on c.host as they come, until ctx ends: Ctrl-C is the
// normal end, exit 0.
func runWatch(ctx context.Context, nc *nats.Conn, c *config, stdout, stderr io.Writer) error {
	vm := c.vm
	if vm == "" {
		vm = "*"
	}
	subjects := []string{bus.StateSubject(c.host, vm), bus.EventSubject(c.host, vm, "*")}
	// One channel for both subscriptions keeps the messages in the order
	// the server sent them: a domain's state change and the completion
	// that caused it are printed as they came.
	ch := make(chan *nats.Msg, watchBuffer)
	for _, s := range subjects {
		sub, err := nc.ChanSubscribe(s, ch)
		if err != nil {
			return fmt.Errorf("subscribe to %s: %w", s, err)
		}
		defer func() { _ = sub.Unsubscribe() }()
	}
	// Once the flush is back, the server has the subscriptions: whatever
	// is published after the line below is shown.
	fctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := nc.FlushWithContext(fctx); err != nil {
		return readError(ctx, err, "subscribing to "+strings.Join(subjects, " and "), c.timeout)
	}
	fmt.Fprintf(stderr, "publish: watching %s; Ctrl-C ends\n", strings.Join(subjects, " and "))
	for {
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), nats.ErrPermissionViolation) {
				return stopped(ctx, "watching "+strings.Join(subjects, " and "))
			}
			return nil
		case m := <-ch:
			if err := printWatched(stdout, stderr, m, c.json, time.Now()); err != nil {
				return err
			}
		}
	}
}

// printWatched prints one message: its JSON on a line with -json, else a
// line a person reads. What is not JSON goes to stderr, so that -json's
// stdout stays JSON lines.
func printWatched(stdout, stderr io.Writer, m *nats.Msg, asJSON bool, now time.Time) error {
	var line string
	if asJSON {
		var b bytes.Buffer
		if err := json.Compact(&b, m.Data); err != nil {
			fmt.Fprintf(stderr, "publish: %s: not JSON, left out: %v\n", oneLine(m.Subject), err)
			return nil
		}
		line = b.String()
	} else {
		var err error
		if line, err = watchLine(m, now); err != nil {
			fmt.Fprintf(stderr, "publish: %s: %v\n", oneLine(m.Subject), err)
			return nil
		}
	}
	_, err := fmt.Fprintln(stdout, line)
	return err
}

// watchLine is the one-line form of a state message or a completion:
//
//	15:04:05.000 state  web-1 running (booted, started)
//	15:04:05.100 done   web-1 stop ok changed shutoff 1.2s id=...
//	15:04:05.100 done   web-1 stop error not_found: domain "web-1" not found id=...
//
// The time is the message's own (when libvirt said so, when the command
// ended), now when it has none.
func watchLine(m *nats.Msg, now time.Time) (string, error) {
	if strings.HasPrefix(m.Subject, bus.StatePrefix+".") {
		var s bus.DomainState
		if err := json.Unmarshal(m.Data, &s); err != nil {
			return "", fmt.Errorf("not a domain state: %w", err)
		}
		line := fmt.Sprintf("%s state  %s %s", clock(s.At, now), s.VM, cmp.Or(s.State, "?"))
		if why := nonEmpty(s.Reason, s.Event); len(why) > 0 {
			line += " (" + strings.Join(why, ", ") + ")"
		}
		return oneLine(line), nil
	}
	var c bus.Completion
	if err := json.Unmarshal(m.Data, &c); err != nil || c.ID == "" {
		return "", fmt.Errorf("not a completion: %v", cmp.Or(err, errors.New("no id")))
	}
	return oneLine(fmt.Sprintf("%s done   %s %s %s id=%s", clock(c.FinishedAt, now), c.VM, c.Action, doneOutcome(&c), c.ID)), nil
}

// doneOutcome is what a completion says happened, in watch's words.
func doneOutcome(c *bus.Completion) string {
	if c.Status != bus.StatusOK {
		code, msg := "unknown", "(no error object)"
		if c.Error != nil {
			code, msg = c.Error.Code, c.Error.Message
		}
		return fmt.Sprintf("%s %s: %s", cmp.Or(c.Status, "?"), code, msg)
	}
	changed := "unchanged"
	if c.Changed {
		changed = "changed"
	}
	took := time.Duration(c.DurationMS * float64(time.Millisecond))
	if took >= time.Second {
		took = took.Round(100 * time.Millisecond)
	} else {
		took = took.Round(time.Millisecond)
	}
	return strings.Join(nonEmpty(c.Status, changed, c.State, took.String()), " ")
}

// clock is a message's time of day, to the millisecond, in local time.
func clock(t, now time.Time) string {
	if t.IsZero() {
		t = now
	}
	return t.Local().Format("15:04:05.000")
}

func nonEmpty(ss ...string) []string {
	out := ss[:0]
	for _, s := range ss {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}
