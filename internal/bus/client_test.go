package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus"
)

// The client is tested from outside the package, as its callers use it,
// against a real server and a real bus.Worker whose handler only counts.

// clientWait bounds every wait that should succeed; it only turns a hang
// into a readable failure.
const clientWait = 20 * time.Second

func clientServer(t *testing.T) string {
	t.Helper()
	s, err := bus.RunEmbedded(t.TempDir(), "127.0.0.1", -1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s.ClientURL()
}

func clientConn(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.Name(t.Name()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// seen keeps the commands the handler ran, by id.
type seen struct {
	mu   sync.Mutex
	byID map[string][]bus.Command
}

func (s *seen) of(id string) []bus.Command {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byID[id]
}

// clientWorker runs a bus.Worker for hv1 with delivery mode delivery. Its
// handler answers ok, except for VM "missing" (not_found) and VM "slow",
// which it holds until the test ends.
func clientWorker(t *testing.T, url, delivery string) *seen {
	t.Helper()
	s := &seen{byID: map[string][]bus.Command{}}
	release := make(chan struct{})
	handler := func(_ context.Context, cmd bus.Command) bus.Outcome {
		s.mu.Lock()
		s.byID[cmd.ID] = append(s.byID[cmd.ID], cmd)
		s.mu.Unlock()
		switch cmd.VM {
		case "missing":
			return bus.Outcome{Err: &bus.Error{Code: bus.CodeNotFound, Message: "no such domain"}}
		case "slow":
			<-release
		}
		return bus.Outcome{Changed: true, State: "running"}
	}
	w, err := bus.New(clientConn(t, url), bus.Config{Host: "hv1", Delivery: delivery}, handler, nil, prometheus.NewRegistry())
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
	// Registered after the worker's cleanup, so it runs first: the worker
	// finishes the commands it runs before it stops.
	t.Cleanup(func() { close(release) })
	for deadline := time.Now().Add(clientWait); !w.Ready(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("worker not ready")
		}
	}
	return s
}

func newClient(t *testing.T, nc *nats.Conn, host string, opts ...bus.ClientOption) *bus.Client {
	t.Helper()
	c, err := bus.NewClient(nc, host, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), clientWait)
	t.Cleanup(cancel)
	return ctx
}

// wantDone checks that res is cmd's completion with status and that Raw
// is that completion.
func wantDone(t *testing.T, res *bus.Result, err error, id, vm, status string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	c := res.Completion
	if c == nil || c.ID != id || c.VM != vm || c.Host != "hv1" || c.Status != status {
		t.Fatalf("%s: completion %+v, want id %s vm %s status %s", id, c, id, vm, status)
	}
	var raw bus.Completion
	if err := json.Unmarshal(res.Raw, &raw); err != nil || raw.ID != id || raw.Status != status {
		t.Errorf("%s: raw %s: %v", id, res.Raw, err)
	}
}

// TestClientJetStream: Do sends with the headers of the contract and
// returns the completion from the reply inbox; a repeated id is dropped
// by the stream and answered from the record, without running again.
func TestClientJetStream(t *testing.T) {
	t.Parallel()
	url := clientServer(t)
	s := clientWorker(t, url, bus.DeliveryJetStream)
	client := newClient(t, clientConn(t, url), "hv1")
	ctx := waitCtx(t)

	expires := time.Now().Add(10 * time.Minute).Truncate(time.Second)
	res, err := client.Do(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "c-1", Params: json.RawMessage(`{"mode":"x"}`), Expires: expires})
	wantDone(t, res, err, "c-1", "web-1", bus.StatusOK)
	if res.FromRecord || res.Ack == nil || res.Ack.Duplicate || res.Ack.Stream != bus.StreamName {
		t.Errorf("first send: from record %t, ack %+v", res.FromRecord, res.Ack)
	}
	cmd := s.of("c-1")[0]
	if !strings.HasPrefix(cmd.Reply, "_INBOX.") || !cmd.Expires.Equal(expires) || string(cmd.Params) != `{"mode":"x"}` {
		t.Errorf("the worker got reply %q, expires %s, params %s", cmd.Reply, cmd.Expires, cmd.Params)
	}

	again, err := client.Do(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "c-1"})
	wantDone(t, again, err, "c-1", "web-1", bus.StatusOK)
	if !again.FromRecord || !again.Ack.Duplicate || !again.Completion.StartedAt.Equal(res.Completion.StartedAt) {
		t.Errorf("repeat: from record %t, ack %+v, started %s, want the first completion's %s",
			again.FromRecord, again.Ack, again.Completion.StartedAt, res.Completion.StartedAt)
	}
	if n := len(s.of("c-1")); n != 1 {
		t.Errorf("c-1 ran %d times", n)
	}

	// An id reused for another command gets the conflict the worker gives.
	reused, err := client.Do(ctx, bus.Cmd{VM: "web-2", Action: "stop", ID: "c-1"})
	wantDone(t, reused, err, "c-1", "web-2", bus.StatusError)
	if reused.Completion.Error == nil || reused.Completion.Error.Code != bus.CodeConflict {
		t.Errorf("reused id: %+v, want conflict", reused.Completion.Error)
	}

	res, err = client.Do(ctx, bus.Cmd{VM: "missing", Action: "status"})
	if err != nil || res.Completion.ID == "" || res.Completion.Error == nil || res.Completion.Error.Code != bus.CodeNotFound {
		t.Errorf("without id: %+v, %v; want a fresh id and not_found", res, err)
	}
}

