package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

func TestNATSServerRestartMidBacklog(t *testing.T) {
	const total = 40
	dir := t.TempDir()
	s := bustest.RunServer(t, RunEmbedded, dir, -1)
	port := bustest.ServerPort(t, s)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)

	c := newCalls()
	restarted := make(chan struct{})
	// AckWait is short so that a pull the restart cut off (delivered by the
	// server, never received) comes back quickly; the heartbeat keeps the
	// held ones.
	w := startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: 4, Concurrency: 2, AckWait: 2 * time.Second},
		func(_ context.Context, cmd Command) Outcome {
			// Past a quarter of the backlog, commands finish only once the
			// server is back: they are answered across the outage.
			if c.add(cmd) > total/4 {
				<-restarted
			}
			time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
			return Outcome{State: "running"}
		})
	for i := range total {
		publishCmd(t, js, fmt.Sprintf("vm-%d", i%4), "start", id("r", i), "", "")
	}

	waitFor(t, "a quarter of the backlog done, two running", func() bool { return c.total() == total/4+2 })
	s.Shutdown()
	s.WaitForShutdown()
	bustest.RunServer(t, RunEmbedded, dir, port)
	close(restarted)

	// Every command is acked, which the worker does only after recording
	// and publishing its completion...
	waitStreamEmpty(t, js)
	kv, err := js.KeyValue(t.Context(), RecordBucket)
	if err != nil {
		t.Fatal(err)
	}
	for i := range total {
		e, err := kv.Get(t.Context(), recordKey(testHost, id("r", i)))
		if err != nil {
			t.Errorf("no record of %s: %v", id("r", i), err)
			continue
		}
		var rec Completion
		if err := json.Unmarshal(e.Value(), &rec); err != nil || rec.Status != StatusOK || rec.ID != id("r", i) {
			t.Errorf("record of %s: %s (%v)", id("r", i), e.Value(), err)
		}
	}
	waitFor(t, "worker ready again", w.Ready)
	if n := metricValue(t, w.reg, "virtbus_reconnects_total", "target", "nats"); n < 1 {
		t.Errorf("virtbus_reconnects_total{target=nats} = %v after a restart", n)
	}
	// ...and ran exactly once. A completion may be published twice (an ack
	// lost in the restart is answered again from the record), a run may not.
	for i := range total {
		if n := len(c.of(id("r", i))); n != 1 {
			t.Errorf("%s ran %d times, want 1", id("r", i), n)
		}
	}
}

func TestWorkerStartedWhileNATSDown(t *testing.T) {
	port := bustest.FreePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	c := newCalls()
	w := newWorker(t, connect(t, url), Config{}, okHandler(c)).start(t)
	if w.Ready() {
		t.Fatal("Ready() with no server")
	}

	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), port)
	waitFor(t, "worker ready once NATS is up", w.Ready)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	events := collect(t, nc, EventPrefix+".>")
	publishCmd(t, js, "web-1", "start", "late-1", "", "")
	if got := events.WaitID(t, "late-1"); got.Status != StatusOK {
		t.Errorf("completion %+v", got)
	}
}

