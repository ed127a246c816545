package bus

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// Each hostile message ends in exactly one invalid completion on an event
// subject; none reaches the handler, the KV bucket or another subject, the
// worker's connection stays up, and the next good command runs.
func TestHostileMessagesEndInOneInvalidCompletion(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	workerNC := connect(t, s.ClientURL())
	startWorker(t, workerNC, Config{}, okHandler(c))
	events := collect(t, nc, EventPrefix+".>")
	injected := collect(t, nc, CommandPrefix+".hv1.web-2.>")
	long := strings.Repeat("x", 4050)

	tests := []struct {
		name, vm, action, id, reply string
		wantVM, wantAction          string
	}{
		{name: "id of 4050 bytes", vm: "web-1", action: "stop", id: long},
		{name: "id with a slash", vm: "web-1", action: "stop", id: "a/b"},
		{name: "id in the worker's space", vm: "web-1", action: "stop", id: "~7-1"},
		{name: "reply of 4050 bytes", vm: "web-1", action: "stop", id: "h-reply-long", reply: "_INBOX." + long},
		{name: "reply into the record bucket", vm: "web-1", action: "stop", id: "h-kv", reply: "$KV." + RecordBucket + ".hv1.victim"},
		{name: "reply onto a command subject", vm: "web-1", action: "stop", id: "h-cmd", reply: "virtbus.cmd.hv1.web-2.stop"},
		{name: "reply onto an event subject", vm: "web-1", action: "stop", id: "h-evt", reply: "virtbus.evt.hv1.web-2.stop"},
		{name: "reply into the JetStream API", vm: "web-1", action: "stop", id: "h-api", reply: "$JS.API.STREAM.DELETE." + StreamName},
		{name: "vm of 200 bytes", vm: strings.Repeat("v", 200), action: "start", id: "h-vm", wantVM: InvalidToken},
		{name: "action of 200 bytes", vm: "web-1", action: strings.Repeat("a", 200), id: "h-action", wantAction: InvalidToken},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := nats.NewMsg(CommandSubject(testHost, tc.vm, tc.action))
			m.Header.Set(HeaderMsgID, tc.id)
			if tc.reply != "" {
				m.Header.Set(HeaderReply, tc.reply)
			}
			if _, err := js.PublishMsg(t.Context(), m); err != nil {
				t.Fatalf("publish: %v", err)
			}
			waitStreamEmpty(t, js)
			got := invalidCompletions(t, events)
			if len(got) != 1 {
				t.Fatalf("%d invalid completions, want exactly 1: %+v", len(got), got)
			}
			comp := got[0]
			wantVM, wantAction := cmp.Or(tc.wantVM, tc.vm), cmp.Or(tc.wantAction, tc.action)
			if comp.VM != wantVM || comp.Action != wantAction {
				t.Errorf("completion for vm %.20q action %.20q, want %.20q %.20q", comp.VM, comp.Action, wantVM, wantAction)
			}
			if ValidID(tc.id) && comp.ID != tc.id || !ValidID(tc.id) && !strings.HasPrefix(comp.ID, "~") {
				t.Errorf("completion id %.40q: want the client's id when valid, else one starting with ~", comp.ID)
			}
			if len(comp.Error.Message) > 512 {
				t.Errorf("message of %d bytes echoes the input", len(comp.Error.Message))
			}
		})
	}
	if n := c.total(); n != 0 {
		t.Errorf("handler ran %d hostile commands", n)
	}
	if all := injected.Settled(t); len(all) != 0 {
		t.Errorf("%d messages injected onto web-2's command subject (%v)", len(all), all)
	}
	kv, err := js.KeyValue(t.Context(), RecordBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Get(t.Context(), "hv1.victim"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("record key hv1.victim written through a reply header: %v", err)
	}
	if !workerNC.IsConnected() || workerNC.Stats().Reconnects != 0 {
		t.Errorf("worker connection: connected %v after %d reconnects", workerNC.IsConnected(), workerNC.Stats().Reconnects)
	}
	publishCmd(t, js, "web-1", "start", "good-after", "", "")
	if got := events.WaitID(t, "good-after"); got.Status != StatusOK {
		t.Errorf("good command after the hostile ones: %+v", got)
	}
}

// invalidCompletions settles events and returns the invalid completions
// not seen by an earlier call.
func invalidCompletions(t *testing.T, events *bustest.Collector[Completion]) []Completion {
	t.Helper()
	var out []Completion
	for _, c := range events.TakeSettled(t) {
		if c.Error != nil && c.Error.Code == CodeInvalid {
			out = append(out, c)
		}
	}
	return out
}

