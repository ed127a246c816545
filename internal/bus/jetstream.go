package bus

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// StreamName is the stream that keeps commands until a worker acks them.
const StreamName = "VIRTBUS_CMD"

// ConsumerName is the durable consumer (JetStream) or queue group (core) of
// host.
func ConsumerName(host string) string { return "virtbus-" + host }

const (
	// fetchWait is how long one pull waits for messages; it bounds how long
	// shutdown waits for the fetch loop. A pull is not cancelled early: the
	// server could already have handed it messages that would then sit
	// unacked until AckWait.
	fetchWait = time.Second
	// setupTimeout bounds one round of stream, consumer and bucket calls.
	setupTimeout = 5 * time.Second
	// verifyEvery is how often the fetch loop checks that the consumer and
	// the record bucket still exist.
	verifyEvery = 2 * time.Second
	// ackTries bounds the confirmed acks of one message while connected:
	// when they all fail, the command is answered again from its record on
	// redelivery.
	ackTries = 5
	// parkLimit is how many commands beyond their VM's share of the FIFO the
	// worker holds (with concurrency above 1), so that it reads past one
	// VM's deep backlog to the next VM's command. At most maxCommandSize
	// each, they take at most 32 MiB, and far less in practice; they count
	// against the consumer's MaxAckPending (the server's default is 1000).
	parkLimit = 512
)

// runJetStream is Run for DeliveryJetStream. Three loops run until ctx
// ends: keepSetUp owns the stream, consumer, buckets and lease; fetchLoop
// pulls into the FIFO; the queue runs the commands. ErrLeaseLost ends it
// early: another worker took this host over.
func (w *Worker) runJetStream(ctx context.Context) error {
	js, err := jetstream.New(w.nc)
	if err != nil {
		return fmt.Errorf("jetstream context: %w", err)
	}
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)

	left := make(chan []*job, 1)
	go func() {
		left <- w.q.Run(ctx, func(_ string, j *job) { w.guard(ctx, j, w.processJS) })
	}()
	beatCtx, stopBeat := context.WithCancel(context.WithoutCancel(ctx))
	// The lease is kept until everything held was handed back: a standby
	// that took over earlier could fetch a VM's later commands first.
	leaseCtx, stopLease := context.WithCancel(context.WithoutCancel(ctx))
	var loops, leases sync.WaitGroup
	loops.Go(func() { w.heartbeat(beatCtx) })
	loops.Go(func() { w.keepSetUp(ctx, js, func(l *lease) { leases.Go(func() { w.keepLease(leaseCtx, l, stop) }) }) })

	w.fetchLoop(ctx)

	// The queue hands back what it did not start only after the running
	// commands ended, so no command is answered after Run returns. Messages
	// that came in after shutdown began go back only now too: no pull is
	// open that they would be redelivered straight into. The server
	// redelivers in nak order, so nak in stream order to keep each VM's
	// commands in order for the next worker.
	back := append(<-left, w.late...)
	slices.SortFunc(back, func(a, b *job) int { return cmp.Compare(a.stored.seq, b.stored.seq) })
	for _, j := range back {
		w.handBack(j)
	}
	stopBeat()
	loops.Wait()
	w.markStopped()
	// Naks are fire-and-forget: push them out before the caller closes the
	// connection.
	if w.nc.IsConnected() {
		if err := w.nc.FlushTimeout(publishTimeout); err != nil {
			w.log.Warn("flush at shutdown", "err", err)
		}
	}
	stopLease()
	leases.Wait()
	if cause := context.Cause(ctx); errors.Is(cause, ErrLeaseLost) {
		return cause
	}
	return nil
}

// markStopped notes in the record bucket that this worker handed back
// everything it held, so that the next one need not wait (see takeOver).
func (w *Worker) markStopped() {
	recs := w.records.Load()
	if recs == nil || !w.nc.IsConnected() {
		return
	}
	if err := recs.markStopped(context.Background(), time.Now()); err != nil {
		w.log.Warn("recording the clean shutdown failed; the next start waits one ack wait", "err", err)
	}
}

// fetchLoop pulls as many messages as the FIFO has room for until ctx
// ends, from the consumer keepSetUp provides. It outlives any NATS outage:
// a fetch error hands the consumer back to keepSetUp to set up again.
func (w *Worker) fetchLoop(ctx context.Context) {
	reconnects := w.nc.Stats().Reconnects
	for ctx.Err() == nil {
		// A pull published while disconnected would wait in the reconnect
		// buffer and reach the server long after it was given up.
		if waitConnected(ctx, w.nc) != nil {
			return
		}
		cons := w.cons.Load()
		if cons == nil {
			sleep(ctx, 50*time.Millisecond)
			continue
		}
		// After a reconnect the server may have lost the consumer; pulls
		// to a missing one just go unanswered.
		if n := w.nc.Stats().Reconnects; n != reconnects {
			reconnects = n
			w.lose(cons)
			continue
		}
		room, err := w.q.WaitRoom(ctx)
		if err != nil {
			return
		}
		batch, err := (*cons).Fetch(room, jetstream.FetchMaxWait(w.fetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				w.accept(msg)
			}
			err = batch.Error()
		}
		if err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			w.log.Warn("fetch failed; setting up again", "err", err)
			w.lose(cons)
			sleep(ctx, time.Second)
		}
	}
}

