//go:build cluster

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
	"github.com/virtbus/virtbus/internal/vm"
)

// clusterWait bounds the waits of the cluster test: JetStream elects new
// leaders for every replicated stream and consumer after a node loss, and a
// worker that lost a pull to a dead node waits out the consumer's ack wait
// (30 s) before it fetches again.
const clusterWait = 3 * time.Minute

// clusterPhases are the rounds of commands (see runFaults), each fault
// landing while a round is being sent and run. clusterPerPhase is each
// VM's commands in one round; clusterPace is the pause between two
// commands of one VM, so that a round takes a moment to send.
const (
	clusterPhases   = 6
	clusterPerPhase = 3
	clusterPace     = 100 * time.Millisecond
)

// clusterVM is one domain of the cluster test and the commands sent to it.
type clusterVM struct {
	host string
	name string
	qemu *libvirt.Domain // nil for a test-driver domain
	cmds []clusterCmd    // in publish order
}

// clusterCmd is one command and the state libvirt should report after it.
type clusterCmd struct {
	id, action, body, state string
}

// clusterMoves are the commands a VM may get in each state, each with the
// state it leaves: all of them succeed, so every completion is ok.
var clusterMoves = map[string][]struct{ action, body, next string }{
	"shutoff": {{"start", "", "running"}, {"status", "", "shutoff"}},
	"running": {{"pause", "", "paused"}, {"stop", `{"mode":"force"}`, "shutoff"}, {"status", "", "running"}, {"start", "", "running"}},
	"paused":  {{"resume", "", "running"}, {"stop", `{"mode":"force"}`, "shutoff"}, {"status", "", "paused"}},
}

// plan gives v its n commands: a walk through the states that differs from
// VM to VM (seed), so the VMs end in different states.
func (v *clusterVM) plan(seed, n int) {
	state := "shutoff"
	for k := range n {
		moves := clusterMoves[state]
		m := moves[(seed+k*k+2*k)%len(moves)]
		v.cmds = append(v.cmds, clusterCmd{id: fmt.Sprintf("%s-%d", v.name, k), action: m.action, body: m.body, state: m.next})
		state = m.next
	}
}

