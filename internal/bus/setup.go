package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/backoff"
)

// maxCommandSize caps one command message in a stream the worker creates:
// parameters are a small JSON object, and the HTTP API takes no more.
const maxCommandSize = 64 << 10

// keepSetUp sets up the stream, the consumer and the buckets, takes the
// host's lease (standing by while another worker holds it), and hands the
// consumer to the fetch loop. Then it checks every verifyEvery that the
// consumer and the record bucket still exist, and sets up again when they
// are lost, after a reconnect (the server may be a new node or have a
// wiped store), or when a fetch failed. /readyz is 503 meanwhile. The
// lease, once taken, goes to kept, which keeps it.
func (w *Worker) keepSetUp(ctx context.Context, js jetstream.JetStream, kept func(*lease)) {
	var (
		takeover   = true
		reconnects = w.nc.Stats().Reconnects
		// A server without JetStream: back off to a warning every half minute.
		retry = backoff.Backoff{Min: time.Second, Max: 30 * time.Second}
	)
	for ctx.Err() == nil {
		if w.cons.Load() == nil {
			if waitConnected(ctx, w.nc) != nil {
				return
			}
			cons, err := w.setup(ctx, js)
			if err != nil {
				delay := retry.Next()
				if ctx.Err() == nil {
					w.log.Warn("jetstream setup failed; retrying", "err", err, "retry_in", delay)
				}
				sleep(ctx, delay)
				continue
			}
			retry.Reset()
			if takeover {
				l, err := w.acquireLease(ctx, js)
				if err != nil {
					return
				}
				kept(l)
				w.loadKnown(ctx, js)
			}
			w.takeOver(ctx, js, cons, takeover)
			takeover = false
			w.cons.Store(&cons)
			w.ready.Store(true)
			w.log.Info("consuming", "stream", StreamName, "consumer", ConsumerName(w.cfg.Host))
		}
		select {
		case <-ctx.Done():
			return
		case <-w.lost:
		case <-time.After(verifyEvery):
		}
		cons := w.cons.Load()
		if n := w.nc.Stats().Reconnects; n != reconnects {
			reconnects = n
			w.lose(cons)
		} else if cons != nil {
			if err := w.verify(ctx, *cons); err != nil && ctx.Err() == nil {
				w.log.Warn("jetstream objects lost; setting up again", "err", err)
				w.lose(cons)
			}
		}
	}
}

// lose drops the consumer cons (if it is still the current one), so that
// keepSetUp sets everything up again; the worker is not ready meanwhile.
func (w *Worker) lose(cons *jetstream.Consumer) {
	if w.cons.CompareAndSwap(cons, nil) {
		w.ready.Store(false)
	}
	select {
	case w.lost <- struct{}{}:
	default:
	}
}

// keepLease renews l until ctx ends, then releases it. When another
// worker took it, it ends the run through stop.
func (w *Worker) keepLease(ctx context.Context, l *lease, stop context.CancelCauseFunc) {
	if err := l.keep(ctx, w.cfg.Lease/3); err != nil {
		w.log.Error("another worker took this host's lease; stopping", "err", err)
		stop(err)
		return
	}
	if !w.nc.IsConnected() {
		w.log.Warn("lease not released (NATS not connected); a standby takes over when it runs out")
		return
	}
	if err := l.release(); err != nil {
		w.log.Warn("lease not released; a standby takes over when it runs out", "err", err)
	}
}

// setup finds the stream, this host's consumer and the record bucket, and
// creates whichever is missing. It never updates one that exists: they
// belong to the operator once they exist (limits, replicas, max age), and
// the worker's NATS user needs no right to change them. Settings that break
// one of the worker's promises are logged, once each. Setup is simply
// repeated after an error that may mean the server lost them.
func (w *Worker) setup(ctx context.Context, js jetstream.JetStream) (jetstream.Consumer, error) {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	stream, err := findOrCreate(ctx, w.log, "stream "+StreamName, jetstream.ErrStreamNotFound,
		func() (jetstream.Stream, error) { return js.Stream(ctx, StreamName) },
		func() (jetstream.Stream, error) { return js.CreateStream(ctx, w.streamConfig()) })
	if err != nil {
		return nil, err
	}
	name := ConsumerName(w.cfg.Host)
	cons, err := findOrCreate(ctx, w.log, "consumer "+name, jetstream.ErrConsumerNotFound,
		func() (jetstream.Consumer, error) { return js.Consumer(ctx, StreamName, name) },
		func() (jetstream.Consumer, error) { return js.CreateConsumer(ctx, StreamName, w.consumerConfig()) })
	if err != nil {
		return nil, err
	}
	recs, err := openRecords(ctx, js, w.log, w.cfg.Host, w.cfg.RecordTTL, w.cfg.StreamReplicas)
	if err != nil {
		return nil, err
	}
	if st, err := recs.kv.Status(ctx); err == nil {
		recs.ttl = st.TTL()
	}
	w.records.Store(recs)
	w.checkSettings(stream.CachedInfo().Config, cons.CachedInfo().Config, recs.ttl)
	w.ackWait.Store(int64(cons.CachedInfo().Config.AckWait))
	return cons, nil
}

