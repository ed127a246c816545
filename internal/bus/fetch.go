package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

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
		// A pull per freed slot would cost a round trip and a subscription
		// per command under a backlog: wait for a quarter of the queue.
		room, err := w.q.WaitRoomFor(ctx, max(1, w.q.Cap()/4))
		if err != nil {
			return
		}
		batch, err := (*cons).Fetch(room, jetstream.FetchMaxWait(w.fetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				w.acceptUnlessReconnected(msg, reconnects)
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

// acceptUnlessReconnected accepts msg unless the connection was made
// anew since the pull began. A pull outlives a reconnect (the consumer's
// leader answers it on the new connection, in a cluster), but a message
// it had sent on the old one may have been lost with it: taking the ones
// after it would run a VM's later commands before that one. They are left
// unacked instead, not held, and come back after the ack wait in stream
// order, the lost one first (see keepSetUp's wait after a reconnect).
func (w *Worker) acceptUnlessReconnected(msg jetstream.Msg, reconnects uint64) {
	if w.nc.Stats().Reconnects != reconnects {
		w.log.Debug("message of a pull from before a reconnect left for redelivery", "subject", Clip(msg.Subject(), 256))
		return
	}
	w.accept(msg)
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

	added, shared := w.held.add(j)
	if !added {
		w.log.Info("redelivery of a command still in progress; one completion answers both", "id", j.cmd.ID, "attempt", j.cmd.Attempt)
		return
	}
	// The record is looked up now, while the command waits its turn, when
	// there may be one. Not when another held command has the same id:
	// that one's record may be written after a look now, so this one
	// looks when it runs.
	if recs := w.records.Load(); recs != nil && !shared && w.known.mayHave(j.cmd.ID) {
		j.lookup = recs.lookAhead(j.cmd.ID)
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
