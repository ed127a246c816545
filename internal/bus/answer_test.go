package bus

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// A VM's next command starts only once the last one's completion is
// recorded, though the rest of the answer (publish, ack) runs beside it:
// each command of vm-a finds its predecessor's record in the bucket. Then
// a crash can leave at most the VM's last command run and unrecorded.
func TestVMsNextCommandWaitsForTheRecord(t *testing.T) {
	t.Parallel()
	const n = 30
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	var (
		mu      sync.Mutex
		missing []string
	)
	startWorker(t, connect(t, s.ClientURL()), Config{}, func(ctx context.Context, cmd Command) Outcome {
		var i int
		if _, err := fmt.Sscanf(cmd.ID, "rec-%d", &i); err == nil && i > 0 {
			kv, err := js.KeyValue(ctx, RecordBucket)
			if err == nil {
				_, err = kv.Get(ctx, recordKey(testHost, id("rec", i-1)))
			}
			if err != nil {
				mu.Lock()
				missing = append(missing, fmt.Sprintf("%s: %v", id("rec", i-1), err))
				mu.Unlock()
			}
		}
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")
	for i := range n {
		publishCmd(t, js, "vm-a", "start", id("rec", i), "", "")
	}
	events.WaitID(t, id("rec", n-1))
	mu.Lock()
	defer mu.Unlock()
	if len(missing) > 0 {
		t.Errorf("%d commands started before their predecessor was recorded: %v", len(missing), missing)
	}
}

// A publisher that sends an id again after the stream's duplicate window
// puts two messages with one id in the stream. Held together, the second
// is not run: it gets the first one's completion (same VM and action) or
// a conflict (another command), though the first one's record may not be
// written when the second is fetched.
func TestSameIDTwiceInOneBacklog(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: StreamName, Subjects: []string{CommandPrefix + ".>"},
		Retention: jetstream.WorkQueuePolicy, Duplicates: 100 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	c := newCalls()
	startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: 8}, func(_ context.Context, cmd Command) Outcome {
		if c.add(cmd); cmd.ID == "gate" {
			<-release
		}
		return Outcome{Changed: true, State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")
	publishCmd(t, js, "vm-a", "start", "gate", "", "")
	waitFor(t, "the gate to run", func() bool { return c.total() == 1 })
	for _, cmd := range []struct{ vm, action string }{{"vm-a", "start"}, {"vm-a", "start"}, {"vm-a", "stop"}} {
		time.Sleep(200 * time.Millisecond) // past the duplicate window
		if ack := publishCmd(t, js, cmd.vm, cmd.action, "twice", "", ""); ack.Duplicate {
			t.Fatal("the stream dropped the copy as a duplicate; the test needs both in the stream")
		}
	}
	waitFor(t, "all four held", func() bool { return consumerInfo(t, js).NumAckPending == 4 })
	close(release)

	var got []Completion
	events.WaitFor(t, 10*time.Second, "three completions of id twice", func(all []Completion) bool {
		got = got[:0]
		for _, c := range all {
			if c.ID == "twice" {
				got = append(got, c)
			}
		}
		return len(got) == 3
	})
	if n := len(c.of("twice")); n != 1 {
		t.Errorf("id twice ran %d times, want once", n)
	}
	first, again, other := got[0], got[1], got[2]
	if first.Status != StatusOK || again.Status != StatusOK || again.FinishedAt != first.FinishedAt {
		t.Errorf("the copy got %+v, want the first one's completion %+v", again, first)
	}
	if other.Status != StatusError || other.Error == nil || other.Error.Code != CodeConflict || other.Action != "stop" {
		t.Errorf("the id reused for a stop got %+v, want a conflict", other)
	}
	waitStreamEmpty(t, js)
}

// A VM's completion counts as arrived once the record write of the VM's
// next command, sent after it on the same connection, is confirmed: no
// flush then, and other VMs' completions stay unconfirmed. A record write
// sent before it, or no record at all, proves nothing: a flush confirms
// every completion sent.
func TestNextRecordConfirmsTheVMsCompletion(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	w := &Worker{nc: connect(t, s.ClientURL()), log: slog.New(slog.DiscardHandler)}
	conn := w.nc.Stats().Reconnects
	for _, tc := range []struct {
		name    string
		next    *answering // vm-a's next answer, its record confirmed
		flushed bool
	}{
		{"record sent after it", &answering{record: true, after: 1}, false},
		{"record sent before it", &answering{record: true, after: 0}, true},
		{"no record", &answering{}, true},
	} {
		a := newAnswerer(w)
		a.unconfirmed["vm-a"] = []*answering{{j: &job{key: "vm-a"}, conn: conn, sent: 1}}
		a.unconfirmed["vm-b"] = []*answering{{j: &job{key: "vm-b"}, conn: conn, sent: 2}}
		a.count = 2
		tc.next.j = &job{key: "vm-a"}
		a.settle(t.Context(), tc.next)
		if _, ok := a.unconfirmed["vm-a"]; ok {
			t.Errorf("%s: vm-a's earlier completion still unconfirmed", tc.name)
		}
		if _, ok := a.unconfirmed["vm-b"]; ok == tc.flushed {
			t.Errorf("%s: vm-b's completion unconfirmed: %v, want %v (flushed: %v)", tc.name, ok, !tc.flushed, tc.flushed)
		}
		if want := map[bool]int{false: 1, true: 0}[tc.flushed]; a.count != want {
			t.Errorf("%s: %d completions unconfirmed, want %d", tc.name, a.count, want)
		}
	}
}