func (w *Worker) streamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        StreamName,
		Description: "virtbus commands, kept until a worker answers them",
		Subjects:    []string{CommandPrefix + ".>"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    w.cfg.StreamReplicas,
		Duplicates:  w.cfg.DupWindow,
		// A worker answers a command older than CommandMaxAge `expired`;
		// twice that keeps it for a worker that was down a while, and lets
		// the commands of a host that never comes back go in the end.
		MaxAge:     2 * w.cfg.CommandMaxAge,
		MaxMsgSize: maxCommandSize,
	}
}

func (w *Worker) consumerConfig() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       ConsumerName(w.cfg.Host),
		Description:   "virtbus worker on " + w.cfg.Host,
		FilterSubject: CommandPrefix + "." + w.cfg.Host + ".>",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       w.cfg.AckWait,
		// The bus counts deliveries itself, so that a command that runs out
		// of them is answered instead of vanishing in the stream.
		MaxDeliver: -1,
	}
}

// checkSettings logs, once per setting, what an operator's settings break.
// The worker goes on: the settings are the operator's to change.
func (w *Worker) checkSettings(s jetstream.StreamConfig, c jetstream.ConsumerConfig, recordTTL time.Duration) {
	checks := []struct {
		name   string
		broken bool
		why    string
	}{
		{"stream " + StreamName + " retention", s.Retention != jetstream.WorkQueuePolicy,
			"not work-queue: answered commands stay in the stream"},
		{"stream " + StreamName + " max_age", s.MaxAge > 0 && s.MaxAge < w.cfg.CommandMaxAge,
			fmt.Sprintf("%s is shorter than VIRTBUS_COMMAND_MAX_AGE (%s): commands can vanish unanswered", s.MaxAge, w.cfg.CommandMaxAge)},
		{"stream " + StreamName + " max_msgs_per_subject", s.MaxMsgsPerSubject > 0,
			"commands beyond the limit are dropped unanswered"},
		{"consumer " + c.Durable + " ack_policy", c.AckPolicy != jetstream.AckExplicitPolicy,
			"not explicit: commands count as done before they ran"},
		{"consumer " + c.Durable + " max_deliver", c.MaxDeliver > 0,
			"the server drops a command after that many deliveries, unanswered; the worker counts them itself"},
		{"consumer " + c.Durable + " filter_subject", c.FilterSubject != CommandPrefix+"."+w.cfg.Host+".>",
			fmt.Sprintf("%q: this worker would take other hosts' commands, or miss its own", c.FilterSubject)},
		{"consumer " + c.Durable + " max_ack_pending", c.MaxAckPending > 0 && c.MaxAckPending < w.cfg.QueueSize,
			fmt.Sprintf("%d is below VIRTBUS_QUEUE_SIZE (%d): the FIFO never fills", c.MaxAckPending, w.cfg.QueueSize)},
		{"consumer " + c.Durable + " max_ack_pending (fairness)", w.cfg.Concurrency > 1 && c.MaxAckPending > 0 &&
			c.MaxAckPending >= w.cfg.QueueSize && c.MaxAckPending < w.cfg.QueueSize+parkLimit,
			fmt.Sprintf("%d: a VM with more than %d commands waiting holds up the other VMs' commands behind them",
				c.MaxAckPending, c.MaxAckPending-w.cfg.Concurrency+1)},
		{"kv bucket " + RecordBucket + " ttl", recordTTL > 0 && recordTTL < w.cfg.CommandMaxAge,
			fmt.Sprintf("%s is shorter than a command may wait: a redelivery after it runs the command again", recordTTL)},
	}
	for _, ch := range checks {
		if ch.broken && !w.warned[ch.name] {
			w.warned[ch.name] = true
			w.log.Warn("setting breaks a promise; left as the operator set it", "setting", ch.name, "why", ch.why)
		}
	}
}

// findOrCreate looks a JetStream object up and creates it only when the
// lookup says it is missing. When two workers create it at once, the loser
// finds the winner's.
func findOrCreate[T any](ctx context.Context, log *slog.Logger, what string, missing error, find, create func() (T, error)) (T, error) {
	v, err := find()
	if err == nil {
		return v, nil
	}
	if !errors.Is(err, missing) {
		return v, fmt.Errorf("look up %s: %w", what, err)
	}
	if v, err = create(); err == nil {
		log.Info("created " + what + " (it was missing)")
		return v, nil
	}
	if v, ferr := find(); ferr == nil {
		return v, nil
	}
	return v, fmt.Errorf("create %s: %w", what, err)
}

// verify checks, between fetches, that the consumer and the record bucket
// are still there: a pull to a consumer that was deleted just goes
// unanswered, and a record lookup in a deleted bucket fails forever.
func (w *Worker) verify(ctx context.Context, cons jetstream.Consumer) error {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if _, err := cons.Info(ctx); err != nil {
		return fmt.Errorf("consumer %s: %w", ConsumerName(w.cfg.Host), err)
	}
	st, err := w.records.Load().kv.Status(ctx)
	if err != nil {
		return fmt.Errorf("kv bucket %s: %w", RecordBucket, err)
	}
	w.known.keepFor(st.TTL())
	return nil
}