// TestClientConcurrent: many commands in flight on the one reply inbox,
// some sharing an id (the stream drops all but one of those), each end
// with their own completion.
func TestClientConcurrent(t *testing.T) {
	t.Parallel()
	url := clientServer(t)
	s := clientWorker(t, url, bus.DeliveryJetStream)
	client := newClient(t, clientConn(t, url), "hv1")
	ctx := waitCtx(t)

	const n = 40
	var wg sync.WaitGroup
	results := make([]*bus.Result, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			id := fmt.Sprintf("k-%d", i)
			if i%4 == 0 {
				id = "shared"
			}
			results[i], errs[i] = client.Do(ctx, bus.Cmd{VM: fmt.Sprintf("vm-%d", i%5), Action: "status", ID: id})
		})
	}
	wg.Wait()
	var dups int
	for i := range n {
		if errs[i] != nil {
			t.Errorf("command %d: %v", i, errs[i])
			continue
		}
		if results[i].Ack.Duplicate {
			dups++
		}
		if want := fmt.Sprintf("k-%d", i); i%4 != 0 && results[i].Completion.ID != want {
			t.Errorf("command %d got the completion of %s", i, results[i].Completion.ID)
		}
	}
	if dups != n/4-1 || len(s.of("shared")) != 1 {
		t.Errorf("%d duplicates and %d runs of the shared id, want %d and 1", dups, len(s.of("shared")), n/4-1)
	}
}

// TestClientEvents: with ReplyOnEvents the command names no reply subject
// and its completion comes from the event subject, past those of other
// commands for the same VM and action.
func TestClientEvents(t *testing.T) {
	t.Parallel()
	url := clientServer(t)
	s := clientWorker(t, url, bus.DeliveryJetStream)
	nc := clientConn(t, url)
	client := newClient(t, nc, "hv1", bus.ReplyOnEvents())
	ctx := waitCtx(t)

	p, err := client.Start(ctx, bus.Cmd{VM: "web-1", Action: "status", ID: "e-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Another command's completion on the same event subject comes first.
	other, _ := json.Marshal(bus.Completion{ID: "someone-else", Host: "hv1", VM: "web-1", Action: "status", Status: bus.StatusOK})
	if err := nc.Publish(bus.EventSubject("hv1", "web-1", "status"), other); err != nil {
		t.Fatal(err)
	}
	res, err := p.Wait(ctx)
	wantDone(t, res, err, "e-1", "web-1", bus.StatusOK)
	if reply := s.of("e-1")[0].Reply; reply != "" {
		t.Errorf("the command named reply subject %q", reply)
	}

	res, err = client.Do(ctx, bus.Cmd{VM: "web-1", Action: "status", ID: "e-1"})
	wantDone(t, res, err, "e-1", "web-1", bus.StatusOK)
	if !res.FromRecord {
		t.Error("the repeat was not answered from the record")
	}
}

// TestClientSend: Send returns the PubAck and waits for nothing.
func TestClientSend(t *testing.T) {
	t.Parallel()
	url := clientServer(t)
	s := clientWorker(t, url, bus.DeliveryJetStream)
	client := newClient(t, clientConn(t, url), "hv1")
	ctx := waitCtx(t)

	ack, err := client.Send(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "s-1"})
	if err != nil || ack == nil || ack.Sequence == 0 || ack.Duplicate {
		t.Fatalf("send: %+v, %v", ack, err)
	}
	ack, err = client.Send(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "s-1"})
	if err != nil || !ack.Duplicate {
		t.Errorf("repeat: %+v, %v; want a duplicate", ack, err)
	}
	for deadline := time.Now().Add(clientWait); len(s.of("s-1")) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("s-1 never ran")
		}
	}
	if reply := s.of("s-1")[0].Reply; reply != "" {
		t.Errorf("a command nobody waits for named reply subject %q", reply)
	}
}

