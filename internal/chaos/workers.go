package chaos

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/virtbus/virtbus/internal/workerproc"
)

// revision says which commit the worker was built from, and which files
// had uncommitted changes then: the code under test moves while it runs.
func revision() string {
	commit, changed, err := workerproc.Revision()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	if len(changed) > 0 {
		commit += " plus uncommitted changes in " + strings.Join(changed, ", ")
	}
	return commit
}

// worker is one host's worker process, started again whenever it ends
// while the run goes on, as systemd would. Each incarnation logs to a file
// of its own.
type worker struct {
	Kind    Kind
	Host    string
	Metrics string // VIRTBUS_METRICS_ADDR
	env     map[string]string
	bin     string
	logDir  string

	mu      sync.Mutex
	cur     *incarnation
	all     []*incarnation
	closing bool
	exits   []string // exits the harness did not cause
}

// incarnation is one process of a worker.
type incarnation struct {
	*workerproc.Proc
	N      int
	killed bool // by the harness
}

func newWorker(k Kind, host, bin, logDir string, env map[string]string) *worker {
	return &worker{Kind: k, Host: host, Metrics: env["VIRTBUS_METRICS_ADDR"], bin: bin, logDir: logDir, env: env}
}

// start runs a new incarnation.
func (w *worker) start() (*incarnation, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.all) + 1
	p, err := workerproc.Start(w.bin, filepath.Join(w.logDir, fmt.Sprintf("worker-%s-%02d.log", w.Kind, n)), w.env)
	if err != nil {
		return nil, fmt.Errorf("start %s worker: %w", w.Kind, err)
	}
	inc := &incarnation{Proc: p, N: n}
	w.cur = inc
	w.all = append(w.all, inc)
	go w.watch(inc)
	return inc, nil
}

// watch waits for an incarnation to end. An end the harness did not cause
// is a finding: it is noted and the worker is started again.
func (w *worker) watch(inc *incarnation) {
	err := inc.Err()
	w.mu.Lock()
	unexpected := !inc.killed && !w.closing
	if unexpected {
		w.exits = append(w.exits, fmt.Sprintf("%s worker pid %d exited by itself after %s: %v (log %s)",
			w.Kind, inc.Pid, time.Since(inc.Started).Round(time.Millisecond), err, inc.Log))
	}
	w.mu.Unlock()
	if unexpected {
		time.Sleep(time.Second)
		if _, err := w.start(); err != nil {
			w.mu.Lock()
			w.exits = append(w.exits, "restart after that exit failed: "+err.Error())
			w.mu.Unlock()
		}
	}
}

// kill sends SIGKILL to the running incarnation, waits for it to die and
// starts the next one.
func (w *worker) kill() (old, next *incarnation, err error) {
	w.mu.Lock()
	old = w.cur
	old.killed = true
	w.mu.Unlock()
	if err := syscall.Kill(old.Pid, syscall.SIGKILL); err != nil {
		return old, nil, fmt.Errorf("kill %s worker pid %d: %w", w.Kind, old.Pid, err)
	}
	select {
	case <-old.Done():
	case <-time.After(30 * time.Second):
		return old, nil, fmt.Errorf("%s worker pid %d still there 30s after SIGKILL", w.Kind, old.Pid)
	}
	next, err = w.start()
	return old, next, err
}

// stop ends the worker for good: SIGTERM, and SIGKILL if it has not
// exited within grace. It returns the exit error of a graceful stop.
func (w *worker) stop(grace time.Duration) error {
	w.mu.Lock()
	w.closing = true
	inc := w.cur
	w.mu.Unlock()
	if inc == nil {
		return nil
	}
	return inc.Stop(grace)
}

// waitReady polls /readyz until it answers 200 or timeout passes, and
// returns how long that took.
func (w *worker) waitReady(timeout time.Duration) (time.Duration, error) {
	d, err := workerproc.WaitReady(w.Metrics, timeout)
	if err != nil {
		return d, fmt.Errorf("%s %w", w.Kind, err)
	}
	return d, nil
}

// unexpectedExits lists the exits the harness did not cause.
func (w *worker) unexpectedExits() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.exits)
}

// logs is every incarnation's log, each under a header.
func (w *worker) logs() string {
	w.mu.Lock()
	all := slices.Clone(w.all)
	w.mu.Unlock()
	var b strings.Builder
	for _, inc := range all {
		data, err := os.ReadFile(inc.Log)
		if err != nil {
			data = []byte(err.Error())
		}
		fmt.Fprintf(&b, "==== %s worker #%d pid %d (%s) ====\n%s", w.Kind, inc.N, inc.Pid, inc.Log, data)
	}
	return b.String()
}
