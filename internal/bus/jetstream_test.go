package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

func TestCompletionOnEventAndReplySubjects(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		vm      string
		body    string
		outcome Outcome
		want    Completion // the fields the outcome decides
	}{
		{
			name:    "ok",
			vm:      "web-1",
			body:    `{"mode":"force"}`,
			outcome: Outcome{Changed: true, State: "shutoff", Detail: map[string]any{"forced": true}},
			want:    Completion{Status: StatusOK, Changed: true, State: "shutoff", Detail: map[string]any{"forced": true}},
		},
		{
			name:    "error",
			vm:      "web-2",
			body:    ``,
			outcome: Outcome{State: "running", Err: &Error{Code: CodeNotFound, Message: "no domain web-2"}},
			want:    Completion{Status: StatusError, State: "running", Error: &Error{Code: CodeNotFound, Message: "no domain web-2"}},
		},
	}
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	outcomes := map[string]Outcome{}
	for _, tc := range tests {
		outcomes[tc.vm] = tc.outcome
	}
	w := startWorker(t, connect(t, s.ClientURL()), Config{}, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		return outcomes[cmd.VM]
	})
	events := collect(t, nc, EventPrefix+"."+testHost+".>")

	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmdID := "cmd-" + tc.name
			replies := collect(t, nc, "virtbus.reply.test."+tc.name)
			publishCmd(t, js, tc.vm, "stop", cmdID, tc.body, "virtbus.reply.test."+tc.name)

			for _, got := range []Completion{events.WaitID(t, cmdID), replies.WaitID(t, cmdID)} {
				if got.ID != cmdID || got.Host != testHost || got.VM != tc.vm || got.Action != "stop" || got.Attempt != 1 {
					t.Errorf("identity fields: %+v", got)
				}
				if got.Status != tc.want.Status || got.Changed != tc.want.Changed || got.State != tc.want.State ||
					!reflect.DeepEqual(got.Detail, tc.want.Detail) || !reflect.DeepEqual(got.Error, tc.want.Error) {
					t.Errorf("outcome fields: got %+v, want %+v", got, tc.want)
				}
				if got.ReceivedAt.IsZero() || got.StartedAt.Before(got.ReceivedAt) || got.FinishedAt.Before(got.StartedAt) ||
					got.DurationMS < 0 {
					t.Errorf("times: received %v started %v finished %v duration_ms %v",
						got.ReceivedAt, got.StartedAt, got.FinishedAt, got.DurationMS)
				}
			}

			seen := c.of(cmdID)
			if len(seen) != 1 {
				t.Fatalf("handler called %d times, want 1", len(seen))
			}
			wantParams := tc.body
			if wantParams == "" {
				wantParams = "{}"
			}
			cmd := seen[0]
			if cmd.Host != testHost || cmd.VM != tc.vm || cmd.Action != "stop" || string(cmd.Params) != wantParams ||
				cmd.Reply != "virtbus.reply.test."+tc.name || cmd.Attempt != 1 {
				t.Errorf("handler saw %+v (params %s)", cmd, cmd.Params)
			}
			waitStreamEmpty(t, js)
			checkCounter(t, w.reg, 1, "virtbus_commands_completed_total", "action", "stop", "status", tc.want.Status)
		})
	}
	checkCounter(t, w.reg, 1, "virtbus_command_errors_total", "action", "stop", "code", CodeNotFound)
	if got := metricValue(t, w.reg, "virtbus_nats_up"); got != 1 {
		t.Errorf("virtbus_nats_up = %v, want 1", got)
	}
	if got := metricValue(t, w.reg, "virtbus_queue_capacity"); got != 64 {
		t.Errorf("virtbus_queue_capacity = %v, want the default 64", got)
	}

	// The metric names are a contract with deploy/ and the worker.
	mfs, err := w.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, mf := range mfs {
		have[mf.GetName()] = true
	}
	for _, name := range []string{
		"virtbus_queue_depth", "virtbus_queue_capacity", "virtbus_in_flight",
		"virtbus_commands_received_total", "virtbus_commands_completed_total", "virtbus_command_errors_total",
		"virtbus_command_duration_seconds", "virtbus_queue_wait_seconds",
		"virtbus_redeliveries_total", "virtbus_duplicates_suppressed_total",
		"virtbus_nats_up", "virtbus_reconnects_total",
	} {
		if !have[name] {
			t.Errorf("metric %s not registered", name)
		}
	}
	if got := metricValue(t, w.reg, "virtbus_reconnects_total", "target", "nats"); got != 0 {
		t.Errorf("virtbus_reconnects_total{target=nats} = %v, want 0", got)
	}
}

