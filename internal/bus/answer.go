package bus

import (
	"context"
	"errors"
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
	conn      uint64 // the connection's reconnect count when the completion went out
	done      bool   // answered, or handed back
}

// answerer records, publishes and acks completions in the order their
// outcomes came, off the runners: a runner takes the next command as soon
// as the last one's outcome is known. That VM's next command waits until
// this one is recorded (the queue holds the VM busy until then), so other
// VMs' commands fill the time a record takes. Record writes are sent as
// soon as an answer arrives and confirmed in order, so many are in flight
// at once; a completion is published only after its record is confirmed
// and is followed by its ack, and the server confirms a batch of them
// before the next batch goes out (see confirmSent).
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
// answered or handed back, in batches of what has come meanwhile. ctx is
// the worker's: once it ends, a write that fails is not tried again, and
// its command is handed back instead.
func (a *answerer) run(ctx context.Context) {
	defer close(a.done)
	for an := range a.in {
		batch := []*answering{an}
	more:
		for len(batch) < cap(a.in) {
			select {
			case next, ok := <-a.in:
				if !ok {
					break more
				}
				batch = append(batch, next)
			default:
				break more
			}
		}
		a.answerBatch(ctx, batch)
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

// answerBatch answers a batch: each one's record confirmed (then the
// VM's next command may run), its completion published and its message
// acked, in order; then one confirmation that the server has them all
// before the next batch publishes anything (see confirmSent). A panic past
// publishing hands back what was not confirmed: its redelivery is
// answered from the record.
func (a *answerer) answerBatch(ctx context.Context, batch []*answering) {
	w := a.w
	defer func() {
		r := recover()
		if r != nil {
			w.log.Error("panic answering commands; handing back the unanswered", "panic", Clip(fmt.Sprint(r), 256), "stack", string(debug.Stack()))
		}
		for _, an := range batch {
			if r != nil && !an.done {
				w.handBack(an.j)
			}
			if an.release != nil {
				an.release()
			}
			<-a.room
		}
	}()
	var sent []*answering
	for _, an := range batch {
		if a.publishGuarded(ctx, an) {
			sent = append(sent, an)
		} else {
			an.done = true
		}
	}
	w.confirmSent(ctx, sent)
	for _, an := range sent {
		w.held.remove(an.j)
		w.report(an.c, an.duplicate)
		an.done = true
	}
}

// publishGuarded is publish, with a panic handing the one command back
// (its redelivery is answered from the record, if any) while the rest of
// the batch goes on.
func (a *answerer) publishGuarded(ctx context.Context, an *answering) (ok bool) {
	defer func() {
		if r := recover(); r != nil {
			a.w.log.Error("panic answering a command; handing it back", "id", an.j.cmd.ID,
				"panic", Clip(fmt.Sprint(r), 256), "stack", string(debug.Stack()))
			a.w.handBack(an.j)
			ok = false
		}
	}()
	return a.publish(ctx, an)
}

// publish confirms an's record and publishes its completion; false when
// it handed the command back instead (at shutdown), or a test stopped it.
func (a *answerer) publish(ctx context.Context, an *answering) bool {
	w := a.w
	switch {
	case an.data == nil:
		w.log.Error("completion not encodable; handing back", "id", an.j.cmd.ID, "err", an.putErr)
	case an.record && !w.confirmRecord(ctx, an):
		w.log.Warn("completion not recorded at shutdown; handing back", "id", an.j.cmd.ID)
	case an.record && w.crashAfterRecord != nil && w.crashAfterRecord(an.j.cmd):
		w.held.remove(an.j)
		return false
	default:
		if an.release != nil {
			// Recorded: the VM's next command may run. Its completion
			// still comes after this one's (see answerBatch).
			an.release()
		}
		an.conn = w.nc.Stats().Reconnects
		err := w.send(ctx, an.c, an.data, an.j.cmd.Reply)
		if err == nil {
			w.ack(an)
			return true
		}
		w.log.Warn("completion not published at shutdown; handing back", "id", an.j.cmd.ID, "err", err)
	}
	w.handBack(an.j)
	return false
}

// ack acks an's command after its completion went out on the same
// connection, so the server sees the completion first; confirmSent
// confirms both.
func (w *Worker) ack(an *answering) {
	if err := an.j.msg().Ack(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
		w.log.Debug("ack failed", "id", an.j.cmd.ID, "err", err)
	}
}

// confirmSent waits until the server has every completion and ack sent:
// a flush, whose answer comes after all of them. Until then no later
// completion goes out. When the connection broke since one went out, it
// may have gone with it: the completion and the ack are sent again on the
// new connection first, so a VM's completions still reach the bus in the
// order its commands ran (a copy may arrive twice). What never gets
// through is answered from the record on redelivery.
func (w *Worker) confirmSent(ctx context.Context, sent []*answering) {
	if len(sent) == 0 {
		return
	}
	var err error
	for range ackTries {
		if err = waitConnected(ctx, w.nc); err != nil {
			break // shutdown while disconnected
		}
		for _, an := range sent {
			if n := w.nc.Stats().Reconnects; n != an.conn {
				an.conn = n
				if w.send(ctx, an.c, an.data, an.j.cmd.Reply) == nil {
					w.ack(an)
				}
			}
		}
		if err = w.nc.FlushTimeout(publishTimeout); err == nil {
			return
		}
		w.log.Debug("completions not confirmed yet", "count", len(sent), "err", err)
		if sleep(ctx, 100*time.Millisecond); ctx.Err() != nil {
			break
		}
	}
	w.log.Warn("completions and acks not confirmed; a redelivery is answered from the record", "count", len(sent), "err", err)
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
