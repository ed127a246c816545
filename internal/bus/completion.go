package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/backoff"
)

var errNotConnected = errors.New("nats not connected")

// publishTimeout bounds the flush that confirms a completion reached the
// server.
const publishTimeout = 5 * time.Second

// execute runs the handler, turning a panic into an `unavailable` outcome:
// one bad command must not take the worker and every other VM down, and the
// bus's MaxDeliver still ends it in a final completion.
func (w *Worker) execute(ctx context.Context, cmd Command) (out Outcome, started, finished time.Time) {
	started = time.Now()
	defer func() {
		if r := recover(); r != nil {
			w.log.Error("handler panic", "id", cmd.ID, "vm", cmd.VM, "action", cmd.Action,
				"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			out = Outcome{Err: &Error{Code: CodeUnavailable, Message: fmt.Sprintf("handler panic: %v", r)}}
		}
		finished = time.Now()
	}()
	out = w.handler(handlerContext(ctx), cmd)
	return out, started, finished
}

// retryDelay is the wait before the try after attempt.
func (w *Worker) retryDelay(attempt int) time.Duration {
	return backoff.Nth(w.cfg.RetryBackoff, w.cfg.RetryBackoffMax, attempt-1)
}

func (w *Worker) completion(cmd Command, out Outcome, started, finished time.Time) Completion {
	c := Completion{
		ID:         cmd.ID,
		Host:       w.cfg.Host,
		VM:         cmd.VM,
		Action:     cmd.Action,
		Status:     StatusOK,
		Changed:    out.Changed,
		State:      out.State,
		Detail:     out.Detail,
		Attempt:    cmd.Attempt,
		ReceivedAt: cmd.ReceivedAt.UTC(),
		StartedAt:  started.UTC(),
		FinishedAt: finished.UTC(),
		DurationMS: float64(finished.Sub(started)) / float64(time.Millisecond),
	}
	if out.Err != nil {
		c.Status = StatusError
		// Messages may quote parameters a client sent: keep them bounded.
		c.Error = &Error{Code: out.Err.Code, Message: strings.ToValidUTF8(clipMessage(out.Err.Message), "")}
	}
	return c
}

// maxMessageLen bounds an error message in a completion and its log line.
const maxMessageLen = 1024

func clipMessage(m string) string {
	if len(m) <= maxMessageLen {
		return m
	}
	return m[:maxMessageLen] + "…"
}

// failure is the completion of a command that ends without running.
func (w *Worker) failure(cmd Command, e *Error) Completion {
	now := time.Now()
	return w.completion(cmd, Outcome{Err: e}, now, now)
}

// publish sends a completion to the event subject and the reply subject,
// and confirms with a flush that the server has it: core mode's only
// confirmation, as nothing follows the completion there.
func (w *Worker) publish(ctx context.Context, c Completion, reply string) error {
	c, data, err := w.encode(c)
	if err != nil {
		return err
	}
	return w.deliver(ctx, c, data, reply, true)
}

// send sends a completion, encoded as data, to the event subject and the
// reply subject without waiting: the ack that follows on the same
// connection reaches the server after it, and a redelivery answers a
// completion that got lost.
func (w *Worker) send(ctx context.Context, c Completion, data []byte, reply string) error {
	return w.deliver(ctx, c, data, reply, false)
}

// encode is c as JSON, once for its record and its publishing. Only an
// unencodable Detail fails; it is dropped then rather than lose the
// completion, and the completion returned says so.
func (w *Worker) encode(c Completion) (Completion, []byte, error) {
	data, err := json.Marshal(c)
	if err == nil {
		return c, data, nil
	}
	w.log.Error("completion detail not encodable; sent without it", "id", c.ID, "err", err)
	c.Detail = map[string]any{"encode_error": err.Error()}
	if data, err = json.Marshal(c); err != nil {
		return c, nil, fmt.Errorf("encode completion %s: %w", c.ID, err)
	}
	return c, data, nil
}

// deliver is publish (flush set) and send. While NATS is down it keeps
// trying, until it goes through or ctx ends; the caller must not ack
// before it returns nil.
func (w *Worker) deliver(ctx context.Context, c Completion, data []byte, reply string, flush bool) error {
	var subjects []string
	if ValidToken(c.VM) && ValidToken(c.Action) {
		subjects = append(subjects, EventSubject(w.cfg.Host, c.VM, c.Action))
	}
	if reply != "" {
		subjects = append(subjects, reply)
	}
	return retry(ctx, func() error {
		// Publishing into the reconnect buffer would "succeed" and the flush
		// would then time out: publish only to a live connection.
		if !w.nc.IsConnected() {
			return errNotConnected
		}
		for _, s := range subjects {
			if err := w.nc.Publish(s, data); err != nil {
				return fmt.Errorf("publish completion %s to %s: %w", c.ID, s, err)
			}
		}
		if !flush {
			return nil
		}
		if err := w.nc.FlushTimeout(publishTimeout); err != nil {
			return fmt.Errorf("flush completion %s: %w", c.ID, err)
		}
		return nil
	}, func(err error) {
		w.log.Debug("completion not published yet", "id", c.ID, "err", err)
	})
}

// report counts and logs a command's final completion: the one log line
// per command.
func (w *Worker) report(c Completion, duplicate bool) {
	code := ""
	if c.Error != nil {
		code = c.Error.Code
	}
	attrs := []any{"id", c.ID, "vm", c.VM, "action", c.Action, "status", c.Status, "code", code,
		"attempt", c.Attempt, "duration_ms", c.DurationMS}
	if duplicate {
		w.m.duplicates.Inc()
		w.log.Info("command answered from record", attrs...)
		return
	}
	action := w.m.action(c.Action)
	w.m.completed.WithLabelValues(action, c.Status).Inc()
	w.m.duration.WithLabelValues(action).Observe(c.DurationMS / 1000)
	if c.Error != nil {
		w.m.errors.WithLabelValues(action, metricCode(code)).Inc()
		w.log.Warn("command failed", append(attrs, "error", c.Error.Message)...)
		return
	}
	w.log.Info("command done", attrs...)
}

// retry calls op until it succeeds or ctx ends, with capped doubling
// between tries. op always runs at least once, even after ctx ended, so a
// finished command still gets its one chance to be answered at shutdown.
func retry(ctx context.Context, op func() error, onErr func(error)) error {
	b := backoff.Backoff{Min: 50 * time.Millisecond, Max: time.Second}
	for {
		err := op()
		if err == nil {
			return nil
		}
		if onErr != nil {
			onErr(err)
		}
		if sleep(ctx, b.Next()); ctx.Err() != nil {
			return err
		}
	}
}

// waitConnected blocks until the connection is up or ctx ends.
func waitConnected(ctx context.Context, nc *nats.Conn) error {
	return retry(ctx, func() error {
		if !nc.IsConnected() {
			return errNotConnected
		}
		return nil
	}, nil)
}