func TestAckOnlyAfterCompletion(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	started := make(chan struct{})
	release := make(chan struct{})
	startWorker(t, connect(t, s.ClientURL()), Config{}, func(context.Context, Command) Outcome {
		close(started)
		<-release
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "web-1", "start", "slow-1", "", "")
	select {
	case <-started:
	case <-time.After(waitTimeout):
		t.Fatal("handler never called")
	}
	// The handler is running: the message must still be in the stream and
	// unacked, and no completion out.
	if got := consumerInfo(t, js).NumAckPending; got != 1 {
		t.Errorf("NumAckPending = %d while the handler runs, want 1", got)
	}
	if got := bustest.StreamMsgs(t, js, StreamName); got != 1 {
		t.Errorf("stream holds %d messages while the handler runs, want 1", got)
	}
	if got := events.SettledID(t, "slow-1"); len(got) != 0 {
		t.Errorf("completion published before the handler returned: %+v", got)
	}

	close(release)
	events.WaitID(t, "slow-1")
	waitStreamEmpty(t, js)
}

func TestInvalidCommandEndsInOneCompletion(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		vm   string
		body string
	}{
		{name: "malformed json", vm: "web-1", body: `{"mode":`},
		{name: "json array", vm: "web-2", body: `[1,2,3]`},
		{name: "json string", vm: "web-3", body: `"start"`},
		{name: "not json", vm: "web-4", body: `mode=force`},
	}
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{}, okHandler(c))
	events := collect(t, nc, EventPrefix+".>")

	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmdID := id("bad", i)
			publishCmd(t, js, tc.vm, "stop", cmdID, tc.body, "")
			got := events.WaitID(t, cmdID)
			if got.Status != StatusError || got.Error == nil || got.Error.Code != CodeInvalid || got.VM != tc.vm {
				t.Errorf("completion %+v, want an invalid error for %s", got, tc.vm)
			}
			waitStreamEmpty(t, js)
			if all := events.SettledID(t, cmdID); len(all) != 1 {
				t.Errorf("%d completions, want exactly 1", len(all))
			}
		})
	}
	if n := c.total(); n != 0 {
		t.Errorf("handler called %d times for invalid commands", n)
	}
	checkCounter(t, w.reg, float64(len(tests)), "virtbus_command_errors_total", "action", "stop", "code", CodeInvalid)
}

func TestSameMsgIDRunsOnce(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	startWorker(t, connect(t, s.ClientURL()), Config{}, okHandler(c))
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "web-1", "start", "twice", "", "")
	if ack := publishCmd(t, js, "web-1", "start", "twice", "", ""); !ack.Duplicate {
		t.Errorf("second publish of the same id not flagged duplicate: %+v", ack)
	}
	// Same VM, published after: by the time it completes, a second run of
	// "twice" would have happened (order per VM).
	publishCmd(t, js, "web-1", "start", "after", "", "")
	events.WaitID(t, "after")
	waitStreamEmpty(t, js)
	if n := len(c.of("twice")); n != 1 {
		t.Errorf("handler ran %q %d times, want 1", "twice", n)
	}
	if n := len(events.SettledID(t, "twice")); n != 1 {
		t.Errorf("%d completions for %q, want 1", n, "twice")
	}
}

func TestRedeliveryAnsweredFromRecord(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	c := newCalls()
	w := newWorker(t, connect(t, s.ClientURL()), Config{AckWait: time.Second}, okHandler(c))
	// The first time, "crash" right after recording the completion: no
	// publish, no ack, so the server redelivers once AckWait has passed.
	var crashed atomic.Bool
	w.crashAfterRecord = func(cmd Command) bool { return !crashed.Swap(true) }
	w.start(t)
	events := collect(t, nc, EventPrefix+".>")

	publishCmd(t, js, "web-1", "reboot", "rec-1", "", "virtbus.reply.test.rec")
	got := events.WaitID(t, "rec-1")
	waitStreamEmpty(t, js)

	if !crashed.Load() {
		t.Fatal("crash hook never ran")
	}
	if n := len(c.of("rec-1")); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
	// The answer is the recorded completion of the first delivery.
	if got.Attempt != 1 || got.Status != StatusOK || got.State != "running" {
		t.Errorf("replayed completion %+v, want the recorded attempt 1", got)
	}
	checkCounter(t, w.reg, 1, "virtbus_duplicates_suppressed_total")
	if v := metricValue(t, w.reg, "virtbus_redeliveries_total"); v < 1 {
		t.Errorf("virtbus_redeliveries_total = %v, want at least 1", v)
	}
}

