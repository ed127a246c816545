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
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// runOne sends one command and, unless -wait=false, reports its completion.
// -timeout bounds everything after connecting: the PubAck and the wait.
func runOne(ctx context.Context, nc *nats.Conn, c *config, stdout, stderr io.Writer) error {
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	subject := bus.CommandSubject(c.host, c.vm, c.action)
	msg := withDeadline(commandMsg(subject, c.id, c.params), c.expires)

	if c.core {
		return coreOne(ctx, tctx, nc, c, msg, stdout)
	}

	// Subscribe before publishing: a fast worker may answer before the
	// PubAck is back.
	var sub *nats.Subscription
	if c.wait {
		inbox := nc.NewInbox()
		var err error
		if sub, err = nc.SubscribeSync(inbox); err != nil {
			return fmt.Errorf("subscribe to reply inbox: %w", err)
		}
		defer sub.Unsubscribe()
		msg.Header.Set(bus.HeaderReply, inbox)
	}

	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	ack, err := js.PublishMsg(tctx, msg)
	if err != nil {
		return publishError(ctx, err, subject, c)
	}
	if ack.Duplicate {
		fmt.Fprintf(stderr, "publish: note: the stream already had a command with id %s inside its duplicate window and dropped this one\n", c.id)
		if c.wait {
			// Nothing answers our inbox for a dropped copy; the first
			// copy's completion is recorded once it has run.
			comp, err := bus.AwaitCompletion(tctx, js, c.host, c.vm, c.action, c.id)
			if err == nil {
				raw, _ := json.Marshal(comp)
				return report(stdout, c.json, comp, raw)
			}
			if ctx.Err() != nil || tctx.Err() != nil {
				return waitError(ctx, tctx.Err(), fmt.Sprintf("waiting for the recorded completion of %s (id %s)", subject, c.id), c.timeout)
			}
			fmt.Fprintf(stderr, "publish: the completion records are out of reach (%v); waiting on the reply subject\n", err)
		}
	}
	if !c.wait {
		return printQueued(stdout, c, ack)
	}

	for {
		m, err := sub.NextMsgWithContext(tctx)
		if err != nil {
			return waitError(ctx, err, fmt.Sprintf("waiting for the completion of %s (id %s)", subject, c.id), c.timeout)
		}
		var comp bus.Completion
		if err := json.Unmarshal(m.Data, &comp); err != nil {
			fmt.Fprintf(stderr, "publish: ignoring a reply that is not a completion: %v\n", err)
			continue
		}
		if comp.ID != c.id {
			continue // not ours: an inbox is ours alone, but be strict
		}
		return report(stdout, c.json, &comp, m.Data)
	}
}

// coreOne is the core-NATS path: a plain request, the completion in the reply.
func coreOne(ctx, tctx context.Context, nc *nats.Conn, c *config, msg *nats.Msg, stdout io.Writer) error {
	if !c.wait {
		if err := nc.PublishMsg(msg); err != nil {
			return fmt.Errorf("publish %s: %w", msg.Subject, err)
		}
		if err := nc.FlushWithContext(tctx); err != nil {
			return waitError(ctx, err, "flushing the command to the server", c.timeout)
		}
		fmt.Fprintln(stdout, c.id)
		return nil
	}
	resp, err := nc.RequestMsgWithContext(tctx, msg)
	if errors.Is(err, nats.ErrNoResponders) {
		return fmt.Errorf("request %s: no worker is subscribed (core mode): is a worker with VIRTBUS_DELIVERY=core running on host %q?", msg.Subject, c.host)
	}
	if err != nil {
		return waitError(ctx, err, fmt.Sprintf("waiting for the completion of %s (id %s)", msg.Subject, c.id), c.timeout)
	}
	comp, err := decodeCoreReply(resp.Data)
	if err != nil {
		return fmt.Errorf("reply to %s: %w", msg.Subject, err)
	}
	return report(stdout, c.json, comp, resp.Data)
}

// decodeCoreReply reads the reply to a core request. When a JetStream
// stream captures the subject too, the stream's PubAck wins the race to
// the reply: say so instead of printing an empty completion.
func decodeCoreReply(data []byte) (*bus.Completion, error) {
	var reply struct {
		bus.Completion
		Stream string `json:"stream"`
	}
	if err := json.Unmarshal(data, &reply); err != nil {
		return nil, fmt.Errorf("not a completion: %w", err)
	}
	if reply.ID == "" && reply.Stream != "" {
		return nil, fmt.Errorf("the reply is a PubAck of stream %s, not a completion: a stream takes this subject, so drop -core", reply.Stream)
	}
	if reply.ID == "" || reply.Status == "" {
		return nil, fmt.Errorf("not a completion: %.200s", data)
	}
	return &reply.Completion, nil
}

// commandMsg builds the command message; the id goes in Nats-Msg-Id.
func commandMsg(subject, id string, params json.RawMessage) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set(bus.HeaderMsgID, id)
	m.Data = params
	return m
}

// withDeadline sets Virtbus-Expires to now plus d, when d is set.
func withDeadline(m *nats.Msg, d time.Duration) *nats.Msg {
	if d > 0 {
		m.Header.Set(bus.HeaderExpires, time.Now().Add(d).UTC().Format(time.RFC3339))
	}
	return m
}

// publishError explains the failures a producer can do something about.
func publishError(ctx context.Context, err error, subject string, c *config) error {
	if errors.Is(err, jetstream.ErrNoStreamResponse) {
		return fmt.Errorf("%s: no JetStream stream takes this subject, so the command was NOT queued:"+
			" start a worker on host %q (it creates stream VIRTBUS_CMD) or create the stream as deploy/ shows;"+
			" for a worker with VIRTBUS_DELIVERY=core use -core", subject, c.host)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, nats.ErrTimeout) {
		return waitError(ctx, context.DeadlineExceeded, "waiting for the stream's PubAck of "+subject+" (was it queued? a permissions violation is logged above)", c.timeout)
	}
	return fmt.Errorf("publish %s: %w", subject, err)
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