// TestCluster (build tag cluster, `make cluster`) runs three hosts'
// workers on a three-node NATS cluster, the
// command stream and the buckets with three replicas, each worker given a
// node of its own first in VIRTBUS_NATS_URL (nats.go shuffles the list, so
// it may connect to another). Commands keep flowing while a node is
// lost with its store and comes back empty, and while the node a worker is
// connected to is down. Every command completes once, from its own host's
// worker, in publish order per VM, and libvirt ends as the last commands
// say.
func TestCluster(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	drv, err := testdriver.Open(testbed.Socket())
	if err != nil {
		testbed.Unavailable(t, err.Error())
	}
	t.Cleanup(func() {
		if err := drv.Close(); err != nil {
			t.Error(err)
		}
	})
	cl := bustest.RunCluster(t, 3)
	hosts := []string{hostID(), hostID(), hostID()}
	vms := clusterVMs(t, lv, drv, hosts)
	// One collector per node, subscribed before anything runs: the one on
	// a node that is never shut down sees every completion as published.
	evts := make([]*bustest.Collector[clusterEvent], cl.Len())
	for i := range evts {
		evts[i] = collectEvents(t, bustest.Connect(t, cl.URL(i)))
	}
	workers := make([]*inProcess, len(hosts))
	for i, host := range hosts {
		// At info, a failure shows every command's line in the worker's log.
		e := workerEnv(t, cl.URLs(i), host).with("VIRTBUS_STREAM_REPLICAS", "3", "VIRTBUS_LOG_LEVEL", "info")
		if i > 0 {
			e = e.with("VIRTBUS_LIBVIRT_URI", testdriver.URI)
		}
		workers[i] = startWorker(t, e)
	}
	nc := bustest.Connect(t, cl.URLs(0), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	js := bustest.JetStream(t, nc)
	streams := wantReplicated(t, js, 3)
	for i, host := range hosts {
		t.Logf("worker %s listed node %s first, connected to node %s", host, cl.Name(i), cl.Name(workerNode(t, cl, host)))
	}

	start := time.Now()
	p := newClusterPublisher(t, js, vms)
	survivor := runFaults(t, cl, hosts, streams, p, func(phase int) { waitPhase(t, evts, vms, phase) })
	p.wait(t)
	t.Logf("published %d commands in %s: %d needed more than one try, %d PubAcks said duplicate",
		p.sent, time.Since(start).Round(time.Millisecond), p.retried, p.duplicates)

	got := waitAllCompletions(t, evts[survivor], vms)
	t.Logf("every command completed %s after the first publish; completions collected on node %s, never shut down",
		time.Since(start).Round(time.Millisecond), cl.Name(survivor))
	bustest.WaitStreamEmpty(t, js, clusterWait, bus.StreamName,
		bus.ConsumerName(hosts[0]), bus.ConsumerName(hosts[1]), bus.ConsumerName(hosts[2]))
	checkCompletions(t, got, vms, testDriverReset(t, drv))
	checkWorkersRanOnlyTheirOwn(t, workers, hosts, vms)
	checkFinalStates(t, lv, drv, vms)
}

// clusterVMs makes each host's domains and plans their commands: a QEMU
// domain for the first host, test-driver domains for the others.
func clusterVMs(t *testing.T, lv *testbed.Live, drv *testdriver.Driver, hosts []string) []*clusterVM {
	t.Helper()
	dom := lv.Domain("cluster", testbed.DomainOptions{})
	vms := []*clusterVM{{host: hosts[0], name: dom.Name, qemu: &dom}}
	for _, host := range hosts[1:] {
		for range 3 {
			name := testbed.Name("cluster")
			if err := drv.Define(name); err != nil {
				t.Fatal(err)
			}
			vms = append(vms, &clusterVM{host: host, name: name})
		}
	}
	for i, v := range vms {
		v.plan(i, clusterPhases*clusterPerPhase)
	}
	return vms
}

// wantReplicated checks that the worker made the command stream and the
// buckets with replicas replicas, and returns their stream names.
func wantReplicated(t *testing.T, js jetstream.JetStream, replicas int) []string {
	t.Helper()
	streams := []string{bus.StreamName, "KV_" + bus.RecordBucket, "KV_" + bus.StateBucket, "KV_" + bus.LeaseBucket}
	for _, name := range streams {
		var cfg jetstream.StreamConfig
		bustest.Eventually(t, clusterWait, "stream "+name, func() bool {
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			s, err := js.Stream(ctx, name)
			if err == nil {
				cfg = s.CachedInfo().Config
			}
			return err == nil
		})
		if cfg.Replicas != replicas {
			t.Errorf("stream %s has %d replicas, want %d", name, cfg.Replicas, replicas)
		}
	}
	return streams
}

// workerNode is the node host's worker is connected to, once it is.
func workerNode(t *testing.T, cl *bustest.Cluster, host string) int {
	t.Helper()
	node := -1
	bustest.Eventually(t, clusterWait, "worker "+host+" connected", func() bool {
		node = cl.NodeOf("virtbus-worker-" + host)
		return node >= 0
	})
	return node
}

// waitPhase waits until every command of phase has a completion on one
// collector or another; a collector whose node is down misses some.
func waitPhase(t *testing.T, evts []*bustest.Collector[clusterEvent], vms []*clusterVM, phase int) {
	t.Helper()
	bustest.Eventually(t, clusterWait, fmt.Sprintf("the completions of phase %d", phase), func() bool {
		seen := map[string]bool{}
		for _, c := range evts {
			for _, e := range c.Snapshot() {
				seen[e.ID] = true
			}
		}
		for _, v := range vms {
			for _, c := range v.cmds[phase*clusterPerPhase : (phase+1)*clusterPerPhase] {
				if !seen[c.id] {
					return false
				}
			}
		}
		return true
	})
}

// runFaults releases the phases of commands around the faults and
// returns a node that was never shut down:
//
//	0  before any fault; halfway through it, the node leading the command
//	   stream is shut down and its store removed
//	1  sent and completed while that node is down
//	2  sent as it comes back, empty, on the same ports; halfway through,
//	   it must have caught up with every stream
//	3  halfway through, the node a worker is connected to (another one)
//	   is shut down, leaving the quorum to the node that came back empty
//	4  sent and completed while that node is down
//	5  sent as it comes back on its store
func runFaults(t *testing.T, cl *bustest.Cluster, hosts, streams []string, p *clusterPublisher, completed func(phase int)) int {
	t.Helper()
	step := func(what string, f func()) {
		t.Helper()
		at := time.Now()
		f()
		t.Logf("%s (%s)", what, time.Since(at).Round(time.Millisecond))
	}
	p.release(0)
	p.waitHalf(t, 0)
	lost := cl.StreamLeader(t, bus.StreamName)
	step("fault: node "+cl.Name(lost)+", leader of "+bus.StreamName+", shut down, its store removed",
		func() { cl.Stop(lost); cl.Wipe(lost) })
	p.release(1)
	step("phase 1 sent and completed with node "+cl.Name(lost)+" down", func() { completed(1) })
	step("fault: node "+cl.Name(lost)+" started again, empty, on the same ports", func() { cl.Start(lost) })
	p.release(2)
	p.waitHalf(t, 2)
	step("node "+cl.Name(lost)+" caught up: current in JetStream and every stream", func() { cl.WaitCurrent(t, streams...) })
	p.release(3)
	p.waitHalf(t, 3)
	// The node of some worker, another than the one lost where there is
	// one.
	target, whose := -1, ""
	for _, host := range hosts {
		if n := workerNode(t, cl, host); target < 0 || target == lost {
			target, whose = n, host
		}
	}
	step(fmt.Sprintf("fault: node %s, worker %s's, shut down", cl.Name(target), whose), func() { cl.Stop(target) })
	p.release(4)
	step("phase 4 sent and completed with node "+cl.Name(target)+" down", func() { completed(4) })
	step("fault: node "+cl.Name(target)+" started again on its store", func() { cl.Start(target) })
	p.release(5)
	p.wait(t)
	step("every node current in JetStream and every stream", func() { cl.WaitCurrent(t, streams...) })
	for i := range cl.Len() {
		if i != lost && i != target {
			return i
		}
	}
	t.Fatal("no node stayed up")
	return -1
}

// clusterPublisher sends commands the way a careful producer does on a
// cluster: a PubAck that does not come is asked for again with the same
// Nats-Msg-Id, which the stream's duplicate window makes safe. One
// goroutine per VM sends that VM's commands one after the other, each once
// the last one's PubAck came and its phase is released.
type clusterPublisher struct {
	js    jetstream.JetStream
	gates []chan struct{} // closed when the phase may be sent
	done  chan struct{}
	errs  chan error // one per VM at most, so cap is the number of VMs

	mu                        sync.Mutex
	sent, retried, duplicates int
	sentOf                    []int // by phase
}

func newClusterPublisher(t *testing.T, js jetstream.JetStream, vms []*clusterVM) *clusterPublisher {
	p := &clusterPublisher{js: js, done: make(chan struct{}), errs: make(chan error, len(vms)), sentOf: make([]int, clusterPhases)}
	for range clusterPhases {
		p.gates = append(p.gates, make(chan struct{}))
	}
	ctx := t.Context()
	var wg sync.WaitGroup
	for _, v := range vms {
		wg.Go(func() {
			if err := p.sendAll(ctx, v); err != nil {
				p.errs <- err
			}
		})
	}
	go func() { wg.Wait(); close(p.done) }()
	return p
}

func (p *clusterPublisher) sendAll(ctx context.Context, v *clusterVM) error {
	for k, c := range v.cmds {
		phase := k / clusterPerPhase
		select {
		case <-p.gates[phase]:
		case <-ctx.Done():
			return ctx.Err()
		}
		if err := p.send(ctx, v.host, v.name, c); err != nil {
			return err
		}
		p.mu.Lock()
		p.sentOf[phase]++
		p.mu.Unlock()
		time.Sleep(clusterPace)
	}
	return nil
}

// release lets phase's commands go.
func (p *clusterPublisher) release(phase int) { close(p.gates[phase]) }

// waitHalf waits until half of phase's commands have their PubAck.
func (p *clusterPublisher) waitHalf(t *testing.T, phase int) {
	t.Helper()
	half := (cap(p.errs)*clusterPerPhase + 1) / 2
	bustest.Eventually(t, clusterWait, fmt.Sprintf("half of phase %d sent", phase), func() bool {
		p.fail(t)
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.sentOf[phase] >= half
	})
}

// wait waits until every command has its PubAck.
func (p *clusterPublisher) wait(t *testing.T) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(clusterWait):
		t.Fatalf("commands not all sent after %s", clusterWait)
	}
	p.fail(t)
}