// A command without an id gets one no client can send, and a re-created
// stream, whose sequences start again, does not make an old record answer
// a new command.
func TestIDLessCommandsAreNeverAnsweredFromAnotherRecord(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{}, okHandler(c))
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "web-1", "stop", "", "", "")
	first := waitOne(t, events, "web-1")
	if !strings.HasPrefix(first.ID, "~") || ValidID(first.ID) {
		t.Fatalf("worker-made id %q: want one starting with ~, outside the client alphabet", first.ID)
	}

	// An operator deletes and re-creates the stream: sequence 1 again.
	if err := js.DeleteStream(t.Context(), StreamName); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "worker to set up again", func() bool {
		_, err := js.Stream(t.Context(), StreamName)
		return err == nil && w.Ready()
	})
	publishCmd(t, js, "web-1", "stop", "", "", "")
	second := waitOne(t, events, "web-1")
	if second.ID == first.ID {
		t.Errorf("id %s made twice", second.ID)
	}
	if n := c.total(); n != 2 {
		t.Errorf("handler ran %d times, want 2: the second command was answered from the first's record", n)
	}
}

// waitOne waits for a completion for vm that no earlier call returned.
func waitOne(t *testing.T, events *bustest.Collector[Completion], vm string) Completion {
	t.Helper()
	return events.Take(t, "a completion for "+vm, func(c Completion) bool { return c.VM == vm })
}

// An id reused for another command ends that command in conflict without
// running it; the first command's record is kept.
func TestIDReusedForAnotherCommandConflicts(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	// A short duplicate window, so the stream lets the second copy through
	// and the record is what must catch it.
	startWorker(t, connect(t, s.ClientURL()), Config{DupWindow: 100 * time.Millisecond}, okHandler(c))
	events := collect(t, nc, EventPrefix+".hv1.web-1.>")
	victim := collect(t, nc, EventPrefix+".hv1.web-2.>")

	publishCmd(t, js, "web-1", "status", "shared-id", "", "")
	if got := events.WaitID(t, "shared-id"); got.Status != StatusOK {
		t.Fatalf("first command: %+v", got)
	}
	time.Sleep(300 * time.Millisecond)
	publishCmd(t, js, "web-2", "stop", "shared-id", "", "")
	got := victim.WaitID(t, "shared-id")
	if got.Status != StatusError || got.Error.Code != CodeConflict || got.VM != "web-2" || got.Action != "stop" {
		t.Errorf("reused id: %+v, want a conflict for web-2 stop", got)
	}
	if n := len(c.of("shared-id")); n != 1 {
		t.Errorf("handler ran %d commands with the id, want 1", n)
	}
	rec, err := mustRecords(t, js).get(t.Context(), "shared-id")
	if err != nil || rec == nil || rec.VM != "web-1" || rec.Action != "status" {
		t.Errorf("record after the conflict: %+v %v, want the first command's", rec, err)
	}
	// A publisher whose copy the stream dropped as a duplicate gets the
	// same answers from the record.
	if c, err := AwaitCompletion(t.Context(), js, testHost, "web-2", "stop", "shared-id"); err != nil || c.Error == nil || c.Error.Code != CodeConflict {
		t.Errorf("awaiting the reused id for web-2 stop: %+v %v, want a conflict", c, err)
	}
	if c, err := AwaitCompletion(t.Context(), js, testHost, "web-1", "status", "shared-id"); err != nil || c.Status != StatusOK || c.VM != "web-1" {
		t.Errorf("awaiting the id for its own command: %+v %v, want the record", c, err)
	}
}

func mustRecords(t *testing.T, js jetstream.JetStream) *records {
	t.Helper()
	kv, err := js.KeyValue(t.Context(), RecordBucket)
	if err != nil {
		t.Fatal(err)
	}
	return &records{kv: kv, host: testHost}
}

