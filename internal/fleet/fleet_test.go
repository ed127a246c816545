//go:build fleet

package fleet

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
	"github.com/virtbus/virtbus/internal/workerproc"
)

// fleetWait bounds every wait of the simulation: a worker whose pull died
// with the restarted node and cannot reset its consumer waits out the ack
// wait (30 s) before the lost commands come back, and 50 workers share two
// cores.
const fleetWait = 5 * time.Minute

// settings size a run; VIRTBUS_FLEET_* override each.
type settings struct {
	Hosts     int           // worker processes, one per simulated host
	VMs       int           // test-driver domains per host
	Commands  int           // per VM
	Producers int           // NATS connections the commands go out on
	Pace      time.Duration // pause after each command of one VM
	Down      time.Duration // how long the restarted node stays down
}

func loadSettings(t *testing.T) settings {
	t.Helper()
	s := settings{Hosts: 50, VMs: 3, Commands: 40, Producers: 10, Pace: 250 * time.Millisecond, Down: 5 * time.Second}
	for name, n := range map[string]*int{"HOSTS": &s.Hosts, "VMS": &s.VMs, "COMMANDS": &s.Commands, "PRODUCERS": &s.Producers} {
		if raw := os.Getenv("VIRTBUS_FLEET_" + name); raw != "" {
			v, err := strconv.Atoi(raw)
			if err != nil || v < 1 {
				t.Fatalf("VIRTBUS_FLEET_%s=%q: want a positive whole number", name, raw)
			}
			*n = v
		}
	}
	for name, d := range map[string]*time.Duration{"PACE": &s.Pace, "DOWN": &s.Down} {
		if raw := os.Getenv("VIRTBUS_FLEET_" + name); raw != "" {
			v, err := time.ParseDuration(raw)
			if err != nil || v < 0 {
				t.Fatalf("VIRTBUS_FLEET_%s=%q: want a duration", name, raw)
			}
			*d = v
		}
	}
	return s
}

