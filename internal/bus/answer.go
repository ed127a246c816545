package bus

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// An answer is what is left of a command once its outcome is known: the
// completion to record (unless it came from the record), publish to the
// event and reply subjects, and only then the ack.
type answering struct {
	j         *job
	c         Completion
	data      []byte // c encoded, set by add
	record    bool   // write c to the record bucket before publishing it
	duplicate bool   // c is the record of an earlier delivery
	put       jetstream.PubAckFuture
	putErr    error
	release   func() // lets the VM's next command start; nil: nothing waits
}

// answerer records, publishes and acks completions in the order their
// outcomes came, off the runners: a runner takes the next command as soon
// as the last one's outcome is known. That VM's next command waits only
// for the record (the queue holds the VM busy until then), so other VMs'
// commands fill the time a record takes. Record writes are sent as soon as
// an answer arrives and confirmed in order, so many are in flight at once;
// a completion is published only after its record is confirmed, and the
// ack follows it on the same connection, so the server sees them in that
// order whatever happens to the connection.
type answerer struct {
	w    *Worker
	room chan struct{}   // a token per answer on its way
	in   chan *answering // from the runners, their records sent
	done chan struct{}
}

func newAnswerer(w *Worker) *answerer {
	return &answerer{
		w:    w,
		room: make(chan struct{}, w.cfg.QueueSize),
		in:   make(chan *answering, w.cfg.QueueSize),
		done: make(chan struct{}),
	}
}

// run answers until close has been called and everything handed in was
// answered or handed back. ctx is the worker's: once it ends, a write that
// fails is not tried again, and its command is handed back instead.
func (a *answerer) run(ctx context.Context) {
	defer close(a.done)
	for an := range a.in {
		a.answer(ctx, an)
	}
}

// add hands an answer over, once its record write is sent: the runner
// sends it, which costs no wait, so that it is under way before the
// runner lets go. At most as many answers as the FIFO holds commands are
// on their way at once; a runner that finds no room waits, holding its
// slot, so the worker holds at most twice the FIFO's size of unacked
// messages (beyond the parked ones).
func (a *answerer) add(an *answering) {
	a.room <- struct{}{}
	an.c, an.data, an.putErr = a.w.encode(an.c)
	if an.record && an.putErr == nil {
		an.put, an.putErr = a.w.records.Load().putAsync(an.c.ID, an.data)
	}
	a.in <- an
}

// close says no more answers come, and waits for those handed in.
func (a *answerer) close() {
	close(a.in)
	<-a.done
}

// answer confirms the record, then publishes and acks. A panic here hands
// the command back: its redelivery is answered from the record, if any.
func (a *answerer) answer(ctx context.Context, an *answering) {
	w := a.w
	defer func() {
		<-a.room
		if r := recover(); r != nil {
			w.log.Error("panic answering a command; handing it back", "id", an.j.cmd.ID,
				"panic", Clip(fmt.Sprint(r), 256), "stack", string(debug.Stack()))
			w.handBack(an.j)
		}
	}()
	if an.release != nil {
		defer an.release() // also after a panic
	}
	if an.data == nil {
		w.log.Error("completion not encodable; handing back", "id", an.j.cmd.ID, "err", an.putErr)
		w.handBack(an.j)
		return
	}
	recorded := !an.record || w.confirmRecord(ctx, an)
	if an.release != nil {
		// The VM's next command may start: this one is recorded, or it is
		// handed back below, which happens only at shutdown, when nothing
		// starts anymore.
		an.release()
	}
	if !recorded {
		w.log.Warn("completion not recorded at shutdown; handing back", "id", an.j.cmd.ID)
		w.handBack(an.j)
		return
	}
	if an.record && w.crashAfterRecord != nil && w.crashAfterRecord(an.j.cmd) {
		w.held.remove(an.j)
		return
	}
	w.finish(ctx, an.j, an.c, an.data, an.duplicate)
}

// confirmRecord waits for the server to confirm the record write sent
// ahead, and writes it again, waiting, when that write failed or was never
// sent. It reports false when shutdown came first.
func (w *Worker) confirmRecord(ctx context.Context, an *answering) bool {
	if an.put != nil {
		t := time.NewTimer(recordTimeout)
		defer t.Stop()
		select {
		case <-an.put.Ok():
			return true
		case an.putErr = <-an.put.Err():
		case <-t.C:
			an.putErr = fmt.Errorf("record completion %s: no confirmation within %s", an.c.ID, recordTimeout)
		}
	}
	w.log.Debug("record failed", "id", an.c.ID, "err", an.putErr)
	callCtx := handlerContext(ctx)
	err := retry(ctx, func() error { return w.records.Load().put(callCtx, an.c.ID, an.data) },
		func(err error) { w.log.Debug("record failed", "id", an.c.ID, "err", err) })
	return err == nil
}
