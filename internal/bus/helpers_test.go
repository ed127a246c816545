package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

const testHost = "hv1"

// testActions are the actions the test workers know, as the worker's
// executor would tell them.
var testActions = []string{"start", "stop", "reboot", "attach-disk", "detach-disk", "status", "pause", "resume"}

// waitTimeout bounds every wait for an outcome. It only turns a hang into a
// readable failure; nothing is asserted about how long anything takes.
const waitTimeout = 20 * time.Second

// startServer runs a real embedded NATS server with JetStream for one test.
func startServer(t *testing.T, dir string, port int) *server.Server {
	t.Helper()
	s, err := RunEmbedded(dir, "127.0.0.1", port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// connect dials like the worker does (reconnect forever), with a short
// reconnect wait so that restarts in tests are quick.
func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url,
		nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond),
		nats.RetryOnFailedConnect(true),
	)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func jsFor(t *testing.T, nc *nats.Conn) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
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
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
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
	ack, err := js.PublishMsg(t.Context(), m)
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return ack
}

// completions collects the completions published on subject.
type completions struct {
	nc *nats.Conn
	ch chan *nats.Msg

	mu   sync.Mutex
	byID map[string][]Completion
	all  []Completion
}

func collect(t *testing.T, nc *nats.Conn, subject string) *completions {
	t.Helper()
	c := &completions{nc: nc, ch: make(chan *nats.Msg, 4096), byID: map[string][]Completion{}}
	sub, err := nc.ChanSubscribe(subject, c.ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return c
}

// drain moves what has arrived into the maps.
func (c *completions) drain(t *testing.T) {
	t.Helper()
	for {
		select {
		case m := <-c.ch:
			var comp Completion
			if err := json.Unmarshal(m.Data, &comp); err != nil {
				t.Errorf("completion on %s is not JSON: %v: %s", m.Subject, err, m.Data)
				continue
			}
			c.mu.Lock()
			c.byID[comp.ID] = append(c.byID[comp.ID], comp)
			c.all = append(c.all, comp)
			c.mu.Unlock()
		default:
			return
		}
	}
}

// wait returns the first completion of id.
func (c *completions) wait(t *testing.T, id string) Completion {
	t.Helper()
	var got Completion
	waitFor(t, "completion "+id, func() bool {
		c.drain(t)
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.byID[id]) == 0 {
			return false
		}
		got = c.byID[id][0]
		return true
	})
	return got
}

// settled returns everything received for id once the server has handed
// over all that was published before this call: a flush round trip is
// answered only after the messages routed to us ahead of it.
func (c *completions) settled(t *testing.T, id string) []Completion {
	t.Helper()
	if err := c.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	c.drain(t)
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Completion(nil), c.byID[id]...)
}

func consumerInfo(t *testing.T, js jetstream.JetStream) *jetstream.ConsumerInfo {
	t.Helper()
	cons, err := js.Consumer(t.Context(), StreamName, ConsumerName(testHost))
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func streamMsgs(t *testing.T, js jetstream.JetStream) uint64 {
	t.Helper()
	s, err := js.Stream(t.Context(), StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// waitStreamEmpty waits until every command was acked.
func waitStreamEmpty(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	waitFor(t, "stream to empty", func() bool {
		return streamMsgs(t, js) == 0 && consumerInfo(t, js).NumAckPending == 0
	})
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

// freePort finds a port nothing listens on, for a server started later.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func serverPort(t *testing.T, s *server.Server) int {
	t.Helper()
	addr, ok := s.Addr().(*net.TCPAddr)
	if !ok {
		t.Fatalf("server address %v", s.Addr())
	}
	return addr.Port
}

func okHandler(c *calls) Handler {
	return func(_ context.Context, cmd Command) Outcome {
		c.add(cmd)
		return Outcome{Changed: true, State: "running"}
	}
}

func id(prefix string, i int) string { return fmt.Sprintf("%s-%03d", prefix, i) }