// TestFleet (build tag fleet, `make fleet`) simulates a fleet: Hosts
// worker processes, each a host of its own with VMs test-driver domains
// that only it sees, on a three-node NATS cluster with the command stream
// and the buckets replicated three times. Producers on every node send a
// mix of start, forced stop, pause, resume and status; halfway through,
// the node leading the command stream is restarted. It prints throughput
// and latency per host and overall (VIRTBUS_FLEET_REPORT names a file that
// gets the table too) and fails when a command is lost, completed twice
// differently, completed out of order, run by another host or run twice.
func TestFleet(t *testing.T) {
	s := loadSettings(t)
	testbed.Require(t)
	bin, err := workerproc.Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cl := bustest.RunCluster(t, 3)
	vms := fleetVMs(t, s)
	// Collected on every node: those on a node never restarted are
	// complete.
	var evts []*bustest.Collector[Event]
	var conns []*nats.Conn
	for i := range cl.Len() {
		evts = append(evts, Collect(t, bustest.Connect(t, cl.URL(i)), fleetWait))
		conns = append(conns, bustest.Connect(t, cl.URL(i)))
	}
	arrived := stampArrivals(t, conns...)
	workers := startWorkers(t, bin, cl, vms)
	var producers []jetstream.JetStream
	for i := range s.Producers {
		nc := bustest.Connect(t, cl.URLs(i%cl.Len()), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
		producers = append(producers, bustest.JetStream(t, nc))
	}

	r := &report{settings: s, began: time.Now()}
	p := Publish(t, vms, PublishOptions{Producers: producers, Phases: 1, Pace: s.Pace, GiveUp: fleetWait})
	p.Release(0)
	p.WaitHalf(t, 0)
	// The worst node to lose: the one leading the command stream, so that
	// publishing stops too until another is elected.
	target := cl.StreamLeader(t, bus.StreamName)
	r.node, r.restart = cl.Name(target), restartNode(t, cl, target, s.Down)
	p.Wait(t)
	got := WaitAll(t, evts[(target+1)%cl.Len()], fleetWait, vms)
	bustest.WaitStreamEmpty(t, producers[0], fleetWait, bus.StreamName, consumers(vms)...)

	r.sent, r.retried, r.duplicates = p.Counts()
	r.latencies(vms, p, arrived)
	r.readWorkers(t, workers, vms)
	r.copied = Check(t, got, vms, func(v *VM) bool { return r.libvirtLost[v.Host] })
	stopWorkers(t, workers)
	var out bytes.Buffer
	r.write(&out)
	fmt.Print("\n", out.String())
	if path := os.Getenv("VIRTBUS_FLEET_REPORT"); path != "" {
		if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// fleetVMs names the hosts and their domains, writes each host's test
// driver node file and plans every VM's commands.
func fleetVMs(t *testing.T, s settings) []*VM {
	t.Helper()
	run := testbed.Name("fleet")
	var vms []*VM
	for h := range s.Hosts {
		host := fmt.Sprintf("%s-h%02d", run, h+1)
		for d := range s.VMs {
			v := &VM{Host: host, Name: fmt.Sprintf("%s-vm%d", host, d+1)}
			v.Plan(h*s.VMs+d, s.Commands)
			vms = append(vms, v)
		}
	}
	return vms
}

// stampArrivals notes when each command's first completion reached one
// of conns.
func stampArrivals(t *testing.T, conns ...*nats.Conn) func(id string) (time.Time, bool) {
	t.Helper()
	var mu sync.Mutex
	first := map[string]time.Time{}
	stamp := func(m *nats.Msg) {
		at := time.Now()
		var c struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(m.Data, &c) != nil {
			return // Collect reports it
		}
		mu.Lock()
		defer mu.Unlock()
		if f, ok := first[c.ID]; !ok || at.Before(f) {
			first[c.ID] = at
		}
	}
	for _, nc := range conns {
		if _, err := nc.Subscribe("virtbus.evt.>", stamp); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	return func(id string) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		at, ok := first[id]
		return at, ok
	}
}

// consumers are the hosts' durable consumer names.
func consumers(vms []*VM) []string {
	var out []string
	for _, v := range vms {
		if name := bus.ConsumerName(v.Host); len(out) == 0 || out[len(out)-1] != name {
			out = append(out, name)
		}
	}
	return out
}

// restartNode shuts node i down, keeps it down for down, starts it again
// on its store and waits until it has caught up; it returns how long the
// whole took.
func restartNode(t *testing.T, cl *bustest.Cluster, i int, down time.Duration) time.Duration {
	t.Helper()
	at := time.Now()
	cl.Stop(i)
	time.Sleep(down)
	cl.Start(i)
	cl.WaitCurrent(t, bus.StreamName, "KV_"+bus.RecordBucket, "KV_"+bus.StateBucket, "KV_"+bus.LeaseBucket)
	return time.Since(at)
}

// startWorkers starts one worker process per host, each on its own test
// driver node file and with a different node first in its list, and waits
// until every one is ready.
func startWorkers(t *testing.T, bin string, cl *bustest.Cluster, vms []*VM) []*workerproc.Proc {
	t.Helper()
	dir := t.TempDir()
	names := map[string][]string{}
	var hosts []string
	for _, v := range vms {
		if names[v.Host] == nil {
			hosts = append(hosts, v.Host)
		}
		names[v.Host] = append(names[v.Host], v.Name)
	}
	var workers []*workerproc.Proc
	for i, host := range hosts {
		uri, err := testdriver.HostURI(filepath.Join(dir, host+".xml"), names[host])
		if err != nil {
			t.Fatal(err)
		}
		w, err := workerproc.Start(bin, filepath.Join(dir, host+".log"), map[string]string{
			"VIRTBUS_HOST":            host,
			"VIRTBUS_NATS_URL":        cl.URLs(i % cl.Len()),
			"VIRTBUS_STREAM_REPLICAS": "3",
			"VIRTBUS_LIBVIRT_SOCKET":  testbed.Socket(),
			"VIRTBUS_LIBVIRT_URI":     uri,
			"VIRTBUS_DISK_ROOTS":      testbed.ImageRoot(),
			"VIRTBUS_STATE_DIR":       filepath.Join(dir, host),
			"VIRTBUS_API_ADDR":        "off",
			"VIRTBUS_METRICS_ADDR":    bustest.FreeAddr(t),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(w.Kill)
		workers = append(workers, w)
	}
	for _, w := range workers {
		if err := w.Ready(fleetWait); err != nil {
			t.Fatalf("%v\n%s", err, w.Logs())
		}
	}
	return workers
}

// stopWorkers stops every worker with SIGTERM, at once, and fails on any
// that does not exit cleanly.
func stopWorkers(t *testing.T, workers []*workerproc.Proc) {
	t.Helper()
	errs := make([]error, len(workers))
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Go(func() { errs[i] = w.Stop(time.Minute) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("%v\n%s", err, workers[i].Logs())
		}
	}
}