// fail ends the test when a producer gave up.
func (p *clusterPublisher) fail(t *testing.T) {
	t.Helper()
	select {
	case err := <-p.errs:
		t.Fatal(err)
	default:
	}
}

func (p *clusterPublisher) send(ctx context.Context, host, name string, c clusterCmd) error {
	deadline := time.Now().Add(clusterWait)
	for try := 1; ; try++ {
		msg := nats.NewMsg(bus.CommandSubject(host, name, c.action))
		msg.Header.Set(bus.HeaderMsgID, c.id)
		msg.Data = []byte(c.body)
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := p.js.PublishMsg(actx, msg)
		cancel()
		if err == nil {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.sent++
			if try > 1 {
				p.retried++
			}
			if ack.Duplicate {
				p.duplicates++
			}
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("publish %s %s (id %s), %d tries: %w", c.action, name, c.id, try, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// clusterEvent is a completion and the subject it came on.
type clusterEvent struct {
	bus.Completion
	subject string
}

func (e clusterEvent) String() string { return e.ID + "@" + e.subject + "=" + e.Status }

// collectEvents gathers every completion on virtbus.evt.> that nc's node
// routes to it.
func collectEvents(t *testing.T, nc *nats.Conn) *bustest.Collector[clusterEvent] {
	t.Helper()
	return bustest.Collect(t, nc, "virtbus.evt.>", clusterWait, func(m *nats.Msg) (clusterEvent, string, error) {
		e := clusterEvent{subject: m.Subject}
		if err := json.Unmarshal(m.Data, &e.Completion); err != nil {
			return e, "", err
		}
		if e.ID == "" {
			return e, "", errors.New("completion without an id")
		}
		return e, e.ID, nil
	})
}

// waitAllCompletions waits for a completion of every command, then for
// what was published before the wait ended.
func waitAllCompletions(t *testing.T, c *bustest.Collector[clusterEvent], vms []*clusterVM) []clusterEvent {
	t.Helper()
	var ids []string
	for _, v := range vms {
		for _, cmd := range v.cmds {
			ids = append(ids, cmd.id)
		}
	}
	c.WaitIDs(t, clusterWait, ids...)
	return c.Settled(t)
}

// testDriverReset says whether libvirtd lost the test driver's domains
// during the test (another package's test may restart it): then their
// states and the errors of commands that met the reset are not the
// commands' doing.
func testDriverReset(t *testing.T, drv *testdriver.Driver) bool {
	t.Helper()
	resets, errs := drv.History()
	for _, r := range resets {
		t.Logf("libvirtd restarted under the test: test driver lost %d domains at %s", r.Missing, r.Lost.Format(time.RFC3339Nano))
	}
	for _, e := range errs {
		t.Errorf("test driver: %s", e)
	}
	return len(resets) > 0
}

// checkCompletions: one completion per command (or identical copies), from
// its own host, on its own host's subject, each VM's first ones in publish
// order, each ok and reporting
// the state the VM's commands so far lead to.
func checkCompletions(t *testing.T, got []clusterEvent, vms []*clusterVM, driverReset bool) {
	t.Helper()
	byID := map[string][]clusterEvent{}
	byVM := map[string][]string{}
	attempts := map[string][]string{} // by VM: the ids' numbers and attempts, for a failure message
	for _, e := range got {
		if len(byID[e.ID]) == 0 {
			// The order is that of each command's first completion: a
			// copy (sent again after a broken connection, or answered
			// from the record on a redelivery) may come later.
			byVM[e.VM] = append(byVM[e.VM], e.ID)
		}
		byID[e.ID] = append(byID[e.ID], e)
		attempts[e.VM] = append(attempts[e.VM], fmt.Sprintf("%s(attempt %d)", strings.TrimPrefix(e.ID, e.VM+"-"), e.Attempt))
	}
	var sent []string
	for _, v := range vms {
		var want []string
		for _, c := range v.cmds {
			want = append(want, c.id)
			checkOne(t, v, c, byID[c.id], driverReset)
		}
		if !slices.Equal(byVM[v.name], want) {
			t.Errorf("completions of %s (host %s) came in the order %v, want the publish order 0 to %d", v.name, v.host, attempts[v.name], len(want)-1)
		}
		sent = append(sent, want...)
	}
	for id, es := range byID {
		if !slices.Contains(sent, id) {
			t.Errorf("completion of a command never sent: %v", es)
		}
	}
	t.Logf("completions: %d for %d commands on %d VMs of %d hosts", len(got), len(sent), len(vms), 3)
}

// checkOne checks the completions of one command: one, or copies of one
// (the same completion sent again), never two different ones.
func checkOne(t *testing.T, v *clusterVM, c clusterCmd, es []clusterEvent, driverReset bool) {
	t.Helper()
	if len(es) == 0 {
		t.Errorf("command %s (%s %s) has no completion", c.id, c.action, v.name)
		return
	}
	e := es[0]
	for _, dup := range es[1:] {
		if !reflect.DeepEqual(dup.Completion, e.Completion) || dup.subject != e.subject {
			t.Errorf("command %s (%s %s) has different completions: %+v and %+v", c.id, c.action, v.name, e.Completion, dup.Completion)
		}
	}
	if len(es) > 1 {
		t.Logf("command %s (%s %s): %d copies of its completion", c.id, c.action, v.name, len(es))
	}
	if e.Host != v.host || e.subject != bus.EventSubject(v.host, v.name, c.action) {
		t.Errorf("command %s for host %s completed by host %q on %s", c.id, v.host, e.Host, e.subject)
	}
	if v.qemu == nil && driverReset {
		return
	}
	if e.Status != bus.StatusOK || e.State != c.state {
		t.Errorf("command %s (%s %s): status %s error %+v state %q, want ok and %s", c.id, c.action, v.name, e.Status, e.Error, e.State, c.state)
	}
}

// checkWorkersRanOnlyTheirOwn: each worker ran exactly its own host's
// commands, once each (a command answered from its record is not run and
// not counted). Any other host's command that reached a worker would add
// to its count.
func checkWorkersRanOnlyTheirOwn(t *testing.T, workers []*inProcess, hosts []string, vms []*clusterVM) {
	t.Helper()
	for i, w := range workers {
		want := 0
		for _, v := range vms {
			if v.host == hosts[i] {
				want += len(v.cmds)
			}
		}
		_, page := httpDo(t, "GET", "http://"+w.env["VIRTBUS_METRICS_ADDR"]+"/metrics", nil, "")
		ran := 0.0
		for _, line := range strings.Split(page, "\n") {
			if strings.HasPrefix(line, "virtbus_commands_completed_total{") {
				var v float64
				if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
					ran += v
				}
			}
		}
		redelivered, _ := metric(page, "virtbus_redeliveries_total")
		fromRecord, _ := metric(page, "virtbus_duplicates_suppressed_total")
		reconnects, _ := metric(page, `virtbus_reconnects_total{target="nats"}`)
		t.Logf("worker %s: ran %v commands (want %d), %v redeliveries, %v answered from the record, %v NATS reconnects",
			hosts[i], ran, want, redelivered, fromRecord, reconnects)
		if ran != float64(want) {
			t.Errorf("worker %s ran %v commands, want its host's %d", hosts[i], ran, want)
		}
		for _, line := range strings.Split(w.stderr.String(), "\n") {
			if strings.Contains(line, "does not hold") {
				t.Logf("worker %s: %s", hosts[i], line)
			}
		}
	}
}

// checkFinalStates: libvirt's state of each domain is what its last
// command left.
func checkFinalStates(t *testing.T, lv *testbed.Live, drv *testdriver.Driver, vms []*clusterVM) {
	t.Helper()
	reset := false
	if resets, _ := drv.History(); len(resets) > 0 {
		reset = true
	}
	for _, v := range vms {
		want := v.cmds[len(v.cmds)-1].state
		var st libvirt.DomainState
		if v.qemu != nil {
			st = lv.State(*v.qemu)
		} else {
			if reset {
				continue
			}
			var err error
			if st, err = drv.State(v.name); err != nil {
				t.Errorf("state of %s: %v", v.name, err)
				continue
			}
		}
		if got := vm.StateName(st); got != want {
			t.Errorf("libvirt says %s is %s, want %s (its last command: %s)", v.name, got, want, v.cmds[len(v.cmds)-1].action)
		}
	}
}
