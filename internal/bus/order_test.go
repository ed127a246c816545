package bus

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// A command retried after `unavailable` keeps its VM's place: the VM's
// next command runs only after it, while another VM goes on.
func TestOrderPerVMHoldsDuringRetries(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	cfg := Config{Concurrency: 2, MaxDeliver: 5, RetryBackoff: 50 * time.Millisecond, RetryBackoffMax: 100 * time.Millisecond}
	startWorker(t, connect(t, s.ClientURL()), cfg, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		if cmd.ID == "a-1" && cmd.Attempt < 3 {
			return Outcome{Err: &Error{Code: CodeUnavailable, Message: "libvirt down"}}
		}
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "vm-a", "stop", "a-1", "", "")
	publishCmd(t, js, "vm-a", "start", "a-2", "", "")
	publishCmd(t, js, "vm-b", "start", "b-1", "", "")
	events.WaitID(t, "a-2")
	events.WaitID(t, "b-1")
	waitStreamEmpty(t, js)
	if got, want := c.idsFor("vm-a"), []string{"a-1", "a-1", "a-1", "a-2"}; !slices.Equal(got, want) {
		t.Errorf("vm-a ran %v, want %v: a-2 overtook the retried a-1", got, want)
	}
	if got := events.SettledID(t, "a-1"); len(got) != 1 || got[0].Status != StatusOK || got[0].Attempt != 3 {
		t.Errorf("a-1 completions %+v, want one ok at attempt 3", got)
	}
}

// A command taken off the FIFO after its deadline (Virtbus-Expires, or
// its age limit) ends in `expired` and never runs; a deadline that is not
// a time is `invalid`.
func TestExpiredCommandsDoNotRun(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	events := collect(t, nc, EventPrefix+".>")

	// Published while no worker runs: by the time one starts, "old" is past
	// the worker's age limit.
	w := newWorker(t, connect(t, s.ClientURL()), Config{CommandMaxAge: 500 * time.Millisecond}, okHandler(c))
	createStream(t, js)
	publishExpiring(t, js, "old", "")
	publishExpiring(t, js, "past-deadline", time.Now().Add(-time.Minute).Format(time.RFC3339))
	publishExpiring(t, js, "bad-deadline", "tomorrow")
	time.Sleep(600 * time.Millisecond)
	publishExpiring(t, js, "in-time", time.Now().Add(time.Hour).Format(time.RFC3339))
	w.start(t)

	for id, want := range map[string]string{"old": CodeExpired, "past-deadline": CodeExpired, "bad-deadline": CodeInvalid, "in-time": ""} {
		got := events.WaitID(t, id)
		switch {
		case want == "" && got.Status != StatusOK:
			t.Errorf("%s: %+v, want ok", id, got)
		case want != "" && (got.Error == nil || got.Error.Code != want):
			t.Errorf("%s: %+v, want code %s", id, got, want)
		}
	}
	waitStreamEmpty(t, js)
	if ids := c.idsFor("web-1"); !slices.Equal(ids, []string{"in-time"}) {
		t.Errorf("handler ran %v, want only in-time", ids)
	}
	checkCounter(t, w.reg, 2, "virtbus_command_errors_total", "action", "stop", "code", CodeExpired)
}

func publishExpiring(t *testing.T, js jetstream.JetStream, id, expires string) {
	t.Helper()
	m := nats.NewMsg(CommandSubject(testHost, "web-1", "stop"))
	m.Header.Set(HeaderMsgID, id)
	if expires != "" {
		m.Header.Set(HeaderExpires, expires)
	}
	if _, err := js.PublishMsg(t.Context(), m); err != nil {
		t.Fatal(err)
	}
}

// createStream makes the command stream as an operator would before any
// worker ran.
func createStream(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: StreamName, Subjects: []string{CommandPrefix + ".>"},
		Retention: jetstream.WorkQueuePolicy, Duplicates: time.Minute}); err != nil {
		t.Fatal(err)
	}
}

