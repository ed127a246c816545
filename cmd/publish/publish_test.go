package main

import (
	"bytes"
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// runServer starts a real NATS server on a free port: the worker's embedded
// one with JetStream, or a plain core-NATS one.
func runServer(t *testing.T, jetStream bool) *server.Server {
	t.Helper()
	if jetStream {
		return bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	}
	return bustest.RunCoreServer(t)
}

// received is one command as the test responder saw it.
type received struct {
	subject string
	header  nats.Header
	data    []byte
}

// responder stands in for a worker: it answers each command by the VM it
// names. "missing" fails with not_found, "silent" is never answered, any
// other VM succeeds.
type responder struct {
	mu   sync.Mutex
	got  []received
	sent map[string][]byte // raw completion by command id
}

func (r *responder) answer(subject string, header nats.Header, data []byte) []byte {
	_, vm, action, err := bus.ParseCommandSubject(subject)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, received{subject, header, data})
	if err != nil || vm == "silent" {
		return nil
	}
	now := time.Now().UTC()
	c := bus.Completion{ID: header.Get(bus.HeaderMsgID), Host: "hv1", VM: vm, Action: action, Attempt: 1,
		ReceivedAt: now, StartedAt: now, FinishedAt: now, DurationMS: 12.3}
	var params map[string]any
	switch {
	case json.Unmarshal(data, &params) != nil:
		c.Status, c.Error = bus.StatusError, &bus.Error{Code: bus.CodeInvalid, Message: "params are not a JSON object"}
	case vm == "missing":
		c.Status, c.Error = bus.StatusError, &bus.Error{Code: bus.CodeNotFound, Message: `domain "missing" not found`}
	default:
		c.Status, c.Changed, c.State, c.Detail = bus.StatusOK, true, "shutoff", map[string]any{"forced": true}
	}
	b, _ := json.Marshal(c)
	r.sent[c.ID] = b
	return b
}

func (r *responder) lastGot() received {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.got) == 0 {
		return received{}
	}
	return r.got[len(r.got)-1]
}

func (r *responder) completion(id string) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sent[id]
}

// startJetStreamResponder creates what a worker on hv1 would: the stream and
// its durable pull consumer, and answers on each command's Virtbus-Reply.
func startJetStreamResponder(t *testing.T, url string) *responder {
	t.Helper()
	ctx := t.Context()
	nc := bustest.Connect(t, url)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: "VIRTBUS_CMD", Subjects: []string{"virtbus.cmd.>"}, Retention: jetstream.WorkQueuePolicy,
		Storage: jetstream.MemoryStorage, Duplicates: time.Minute,
	}); err != nil {
		t.Fatalf("create stream: %v", err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, "VIRTBUS_CMD", jetstream.ConsumerConfig{
		Durable: "virtbus-hv1", FilterSubject: "virtbus.cmd.hv1.>", AckPolicy: jetstream.AckExplicitPolicy,
	})
	if err != nil {
		t.Fatalf("create consumer: %v", err)
	}
	r := &responder{sent: map[string][]byte{}}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		if b := r.answer(m.Subject(), m.Headers(), m.Data()); b != nil {
			if reply := m.Headers().Get(bus.HeaderReply); reply != "" {
				_ = nc.Publish(reply, b)
			}
		}
		_ = m.Ack()
	})
	if err != nil {
		t.Fatalf("consume: %v", err)
	}
	t.Cleanup(cc.Stop)
	return r
}