// accept queues one fetched message. The fetch asked for no more than the
// free room and only this loop pushes, so the queue refuses a message only
// when it is shutting down; then the message is kept aside, still held and
// heartbeaten, and handed back once the pull is over.
func (w *Worker) accept(msg jetstream.Msg) {
	j := w.decode(msg.Subject(), msg.Headers(), msg.Data(), time.Now())
	j.js = msg
	md, err := msg.Metadata()
	if err == nil {
		j.cmd.Attempt = int(md.NumDelivered)
		j.stored = streamMsg{seq: md.Sequence.Stream, stored: md.Timestamp.UnixNano()}
		j.cmd.Expires = earliest(j.cmd.Expires, md.Timestamp.Add(w.cfg.CommandMaxAge))
	}
	if j.cmd.ID == "" {
		j.cmd.ID = madeID(md)
	}
	w.m.received.WithLabelValues(w.m.action(j.cmd.Action)).Inc()
	if j.cmd.Attempt > 1 {
		w.m.redeliveries.Inc()
	}
	w.log.Debug("command received", "id", j.cmd.ID, "vm", j.cmd.VM, "action", j.cmd.Action, "attempt", j.cmd.Attempt)

	if !w.held.add(j) {
		w.log.Info("redelivery of a command still in progress; one completion answers both", "id", j.cmd.ID, "attempt", j.cmd.Attempt)
		return
	}
	if err := w.q.Push(j.key, j); err != nil {
		w.log.Debug("command not queued", "id", j.cmd.ID, "err", err)
		w.late = append(w.late, j)
	}
}

// earliest is the earlier of two deadlines, a zero one meaning none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}

// madeID names a command that came without a usable id. It is the same
// for every delivery of one stream message, so a redelivery is still
// answered from its record; it differs for a new stream that reuses the
// sequence (the message's stored time is part of it); and it starts with
// '~', which no client id may contain.
func madeID(md *jetstream.MsgMetadata) string {
	if md == nil {
		return "~" + nuid.Next()
	}
	return fmt.Sprintf("~%d-%d", md.Sequence.Stream, md.Timestamp.UnixNano())
}

// processJS answers one command: from its record when it was answered
// before, else by running it. The completion is recorded, then published,
// and only then is the message acked.
func (w *Worker) processJS(ctx context.Context, j *job) {
	defer w.held.remove(j)
	cmd := j.cmd
	w.m.queueWait.WithLabelValues(w.m.action(cmd.Action)).Observe(time.Since(cmd.ReceivedAt).Seconds())
	// NATS calls use a context shutdown does not cancel: a command taken
	// off the queue is seen through. ctx only ends the waiting for NATS.
	callCtx := handlerContext(ctx)

	var rec *Completion
	err := retry(ctx, func() error {
		var err error
		rec, err = w.records.Load().get(callCtx, cmd.ID)
		return err
	}, func(err error) { w.log.Debug("record lookup failed", "id", cmd.ID, "err", err) })
	if err != nil {
		w.log.Warn("record lookup failed at shutdown; handing back", "id", cmd.ID, "err", err)
		w.handBack(j)
		return
	}
	if rec != nil && !rec.answers(cmd.VM, cmd.Action) {
		// The id was used before for another command: answer this one with
		// a conflict, and keep the first one's record.
		w.finish(ctx, j, w.failure(cmd, rec.reusedBy(cmd.ID)), false)
		return
	}
	if rec != nil {
		w.finish(ctx, j, *rec, true)
		return
	}

	c, ok := w.outcome(ctx, j)
	if !ok {
		w.log.Info("shutdown while a command waited to retry; handing back", "id", cmd.ID)
		w.handBack(j)
		return
	}
	if err := retry(ctx, func() error { return w.records.Load().put(callCtx, c) },
		func(err error) { w.log.Debug("record failed", "id", c.ID, "err", err) }); err != nil {
		w.log.Warn("completion not recorded at shutdown; handing back", "id", cmd.ID, "err", err)
		w.handBack(j)
		return
	}
	if w.crashAfterRecord != nil && w.crashAfterRecord(cmd) {
		return
	}
	w.finish(ctx, j, c, false)
}

// outcome decides a command's completion: refused as it came, expired,
// out of deliveries, or run. It reports false when shutdown interrupted
// the waits between retries.
func (w *Worker) outcome(ctx context.Context, j *job) (Completion, bool) {
	cmd := j.cmd
	switch {
	case j.invalid != nil:
		return w.failure(cmd, j.invalid), true
	case !cmd.Expires.IsZero() && time.Now().After(cmd.Expires):
		return w.failure(cmd, &Error{Code: CodeExpired, Message: fmt.Sprintf(
			"deadline %s passed before the command ran; it did not run", cmd.Expires.UTC().Format(time.RFC3339))}), true
	case cmd.Attempt > w.cfg.DeliveryLimit:
		return w.failure(cmd, &Error{Code: CodeUnavailable,
			Message: fmt.Sprintf("not completed after %d deliveries", cmd.Attempt-1)}), true
	}
	return w.runWithRetries(ctx, cmd)
}

