package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

const testHost = "hv1"

// testActions are the actions the test workers know, as the worker's
// executor would tell them.
var testActions = []string{"start", "stop", "reboot", "attach-disk", "detach-disk", "status", "pause", "resume"}

// waitTimeout bounds every wait for an outcome. It only turns a hang into a
// readable failure; nothing is asserted about how long anything takes.
const waitTimeout = 20 * time.Second

// connect dials like the worker does (reconnect forever), with a short
// reconnect wait so that restarts in tests are quick.
func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	return bustest.Connect(t, url,
		nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond),
		nats.RetryOnFailedConnect(true),
	)
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// runningWorker is a Worker whose Run goroutine the test controls.
type runningWorker struct {
	*Worker
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// stop ends Run as a SIGTERM would and returns its error.
func (r *runningWorker) stop(t *testing.T) error {
	t.Helper()
	r.once.Do(func() {
		r.cancel()
		select {
		case r.err = <-r.done:
		case <-time.After(waitTimeout):
			t.Fatal("worker did not stop")
		}
	})
	return r.err
}

func newWorker(t *testing.T, nc *nats.Conn, cfg Config, h Handler) *runningWorker {
	t.Helper()
	if cfg.Host == "" {
		cfg.Host = testHost
	}
	if cfg.Actions == nil {
		cfg.Actions = testActions
	}
	reg := prometheus.NewRegistry()
	w, err := New(nc, cfg, h, testLogger(t), reg)
	if err != nil {
		t.Fatal(err)
	}
	// Shutdown waits for the open pull to expire; keep that short here.
	w.fetchWait = 200 * time.Millisecond
	return &runningWorker{Worker: w, reg: reg, done: make(chan error, 1)}
}

func (r *runningWorker) start(t *testing.T) *runningWorker {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		if err := r.stop(t); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r
}

func startWorker(t *testing.T, nc *nats.Conn, cfg Config, h Handler) *runningWorker {
	t.Helper()
	r := newWorker(t, nc, cfg, h).start(t)
	waitFor(t, "worker ready", r.Ready)
	return r
}

// waitFor polls cond until it holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	bustest.Eventually(t, waitTimeout, what, cond)
}

// publishCmd publishes a command the way producers should: with JetStream,
// a command id and optionally a reply subject.
func publishCmd(t *testing.T, js jetstream.JetStream, vm, action, id, body, reply string) *jetstream.PubAck {
	t.Helper()
	m := nats.NewMsg(CommandSubject(testHost, vm, action))
	m.Data = []byte(body)
	if id != "" {
		m.Header.Set(HeaderMsgID, id)
	}
	if reply != "" {
		m.Header.Set(HeaderReply, reply)
	}
	// Not jetstream's default 5 s: on a loaded machine a server that just
	// made a stream can take longer to answer, and that is not what the
	// tests look at.
	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	defer cancel()
	ack, err := js.PublishMsg(ctx, m)
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return ack
}

// collect gathers the completions published on subject.
func collect(t *testing.T, nc *nats.Conn, subject string) *bustest.Collector[Completion] {
	t.Helper()
	return bustest.Collect(t, nc, subject, waitTimeout, func(m *nats.Msg) (Completion, string, error) {
		var c Completion
		err := json.Unmarshal(m.Data, &c)
		return c, c.ID, err
	})
}

// consumerInfo is the state of the test host's consumer.
func consumerInfo(t *testing.T, js jetstream.JetStream) *jetstream.ConsumerInfo {
	t.Helper()
	return bustest.ConsumerInfo(t, js, StreamName, ConsumerName(testHost))
}

// waitStreamEmpty waits until every command was acked.
func waitStreamEmpty(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	bustest.WaitStreamEmpty(t, js, waitTimeout, StreamName, ConsumerName(testHost))
}

// calls counts handler calls per command id and keeps the commands seen.
type calls struct {
	mu    sync.Mutex
	byID  map[string][]Command
	order []Command
	n     int
}

func newCalls() *calls { return &calls{byID: map[string][]Command{}} }

// add records a call and returns how many there have been.
func (c *calls) add(cmd Command) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.byID[cmd.ID] = append(c.byID[cmd.ID], cmd)
	c.order = append(c.order, cmd)
	c.n++
	return c.n
}

// idsFor lists the ids the handler saw for vm, in the order it saw them.
func (c *calls) idsFor(vm string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for _, cmd := range c.order {
		if cmd.VM == vm {
			ids = append(ids, cmd.ID)
		}
	}
	return ids
}

func (c *calls) of(id string) []Command {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Command(nil), c.byID[id]...)
}

func (c *calls) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// metricValue reads one counter or gauge from reg; labels are name=value
// pairs that must all match.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue metrics
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

// checkCounter waits for a counter to reach want (the worker counts a
// command after acking it, so just after the test sees the ack) and then
// checks that it did not pass it.
func checkCounter(t *testing.T, reg *prometheus.Registry, want float64, name string, labels ...string) {
	t.Helper()
	var got float64
	deadline := time.Now().Add(waitTimeout)
	for got = metricValue(t, reg, name, labels...); got < want && time.Now().Before(deadline); got = metricValue(t, reg, name, labels...) {
		time.Sleep(10 * time.Millisecond)
	}
	if got != want {
		t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}

func okHandler(c *calls) Handler {
	return func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		return Outcome{Changed: true, State: "running"}
	}
}

func id(prefix string, i int) string { return fmt.Sprintf("%s-%03d", prefix, i) }