func TestOrderPerVMWithConcurrency(t *testing.T) {
	t.Parallel()
	const (
		vms   = 6
		perVM = 12
	)
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)

	var (
		mu      sync.Mutex
		order   = map[string][]int{}
		running = map[string]int{}
		overlap []string
	)
	startWorker(t, connect(t, s.ClientURL()), Config{QueueSize: 16, Concurrency: 4}, func(_ context.Context, cmd Command) Outcome {
		var p struct{ N int }
		if err := json.Unmarshal(cmd.Params, &p); err != nil {
			return Outcome{Err: &Error{Code: CodeInvalid, Message: err.Error()}}
		}
		mu.Lock()
		running[cmd.VM]++
		if running[cmd.VM] > 1 {
			overlap = append(overlap, cmd.ID)
		}
		order[cmd.VM] = append(order[cmd.VM], p.N)
		mu.Unlock()
		// Vary the work so that VMs overtake each other.
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		mu.Lock()
		running[cmd.VM]--
		mu.Unlock()
		return Outcome{State: "running"}
	})
	events := collect(t, nc, EventPrefix+".>")

	var ids []string
	for n := range perVM {
		for v := range vms {
			cmdID := fmt.Sprintf("o-%d-%d", v, n)
			publishCmd(t, js, fmt.Sprintf("vm-%d", v), "reboot", cmdID, fmt.Sprintf(`{"n":%d}`, n), "")
			ids = append(ids, cmdID)
		}
	}
	for _, cmdID := range ids {
		if got := events.WaitID(t, cmdID); got.Status != StatusOK {
			t.Errorf("%s: %+v", cmdID, got)
		}
	}

	mu.Lock()
	defer mu.Unlock()
	if len(overlap) > 0 {
		t.Errorf("commands ran while another for the same VM ran: %v", overlap)
	}
	for v := range vms {
		vm := fmt.Sprintf("vm-%d", v)
		want := make([]int, perVM)
		for i := range want {
			want[i] = i
		}
		if !reflect.DeepEqual(order[vm], want) {
			t.Errorf("%s ran in order %v, want %v", vm, order[vm], want)
		}
	}
}

func TestHoldsNoMoreThanQueueSize(t *testing.T) {
	t.Parallel()
	const (
		queueSize = 4
		total     = 40
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
		publishCmd(t, js, fmt.Sprintf("vm-%d", i%8), "start", id("deep", i), "", "")
	}

	// Watch the worker's count of the messages it holds (taken, not acked
	// or handed back yet) and the FIFO for the whole run, not just once.
	// Not the server's count of unacked deliveries: the server applies acks
	// on a goroutine of their own, so a pull that came after them on the
	// connection can be served first, and the count runs ahead for a moment.
	var peakPending, peakHeld atomic.Int64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stopWatch:
				return
			default:
			}
			peakPending.Store(max(peakPending.Load(), int64(w.held.len())))
			peakHeld.Store(max(peakHeld.Load(), int64(w.q.Len())))
			time.Sleep(time.Millisecond)
		}
	}()

	// Full: two running (blocked), two queued, the rest left in the stream.
	waitFor(t, "the worker to fill its queue", func() bool {
		info := consumerInfo(t, js)
		return info.NumAckPending == queueSize && info.NumPending == total-queueSize && c.total() == 2
	})
	close(release)
	for i := range total {
		events.WaitID(t, id("deep", i))
	}
	waitStreamEmpty(t, js)
	close(stopWatch)
	<-watched

	// The FIFO's commands, and up to as many again whose completions are
	// being recorded and published (see answerer).
	if got := peakPending.Load(); got > 2*queueSize {
		t.Errorf("worker held %d unacked messages at once, queue size %d", got, queueSize)
	}
	if got := peakHeld.Load(); got > queueSize {
		t.Errorf("FIFO held %d, queue size %d", got, queueSize)
	}
	if n := c.total(); n != total {
		t.Errorf("handler ran %d times, want %d", n, total)
	}
}

