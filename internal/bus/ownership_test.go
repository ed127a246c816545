package bus

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// The stream, consumer and bucket belong to the operator once they exist:
// a worker rewrites none of their settings, and names once each setting
// that breaks one of its promises.
func TestOperatorSettingsAreKept(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	ctx := t.Context()
	streamCfg := jetstream.StreamConfig{Name: StreamName, Subjects: []string{CommandPrefix + ".>"}, Retention: jetstream.WorkQueuePolicy,
		MaxAge: time.Hour, MaxBytes: 1 << 20, MaxMsgsPerSubject: 10, Discard: jetstream.DiscardNew, DenyPurge: true}
	if _, err := js.CreateStream(ctx, streamCfg); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateConsumer(ctx, StreamName, jetstream.ConsumerConfig{Durable: ConsumerName(testHost),
		FilterSubject: CommandPrefix + "." + testHost + ".>", AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: 5 * time.Second, MaxAckPending: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: RecordBucket, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}

	var logs bustest.Buffer
	w := newWorker(t, connect(t, s.ClientURL()), Config{}, okHandler(newCalls()))
	w.log = slog.New(slog.NewTextHandler(&logs, nil))
	w.start(t)
	waitFor(t, "worker ready", w.Ready)
	events := collect(t, nc, EventPrefix+".>")
	publishCmd(t, js, "web-1", "start", "kept-1", "", "")
	events.WaitID(t, "kept-1")
	w.lose(w.cons.Load()) // set up again: the warnings are not repeated
	waitFor(t, "worker ready again", w.Ready)

	stream, _ := js.Stream(ctx, StreamName)
	if got := stream.CachedInfo().Config; got.MaxAge != time.Hour || got.MaxBytes != 1<<20 || got.MaxMsgsPerSubject != 10 ||
		got.Discard != jetstream.DiscardNew || !got.DenyPurge {
		t.Errorf("stream settings rewritten: %+v", got)
	}
	cons, _ := js.Consumer(ctx, StreamName, ConsumerName(testHost))
	if got := cons.CachedInfo().Config; got.AckWait != 5*time.Second || got.MaxAckPending != 2 {
		t.Errorf("consumer settings rewritten: ack wait %s, max ack pending %d", got.AckWait, got.MaxAckPending)
	}
	kv, _ := js.KeyValue(ctx, RecordBucket)
	if st, _ := kv.Status(ctx); st.TTL() != time.Hour {
		t.Errorf("record TTL rewritten: %s", st.TTL())
	}
	for _, setting := range []string{"max_age", "max_msgs_per_subject", "max_ack_pending", "VIRTBUS_DONE ttl"} {
		if n := strings.Count(logs.String(), setting+"\""); n != 1 {
			t.Errorf("setting %s named %d times in the log, want once:\n%s", setting, n, logs.String())
		}
	}
}

// A worker creates the stream with VIRTBUS_STREAM_REPLICAS (here 1, all a
// single server has) and its age limit.
func TestCreatedStreamCarriesTheLimits(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	js := bustest.JetStream(t, connect(t, s.ClientURL()))
	startWorker(t, connect(t, s.ClientURL()), Config{CommandMaxAge: 2 * time.Hour, StreamReplicas: 1}, okHandler(newCalls()))
	stream, err := js.Stream(t.Context(), StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if got := stream.CachedInfo().Config; got.MaxAge != 4*time.Hour || got.Replicas != 1 || got.MaxMsgSize != maxCommandSize {
		t.Errorf("created stream: max age %s, replicas %d, max msg size %d", got.MaxAge, got.Replicas, got.MaxMsgSize)
	}
}

// A deleted record bucket, consumer or stream is noticed within seconds
// and set up again; commands then complete as before.
func TestLostObjectsAreSetUpAgain(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	w := startWorker(t, connect(t, s.ClientURL()), Config{}, okHandler(newCalls()))
	events := collect(t, nc, EventPrefix+".>")
	losses := []struct {
		name string
		lose func() error
	}{
		{"record bucket", func() error { return js.DeleteKeyValue(t.Context(), RecordBucket) }},
		{"consumer", func() error { return js.DeleteConsumer(t.Context(), StreamName, ConsumerName(testHost)) }},
		{"stream", func() error { return js.DeleteStream(t.Context(), StreamName) }},
	}
	for i, l := range losses {
		if err := l.lose(); err != nil {
			t.Fatalf("delete the %s: %v", l.name, err)
		}
		waitFor(t, "the "+l.name+" set up again", func() bool {
			_, errS := js.Stream(t.Context(), StreamName)
			_, errK := js.KeyValue(t.Context(), RecordBucket)
			_, errC := js.Consumer(t.Context(), StreamName, ConsumerName(testHost))
			return errS == nil && errK == nil && errC == nil && w.Ready()
		})
		publishCmd(t, js, "web-1", "start", id("after-loss", i), "", "")
		if got := events.WaitID(t, id("after-loss", i)); got.Status != StatusOK {
			t.Errorf("after losing the %s: %+v", l.name, got)
		}
	}
}

// One active worker per host: a second one with the same host id stands
// by, fetching nothing, and takes over when the first stops cleanly (at
// once) or dies (within one lease).
func TestStandbyTakesOver(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	events := collect(t, nc, EventPrefix+".>")
	first, second, third := newCalls(), newCalls(), newCalls()
	cfg := Config{Lease: 2 * time.Second}
	a := startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(first))
	b := newWorker(t, connect(t, s.ClientURL()), cfg, okHandler(second)).start(t)
	waitFor(t, "the second worker to stand by", b.Standby)

	publishCmd(t, js, "web-1", "start", "while-a", "", "")
	events.WaitID(t, "while-a")
	if second.total() != 0 || b.Ready() {
		t.Errorf("the standby ran %d commands (ready %v)", second.total(), b.Ready())
	}

	if err := a.stop(t); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the standby to take over", b.Ready)
	publishCmd(t, js, "web-1", "start", "after-stop", "", "")
	events.WaitID(t, "after-stop")
	if len(second.of("after-stop")) != 1 {
		t.Errorf("after a clean stop the standby did not run the command")
	}

	// Now b dies without a word: its connection goes, nothing is released.
	c := newWorker(t, connect(t, s.ClientURL()), cfg, okHandler(third)).start(t)
	waitFor(t, "the third worker to stand by", c.Standby)
	died := time.Now()
	b.nc.Close()
	waitFor(t, "the standby to take over a dead worker", c.Ready)
	if waited := time.Since(died); waited > 3*cfg.Lease {
		t.Errorf("took over after %s, lease %s", waited, cfg.Lease)
	}
	publishCmd(t, js, "web-1", "start", "after-death", "", "")
	events.WaitID(t, "after-death")
	if len(third.of("after-death")) != 1 {
		t.Errorf("after a death the standby did not run the command")
	}
	if err := b.stop(t); !errors.Is(err, ErrConnectionClosed) {
		t.Errorf("dead worker's Run: %v", err)
	}
	b.err = nil // expected, and checked: the cleanup need not report it

}

// A worker whose lease another took stops at once with ErrLeaseLost.
func TestLostLeaseStopsTheWorker(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	js := bustest.JetStream(t, connect(t, s.ClientURL()))
	w := newWorker(t, connect(t, s.ClientURL()), Config{Lease: time.Second}, okHandler(newCalls()))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	waitFor(t, "worker ready", w.Ready)
	kv, err := js.KeyValue(t.Context(), LeaseBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(t.Context(), testHost, []byte("someone else")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrLeaseLost) {
			t.Errorf("Run returned %v, want ErrLeaseLost", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("worker kept running without its lease")
	}
}
