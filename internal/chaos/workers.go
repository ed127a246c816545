package chaos

import (
	"fmt"
	"os"
	"os/exec"
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
	env     []string
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
	N       int
	Pid     int
	Log     string
	Started time.Time
	done    chan struct{}
	err     error // Wait's, once done is closed
	killed  bool  // by the harness
}

func newWorker(k Kind, host, bin, logDir string, env map[string]string) *worker {
	return &worker{Kind: k, Host: host, Metrics: env["VIRTBUS_METRICS_ADDR"], bin: bin, logDir: logDir, env: workerproc.Env(env)}
}

// start runs a new incarnation.
func (w *worker) start() (*incarnation, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	inc := &incarnation{N: len(w.all) + 1, done: make(chan struct{})}
	inc.Log = filepath.Join(w.logDir, fmt.Sprintf("worker-%s-%02d.log", w.Kind, inc.N))
	f, err := os.Create(inc.Log)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(w.bin)
	cmd.Env, cmd.Stdout, cmd.Stderr = w.env, f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s worker: %w", w.Kind, err)
	}
	inc.Pid, inc.Started = cmd.Process.Pid, time.Now()
	w.cur = inc
	w.all = append(w.all, inc)
	go w.watch(inc, cmd, f)
	return inc, nil
}

// watch waits for an incarnation to end. An end the harness did not cause
// is a finding: it is noted and the worker is started again.
func (w *worker) watch(inc *incarnation, cmd *exec.Cmd, f *os.File) {
	inc.err = cmd.Wait()
	_ = f.Close()
	close(inc.done)
	w.mu.Lock()
	unexpected := !inc.killed && !w.closing
	if unexpected {
		w.exits = append(w.exits, fmt.Sprintf("%s worker pid %d exited by itself after %s: %v (log %s)",
			w.Kind, inc.Pid, time.Since(inc.Started).Round(time.Millisecond), inc.err, inc.Log))
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
	case <-old.done:
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
	_ = syscall.Kill(inc.Pid, syscall.SIGTERM)
	select {
	case <-inc.done:
		return inc.err
	case <-time.After(grace):
		_ = syscall.Kill(inc.Pid, syscall.SIGKILL)
		<-inc.done
		return fmt.Errorf("%s worker pid %d did not exit within %s of SIGTERM", w.Kind, inc.Pid, grace)
	}
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