func TestUnavailableRetriedThenFinal(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name         string
		maxDeliver   int
		unavailable  int // attempts that end unavailable before one succeeds
		wantAttempts []int
		wantStatus   string
	}{
		{name: "gives up after max deliver", maxDeliver: 3, unavailable: 99, wantAttempts: []int{1, 2, 3}, wantStatus: StatusError},
		{name: "recovers on a retry", maxDeliver: 3, unavailable: 1, wantAttempts: []int{1, 2}, wantStatus: StatusOK},
		{name: "max deliver one is final at once", maxDeliver: 1, unavailable: 99, wantAttempts: []int{1}, wantStatus: StatusError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
			nc := connect(t, s.ClientURL())
			js := bustest.JetStream(t, nc)
			c := newCalls()
			cfg := Config{MaxDeliver: tc.maxDeliver, RetryBackoff: 10 * time.Millisecond, RetryBackoffMax: 40 * time.Millisecond}
			startWorker(t, connect(t, s.ClientURL()), cfg, func(_ context.Context, cmd Command) Outcome {
				c.add(cmd)
				if cmd.Attempt <= tc.unavailable {
					return Outcome{Err: &Error{Code: CodeUnavailable, Message: "libvirt down"}}
				}
				return Outcome{State: "running"}
			})
			events := collect(t, nc, EventPrefix+".>")

			publishCmd(t, js, "web-1", "start", "u-1", "", "")
			got := events.WaitID(t, "u-1")
			waitStreamEmpty(t, js)

			var attempts []int
			for _, cmd := range c.of("u-1") {
				attempts = append(attempts, cmd.Attempt)
			}
			if !reflect.DeepEqual(attempts, tc.wantAttempts) {
				t.Errorf("handler saw attempts %v, want %v", attempts, tc.wantAttempts)
			}
			last := tc.wantAttempts[len(tc.wantAttempts)-1]
			if got.Status != tc.wantStatus || got.Attempt != last {
				t.Errorf("completion %+v, want status %s attempt %d", got, tc.wantStatus, last)
			}
			if tc.wantStatus == StatusError && (got.Error == nil || got.Error.Code != CodeUnavailable) {
				t.Errorf("final error %+v, want unavailable", got.Error)
			}
			if n := len(events.SettledID(t, "u-1")); n != 1 {
				t.Errorf("%d completions, want exactly 1 (retries publish nothing)", n)
			}
		})
	}
}

func TestDeliveriesBeyondTheLimitAnsweredWithoutRunning(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	// The naks below leave no clean-shutdown mark, so the second worker
	// waits one ack wait for commands it must take to be deliverable: keep
	// it short.
	cfg := Config{DeliveryLimit: 2, AckWait: 2 * time.Second}
	c := newCalls()

	// A first worker sets up the stream and consumer, then stops.
	first := startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(c))
	if err := first.stop(t); err != nil {
		t.Fatal(err)
	}

	// Deliver the command twice without answering it, as two crashed
	// workers would have.
	publishCmd(t, js, "web-1", "start", "spent", "", "")
	cons, err := js.Consumer(t.Context(), StreamName, ConsumerName(testHost))
	if err != nil {
		t.Fatal(err)
	}
	for range cfg.DeliveryLimit {
		msgs, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for m := range msgs.Messages() {
			n++
			if err := m.Nak(); err != nil {
				t.Fatal(err)
			}
		}
		if n != 1 {
			t.Fatalf("fetched %d messages, want 1 (%v)", n, msgs.Error())
		}
	}

	events := collect(t, nc, EventPrefix+".>")
	startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(c))
	got := events.WaitID(t, "spent")
	waitStreamEmpty(t, js)
	if got.Status != StatusError || got.Error == nil || got.Error.Code != CodeUnavailable || got.Attempt != cfg.DeliveryLimit+1 {
		t.Errorf("completion %+v, want unavailable at attempt %d", got, cfg.DeliveryLimit+1)
	}
	if n := c.total(); n != 0 {
		t.Errorf("handler ran %d times, want 0", n)
	}
}

