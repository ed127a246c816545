package bus

import (
	"context"
	"fmt"
	"time"
)

// processJS decides one command's completion: from its record when it
// was answered before, else by running it. The answerer then records it,
// publishes it and only then acks the message. The runner is free as soon
// as the completion is decided; the VM's next command waits for the
// record.
func (w *Worker) processJS(ctx context.Context, j *job) {
	cmd := j.cmd
	w.m.queueWait.WithLabelValues(w.m.action(cmd.Action)).Observe(time.Since(cmd.ReceivedAt).Seconds())
	rec, err := w.recorded(ctx, j)
	if err != nil {
		w.log.Warn("record lookup failed at shutdown; handing back", "id", cmd.ID, "err", err)
		w.handBack(j)
		return
	}
	switch {
	case rec != nil && !rec.answers(cmd.VM, cmd.Action):
		// The id was used before for another command: answer this one with
		// a conflict, and keep the first one's record.
		w.answers.add(&answering{j: j, c: w.failure(cmd, rec.reusedBy(cmd.ID))})
	case rec != nil:
		w.answers.add(&answering{j: j, c: *rec, duplicate: true})
	default:
		c, ok := w.outcome(ctx, j)
		if !ok {
			w.log.Info("shutdown while a command waited to retry; handing back", "id", cmd.ID)
			w.handBack(j)
			return
		}
		// The VM's next command waits until this one is recorded (see
		// answerBatch): a crash then leaves at most the last command of a
		// VM run but unrecorded, and a redelivery runs only that one again,
		// never an earlier one over a later one's effect.
		w.answers.add(&answering{j: j, c: c, record: true, release: w.q.Hold(j.key)})
	}
}

// recorded is the completion recorded for j's command id, or nil: none
// when the id has no record to look up, else the lookup started when it
// was fetched, or one now when that failed or was not started.
func (w *Worker) recorded(ctx context.Context, j *job) (*Completion, error) {
	if l := j.lookup; l != nil {
		if <-l.done; l.err == nil {
			return l.rec, nil
		}
	} else if !w.known.mayHave(j.cmd.ID) {
		return nil, nil
	}
	// NATS calls use a context shutdown does not cancel: a command taken
	// off the queue is seen through. ctx only ends the waiting for NATS.
	callCtx := handlerContext(ctx)
	var rec *Completion
	err := retry(ctx, func() error {
		var err error
		rec, err = w.records.Load().get(callCtx, j.cmd.ID)
		return err
	}, func(err error) { w.log.Debug("record lookup failed", "id", j.cmd.ID, "err", err) })
	return rec, err
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