// runWithRetries runs a command, and runs it again after a back-off while
// it ends `unavailable`, up to MaxDeliver attempts. The retries happen in
// place, holding the VM's slot, so that the VM's later commands cannot
// overtake it. It reports false when shutdown came during a back-off; the
// completion is then the last attempt's.
func (w *Worker) runWithRetries(ctx context.Context, cmd Command) (Completion, bool) {
	for tries := 1; ; tries++ {
		out, started, finished := w.execute(ctx, cmd)
		c := w.completion(cmd, out, started, finished)
		if out.Err == nil || out.Err.Code != CodeUnavailable || tries >= w.cfg.MaxDeliver {
			return c, true
		}
		delay := w.retryDelay(tries)
		w.log.Info("command unavailable; will retry", "id", cmd.ID, "vm", cmd.VM, "action", cmd.Action,
			"attempt", cmd.Attempt, "retry_in", delay, "error", out.Err.Message)
		if sleep(ctx, delay); ctx.Err() != nil {
			return c, false
		}
		cmd.Attempt++
	}
}

// finish publishes a completion, then acks its command and reports it.
func (w *Worker) finish(ctx context.Context, j *job, c Completion, duplicate bool) {
	if err := w.publish(ctx, c, j.cmd.Reply); err != nil {
		w.log.Warn("completion not published at shutdown; handing back", "id", j.cmd.ID, "err", err)
		w.handBack(j)
		return
	}
	w.ack(ctx, j)
	w.report(c, duplicate)
}

// guard runs process and turns a panic in it into an error completion and
// a log line: a command that trips a bug must not take the other VMs down.
// If even answering it panics, the command is handed back; MaxDeliver then
// ends it.
func (w *Worker) guard(ctx context.Context, j *job, process func(context.Context, *job)) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		w.log.Error("panic handling a command", "id", j.cmd.ID, "vm", j.cmd.VM, "action", j.cmd.Action,
			"panic", Clip(fmt.Sprint(r), 256), "stack", string(debug.Stack()))
		defer func() {
			if r := recover(); r != nil {
				w.log.Error("panic answering a command; handing it back", "id", j.cmd.ID, "panic", Clip(fmt.Sprint(r), 256))
				w.handBack(j)
			}
		}()
		c := w.failure(j.cmd, &Error{Code: CodeUnavailable, Message: "internal error handling the command"})
		if j.core != nil {
			w.answerCore(ctx, c, j.cmd.Reply)
			return
		}
		w.answerAfterPanic(ctx, j, c)
	}()
	process(ctx, j)
}

// answerAfterPanic ends a JetStream command whose processing panicked. The
// panic may have come after the completion was recorded: then the record
// is the answer, as it will be for any redelivery. Otherwise the error
// completion is recorded first, so a redelivery gets the same one.
func (w *Worker) answerAfterPanic(ctx context.Context, j *job, c Completion) {
	recs := w.records.Load()
	callCtx := handlerContext(ctx)
	rec, err := recs.get(callCtx, j.cmd.ID)
	switch {
	case err != nil:
		w.handBack(j)
		return
	case rec != nil && rec.answers(j.cmd.VM, j.cmd.Action):
		c = *rec
	default:
		if err := recs.put(callCtx, c); err != nil {
			w.handBack(j)
			return
		}
	}
	w.finish(ctx, j, c, false)
}

// ack acks after the completion went out, and waits for the server to
// confirm, so that the slot is freed only once the server counts the
// message as done. An ack that never goes through is not fatal: the
// redelivery is answered from the record.
func (w *Worker) ack(ctx context.Context, j *job) {
	var err error
	for range ackTries {
		if err = waitConnected(ctx, w.nc); err != nil {
			break // shutdown while disconnected
		}
		actx, cancel := context.WithTimeout(handlerContext(ctx), publishTimeout)
		err = j.msg().DoubleAck(actx)
		cancel()
		if err == nil || errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
			return
		}
		w.log.Debug("ack failed", "id", j.cmd.ID, "err", err)
		sleep(ctx, 100*time.Millisecond)
	}
	w.log.Warn("ack not confirmed; a redelivery is answered from the record", "id", j.cmd.ID, "err", err)
}

// handBack returns a command that was not answered to the stream for
// immediate redelivery.
func (w *Worker) handBack(j *job) {
	if j.msg() == nil {
		return // core mode: nothing to hand back to
	}
	w.held.remove(j)
	if err := j.msg().Nak(); err != nil {
		w.log.Warn("nak failed; redelivered after ack wait", "id", j.cmd.ID, "err", err)
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