// With concurrency 2, a VM with a deep backlog keeps its share of the FIFO
// and parks the rest, so the worker reads past the backlog: another VM's
// command published behind 200 of them runs on the idle slot at once,
// while the backlog still runs in order.
func TestDeepBacklogDoesNotHoldUpOtherVMs(t *testing.T) {
	t.Parallel()
	const backlog = 200
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	var (
		mu        sync.Mutex
		bStarted  time.Time
		aBeforeB  int
		aRunSoFar int
	)
	startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: 4, Concurrency: 2}, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		mu.Lock()
		if cmd.VM == "vm-b" {
			bStarted, aBeforeB = time.Now(), aRunSoFar
		} else {
			aRunSoFar++
		}
		mu.Unlock()
		if cmd.VM == "vm-a" {
			time.Sleep(20 * time.Millisecond) // one command's time
		}
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")

	for i := range backlog {
		publishCmd(t, js, "vm-a", "start", id("a", i), "", "")
	}
	bSent := time.Now()
	publishCmd(t, js, "vm-b", "start", "b-1", "", "")
	events.WaitID(t, "b-1")
	mu.Lock()
	wait, before := bStarted.Sub(bSent), aBeforeB
	mu.Unlock()
	t.Logf("vm-b waited %s behind a %d-command backlog of vm-a (20ms each); vm-a ran %d commands meanwhile",
		wait.Round(time.Millisecond), backlog, before)
	// The count, not the time, is asserted: without parking vm-b waits
	// for the whole backlog. Reading past 200 messages takes a few of
	// vm-a's commands' time on a loaded machine; a quarter is far off both.
	if before >= backlog/4 {
		t.Errorf("vm-b ran after %d of vm-a's %d commands, want it to overtake the backlog", before, backlog)
	}

	events.WaitID(t, id("a", backlog-1))
	waitStreamEmpty(t, js)
	var want []string
	for i := range backlog {
		want = append(want, id("a", i))
	}
	if got := c.idsFor("vm-a"); !slices.Equal(got, want) {
		t.Errorf("vm-a ran %d commands out of order or not once each: %v", len(got), got)
	}
	for _, id := range append(want, "b-1") {
		if got := events.SettledID(t, id); len(got) != 1 {
			t.Errorf("%s: %d completions, want 1", id, len(got))
		}
	}
}

// Parking is bounded: a VM's backlog deeper than its share of the FIFO plus
// parkLimit stays in the stream, and it all runs in order once the VM's
// commands move again.
func TestParkingIsBounded(t *testing.T) {
	t.Parallel()
	const (
		queueSize = 4
		share     = queueSize - 2 + 1 // concurrency 2
		total     = share + parkLimit + 50
	)
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	release := make(chan struct{})
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: queueSize, Concurrency: 2}, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		<-release
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")
	for i := range total {
		publishCmd(t, js, "vm-a", "start", id("a", i), "", "")
	}

	waitFor(t, "the worker to fill its share and its park", func() bool {
		info := consumerInfo(t, js)
		return info.NumAckPending == share+parkLimit && info.NumPending == total-share-parkLimit
	})
	if got, want := w.q.Len(), share; got != want {
		t.Errorf("FIFO holds %d of one VM, want its share %d", got, want)
	}
	if got := metricValue(t, w.reg, "virtbus_queue_parked"); got != parkLimit {
		t.Errorf("virtbus_queue_parked = %v, want %d", got, parkLimit)
	}
	close(release)
	events.WaitID(t, id("a", total-1))
	waitStreamEmpty(t, js)
	var want []string
	for i := range total {
		want = append(want, id("a", i))
	}
	if got := c.idsFor("vm-a"); !slices.Equal(got, want) {
		t.Errorf("vm-a ran %d commands, out of order or not once each", len(got))
	}
	if got := metricValue(t, w.reg, "virtbus_queue_parked"); got != 0 {
		t.Errorf("virtbus_queue_parked after the backlog = %v, want 0", got)
	}
}
