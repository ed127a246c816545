package main

import (
	"fmt"
	"reflect"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// backlogStep is one command of a VM's backlog and the state it leaves.
type backlogStep struct{ action, body, state string }

// cycle is start, status, stop force, status, over and over: each status
// proves that the command before it ran, and ran before it.
var cycle = []backlogStep{
	{"start", "", "running"},
	{"status", "", "running"},
	{"stop", `{"mode":"force"}`, "shutoff"},
	{"status", "", "shutoff"},
}

// backlog is commands published while a worker may not be running.
type backlog struct {
	ids   []string
	steps map[string]backlogStep // by id
	byVM  map[string][]string    // ids in publish order
	last  map[string]string      // vm -> state its last command leaves
}

// publishBacklog publishes n commands per VM, round-robin over the VMs,
// VM i starting at step i of the cycle so the VMs end in different states.
func publishBacklog(t *testing.T, url, host, reply, prefix string, doms []libvirt.Domain, n int) backlog {
	t.Helper()
	js := bustest.JetStream(t, bustest.Connect(t, url))
	b := backlog{steps: map[string]backlogStep{}, byVM: map[string][]string{}, last: map[string]string{}}
	for k := range n {
		for i, d := range doms {
			s := cycle[(i+k)%len(cycle)]
			id := fmt.Sprintf("%s-%d-%02d", prefix, i, k)
			command(t, js, host, d.Name, s.action, id, s.body, reply)
			b.ids = append(b.ids, id)
			b.steps[id] = s
			b.byVM[d.Name] = append(b.byVM[d.Name], id)
			b.last[d.Name] = s.state
		}
	}
	return b
}

// check asserts that every command of the backlog completed ok, that no
// command was answered twice with different completions, that each VM's
// status commands saw the state the command before them left (so each VM's
// commands ran in order), and that libvirt agrees with each VM's last
// command.
func (b backlog) check(t *testing.T, lv *testbed.Live, doms []libvirt.Domain, got []received, initial string) {
	t.Helper()
	first := map[string]received{}
	for _, r := range got {
		f, seen := first[r.ID]
		if !seen {
			first[r.ID] = r
			continue
		}
		if !reflect.DeepEqual(f.raw, r.raw) {
			t.Errorf("%s answered twice, differently:\n%v\n%v", r.ID, f.raw, r.raw)
		}
	}
	for _, d := range doms {
		prev := initial
		for _, id := range b.byVM[d.Name] {
			r, s := first[id], b.steps[id]
			if r.Status != bus.StatusOK {
				t.Errorf("%s (%s %s): status %q error %+v, want ok", id, s.action, d.Name, r.Status, r.Error)
			}
			if r.VM != d.Name || r.Action != s.action {
				t.Errorf("%s: completion for %s %s, want %s %s", id, r.Action, r.VM, s.action, d.Name)
			}
			if s.action == "status" && r.State != prev {
				t.Errorf("%s: status of %s says %q, want %q, what the command before it left", id, d.Name, r.State, prev)
			}
			prev = s.state
		}
		want := libvirt.DomainShutoff
		if b.last[d.Name] == "running" {
			want = libvirt.DomainRunning
		}
		wantState(t, lv, d, want)
	}
}

// createStream starts the worker once and stops it with SIGTERM: the
// stream exists from then on (a worker creates it when it is missing),
// and a graceful stop exits 0.
func createStream(t *testing.T, e env) {
	t.Helper()
	p := startProcess(t, e)
	waitReady(t, e["VIRTBUS_METRICS_ADDR"], p.exited)
	if err := p.signal(t, syscall.SIGTERM); err != nil {
		t.Fatalf("worker after SIGTERM: %v, want exit 0\n%s", err, p.output)
	}
}

// TestBacklogPublishedWhileNoWorkerRuns: commands published while no worker
// runs wait in the stream and all complete, in order, once one starts.
func TestBacklogPublishedWhileNoWorkerRuns(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	doms := []libvirt.Domain{
		lv.Domain("backlog", testbed.DomainOptions{}),
		lv.Domain("backlog", testbed.DomainOptions{}),
	}
	e := workerEnv(t, url, host)
	createStream(t, e)

	nc := bustest.Connect(t, url)
	inbox := nc.NewInbox()
	replies := collect(t, nc, inbox)
	b := publishBacklog(t, url, host, inbox, "idle", doms, 6)
	if n := bustest.StreamMsgs(t, bustest.JetStream(t, nc), bus.StreamName); n != uint64(len(b.ids)) {
		t.Fatalf("stream holds %d commands, want the %d published", n, len(b.ids))
	}
	if got := replies.Snapshot(); len(got) != 0 {
		t.Fatalf("completions before any worker ran: %v", got)
	}

	p := startProcess(t, e.with("VIRTBUS_CONCURRENCY", "2"))
	got := replies.WaitIDs(t, waitTimeout, b.ids...)
	b.check(t, lv, doms, got, "shutoff")
	bustest.WaitStreamEmpty(t, bustest.JetStream(t, nc), waitTimeout, bus.StreamName)
	if err := p.signal(t, syscall.SIGTERM); err != nil {
		t.Errorf("worker after SIGTERM: %v, want exit 0", err)
	}
	wantBucketAgrees(t, url, host, lv, doms...)
}

// TestSIGKILLMidBacklog: a worker killed with SIGKILL in the middle of a
// backlog, and started again, completes every command: the ones it had
// answered are not run again with another outcome, the ones it held come
// back first (not after their ack wait, behind later ones), and each VM
// ends in the state its last command asked for.
func TestSIGKILLMidBacklog(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	var doms []libvirt.Domain
	for range 3 {
		doms = append(doms, lv.Domain("kill", testbed.DomainOptions{}))
	}
	// The backlog is deeper than the FIFO, so the killed worker held some
	// commands while later ones still waited in the stream: the restarted
	// worker must run the held ones first to keep each VM's order.
	e := workerEnv(t, url, host).with("VIRTBUS_QUEUE_SIZE", "4")
	createStream(t, e)

	nc := bustest.Connect(t, url)
	inbox := nc.NewInbox()
	replies := collect(t, nc, inbox)
	b := publishBacklog(t, url, host, inbox, "kill", doms, 10)

	p := startProcess(t, e)
	before := replies.WaitFor(t, waitTimeout, "the first completions", func(got []received) bool {
		return len(distinctIDs(got)) >= len(b.ids)/5
	})
	if err := p.signal(t, syscall.SIGKILL); err == nil {
		t.Fatal("worker exited 0 after SIGKILL")
	}
	done := len(distinctIDs(replies.Snapshot()))
	if done == len(b.ids) {
		t.Fatalf("all %d commands completed before the kill; the test proves nothing", done)
	}
	t.Logf("killed the worker after %d of %d completions (%d seen when the kill was sent)", done, len(b.ids), len(distinctIDs(before)))

	start := time.Now()
	startProcess(t, e.with("VIRTBUS_CONCURRENCY", "3"))
	got := replies.WaitIDs(t, 2*waitTimeout, b.ids...)
	t.Logf("the restarted worker completed the rest in %s", time.Since(start).Round(time.Millisecond))
	b.check(t, lv, doms, got, "shutoff")
	redelivered := 0
	for _, r := range got {
		if r.Attempt > 1 {
			redelivered++
		}
	}
	t.Logf("%d completions of redelivered commands, %d completions for %d commands", redelivered, len(got), len(b.ids))
	if redelivered == 0 {
		t.Error("no completion has attempt > 1, yet the killed worker held commands it never answered")
	}
	bustest.WaitStreamEmpty(t, bustest.JetStream(t, nc), waitTimeout, bus.StreamName)
	wantBucketAgrees(t, url, host, lv, doms...)
}

// TestGracefulShutdownFinishesRunningCommand: when run's context ends
// while a long stop runs, run returns nil only after the stop completed;
// the command queued behind it is handed back to the stream, not run or
// lost, and the next worker answers it.
func TestGracefulShutdownFinishesRunningCommand(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	dom := lv.Domain("graceful", testbed.DomainOptions{Running: true})
	e := workerEnv(t, url, host)
	w := startWorker(t, e)

	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	inbox := nc.NewInbox()
	replies := collect(t, nc, inbox)
	// The guest ignores ACPI: the stop waits its whole timeout, then
	// destroys.
	command(t, js, host, dom.Name, "stop", "long-stop", `{"timeout":"4s"}`, inbox)
	command(t, js, host, dom.Name, "status", "behind-stop", "", inbox)

	// Wait until the stop runs, by the worker's own gauge.
	metrics := "http://" + e["VIRTBUS_METRICS_ADDR"] + "/metrics"
	deadline := time.Now().Add(waitTimeout)
	for {
		_, page := httpDo(t, "GET", metrics, nil, "")
		inFlight, _ := metric(page, "virtbus_in_flight")
		depth, _ := metric(page, "virtbus_queue_depth")
		if inFlight == 1 && depth == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stop did not start: in flight %v, queue depth %v", inFlight, depth)
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := w.stop(t); err != nil {
		t.Fatalf("run after its context ended: %v, want nil", err)
	}
	// run has returned: the stop's completion is out, and nothing else.
	r := replies.WaitID(t, "long-stop")
	wantOK(t, r.Completion, true, "shutoff")
	if r.Detail["forced"] != true {
		t.Errorf("stop detail %v, want forced=true", r.Detail)
	}
	wantState(t, lv, dom, libvirt.DomainShutoff)
	for _, r := range replies.Snapshot() {
		if r.ID == "behind-stop" {
			t.Errorf("the command queued behind the stop was answered by a worker shutting down: %+v", r.Completion)
		}
	}
	// The stop's ack went out before run returned; the server removes the
	// message a moment after it reads the ack.
	bustest.Eventually(t, 5*time.Second, "the stream to hold only the handed-back command", func() bool {
		return bustest.StreamMsgs(t, js, bus.StreamName) == 1
	})

	// The next worker answers the handed-back command.
	startWorker(t, e)
	r = replies.WaitID(t, "behind-stop")
	wantOK(t, r.Completion, false, "shutoff")
	bustest.WaitStreamEmpty(t, js, waitTimeout, bus.StreamName)
}