func TestGracefulShutdownHandsBackQueued(t *testing.T) {
	t.Parallel()
	const total = 6
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	events := collect(t, nc, EventPrefix+".>")
	naks := make(chan *nats.Msg, 64)
	if _, err := nc.ChanSubscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED."+StreamName+"."+ConsumerName(testHost), naks); err != nil {
		t.Fatal(err)
	}
	c := newCalls()
	started := make(chan string, total)
	release := make(chan struct{})
	// AckWait is far beyond the test's patience: only a nak brings the
	// queued commands back in time.
	cfg := Config{QueueSize: 8, AckWait: 10 * time.Minute}
	first := startWorker(t, connect(t, s.ClientURL()), cfg, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		started <- cmd.ID
		<-release
		return Outcome{State: "shutoff"}
	})
	for i := range total {
		publishCmd(t, js, fmt.Sprintf("vm-%d", i%2), "stop", id("g", i), "", "")
	}
	waitFor(t, "all commands held, one running", func() bool {
		return first.q.Len() == total && len(started) == 1
	})
	running := <-started

	stopped := make(chan error, 1)
	go func() { stopped <- first.stop(t) }()
	// Run cannot return while the command runs; let it finish once the
	// queue has closed.
	waitFor(t, "the queue to close", func() bool { return first.q.Free() == 0 })
	close(release)
	if err := <-stopped; err != nil {
		t.Fatalf("Run = %v, want nil after a graceful drain", err)
	}

	// The running command was answered and acked before Run returned...
	if n := len(events.SettledID(t, running)); n != 1 {
		t.Errorf("running command %s: %d completions, want 1", running, n)
	}
	if got := bustest.StreamMsgs(t, js, StreamName); got != total-1 {
		t.Errorf("stream holds %d commands after shutdown, want %d", got, total-1)
	}
	// ...and the five queued ones were handed back with a nak.
	nakked := map[uint64]bool{}
	waitFor(t, "naks for the queued commands", func() bool {
		for {
			select {
			case m := <-naks:
				var adv struct {
					StreamSeq uint64 `json:"stream_seq"`
				}
				if err := json.Unmarshal(m.Data, &adv); err == nil {
					nakked[adv.StreamSeq] = true
				}
			default:
				return len(nakked) == total-1
			}
		}
	})
	if n := c.total(); n != 1 {
		t.Errorf("first worker ran %d commands, want 1", n)
	}

	startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(c))
	for i := range total {
		events.WaitID(t, id("g", i))
	}
	waitStreamEmpty(t, js)
	for i := range total {
		if n := len(c.of(id("g", i))); n != 1 {
			t.Errorf("%s ran %d times, want 1", id("g", i), n)
		}
	}
	// Handed back in stream order, each VM's commands still ran in order.
	for vm, want := range map[string][]string{
		"vm-0": {"g-000", "g-002", "g-004"},
		"vm-1": {"g-001", "g-003", "g-005"},
	} {
		if got := c.idsFor(vm); !reflect.DeepEqual(got, want) {
			t.Errorf("%s ran %v, want %v", vm, got, want)
		}
	}
}

func TestHeldMessagesAreNotRedelivered(t *testing.T) {
	t.Parallel()
	const ackWait = time.Second
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	release := make(chan struct{})
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{AckWait: ackWait}, func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		<-release
		return Outcome{State: "running"}
	})
	// The worker's acks and progress reports, as the server sees them.
	acks := make(chan *nats.Msg, 1024)
	if _, err := nc.ChanSubscribe("$JS.ACK."+StreamName+"."+ConsumerName(testHost)+".>", acks); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	publishCmd(t, js, "web-1", "reboot", "long", "", "") // runs, blocked
	publishCmd(t, js, "web-1", "stop", "behind", "", "") // waits behind it
	waitFor(t, "both held", func() bool { return w.q.Len() == 2 && c.total() == 1 })

	// Wait for progress reports covering well over one AckWait for both
	// messages; without them the server would have redelivered both.
	progress := map[string]int{} // by ack subject: one per delivery
	waitFor(t, "progress reports", func() bool {
		for {
			select {
			case m := <-acks:
				if string(m.Data) == "+WPI" {
					progress[m.Subject]++
				}
			default:
				if len(progress) != 2 {
					return false
				}
				for _, n := range progress {
					if n < 5 { // 4 intervals of AckWait/3 > AckWait
						return false
					}
				}
				return true
			}
		}
	})
	if info := consumerInfo(t, js); info.NumRedelivered != 0 {
		t.Errorf("%d messages redelivered while held", info.NumRedelivered)
	}
	close(release)
	waitStreamEmpty(t, js)
	if n := c.total(); n != 2 {
		t.Errorf("handler ran %d times, want 2", n)
	}
}
