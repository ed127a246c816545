package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
	host    string
	metrics string // VIRTBUS_METRICS_ADDR, for /readyz
	pprof   string // VIRTBUS_PPROF_ADDR when profiles are asked for
	log     string
	pid     int
	started time.Time
	done    chan struct{}
	err     error // Wait's, once done is closed
}

// startWorker runs a worker for host; it does not wait for it to be
// ready.
func (b *Bench) startWorker(host string, o workerOptions) (*worker, error) {
	w := &worker{host: host, metrics: bustest.FreeAddr(b.t), done: make(chan struct{})}
	state, err := os.MkdirTemp(b.dir, "state-"+host+"-")
	if err != nil {
		return nil, err
	}
	w.log = state + ".log"
	env := map[string]string{
		"VIRTBUS_HOST":           host,
		"VIRTBUS_NATS_URL":       b.natsURL,
		"VIRTBUS_LIBVIRT_SOCKET": testbed.Socket(),
		"VIRTBUS_LIBVIRT_URI":    o.uri,
		"VIRTBUS_DISK_ROOTS":     testbed.ImageRoot(),
		"VIRTBUS_STATE_DIR":      state,
		"VIRTBUS_API_ADDR":       "off",
		"VIRTBUS_METRICS_ADDR":   w.metrics,
		"VIRTBUS_CONCURRENCY":    strconv.Itoa(o.concurrency),
	}
	if b.S.Profiles != "" {
		w.pprof = bustest.FreeAddr(b.t)
		env["VIRTBUS_PPROF_ADDR"] = w.pprof
	}
	f, err := os.Create(w.log)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(b.bin)
	cmd.Env, cmd.Stdout, cmd.Stderr = workerproc.Env(env), f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start worker for %s: %w", host, err)
	}
	w.pid, w.started = cmd.Process.Pid, time.Now()
	go func() {
		w.err = cmd.Wait()
		_ = f.Close()
		close(w.done)
	}()
	return w, nil
}

// ready waits for /readyz to answer 200.
func (w *worker) ready() error {
	ch := make(chan error, 1)
	go func() {
		_, err := workerproc.WaitReady(w.metrics, time.Minute)
		ch <- err
	}()
	select {
	case err := <-ch:
		return err
	case <-w.done:
		return fmt.Errorf("worker for %s exited before it was ready: %v", w.host, w.err)
	}
}

// stop sends SIGTERM and waits for a clean exit: a worker that needs
// longer than stopGrace, or exits non-zero, fails the row.
func (w *worker) stop() error {
	select {
	case <-w.done:
		return fmt.Errorf("worker for %s exited by itself: %v", w.host, w.err)
	default:
	}
	_ = syscall.Kill(w.pid, syscall.SIGTERM)
	select {
	case <-w.done:
		if w.err != nil {
			return fmt.Errorf("worker for %s at SIGTERM: %w", w.host, w.err)
		}
		return nil
	case <-time.After(stopGrace):
		_ = syscall.Kill(w.pid, syscall.SIGKILL)
		<-w.done
		return fmt.Errorf("worker for %s did not exit within %s of SIGTERM", w.host, stopGrace)
	}
}

const stopGrace = 30 * time.Second

// kill ends the worker whatever it is doing; for a row that failed.
func (w *worker) kill() {
	select {
	case <-w.done:
	default:
		_ = syscall.Kill(w.pid, syscall.SIGKILL)
		<-w.done
	}
}

// usage is the worker's CPU time so far and its peak memory.
func (w *worker) usage() (cpu time.Duration, rss uint64, err error) {
	cpu, err = cpuTime(w.pid)
	if err == nil {
		rss, err = peakRSS(w.pid)
	}
	return cpu, rss, err
}

// warnings are the lines the worker logged at level WARN or ERROR. It
// runs at the default level, info, as an operator's would: one line per
// command.
func (w *worker) warnings() []string {
	data, err := os.ReadFile(w.log)
	if err != nil {
		return []string{err.Error()}
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			out = append(out, line)
		}
	}
	return out
}

// logs is the worker's output, its last 4 KiB, for a failed row.
func (w *worker) logs() string {
	data, err := os.ReadFile(w.log)
	if err != nil {
		return err.Error()
	}
	if len(data) > 4096 {
		data = data[len(data)-4096:]
	}
	return fmt.Sprintf("==== worker for %s, pid %d (%s) ====\n%s", w.host, w.pid, filepath.Base(w.log), data)
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