// takeOver runs before fetching resumes: at the start of a Run and after
// every new set-up (a reconnect, a lost consumer). Commands the consumer
// counts as pending but this worker does not hold were taken by a worker
// that died (SIGKILL, power loss), or delivered into a pull that a server
// restart cut off. Fetching before they come back would run later
// commands of the same VM first. So takeOver has them delivered again
// before it lets fetching resume. Lost from this worker's own pull, they
// come at once: it resets the consumer to its ack floor (resetLost). At
// the start, or where the server cannot reset, it waits until their ack
// wait has passed, when the server redelivers them ahead of the newer
// ones, in order, with their delivery counts intact: a command whose
// worker died may be what killed it, and only its count, which a reset
// would start again at one, lets the delivery limit end it. At the start,
// commands a worker handed back at a clean shutdown are already
// redeliverable: no wait. Every time compared is the server's: the worker's
// clock may be off.
func (w *Worker) takeOver(ctx context.Context, js jetstream.JetStream, cons jetstream.Consumer, start bool) {
	info := cons.CachedInfo()
	lost := info.NumAckPending - w.held.len()
	if lost <= 0 {
		return
	}
	recs := w.records.Load()
	last := info.Delivered.Last // nil after a server restart: when is unknown
	if start && last != nil {
		stopped, err := recs.stoppedAt(ctx)
		if err != nil {
			w.log.Warn("reading the last clean shutdown failed; assuming none", "err", err)
		}
		if !stopped.Before(*last) {
			return // handed back at shutdown: already redeliverable
		}
	}
	wait := info.Config.AckWait
	if last != nil {
		if now, err := recs.serverNow(ctx); err == nil {
			wait = last.Add(info.Config.AckWait).Sub(now)
		} else {
			w.log.Warn("reading the server's clock failed; waiting a whole ack wait", "err", err)
		}
	}
	wait += redeliveryGrace
	if wait <= 0 {
		return
	}
	at := time.Now()
	if !start && w.resetLost(ctx, js, wait) {
		w.log.Info("commands were pending that this worker did not hold; the consumer was reset to deliver them again now, in order",
			"pending", lost, "after", time.Since(at).Round(time.Millisecond))
		return
	}
	if wait -= time.Since(at); wait <= 0 {
		return // the wait passed while this worker's runners finished
	}
	w.log.Warn("commands are pending that this worker does not hold; waiting for them to come back so each VM keeps its order",
		"pending", lost, "wait", wait.Round(time.Millisecond))
	sleep(ctx, wait)
}

// resetLost is the quick way out of takeOver's wait for commands a
// server restart cut off on their way to this worker: once it holds
// nothing (its runners finish what they hold, within the wait), it resets
// its consumer to the ack floor, and the server delivers at once, in
// order, every command after the floor that is not acked: the lost ones
// first. They never reached a handler, so starting their delivery count
// again costs the delivery limit nothing. The stream is a work queue, so
// what was acked is gone and does not come again, except acks still on
// their way, answered from their record. It needs nats-server 2.14
// (consumer reset) and leave to publish to
// $JS.API.CONSUMER.RESET.<stream>.<consumer>; without either it reports
// false, and takeOver waits out the ack wait as before.
func (w *Worker) resetLost(ctx context.Context, js jetstream.JetStream, within time.Duration) bool {
	deadline := time.Now().Add(within)
	for w.held.len() > 0 {
		if time.Until(deadline) <= 0 || ctx.Err() != nil {
			return false
		}
		sleep(ctx, 20*time.Millisecond)
	}
	rctx, cancel := context.WithTimeout(ctx, min(time.Until(deadline), resetTimeout))
	defer cancel()
	if _, err := js.ResetConsumer(rctx, StreamName, ConsumerName(w.cfg.Host)); err != nil {
		if ctx.Err() == nil {
			w.log.Warn("resetting the consumer to deliver the lost commands again failed (it needs nats-server 2.14 and leave to publish to $JS.API.CONSUMER.RESET)",
				"consumer", ConsumerName(w.cfg.Host), "err", err)
		}
		return false
	}
	return true
}

// redeliveryGrace is how much longer than their ack wait takeOver waits
// for lost commands: the server's timer queues them for redelivery a
// moment after the ack wait ends, and a fetch in that moment gets a newer
// command first.
const redeliveryGrace = time.Second

// resetTimeout bounds the consumer reset: a server that does not know
// the request, or a user without leave to send it, gets no answer.
const resetTimeout = 5 * time.Second

// loadKnown reads which command ids have a record, once the lease is held:
// from then on only this worker writes them. A failure costs a lookup per
// command, as before the set existed.
func (w *Worker) loadKnown(ctx context.Context, js jetstream.JetStream) {
	recs := w.records.Load()
	if err := w.known.load(ctx, js, w.cfg.Host, recs.ttl); err != nil {
		w.log.Warn("record keys not listed; looking up every command's record", "err", err)
	}
}