// startCoreResponder answers core-NATS requests, as a worker with
// VIRTBUS_DELIVERY=core does.
func startCoreResponder(t *testing.T, url string) *responder {
	t.Helper()
	nc := bustest.Connect(t, url)
	r := &responder{sent: map[string][]byte{}}
	if _, err := nc.QueueSubscribe("virtbus.cmd.hv1.>", "virtbus-hv1", func(m *nats.Msg) {
		if b := r.answer(m.Subject, m.Header, m.Data); b != nil {
			_ = m.Respond(b)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

type result struct {
	code           int
	stdout, stderr string
}

func runPublish(ctx context.Context, url string, args ...string) result {
	env := envFunc(map[string]string{"VIRTBUS_NATS_URL": url, "VIRTBUS_HOST": "hv1"})
	var stdout, stderr bytes.Buffer
	code := exitCode(run(ctx, args, env, &stdout, &stderr), &stderr)
	return result{code, stdout.String(), stderr.String()}
}

func (r result) want(t *testing.T, code int) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
}

func TestJetStream(t *testing.T) {
	s := runServer(t, true)
	url := s.ClientURL()
	resp := startJetStreamResponder(t, url)
	ctx := t.Context()

	t.Run("ok", func(t *testing.T) {
		r := runPublish(ctx, url, "stop", "web-1", "mode=force", "persistent=false")
		r.want(t, exitOK)
		if want := "ok    stop web-1 changed=true state=shutoff 12ms detail: forced=true\n"; r.stdout != want {
			t.Errorf("stdout %q, want %q", r.stdout, want)
		}
		got := resp.lastGot()
		if got.subject != "virtbus.cmd.hv1.web-1.stop" {
			t.Errorf("subject %q", got.subject)
		}
		if got.header.Get(bus.HeaderMsgID) == "" {
			t.Error("no Nats-Msg-Id")
		}
		if !strings.HasPrefix(got.header.Get(bus.HeaderReply), "_INBOX.") {
			t.Errorf("Virtbus-Reply %q", got.header.Get(bus.HeaderReply))
		}
		var params map[string]any
		if err := json.Unmarshal(got.data, &params); err != nil {
			t.Fatalf("params %q: %v", got.data, err)
		}
		if params["mode"] != "force" || params["persistent"] != false {
			t.Errorf("params %v", params)
		}
	})

	t.Run("expires", func(t *testing.T) {
		before := time.Now()
		runPublish(ctx, url, "-expires", "10m", "status", "web-1").want(t, exitOK)
		exp, err := time.Parse(time.RFC3339, resp.lastGot().header.Get(bus.HeaderExpires))
		if err != nil {
			t.Fatalf("Virtbus-Expires: %v", err)
		}
		if d := exp.Sub(before); d < 10*time.Minute-time.Second || d > 10*time.Minute+time.Minute {
			t.Errorf("Virtbus-Expires %s is %s after sending, want about 10m", exp, d)
		}
	})

	t.Run("error completion", func(t *testing.T) {
		r := runPublish(ctx, url, "stop", "missing")
		r.want(t, exitFailed)
		if want := "error stop missing code=not_found: domain \"missing\" not found\n"; r.stdout != want {
			t.Errorf("stdout %q, want %q", r.stdout, want)
		}
	})

	t.Run("json", func(t *testing.T) {
		r := runPublish(ctx, url, "-json", "-id", "fixed-1", "start", "web-1")
		r.want(t, exitOK)
		if want := string(resp.completion("fixed-1")) + "\n"; r.stdout != want {
			t.Errorf("stdout %q, want the raw completion %q", r.stdout, want)
		}
		if id := resp.lastGot().header.Get(bus.HeaderMsgID); id != "fixed-1" {
			t.Errorf("Nats-Msg-Id %q", id)
		}
	})

	t.Run("duplicate id", func(t *testing.T) {
		// The stream drops it, the worker never sees it, no completion comes.
		r := runPublish(ctx, url, "-id", "fixed-1", "-timeout", "300ms", "start", "web-1")
		r.want(t, exitTimeout)
		if !strings.Contains(r.stderr, "duplicate window") || !strings.Contains(r.stderr, "timed out") {
			t.Errorf("stderr %q", r.stderr)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		r := runPublish(ctx, url, "-timeout", "300ms", "stop", "silent")
		r.want(t, exitTimeout)
		if !strings.Contains(r.stderr, "timed out after 300ms") {
			t.Errorf("stderr %q", r.stderr)
		}
	})

	t.Run("interrupted", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		r := runPublish(ctx, url, "stop", "silent")
		r.want(t, exitFailed)
		if !strings.Contains(r.stderr, "interrupted") {
			t.Errorf("stderr %q", r.stderr)
		}
	})

	t.Run("no wait", func(t *testing.T) {
		r := runPublish(ctx, url, "-wait=false", "-id", "q-1", "reboot", "web-1")
		r.want(t, exitOK)
		if !regexp.MustCompile(`^q-1 stream=VIRTBUS_CMD seq=\d+\n$`).MatchString(r.stdout) {
			t.Errorf("stdout %q", r.stdout)
		}
		r = runPublish(ctx, url, "-wait=false", "-json", "-id", "q-2", "reboot", "web-1")
		r.want(t, exitOK)
		var ack struct {
			ID     string `json:"id"`
			Stream string `json:"stream"`
			Seq    uint64 `json:"seq"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &ack); err != nil || ack.ID != "q-2" || ack.Stream != "VIRTBUS_CMD" || ack.Seq == 0 {
			t.Errorf("stdout %q: %v", r.stdout, err)
		}
	})

	t.Run("load", func(t *testing.T) {
		r := runPublish(ctx, url, "-count", "9", "-vms", "web-1,web-2,missing", "-concurrency", "3", "stop", "mode=force")
		r.want(t, exitFailed)
		table := parseTable(r.stdout)
		for k, want := range map[string]string{"sent": "9/9", "ok": "6", "errors": "3 (not_found=3)", "timeouts": "0"} {
			if table[k] != want {
				t.Errorf("%s = %q, want %q\n%s", k, table[k], want, r.stdout)
			}
		}
		if !strings.Contains(table["latency"], "p99=") || !strings.HasSuffix(table["throughput"], "(completions)") {
			t.Errorf("table:\n%s", r.stdout)
		}
	})

	t.Run("load with timeouts, json", func(t *testing.T) {
		r := runPublish(ctx, url, "-json", "-count", "4", "-vms", "web-1,silent", "-timeout", "300ms", "start")
		r.want(t, exitTimeout)
		var s summary
		if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
			t.Fatalf("summary %q: %v", r.stdout, err)
		}
		if s.Sent != 4 || s.OK != 2 || s.Timeouts != 2 || s.Errors != 0 || s.Latency.Max <= 0 {
			t.Errorf("summary %+v", s)
		}
	})
}

func TestJetStreamWithoutStream(t *testing.T) {
	s := runServer(t, true)
	r := runPublish(t.Context(), s.ClientURL(), "-timeout", "5s", "stop", "web-1")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "NOT queued") || !strings.Contains(r.stderr, "VIRTBUS_CMD") {
		t.Errorf("stderr %q", r.stderr)
	}
	r = runPublish(t.Context(), s.ClientURL(), "-count", "5", "-vms", "a,b", "stop")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "NOT queued") || parseTable(r.stdout)["ok"] != "0" {
		t.Errorf("stdout %q\nstderr %q", r.stdout, r.stderr)
	}
}

func TestCore(t *testing.T) {
	s := runServer(t, false)
	url := s.ClientURL()
	resp := startCoreResponder(t, url)
	ctx := t.Context()

	r := runPublish(ctx, url, "-core", "-id", "c-1", "-json", "stop", "web-1", "mode=force")
	r.want(t, exitOK)
	if want := string(resp.completion("c-1")) + "\n"; r.stdout != want {
		t.Errorf("stdout %q, want %q", r.stdout, want)
	}
	if got := resp.lastGot(); got.header.Get(bus.HeaderMsgID) != "c-1" || string(got.data) != `{"mode":"force"}` {
		t.Errorf("got %+v", got)
	}

	runPublish(ctx, url, "-core", "stop", "missing").want(t, exitFailed)
	runPublish(ctx, url, "-core", "-timeout", "300ms", "stop", "silent").want(t, exitTimeout)

	r = runPublish(ctx, url, "-core", "-host", "hv9", "stop", "web-1")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "no worker is subscribed") {
		t.Errorf("stderr %q", r.stderr)
	}

	r = runPublish(ctx, url, "-core", "-count", "6", "-vms", "web-1,missing", "start")
	r.want(t, exitFailed)
	if table := parseTable(r.stdout); table["ok"] != "3" || table["errors"] != "3 (not_found=3)" {
		t.Errorf("table:\n%s", r.stdout)
	}
}

// With a stream on the subject, a core request's reply is the stream's
// PubAck: publish must say so rather than print an empty completion.
func TestCoreAgainstStream(t *testing.T) {
	s := runServer(t, true)
	startJetStreamResponder(t, s.ClientURL())
	r := runPublish(t.Context(), s.ClientURL(), "-core", "stop", "web-1")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "PubAck") {
		t.Errorf("stderr %q", r.stderr)
	}
}

// parseTable reads load mode's table into name -> the rest of the line.
func parseTable(out string) map[string]string {
	m := map[string]string{}
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		m[f[0]] = strings.Join(f[1:], " ")
	}
	return m
}

// commandMsg builds a command by hand, for tests that send what publish
// never sends, such as a reply subject of the worker's own.
func commandMsg(subject, id string, params json.RawMessage) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set(bus.HeaderMsgID, id)
	m.Data = params
	return m
}

// startBusWorker runs a real bus worker for hv1, whose handler answers ok
// and counts its calls: unlike the responders, it records each completion
// by id, as production does.
func startBusWorker(t *testing.T, url string) *atomic.Int64 {
	t.Helper()
	var calls atomic.Int64
	handler := func(context.Context, bus.Command) bus.Outcome {
		calls.Add(1)
		return bus.Outcome{State: "running"}
	}
	w, err := bus.New(bustest.Connect(t, url), bus.Config{Host: "hv1"}, handler, nil, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("worker: %v", err)
		}
	})
	for deadline := time.Now().Add(15 * time.Second); !w.Ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("worker not ready")
		}
	}
	return &calls
}

// TestLoadRepeatedID: a rerun of load mode with the same -id inside the
// stream's duplicate window has its commands dropped as duplicates. Each
// still ends with a completion, the first run's from the record, instead
// of waiting for one that never comes; the commands new to the rerun run.
func TestLoadRepeatedID(t *testing.T) {
	s := runServer(t, true)
	url := s.ClientURL()
	calls := startBusWorker(t, url)
	load := func(count string) summary {
		t.Helper()
		r := runPublish(t.Context(), url, "-json", "-id", "same", "-count", count, "-vms", "web-1,web-2", "-timeout", "10s", "status")
		r.want(t, exitOK)
		var s summary
		if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
			t.Fatalf("summary %q: %v", r.stdout, err)
		}
		return s
	}

	if s := load("5"); s.Sent != 5 || s.OK != 5 || s.Duplicates != 0 {
		t.Fatalf("first run: %+v", s)
	}
	s2 := load("8")
	if s2.Sent != 8 || s2.OK != 8 || s2.Duplicates != 5 || s2.Timeouts != 0 || s2.Errors != 0 {
		t.Errorf("rerun: %+v, want 8 ok of which 5 duplicates", s2)
	}
	if n := calls.Load(); n != 8 {
		t.Errorf("the handler ran %d times, want 8: a duplicate ran again", n)
	}

	// Single mode too: the duplicate's answer is the recorded completion.
	r := runPublish(t.Context(), url, "-json", "-id", "same-1", "-timeout", "10s", "status", "web-1")
	r.want(t, exitOK)
	var c bus.Completion
	if err := json.Unmarshal([]byte(r.stdout), &c); err != nil || c.ID != "same-1" || c.VM != "web-1" || c.Status != bus.StatusOK {
		t.Errorf("stdout %q: %v", r.stdout, err)
	}
	if !strings.Contains(r.stderr, "duplicate window") {
		t.Errorf("stderr %q", r.stderr)
	}
}