// A connection the server closes for good (here: its password changed, so
// every reconnect is refused) ends Run with an error, so that the process
// exits and its supervisor restarts it.
func TestConnectionClosedForGoodEndsRun(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	opts := func(port int, password string) *server.Options {
		return &server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir,
			Username: "hv1", Password: password, NoLog: true, NoSigs: true}
	}
	s := runServer(t, opts(-1, "old"))
	port := bustest.ServerPort(t, s)
	nc, err := nats.Connect(s.ClientURL(), nats.UserInfo("hv1", "old"), nats.MaxReconnects(-1),
		nats.ReconnectWait(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	w := newWorker(t, nc, Config{}, okHandler(newCalls()))
	done := make(chan error, 1)
	go func() { done <- w.Run(context.Background()) }()
	waitFor(t, "worker ready", w.Ready)

	s.Shutdown()
	s.WaitForShutdown()
	runServer(t, opts(port, "new"))
	select {
	case err := <-done:
		if !errors.Is(err, ErrConnectionClosed) {
			t.Errorf("Run returned %v, want ErrConnectionClosed", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run still running on a connection closed for good")
	}
}

func runServer(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

// A thousand commands with made-up actions add no series: they are all
// counted under action="unknown", and every known label set exists from
// the start.
func TestBogusActionsAddNoSeries(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	// Like the worker's executor, the handler refuses what it does not know.
	w := startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: 256}, func(_ context.Context, cmd Command) Outcome {
		if !slices.Contains(testActions, cmd.Action) {
			return Outcome{Err: &Error{Code: CodeInvalid, Message: "unknown action"}}
		}
		return Outcome{State: "running"}
	})
	if got := seriesCount(t, w.reg, "virtbus_command_errors_total", "action", "start", "code", CodeLibvirt); got != 1 {
		t.Errorf("errors{start,libvirt} series: %d before any command, want 1 (at zero)", got)
	}
	before := seriesCount(t, w.reg, "")

	const bogus = 1000
	for i := range bogus {
		m := nats.NewMsg(CommandSubject(testHost, "web-1", id("bogus", i)))
		if _, err := js.PublishMsgAsync(m); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(waitTimeout):
		t.Fatal("publishes not acked")
	}
	checkCounter(t, w.reg, bogus, "virtbus_commands_completed_total", "action", unknownLabel, "status", StatusError)
	after := seriesCount(t, w.reg, "")
	if after != before {
		t.Errorf("%d series after %d bogus actions, %d before", after, bogus, before)
	}
	t.Logf("virtbus_ series: %d before, %d after %d bogus actions", before, after, bogus)
	if got := metricValue(t, w.reg, "virtbus_command_errors_total", "action", unknownLabel, "code", CodeInvalid); got != bogus {
		t.Errorf("errors{unknown,invalid} = %v, want %d", got, bogus)
	}
}

// seriesCount counts the series of name (every virtbus_ family when name is
// empty) whose labels include the given pairs.
func seriesCount(t *testing.T, reg *prometheus.Registry, name string, labels ...string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		if name != "" && mf.GetName() != name || name == "" && !strings.HasPrefix(mf.GetName(), "virtbus_") {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
				if l.GetName() == "vm" {
					t.Errorf("%s has a vm label", mf.GetName())
				}
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue series
				}
			}
			n++
		}
	}
	return n
}

// A panic in the handler, or in the bus after the completion was recorded,
// ends the command in one completion, and the worker goes on.
func TestPanicsEndInOneCompletion(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	w := newWorker(t, connect(t, s.ClientURL()), Config{MaxDeliver: 1}, func(_ context.Context, cmd Command) Outcome {
		if cmd.VM == "bad-handler" {
			panic("handler bug")
		}
		return Outcome{State: "running"}
	})
	w.crashAfterRecord = func(cmd Command) bool {
		if cmd.VM == "bad-bus" {
			panic("bus bug")
		}
		return false
	}
	w.start(t)
	waitFor(t, "worker ready", w.Ready)
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "bad-handler", "start", "p-handler", "", "")
	publishCmd(t, js, "bad-bus", "start", "p-bus", "", "")
	publishCmd(t, js, "good", "start", "p-good", "", "")
	if got := events.WaitID(t, "p-handler"); got.Status != StatusError || got.Error.Code != CodeUnavailable || !strings.Contains(got.Error.Message, "panic") {
		t.Errorf("handler panic: %+v", got)
	}
	// The panic came after the ok completion was recorded: that record is
	// the answer.
	if got := events.WaitID(t, "p-bus"); got.Status != StatusOK {
		t.Errorf("panic after the record: %+v, want the recorded ok", got)
	}
	if got := events.WaitID(t, "p-good"); got.Status != StatusOK {
		t.Errorf("good command after the panics: %+v", got)
	}
	waitStreamEmpty(t, js)
	for _, id := range []string{"p-handler", "p-bus", "p-good"} {
		if n := len(events.SettledID(t, id)); n != 1 {
			t.Errorf("%s: %d completions, want 1", id, n)
		}
	}
}
