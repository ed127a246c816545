package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
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

// Harness is one chaos run: the NATS server, the two workers, the
// domains they drive, the collector and the faults injected so far.
type Harness struct {
	t      testing.TB
	S      Settings
	rng    *rand.Rand
	dir    string // the worker binary, its logs and the NATS store
	nats   *natsServer
	nc     *nats.Conn // the collector's and the checks' own connection
	js     jetstream.JetStream
	col    *collector
	lv     *testbed.Live
	td     *testdriver.Driver
	VMs    []*VM
	doms   map[string]libvirt.Domain // the QEMU domains, by name
	work   []*worker
	reply  string // prefix of the producers' reply subjects
	build  string // the commit the worker was built from
	faults []*fault
}

// NewHarness sets up everything a run needs and registers its removal:
// libvirtd must be the test bed's own, since the run restarts and freezes
// it.
func NewHarness(t testing.TB, s Settings) *Harness {
	t.Helper()
	h := &Harness{t: t, S: s, rng: rand.New(rand.NewPCG(uint64(s.Seed), 0x636861)), doms: map[string]libvirt.Domain{}}
	h.lv = testbed.Require(t)
	testbed.OwnLibvirtd(t)
	dir, err := os.MkdirTemp("", "virtbus-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	h.dir = dir
	// The workers' logs are printed when the test fails, before this runs.
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	h.startNATS()
	h.makeVMs()
	h.startWorkers()
	return h
}

func (h *Harness) startNATS() {
	n, err := startNATS(filepath.Join(h.dir, "nats"))
	if err != nil {
		h.t.Fatal(err)
	}
	h.nats = n
	h.t.Cleanup(n.shutdown)
	h.nc, err = nats.Connect(n.URL(), nats.Name("virtbus-chaos-collector"), nats.MaxReconnects(-1),
		nats.ReconnectWait(10*time.Millisecond), nats.ReconnectJitter(0, 0))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(h.nc.Close)
	if h.js, err = jetstream.New(h.nc); err != nil {
		h.t.Fatal(err)
	}
	h.reply = "virtbus.reply." + testbed.Name("chaos")
	if h.col, err = collect(h.nc, h.reply+".>"); err != nil {
		h.t.Fatal(err)
	}
}

// makeVMs defines the QEMU domains (with one disk image each, in a
// directory of the run's own that is the QEMU worker's only disk root)
// and the test driver's domains, all under unique names.
func (h *Harness) makeVMs() {
	qemuHost, testHost := testbed.Name("chaos-q"), testbed.Name("chaos-t")
	images := testbed.Dir(h.t)
	for range h.S.QEMUVMs {
		dom := h.lv.Domain("chaos", testbed.DomainOptions{})
		v := &VM{Name: dom.Name, Kind: KindQEMU, Host: qemuHost, Image: filepath.Join(images, dom.Name+".img")}
		if err := sparseImage(v.Image, 16<<20); err != nil {
			h.t.Fatal(err)
		}
		h.VMs = append(h.VMs, v)
		h.doms[v.Name] = dom
	}
	td, err := testdriver.Open(testbed.Socket())
	if err != nil {
		testbed.Unavailable(h.t, err.Error())
	}
	h.td = td
	h.t.Cleanup(func() {
		if err := td.Close(); err != nil {
			h.t.Error(err)
		}
	})
	for range h.S.TestVMs {
		v := &VM{Name: testbed.Name("chaos-td"), Kind: KindTest, Host: testHost}
		if err := td.Define(v.Name); err != nil {
			h.t.Fatal(err)
		}
		h.VMs = append(h.VMs, v)
	}
}

func sparseImage(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("create disk image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return fmt.Errorf("size disk image: %w", err)
	}
	return f.Close()
}

// startWorkers builds the worker and starts one per driver, and waits
// until both are ready (the stream exists then).
func (h *Harness) startWorkers() {
	bin, err := workerproc.Build(h.dir)
	if err != nil {
		h.t.Fatal(err)
	}
	h.build = revision()
	uris := map[Kind]string{KindQEMU: "qemu:///system", KindTest: testdriver.URI}
	for _, k := range []Kind{KindQEMU, KindTest} {
		w := newWorker(k, h.hostOf(k), bin, h.dir, h.workerEnv(k, uris[k]))
		if _, err := w.start(); err != nil {
			h.t.Fatal(err)
		}
		h.t.Cleanup(func() {
			if err := w.stop(30 * time.Second); err != nil {
				h.t.Errorf("%s worker at the end: %v", k, err)
			}
			if h.t.Failed() {
				fmt.Print(w.logs())
			}
		})
		h.work = append(h.work, w)
	}
	for _, w := range h.work {
		if _, err := w.waitReady(time.Minute); err != nil {
			h.t.Fatalf("%v\n%s", err, w.logs())
		}
	}
}

func (h *Harness) hostOf(k Kind) string {
	for _, v := range h.VMs {
		if v.Kind == k {
			return v.Host
		}
	}
	return testbed.Name("chaos-" + string(k))
}

func (h *Harness) workerEnv(k Kind, uri string) map[string]string {
	return map[string]string{
		"VIRTBUS_NATS_URL":        h.nats.URL(),
		"VIRTBUS_HOST":            h.hostOf(k),
		"VIRTBUS_LIBVIRT_URI":     uri,
		"VIRTBUS_LIBVIRT_SOCKET":  testbed.Socket(),
		"VIRTBUS_LIBVIRT_TIMEOUT": h.S.LibvirtTimeout.String(),
		"VIRTBUS_CONCURRENCY":     fmt.Sprint(h.S.Concurrency),
		"VIRTBUS_QUEUE_SIZE":      fmt.Sprint(queueSize),
		"VIRTBUS_DISK_ROOTS":      h.imageRoot(),
		"VIRTBUS_METRICS_ADDR":    freeAddr(h.t),
		"VIRTBUS_API_ADDR":        "off",
		"VIRTBUS_STATE_DIR":       filepath.Join(h.dir, "state-"+string(k)),
		"VIRTBUS_LOG_LEVEL":       "warn",
	}
}

// queueSize is the workers' FIFO: small, so that a burst backs up into
// the stream and a killed worker held both queued and running commands.
const queueSize = 16

// imageRoot is the directory of the QEMU VMs' images.
func (h *Harness) imageRoot() string {
	for _, v := range h.VMs {
		if v.Image != "" {
			return filepath.Dir(v.Image)
		}
	}
	return testbed.ImageRoot()
}

// freeAddr is a free loopback port for VIRTBUS_METRICS_ADDR.
func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// consumer returns host's consumer info.
func (h *Harness) consumer(host string) (*jetstream.ConsumerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.js.Consumer(ctx, bus.StreamName, bus.ConsumerName(host))
	if err != nil {
		return nil, err
	}
	return c.Info(ctx)
}
