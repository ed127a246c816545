package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/workerproc"
)

// workerOptions are what differs between the rows' workers.
type workerOptions struct {
	uri         string // VIRTBUS_LIBVIRT_URI
	concurrency int
}

// worker is one worker process; every row gets a fresh one, so that its
// CPU time and peak memory are the row's alone.
type worker struct {
	*workerproc.Proc
	pprof string // VIRTBUS_PPROF_ADDR when profiles are asked for
}

// startWorker runs a worker for host; it does not wait for it to be
// ready.
func (b *Bench) startWorker(host string, o workerOptions) (*worker, error) {
	state, err := os.MkdirTemp(b.dir, "state-"+host+"-")
	if err != nil {
		return nil, err
	}
	env := map[string]string{
		"VIRTBUS_HOST":           host,
		"VIRTBUS_NATS_URL":       b.natsURL,
		"VIRTBUS_LIBVIRT_SOCKET": testbed.Socket(),
		"VIRTBUS_LIBVIRT_URI":    o.uri,
		"VIRTBUS_DISK_ROOTS":     testbed.ImageRoot(),
		"VIRTBUS_STATE_DIR":      state,
		"VIRTBUS_API_ADDR":       "off",
		"VIRTBUS_METRICS_ADDR":   bustest.FreeAddr(b.t),
		"VIRTBUS_CONCURRENCY":    strconv.Itoa(o.concurrency),
	}
	w := &worker{}
	if b.S.Profiles != "" {
		w.pprof = bustest.FreeAddr(b.t)
		env["VIRTBUS_PPROF_ADDR"] = w.pprof
	}
	if w.Proc, err = workerproc.Start(b.bin, state+".log", env); err != nil {
		return nil, err
	}
	return w, nil
}

// ready waits for /readyz to answer 200.
func (w *worker) ready() error { return w.Ready(time.Minute) }

// stop sends SIGTERM and waits for a clean exit: a worker that needs
// longer than stopGrace, or exits non-zero, fails the row.
func (w *worker) stop() error { return w.Stop(stopGrace) }

const stopGrace = 30 * time.Second

// usage is the worker's CPU time so far and its peak memory.
func (w *worker) usage() (cpu time.Duration, rss uint64, err error) {
	cpu, err = CPUTime(w.Pid)
	if err == nil {
		rss, err = PeakRSS(w.Pid)
	}
	return cpu, rss, err
}

// profile starts taking a CPU profile of the worker for d into
// dir/name.cpu.pprof, when profiles are asked for; the returned wait
// blocks until it is written and reports what went wrong. The worker has
// to live until then.
func (w *worker) profile(dir, name string, d time.Duration) (wait func() error) {
	if w.pprof == "" {
		return func() error { return nil }
	}
	done := make(chan error, 1)
	go func() {
		url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", w.pprof, max(int(d/time.Second), 1))
		resp, err := http.Get(url)
		if err != nil {
			done <- err
			return
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, name+".cpu.pprof"), data, 0o644)
		}
		done <- err
	}()
	return func() error { return <-done }
}