// TestClientErrors: what callers branch on.
func TestClientErrors(t *testing.T) {
	t.Parallel()

	t.Run("no stream", func(t *testing.T) {
		t.Parallel()
		client := newClient(t, clientConn(t, clientServer(t)), "hv1")
		_, err := client.Send(waitCtx(t), bus.Cmd{VM: "web-1", Action: "start"})
		if !errors.Is(err, bus.ErrNoStream) {
			t.Errorf("send: %v, want ErrNoStream", err)
		}
		_, err = client.Do(waitCtx(t), bus.Cmd{VM: "web-1", Action: "start"})
		if !errors.Is(err, bus.ErrNoStream) || errors.Is(err, bus.ErrTimeout) {
			t.Errorf("do: %v, want ErrNoStream", err)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		t.Parallel()
		url := clientServer(t)
		clientWorker(t, url, bus.DeliveryJetStream)
		client := newClient(t, clientConn(t, url), "hv1")
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		_, err := client.Do(ctx, bus.Cmd{VM: "slow", Action: "stop", ID: "t-1"})
		if !errors.Is(err, bus.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, bus.ErrPublish) {
			t.Errorf("%v, want ErrTimeout and DeadlineExceeded", err)
		}
	})

	t.Run("publish", func(t *testing.T) {
		t.Parallel()
		nc := clientConn(t, clientServer(t))
		client := newClient(t, nc, "hv1", bus.Core(true))
		nc.Close()
		_, err := client.Send(waitCtx(t), bus.Cmd{VM: "web-1", Action: "start"})
		if !errors.Is(err, bus.ErrPublish) || !errors.Is(err, nats.ErrConnectionClosed) {
			t.Errorf("%v, want ErrPublish", err)
		}
	})

	// A stream with no worker: no record bucket either. The duplicate's
	// record is out of reach, a notice says so, and the wait goes on on
	// the reply inbox until the context ends.
	t.Run("duplicate without records", func(t *testing.T) {
		t.Parallel()
		nc := clientConn(t, clientServer(t))
		createStream(t, nc)
		var notices []error
		client := newClient(t, nc, "hv1", bus.OnNotice(func(err error) { notices = append(notices, err) }))
		if _, err := client.Send(waitCtx(t), bus.Cmd{VM: "web-1", Action: "start", ID: "d-1"}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		defer cancel()
		p, err := client.Start(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "d-1"})
		if err != nil || !p.Duplicate() || p.ID() != "d-1" {
			t.Fatalf("start: %v, want a duplicate", err)
		}
		defer p.Close()
		if _, err := p.Wait(ctx); !errors.Is(err, bus.ErrTimeout) {
			t.Errorf("wait: %v, want ErrTimeout", err)
		}
		if len(notices) != 1 || !strings.Contains(notices[0].Error(), "out of reach") {
			t.Errorf("notices %v, want one about the records", notices)
		}
	})
}

func createStream(t *testing.T, nc *nats.Conn) {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{
		Name: bus.StreamName, Subjects: []string{bus.CommandPrefix + ".>"}, Storage: jetstream.MemoryStorage, Duplicates: time.Minute,
	}); err != nil {
		t.Fatal(err)
	}
}

// TestClientCore: core mode is a request with the message's own reply
// subject (or, with ReplyOnEvents, a publish and the event subject).
func TestClientCore(t *testing.T) {
	t.Parallel()
	url := clientServer(t)
	s := clientWorker(t, url, bus.DeliveryCore)
	nc := clientConn(t, url)
	ctx := waitCtx(t)

	client := newClient(t, nc, "hv1", bus.Core(true))
	res, err := client.Do(ctx, bus.Cmd{VM: "web-1", Action: "stop", ID: "core-1"})
	wantDone(t, res, err, "core-1", "web-1", bus.StatusOK)
	if res.Ack != nil || !strings.HasPrefix(s.of("core-1")[0].Reply, "_INBOX.") {
		t.Errorf("ack %+v, reply %q", res.Ack, s.of("core-1")[0].Reply)
	}
	res, err = client.Do(ctx, bus.Cmd{VM: "missing", Action: "status", ID: "core-2"})
	wantDone(t, res, err, "core-2", "missing", bus.StatusError)

	events := newClient(t, nc, "hv1", bus.Core(true), bus.ReplyOnEvents())
	res, err = events.Do(ctx, bus.Cmd{VM: "web-1", Action: "start", ID: "core-3"})
	wantDone(t, res, err, "core-3", "web-1", bus.StatusOK)
	if reply := s.of("core-3")[0].Reply; reply != "" {
		t.Errorf("reply %q", reply)
	}

	if ack, err := client.Send(ctx, bus.Cmd{VM: "web-1", Action: "status", ID: "core-4"}); ack != nil || err != nil {
		t.Errorf("send: %+v, %v", ack, err)
	}

	nobody := newClient(t, nc, "hv9", bus.Core(true))
	if _, err := nobody.Do(ctx, bus.Cmd{VM: "web-1", Action: "stop"}); !errors.Is(err, bus.ErrNoWorker) {
		t.Errorf("no worker: %v, want ErrNoWorker", err)
	}
}

// TestClientCoreAgainstStream: a stream on the subject answers a core
// request with its PubAck, which is no completion.
func TestClientCoreAgainstStream(t *testing.T) {
	t.Parallel()
	nc := clientConn(t, clientServer(t))
	createStream(t, nc)
	client := newClient(t, nc, "hv1", bus.Core(true))
	_, err := client.Do(waitCtx(t), bus.Cmd{VM: "web-1", Action: "stop"})
	if !errors.Is(err, bus.ErrBadReply) || !strings.Contains(err.Error(), "PubAck") {
		t.Errorf("%v, want ErrBadReply naming the PubAck", err)
	}
}
