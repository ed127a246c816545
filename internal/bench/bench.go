package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
	"github.com/virtbus/virtbus/internal/workerproc"
)

// Bench is one benchmark run: the NATS server, the worker binary, the
// domains every row works on, and the baselines' own connections.
type Bench struct {
	t       testing.TB
	S       Sizes
	dir     string // the worker binary, the workers' state and logs, the NATS store
	natsURL string
	nc      *nats.Conn
	js      jetstream.JetStream
	bin     string
	build   string    // the commit the worker was built from, "+dirty" with uncommitted changes
	started time.Time // when the run began
	td      *testdriver.Driver
	names   []string         // the test-driver domains
	tdConn  *libvirt.Libvirt // the baselines' connection to the test driver
	lv      *testbed.Live
	qemu    *libvirt.Domain  // the one real QEMU domain, running, while the QEMU rows run
	qemuCon *libvirt.Libvirt // the baseline's connection to QEMU
	hosts   int              // host ids handed out so far
}

// New sets up everything a run needs and registers its removal.
func New(t testing.TB, s Sizes) *Bench {
	t.Helper()
	b := &Bench{t: t, S: s, dir: t.TempDir(), started: time.Now()}
	b.lv = testbed.Require(t)
	b.startNATS()
	bin, err := workerproc.Build(b.dir)
	if err != nil {
		t.Fatal(err)
	}
	b.bin = bin
	b.build = revision()
	b.makeDomains()
	return b
}

func (b *Bench) startNATS() {
	srv, err := bus.RunEmbedded(filepath.Join(b.dir, "nats"), "127.0.0.1", -1)
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	b.natsURL = srv.ClientURL()
	if b.nc, err = nats.Connect(b.natsURL, nats.Name("virtbus-bench")); err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(b.nc.Close)
	// The backlog rows publish asynchronously: this many PubAcks
	// outstanding at most.
	if b.js, err = jetstream.New(b.nc, jetstream.WithPublishAsyncMaxPending(1024)); err != nil {
		b.t.Fatal(err)
	}
}

// makeDomains defines the test-driver domains (shut off) under names of
// this run's own. The test driver's holder keeps it alive, with the
// domains, from here to the end.
func (b *Bench) makeDomains() {
	td, err := testdriver.Open(testbed.Socket())
	if err != nil {
		testbed.Unavailable(b.t, err.Error())
	}
	b.td = td
	b.t.Cleanup(func() {
		if err := td.Close(); err != nil {
			b.t.Error(err)
		}
	})
	for i := range testDomains {
		name := fmt.Sprintf("virtbus-bench-%d-%d", os.Getpid(), i)
		if err := td.Define(name); err != nil {
			b.t.Fatal(err)
		}
		b.names = append(b.names, name)
	}
	if b.tdConn, err = testdriver.Dial(testbed.Socket()); err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { _ = b.tdConn.Disconnect() })
}

// withQEMU runs fn while a QEMU domain of the run's own is running. A
// running TCG guest without an OS keeps a whole core busy, so it lives
// only for the rows that need it: on a 2-core machine it would otherwise
// take half of it from every other row.
func (b *Bench) withQEMU(fn func() error) error {
	dom := b.lv.Domain("bench", testbed.DomainOptions{Running: true})
	b.qemu, b.qemuCon = &dom, b.lv.Conn()
	defer func() {
		b.lv.Remove(dom)
		b.qemu = nil
	}()
	return fn()
}

// host is a new host id: each row's worker answers a host of its own, so
// its consumer starts empty and its completions are its own.
func (b *Bench) host(what string) string {
	b.hosts++
	return fmt.Sprintf("bench-%d-%d-%s", os.Getpid(), b.hosts, what)
}

// expectStates checks, before a row, that its domains are as the rows
// leave them: the test driver's shut off, the QEMU domain running.
func (b *Bench) expectStates() error {
	for _, name := range b.names {
		st, err := b.td.State(name)
		if err != nil {
			return err
		}
		if st != libvirt.DomainShutoff {
			return fmt.Errorf("test-driver domain %s is in state %d, not shut off", name, st)
		}
	}
	if b.qemu == nil {
		return nil
	}
	st, _, err := b.qemuCon.DomainGetState(*b.qemu, 0)
	if err != nil {
		return fmt.Errorf("state of %s: %w", b.qemu.Name, err)
	}
	if libvirt.DomainState(st) != libvirt.DomainRunning {
		return fmt.Errorf("QEMU domain %s is in state %d, not running", b.qemu.Name, st)
	}
	return nil
}
