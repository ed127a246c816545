package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/fleet"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
	"github.com/virtbus/virtbus/internal/vm"
)

// clusterWait bounds the waits of the cluster test: JetStream elects new
// leaders for every replicated stream and consumer after a node loss, and a
// worker that lost a pull to a dead node and cannot reset its consumer
// waits out the ack wait (30 s) before it fetches again.
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

// TestCluster (in `make test`; alone: `make cluster`) runs three hosts'
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
	qemu, vms := clusterVMs(t, lv, drv, hosts)
	// One collector per node, subscribed before anything runs: the one on
	// a node that is never shut down sees every completion as published.
	evts := make([]*bustest.Collector[fleet.Event], cl.Len())
	for i := range evts {
		evts[i] = fleet.Collect(t, bustest.Connect(t, cl.URL(i)), clusterWait)
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
	p := fleet.Publish(t, vms, fleet.PublishOptions{
		Producers: []jetstream.JetStream{js}, Phases: clusterPhases, Pace: clusterPace, GiveUp: clusterWait})
	survivor := runFaults(t, cl, hosts, streams, p, func(phase int) { waitPhase(t, evts, vms, phase) })
	p.Wait(t)
	sent, retried, duplicates := p.Counts()
	t.Logf("published %d commands in %s: %d needed more than one try, %d PubAcks said duplicate",
		sent, time.Since(start).Round(time.Millisecond), retried, duplicates)

	got := fleet.WaitAll(t, evts[survivor], clusterWait, vms)
	t.Logf("every command completed %s after the first publish; completions collected on node %s, never shut down",
		time.Since(start).Round(time.Millisecond), cl.Name(survivor))
	bustest.WaitStreamEmpty(t, js, clusterWait, bus.StreamName,
		bus.ConsumerName(hosts[0]), bus.ConsumerName(hosts[1]), bus.ConsumerName(hosts[2]))
	reset := testDriverReset(t, drv)
	copied := fleet.Check(t, got, vms, func(v *fleet.VM) bool { return reset && v.Name != qemu.Name })
	t.Logf("completions: %d for %d commands on %d VMs of %d hosts; %d commands' completions came more than once (identical copies)",
		len(got), len(fleet.IDs(vms)), len(vms), len(hosts), copied)
	checkWorkersRanOnlyTheirOwn(t, workers, hosts, vms)
	checkFinalStates(t, lv, drv, qemu, vms)
}

// clusterVMs makes each host's domains and plans their commands: a QEMU
// domain for the first host, test-driver domains for the others.
func clusterVMs(t *testing.T, lv *testbed.Live, drv *testdriver.Driver, hosts []string) (libvirt.Domain, []*fleet.VM) {
	t.Helper()
	dom := lv.Domain("cluster", testbed.DomainOptions{})
	vms := []*fleet.VM{{Host: hosts[0], Name: dom.Name}}
	for _, host := range hosts[1:] {
		for range 3 {
			name := testbed.Name("cluster")
			if err := drv.Define(name); err != nil {
				t.Fatal(err)
			}
			vms = append(vms, &fleet.VM{Host: host, Name: name})
		}
	}
	for i, v := range vms {
		v.Plan(i, clusterPhases*clusterPerPhase)
	}
	return dom, vms
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
func waitPhase(t *testing.T, evts []*bustest.Collector[fleet.Event], vms []*fleet.VM, phase int) {
	t.Helper()
	bustest.Eventually(t, clusterWait, fmt.Sprintf("the completions of phase %d", phase), func() bool {
		seen := map[string]bool{}
		for _, c := range evts {
			for _, e := range c.Snapshot() {
				seen[e.ID] = true
			}
		}
		for _, v := range vms {
			for _, c := range v.Cmds[phase*clusterPerPhase : (phase+1)*clusterPerPhase] {
				if !seen[c.ID] {
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
func runFaults(t *testing.T, cl *bustest.Cluster, hosts, streams []string, p *fleet.Publisher, completed func(phase int)) int {
	t.Helper()
	step := func(what string, f func()) {
		t.Helper()
		at := time.Now()
		f()
		t.Logf("%s (%s)", what, time.Since(at).Round(time.Millisecond))
	}
	p.Release(0)
	p.WaitHalf(t, 0)
	lost := cl.StreamLeader(t, bus.StreamName)
	step("fault: node "+cl.Name(lost)+", leader of "+bus.StreamName+", shut down, its store removed",
		func() { cl.Stop(lost); cl.Wipe(lost) })
	p.Release(1)
	step("phase 1 sent and completed with node "+cl.Name(lost)+" down", func() { completed(1) })
	step("fault: node "+cl.Name(lost)+" started again, empty, on the same ports", func() { cl.Start(lost) })
	p.Release(2)
	p.WaitHalf(t, 2)
	step("node "+cl.Name(lost)+" caught up: current in JetStream and every stream", func() { cl.WaitCurrent(t, streams...) })
	p.Release(3)
	p.WaitHalf(t, 3)
	// The node of some worker, another than the one lost where there is
	// one.
	target, whose := -1, ""
	for _, host := range hosts {
		if n := workerNode(t, cl, host); target < 0 || target == lost {
			target, whose = n, host
		}
	}
	step(fmt.Sprintf("fault: node %s, worker %s's, shut down", cl.Name(target), whose), func() { cl.Stop(target) })
	p.Release(4)
	step("phase 4 sent and completed with node "+cl.Name(target)+" down", func() { completed(4) })
	step("fault: node "+cl.Name(target)+" started again on its store", func() { cl.Start(target) })
	p.Release(5)
	p.Wait(t)
	step("every node current in JetStream and every stream", func() { cl.WaitCurrent(t, streams...) })
	for i := range cl.Len() {
		if i != lost && i != target {
			return i
		}
	}
	t.Fatal("no node stayed up")
	return -1
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

// checkWorkersRanOnlyTheirOwn: each worker ran exactly its own host's
// commands, once each (a command answered from its record is not run and
// not counted). Any other host's command that reached a worker would add
// to its count.
func checkWorkersRanOnlyTheirOwn(t *testing.T, workers []*inProcess, hosts []string, vms []*fleet.VM) {
	t.Helper()
	for i, w := range workers {
		want := 0
		for _, v := range vms {
			if v.Host == hosts[i] {
				want += len(v.Cmds)
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
func checkFinalStates(t *testing.T, lv *testbed.Live, drv *testdriver.Driver, qemu libvirt.Domain, vms []*fleet.VM) {
	t.Helper()
	resets, _ := drv.History()
	for _, v := range vms {
		last := v.Cmds[len(v.Cmds)-1]
		var st libvirt.DomainState
		if v.Name == qemu.Name {
			st = lv.State(qemu)
		} else {
			if len(resets) > 0 {
				continue
			}
			var err error
			if st, err = drv.State(v.Name); err != nil {
				t.Errorf("state of %s: %v", v.Name, err)
				continue
			}
		}
		if got := vm.StateName(st); got != last.State {
			t.Errorf("libvirt says %s is %s, want %s (its last command: %s)", v.Name, got, last.State, last.Action)
		}
	}
}
