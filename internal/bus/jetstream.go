package bus

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
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
	// ackTries bounds the tries to have a batch of completions and acks
	// confirmed while connected: when they all fail, a command whose ack
	// was lost is answered again from its record on redelivery.
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
//
// One command's walk, file by file: fetch.go takes it off the consumer
// into the FIFO; process.go decides its completion (from the record, or by
// running it); answer.go records, publishes and acks it; guard.go answers
// it when deciding panics; held.go keeps it from being
// redelivered while it waits. setup.go and lease.go own what it all runs
// on.
func (w *Worker) runJetStream(ctx context.Context) error {
	// Record writes sent ahead that get no answer fail after recordTimeout
	// rather than wait forever (see answerer).
	js, err := jetstream.New(w.nc, jetstream.WithPublishAsyncTimeout(recordTimeout))
	if err != nil {
		return fmt.Errorf("jetstream context: %w", err)
	}
	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)

	w.answers = newAnswerer(w)
	go w.answers.run(ctx)
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
	// The commands that ran are answered before any is handed back.
	w.answers.close()
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
