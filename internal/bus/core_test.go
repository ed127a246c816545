package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

func TestCoreModeAnswersRequest(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	c := newCalls()
	startWorker(t, connect(t, s.ClientURL()), Config{Delivery: DeliveryCore, MaxDeliver: 2, RetryBackoff: time.Millisecond},
		func(_ context.Context, cmd Command) Outcome {
			c.add(cmd)
			if cmd.VM == "flaky" && cmd.Attempt == 1 {
				return Outcome{Err: &Error{Code: CodeUnavailable, Message: "libvirt down"}}
			}
			return Outcome{Changed: true, State: "running"}
		})
	events := collect(t, nc, EventPrefix+".>")

	tests := []struct {
		name        string
		vm          string
		body        string
		wantStatus  string
		wantCode    string
		wantAttempt int
	}{
		{name: "ok", vm: "web-1", body: `{}`, wantStatus: StatusOK, wantAttempt: 1},
		{name: "empty body", vm: "web-2", body: ``, wantStatus: StatusOK, wantAttempt: 1},
		{name: "invalid body", vm: "web-3", body: `[`, wantStatus: StatusError, wantCode: CodeInvalid, wantAttempt: 1},
		{name: "unavailable retried in place", vm: "flaky", body: ``, wantStatus: StatusOK, wantAttempt: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := nats.NewMsg(CommandSubject(testHost, tc.vm, "start"))
			m.Data = []byte(tc.body)
			m.Header.Set(HeaderMsgID, "core-"+tc.vm)
			resp, err := nc.RequestMsg(m, waitTimeout)
			if err != nil {
				t.Fatalf("request: %v", err)
			}
			var got Completion
			if err := json.Unmarshal(resp.Data, &got); err != nil {
				t.Fatalf("reply %s: %v", resp.Data, err)
			}
			if got.ID != "core-"+tc.vm || got.VM != tc.vm || got.Host != testHost || got.Action != "start" ||
				got.Status != tc.wantStatus || got.Attempt != tc.wantAttempt {
				t.Errorf("reply %+v", got)
			}
			if tc.wantCode != "" && (got.Error == nil || got.Error.Code != tc.wantCode) {
				t.Errorf("error %+v, want code %s", got.Error, tc.wantCode)
			}
			if ev := events.WaitID(t, got.ID); ev.Status != got.Status {
				t.Errorf("event %+v differs from reply %+v", ev, got)
			}
		})
	}
}

// coreRequests sends one request per id without waiting and returns the
// replies as they come.
func coreRequests(t *testing.T, nc *nats.Conn, ids []string) <-chan Completion {
	t.Helper()
	out := make(chan Completion, len(ids))
	for i, cmdID := range ids {
		go func() {
			m := nats.NewMsg(CommandSubject(testHost, fmt.Sprintf("vm-%d", i%2), "start"))
			m.Header.Set(HeaderMsgID, cmdID)
			resp, err := nc.RequestMsg(m, waitTimeout)
			var c Completion
			if err == nil {
				err = json.Unmarshal(resp.Data, &c)
			}
			if err != nil {
				c = Completion{ID: cmdID, Status: "request failed: " + err.Error()}
			}
			out <- c
		}()
	}
	return out
}

func TestCoreModeBackPressure(t *testing.T) {
	t.Parallel()
	const total = 8
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	release := make(chan struct{})
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{Delivery: DeliveryCore, QueueSize: 2},
		func(_ context.Context, cmd Command) Outcome {
			c.add(cmd)
			<-release
			return Outcome{State: "running"}
		})
	var ids []string
	for i := range total {
		ids = append(ids, id("bp", i))
	}
	replies := coreRequests(t, nc, ids)
	// The FIFO is full and the subscription waits; nothing is dropped.
	waitFor(t, "the FIFO to fill", func() bool { return w.q.Len() == 2 && c.total() == 1 })
	close(release)
	for range total {
		if got := <-replies; got.Status != StatusOK {
			t.Errorf("reply %+v, want ok", got)
		}
	}
	if n := c.total(); n != total {
		t.Errorf("handler ran %d times, want %d", n, total)
	}
}

func TestCoreModeShutdownAnswersQueued(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	release := make(chan struct{})
	c := newCalls()
	w := startWorker(t, connect(t, s.ClientURL()), Config{Delivery: DeliveryCore, QueueSize: 4},
		func(_ context.Context, cmd Command) Outcome {
			c.add(cmd)
			<-release
			return Outcome{State: "running"}
		})
	replies := coreRequests(t, nc, []string{"s-0", "s-1", "s-2"})
	waitFor(t, "all three held", func() bool { return w.q.Len() == 3 && c.total() == 1 })

	stopped := make(chan error, 1)
	go func() { stopped <- w.stop(t) }()
	waitFor(t, "the queue to close", func() bool { return w.q.Free() == 0 })
	close(release)
	if err := <-stopped; err != nil {
		t.Fatalf("Run = %v", err)
	}
	statuses := map[string]int{}
	for range 3 {
		got := <-replies
		code := ""
		if got.Error != nil {
			code = got.Error.Code
		}
		statuses[got.Status+"/"+code]++
	}
	// The running one finishes; the queued ones are told to try again.
	if statuses["ok/"] != 1 || statuses["error/"+CodeUnavailable] != 2 {
		t.Errorf("replies %v, want 1 ok and 2 unavailable", statuses)
	}
	if n := c.total(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}
