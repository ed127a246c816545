package bus

import (
	"context"
	"fmt"
	"runtime/debug"
)

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

// answerAfterPanic ends a JetStream command whose processing panicked.
// When a record of it exists (an earlier delivery), that is the answer, as
// it will be for any redelivery. Otherwise the error completion is
// recorded first, so a redelivery gets the same one.
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
		w.answers.add(&answering{j: j, c: c, record: true})
		return
	}
	w.answers.add(&answering{j: j, c: c})
}