// An outage longer than the ack wait while a command runs makes the server
// redeliver it; the worker, still holding it, answers both deliveries with
// one completion.
func TestOutageLongerThanAckWaitGivesOneCompletion(t *testing.T) {
	dir := t.TempDir()
	s := bustest.RunServer(t, RunEmbedded, dir, -1)
	port := bustest.ServerPort(t, s)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	release := make(chan struct{})
	w := startWorker(t, connect(t, s.ClientURL()), Config{AckWait: time.Second}, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		<-release
		return Outcome{State: "running"}
	})
	publishCmd(t, js, "web-1", "start", "long-1", "", "")
	waitFor(t, "the command to run", func() bool { return c.total() == 1 })

	s.Shutdown()
	s.WaitForShutdown()
	time.Sleep(1500 * time.Millisecond) // longer than the ack wait: no in-progress note gets through
	bustest.RunServer(t, RunEmbedded, dir, port)
	events := collect(t, connect(t, fmt.Sprintf("nats://127.0.0.1:%d", port)), EventPrefix+".>")
	waitFor(t, "the redelivery", func() bool { return metricValue(t, w.reg, "virtbus_redeliveries_total") >= 1 })
	close(release)

	events.WaitID(t, "long-1")
	waitStreamEmpty(t, bustest.JetStream(t, connect(t, fmt.Sprintf("nats://127.0.0.1:%d", port))))
	if got := events.SettledID(t, "long-1"); len(got) != 1 {
		t.Errorf("%d completions, want exactly 1", len(got))
	}
	if n := c.total(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

// A command the server counts as delivered but no live worker holds (its
// worker died, and then the server restarted, which forgets when it was
// delivered) still runs before its VM's later commands: the worker waits
// for it to come back instead of fetching past it.
func TestPendingCommandKeepsItsPlaceAcrossAServerRestart(t *testing.T) {
	dir := t.TempDir()
	s := bustest.RunServer(t, RunEmbedded, dir, -1)
	port := bustest.ServerPort(t, s)
	url := s.ClientURL()
	js := bustest.JetStream(t, connect(t, url))
	cfg := Config{AckWait: 2 * time.Second}
	c := newCalls()
	first := startWorker(t, connect(t, url), cfg, okHandler(c))
	if err := first.stop(t); err != nil {
		t.Fatal(err)
	}
	publishCmd(t, js, "vm-a", "start", "a-1", "", "")
	publishCmd(t, js, "vm-a", "stop", "a-2", "", "")
	// A worker takes a-1 and dies with it.
	cons, err := js.Consumer(t.Context(), StreamName, ConsumerName(testHost))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	s.Shutdown()
	s.WaitForShutdown()
	bustest.RunServer(t, RunEmbedded, dir, port)

	events := collect(t, connect(t, url), EventPrefix+".>")
	startWorker(t, connect(t, url), cfg, okHandler(c))
	events.WaitID(t, "a-2")
	if got := c.idsFor("vm-a"); !slices.Equal(got, []string{"a-1", "a-2"}) {
		t.Errorf("vm-a ran %v, want a-1 then a-2", got)
	}
}

// A command a server restart cut off on its way to this worker comes
// back at once when the worker sets up again, not after its ack wait: it
// resets the consumer to its ack floor, and the server delivers the lost
// command again, ahead of its VM's later one. The ack wait here is far
// beyond the test's patience.
func TestLostInFlightComesBackAtOnce(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	url := s.ClientURL()
	w, logs, js, cons := loseInFlight(t, url, Config{AckWait: 10 * time.Minute})
	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	defer cancel()
	w.takeOver(ctx, js, cons, false)
	wantNext(t, cons, "a-1", "a-2")
	if !strings.Contains(logs.String(), "the consumer was reset") {
		t.Errorf("the worker did not say it reset the consumer:\n%s", logs.String())
	}
}

// Where the worker may not reset its consumer (a server before 2.14, or
// a user without leave), it falls back to waiting out the ack wait; the
// lost command still comes first.
func TestLostInFlightWaitsWithoutLeaveToReset(t *testing.T) {
	deny := func(storeDir, host string, port int) (*server.Server, error) {
		s, err := server.NewServer(&server.Options{Host: host, Port: port, JetStream: true, StoreDir: storeDir, NoLog: true, NoSigs: true,
			Users: []*server.User{{Username: "w", Password: "w", Permissions: &server.Permissions{
				Publish: &server.SubjectPermission{Allow: []string{">"}, Deny: []string{"$JS.API.CONSUMER.RESET.>"}}}}}})
		if err != nil {
			return nil, err
		}
		go s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			return nil, errors.New("server not ready")
		}
		return s, nil
	}
	s := bustest.RunServer(t, deny, t.TempDir(), -1)
	url := "nats://w:w@" + strings.TrimPrefix(s.ClientURL(), "nats://")
	w, logs, js, cons := loseInFlight(t, url, Config{AckWait: 2 * time.Second})
	w.takeOver(t.Context(), js, cons, false)
	wantNext(t, cons, "a-1", "a-2")
	// The refused reset gets no answer: its timeout may take the whole
	// wait.
	if out := logs.String(); !strings.Contains(out, "resetting the consumer") {
		t.Errorf("the worker did not say the reset failed:\n%s", out)
	}
}

// loseInFlight sets up the stream and consumer, publishes a-1 and a-2 for
// vm-a and takes a-1 the way a pull cut off by a server restart loses it:
// delivered, never acked, held by no one. It returns a worker, not
// started, logging into logs, and its JetStream and consumer.
func loseInFlight(t *testing.T, url string, cfg Config) (*runningWorker, *bustest.Buffer, jetstream.JetStream, jetstream.Consumer) {
	t.Helper()
	first := startWorker(t, connect(t, url), cfg, okHandler(newCalls()))
	if err := first.stop(t); err != nil {
		t.Fatal(err)
	}
	js := bustest.JetStream(t, connect(t, url))
	publishCmd(t, js, "vm-a", "start", "a-1", "", "")
	publishCmd(t, js, "vm-a", "stop", "a-2", "", "")
	cons, err := js.Consumer(t.Context(), StreamName, ConsumerName(testHost))
	if err != nil {
		t.Fatal(err)
	}
	wantNext(t, cons, "a-1")
	w := newWorker(t, connect(t, url), cfg, okHandler(newCalls()))
	logs := &bustest.Buffer{}
	w.log = slog.New(slog.NewTextHandler(logs, nil))
	// As after a reconnect: set up again, then take over.
	if cons, err = w.setup(t.Context(), js); err != nil {
		t.Fatal(err)
	}
	return w, logs, js, cons
}

// wantNext fetches from cons, without acking, and wants the command ids
// ids in that order.
func wantNext(t *testing.T, cons jetstream.Consumer, ids ...string) {
	t.Helper()
	batch, err := cons.Fetch(len(ids), jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for m := range batch.Messages() {
		got = append(got, m.Headers().Get(HeaderMsgID))
	}
	if !slices.Equal(got, ids) {
		t.Errorf("fetched %v, want %v (%v)", got, ids, batch.Error())
	}
}
