package bus

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync/atomic"
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
	// after is how many completions had gone out when the record write
	// was sent: the server that confirms the write got those first, when
	// they went out on the same connection.
	after uint64
	conn  uint64 // the connection's reconnect count when the completion went out
	sent  uint64 // its number among the completions sent (see answerer.sent)
	done  bool   // answered, or handed back
}

// answerer records, publishes and acks completions in the order their
// outcomes came, off the runners: a runner takes the next command as soon
// as the last one's outcome is known. That VM's next command waits until
// this one is recorded (the queue holds the VM busy until then), so other
// VMs' commands fill the time a record takes. Record writes are sent as
// soon as an answer arrives and confirmed in order, so many are in flight
// at once; a completion is published only after its record is confirmed,
// and is followed by its ack.
//
// A VM's completions reach the bus in the order its commands ran, across
// lost connections too: before a VM's completion goes out, the server
// must be known to have the VM's earlier ones. Usually the record write of
// the new one shows it, at no cost: it was sent after them on the same
// connection, and the server confirmed it. Otherwise (a reconnect since, a
// completion that had no record written after it) a flush confirms them,
// after they are sent again when the connection they went out on is gone
// (see confirmAll). A copy may then arrive twice.
type answerer struct {
	w    *Worker
	room chan struct{}   // a token per answer on its way
	in   chan *answering // from the runners, their records sent
	done chan struct{}

	// sent counts the completions sent, re-sent ones included: a record
	// write sent when it read n follows the first n on the connection.
	sent atomic.Uint64
	// unconfirmed holds, per VM, the completions sent that the server
	// has not been seen to have, in the order sent; count is their total.
	// The answerer's alone.
	unconfirmed map[string][]*answering
	count       int
}

// maxUnconfirmed bounds the completions kept until the server is seen to
// have them; past it, and every confirmEvery, a flush confirms them all.
const (
	maxUnconfirmed = 1024
	confirmEvery   = time.Second
)

func newAnswerer(w *Worker) *answerer {
	return &answerer{
		w:           w,
		room:        make(chan struct{}, w.cfg.QueueSize),
		in:          make(chan *answering, w.cfg.QueueSize),
		done:        make(chan struct{}),
		unconfirmed: make(map[string][]*answering),
	}
}

// run answers until close has been called and everything handed in was
// answered or handed back, in batches of what has come meanwhile, and
// then confirms the last completions. ctx is the worker's: once it ends, a
// write that fails is not tried again, and its command is handed back
// instead.
func (a *answerer) run(ctx context.Context) {
	defer close(a.done)
	tick := time.NewTicker(confirmEvery)
	defer tick.Stop()
	for {
		select {
		case an, ok := <-a.in:
			if !ok {
				a.confirmAll(ctx)
				return
			}
			a.answerBatch(ctx, a.gather(an))
			if a.count > maxUnconfirmed {
				a.confirmAll(ctx)
			}
		case <-tick.C:
			a.confirmAll(ctx)
		}
	}
}

// gather is first and whatever else has been handed in meanwhile.
func (a *answerer) gather(first *answering) []*answering {
	batch := []*answering{first}
	for len(batch) < cap(a.in) {
		select {
		case next, ok := <-a.in:
			if !ok {
				return batch
			}
			batch = append(batch, next)
		default:
			return batch
		}
	}
	return batch
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
	if an.record {
		a.w.known.add(an.c.ID)
	}
	if an.record && an.putErr == nil {
		an.after = a.sent.Load()
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
// acked, in order. A panic past publishing hands back what was not
// answered: its redelivery is answered from the record.
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
	for _, an := range batch {
		if a.publishGuarded(ctx, an) {
			w.held.remove(an.j)
			w.report(an.c, an.duplicate)
		}
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
			// still comes after this one's (see settle).
			an.release()
		}
		a.settle(ctx, an)
		err := a.sendOne(ctx, an)
		if err == nil {
			a.unconfirmed[an.j.key] = append(a.unconfirmed[an.j.key], an)
			a.count++
			return true
		}
		w.log.Warn("completion not published at shutdown; handing back", "id", an.j.cmd.ID, "err", err)
	}
	w.handBack(an.j)
	return false
}

// sendOne publishes an's completion and acks its message, on the same
// connection, so the server sees the completion first.
func (a *answerer) sendOne(ctx context.Context, an *answering) error {
	conn := a.w.nc.Stats().Reconnects
	if err := a.w.send(ctx, an.c, an.data, an.j.cmd.Reply); err != nil {
		return err
	}
	an.conn = conn
	if err := an.j.msg().Ack(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
		a.w.log.Debug("ack failed", "id", an.j.cmd.ID, "err", err)
	}
	an.sent = a.sent.Add(1)
	return nil
}

// settle makes sure the server has an's VM's earlier completions before
// an's goes out. an's confirmed record write shows it when it was sent
// after them, with no reconnect since; otherwise confirmAll does.
func (a *answerer) settle(ctx context.Context, an *answering) {
	earlier := a.unconfirmed[an.j.key]
	if len(earlier) == 0 {
		return
	}
	now := a.w.nc.Stats().Reconnects
	for _, p := range earlier {
		if !an.record || p.sent > an.after || p.conn != now {
			a.confirmAll(ctx)
			return
		}
	}
	delete(a.unconfirmed, an.j.key)
	a.count -= len(earlier)
}

// confirmAll waits until the server has every completion and ack sent and
// not yet confirmed: a flush, whose answer comes after all of them. Those
// that went out on a connection since lost may have gone with it: they
// are sent again on the new one first, in order (a copy may arrive twice).
// What never gets through is answered from the record on redelivery.
func (a *answerer) confirmAll(ctx context.Context) {
	if a.count == 0 {
		return
	}
	w := a.w
	var err error
	for range ackTries {
		if err = waitConnected(ctx, w.nc); err != nil {
			break // shutdown while disconnected
		}
		for _, sent := range a.unconfirmed {
			for _, p := range sent {
				if p.conn != w.nc.Stats().Reconnects {
					_ = a.sendOne(ctx, p)
				}
			}
		}
		if err = w.nc.FlushTimeout(publishTimeout); err == nil {
			break
		}
		w.log.Debug("completions not confirmed yet", "count", a.count, "err", err)
		if sleep(ctx, 100*time.Millisecond); ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		w.log.Warn("completions and acks not confirmed; a redelivery is answered from the record", "count", a.count, "err", err)
	}
	clear(a.unconfirmed)
	a.count = 0
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
