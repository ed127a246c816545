package bus

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
)

// drainTimeout bounds how long shutdown waits for the core subscription to
// hand over the messages the client had already buffered.
const drainTimeout = 5 * time.Second

// runCore is Run for DeliveryCore: a queue subscription, at most once. A
// command that cannot be run (shutdown) is still answered, with
// `unavailable`, so a requester never waits for nothing.
func (w *Worker) runCore(ctx context.Context) error {
	subject := CommandPrefix + "." + w.cfg.Host + ".>"
	group := ConsumerName(w.cfg.Host)
	sub, err := w.nc.QueueSubscribe(subject, group, func(m *nats.Msg) { w.acceptCore(ctx, m) })
	if err != nil {
		return fmt.Errorf("subscribe %s queue %s: %w", subject, group, err)
	}
	closed := sub.StatusChanged(nats.SubscriptionClosed)
	w.ready.Store(true)
	w.log.Info("consuming", "subject", subject, "queue", group)

	// Stop taking work as soon as shutdown begins; the messages the client
	// already holds still pass through acceptCore and are answered there.
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		w.ready.Store(false)
		if err := sub.Drain(); err != nil {
			w.log.Warn("drain subscription", "err", err)
		}
	}()

	left := w.q.Run(ctx, func(_ string, j *job) { w.guard(ctx, j, w.processCore) })
	for _, j := range left {
		w.answerCore(ctx, w.failure(j.cmd, errShuttingDown()), j.cmd.Reply)
	}
	<-stopped
	select {
	case <-closed:
	case <-time.After(drainTimeout):
		w.log.Warn("subscription not drained in time", "timeout", drainTimeout)
		_ = sub.Unsubscribe()
	}
	if w.nc.IsConnected() {
		if err := w.nc.FlushTimeout(publishTimeout); err != nil {
			w.log.Warn("flush at shutdown", "err", err)
		}
	}
	return nil
}

func errShuttingDown() *Error {
	return &Error{Code: CodeUnavailable, Message: "worker shutting down; command not run"}
}

// acceptCore runs on the subscription's goroutine. It blocks while the FIFO
// is full: core NATS cannot keep the backlog, so back-pressure means not
// taking the next message yet rather than dropping this one.
func (w *Worker) acceptCore(ctx context.Context, m *nats.Msg) {
	j := w.decode(m.Subject, m.Header, m.Data, time.Now())
	j.core = m
	if m.Reply != "" {
		if err := w.checkReply(m.Reply); err != nil {
			j.cmd.Reply = ""
			if j.invalid == nil {
				j.invalid = err
			}
		} else {
			j.cmd.Reply = m.Reply
		}
	}
	if j.cmd.ID == "" {
		j.cmd.ID = "~core-" + nuid.Next()
	}
	j.cmd.Expires = earliest(j.cmd.Expires, j.cmd.ReceivedAt.Add(w.cfg.CommandMaxAge))
	w.m.received.WithLabelValues(w.m.action(j.cmd.Action)).Inc()
	w.log.Debug("command received", "id", j.cmd.ID, "vm", j.cmd.VM, "action", j.cmd.Action)
	if err := w.q.PushWait(ctx, j.key, j); err != nil {
		w.answerCore(ctx, w.failure(j.cmd, errShuttingDown()), j.cmd.Reply)
	}
}

// processCore runs one command. With no stream to redeliver it, an
// `unavailable` outcome is retried here, holding the VM's place in the
// FIFO, until MaxDeliver attempts or shutdown.
func (w *Worker) processCore(ctx context.Context, j *job) {
	cmd := j.cmd
	w.m.queueWait.WithLabelValues(w.m.action(cmd.Action)).Observe(time.Since(cmd.ReceivedAt).Seconds())
	// Core NATS cannot redeliver: a command interrupted by shutdown while
	// it waited to retry is answered with its last outcome.
	c, _ := w.outcome(ctx, j)
	w.answerCore(ctx, c, cmd.Reply)
}

func (w *Worker) answerCore(ctx context.Context, c Completion, reply string) {
	if err := w.publish(ctx, c, reply); err != nil {
		w.log.Warn("completion lost", "id", c.ID, "err", err)
	}
	w.report(c, false)
}
