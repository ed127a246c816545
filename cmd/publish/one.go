package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// runOne sends one command and, unless -wait=false, reports its completion.
// -timeout bounds everything after connecting: the PubAck and the wait.
func runOne(ctx context.Context, nc *nats.Conn, c *config, stdout, stderr io.Writer) error {
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	client, err := bus.NewClient(nc, c.host, bus.Core(c.core),
		bus.OnNotice(func(err error) { fmt.Fprintf(stderr, "publish: %v\n", err) }))
	if err != nil {
		return err
	}
	defer client.Close()
	if c.checkStream != nil {
		if err := c.checkStream(ctx, bus.CommandSubject(c.host, c.vm, c.action)); err != nil {
			return publishError(ctx, err, c.vm, c)
		}
	}
	cmd := c.command(c.vm, c.id)
	if !c.wait {
		return enqueueOne(ctx, tctx, client, c, cmd, stdout, stderr)
	}

	p, err := client.Start(tctx, cmd)
	if err != nil {
		return publishError(ctx, err, c.vm, c)
	}
	defer p.Close()
	noteDuplicate(stderr, p.Ack(), c.id)
	res, err := p.Wait(tctx)
	if err != nil {
		return awaitError(ctx, err, c.vm, c)
	}
	return report(stdout, c.json, res.Completion, res.Raw)
}

// enqueueOne is -wait=false: the command is handed over, and its id (and
// JetStream's sequence) printed.
func enqueueOne(ctx, tctx context.Context, client *bus.Client, c *config, cmd bus.Cmd, stdout, stderr io.Writer) error {
	ack, err := client.Send(tctx, cmd)
	if err != nil {
		return publishError(ctx, err, c.vm, c)
	}
	if c.core {
		fmt.Fprintln(stdout, c.id)
		return nil
	}
	noteDuplicate(stderr, ack, c.id)
	return printQueued(stdout, c, ack)
}

func noteDuplicate(stderr io.Writer, ack *jetstream.PubAck, id string) {
	if ack != nil && ack.Duplicate {
		fmt.Fprintf(stderr, "publish: note: the stream already had a command with id %s inside its duplicate window and dropped this one\n", id)
	}
}

// publishError explains the failures a producer can do something about.
func publishError(ctx context.Context, err error, vm string, c *config) error {
	subject := bus.CommandSubject(c.host, vm, c.action)
	switch {
	case errors.Is(err, errNoJetStream):
		return fmt.Errorf("%s: the server has no JetStream (not for this user's account, at least), so the command was NOT sent:"+
			" for a worker with VIRTBUS_DELIVERY=core use -core", subject)
	case errors.Is(err, bus.ErrNoStream):
		return fmt.Errorf("%s: no JetStream stream takes this subject, so the command was NOT queued:"+
			" start a worker on host %q (it creates stream VIRTBUS_CMD) or create the stream as deploy/ shows;"+
			" for a worker with VIRTBUS_DELIVERY=core use -core", subject, c.host)
	case errors.Is(err, bus.ErrTimeout) && c.core:
		return waitError(ctx, err, "flushing the command to the server", c.timeout)
	case errors.Is(err, bus.ErrTimeout):
		return waitError(ctx, err, "waiting for the stream's PubAck of "+subject+" (was it queued? a permissions violation is logged above)", c.timeout)
	}
	return err
}

// awaitError explains why no completion came.
func awaitError(ctx context.Context, err error, vm string, c *config) error {
	subject := bus.CommandSubject(c.host, vm, c.action)
	switch {
	case errors.Is(err, bus.ErrNoWorker):
		return fmt.Errorf("request %s: no worker is subscribed (core mode): is a worker with VIRTBUS_DELIVERY=core running on host %q?", subject, c.host)
	case errors.Is(err, bus.ErrBadReply):
		return fmt.Errorf("reply to %s: %w", subject, err)
	}
	return waitError(ctx, err, fmt.Sprintf("waiting for the completion of %s (id %s)", subject, c.id), c.timeout)
}

func printQueued(w io.Writer, c *config, ack *jetstream.PubAck) error {
	if c.json {
		return json.NewEncoder(w).Encode(struct {
			ID        string `json:"id"`
			Stream    string `json:"stream"`
			Seq       uint64 `json:"seq"`
			Duplicate bool   `json:"duplicate,omitempty"`
		}{c.id, ack.Stream, ack.Sequence, ack.Duplicate})
	}
	dup := ""
	if ack.Duplicate {
		dup = " duplicate"
	}
	_, err := fmt.Fprintf(w, "%s stream=%s seq=%d%s\n", c.id, ack.Stream, ack.Sequence, dup)
	return err
}

// report prints a completion and returns the error its status calls for.
func report(w io.Writer, asJSON bool, comp *bus.Completion, raw []byte) error {
	if asJSON {
		if _, err := fmt.Fprintln(w, strings.TrimSpace(string(raw))); err != nil {
			return err
		}
	} else if _, err := fmt.Fprintln(w, formatCompletion(comp)); err != nil {
		return err
	}
	if comp.Status != bus.StatusOK {
		return &exitError{code: exitFailed}
	}
	return nil
}

// formatCompletion is the one-line human form:
//
//	ok    stop web-1 changed=true state=shutoff 61003ms detail: forced=true
//	error stop web-1 code=not_found: domain "web-1" not found
func formatCompletion(c *bus.Completion) string {
	var b strings.Builder
	if c.Status != bus.StatusOK {
		code, msg := "unknown", "(no error object)"
		if c.Error != nil {
			code, msg = c.Error.Code, c.Error.Message
		}
		status := c.Status
		if status == "" {
			status = "?"
		}
		fmt.Fprintf(&b, "%-5s %s %s code=%s: %s", status, c.Action, c.VM, code, msg)
		return b.String()
	}
	fmt.Fprintf(&b, "%-5s %s %s changed=%t", c.Status, c.Action, c.VM, c.Changed)
	if c.State != "" {
		fmt.Fprintf(&b, " state=%s", c.State)
	}
	fmt.Fprintf(&b, " %.0fms", c.DurationMS)
	if c.Attempt > 1 {
		fmt.Fprintf(&b, " attempt=%d", c.Attempt)
	}
	if len(c.Detail) > 0 {
		keys := make([]string, 0, len(c.Detail))
		for k := range c.Detail {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteString(" detail:")
		for _, k := range keys {
			fmt.Fprintf(&b, " %s=%s", k, detailValue(c.Detail[k]))
		}
	}
	return b.String()
}

func detailValue(v any) string {
	switch v := v.(type) {
	case string:
		if v == "" || strings.ContainsAny(v, " \t\"=") {
			return strconv.Quote(v)
		}
		return v
	case nil:
		return "null"
	case float64, bool:
		return fmt.Sprint(v)
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Sprint(v)
		}
		return string(b)
	}
}
