package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// waitTimeout bounds every wait for an outcome. It only turns a hang into a
// readable failure; nothing is asserted about how long anything takes.
const waitTimeout = 60 * time.Second

// binDir holds the worker and publish binaries, built once per test run
// for the tests that need real processes (exec publish, SIGKILL a worker).
var (
	binDir    string
	buildOnce sync.Once
	buildErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "virtbus-worker-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "make binary dir:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// binary returns the path of the built worker or publish command. The build
// runs on first use, so a run of only the configuration tests skips it.
func binary(t *testing.T, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		// go test puts its own GOROOT/bin first in PATH.
		goTool, err := exec.LookPath("go")
		if err != nil {
			buildErr = fmt.Errorf("find the go tool: %w", err)
			return
		}
		cmd := exec.Command(goTool, "build", "-o", binDir+string(os.PathSeparator),
			"github.com/virtbus/virtbus/cmd/worker", "github.com/virtbus/virtbus/cmd/publish")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, name)
}

// freeAddr picks a free loopback address for VIRTBUS_METRICS_ADDR or
// VIRTBUS_API_ADDR, which take a fixed address (the worker does not report
// the port of ":0").
var freeAddr = bustest.FreeAddr

// env is a worker's environment: getenv for an in-process run, list for a
// subprocess.
type env map[string]string

func (e env) getenv(k string) string { return e[k] }

func (e env) with(kv ...string) env {
	out := make(env, len(e)+len(kv)/2)
	for k, v := range e {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

// list is the environment of a subprocess: these variables and PATH only,
// so nothing of the test runner's VIRTBUS_* leaks in.
func (e env) list() []string {
	out := []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range e {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out
}

// workerEnv is the environment of a worker for host on the NATS server at
// url, against the test bed's libvirtd, with its HTTP API on a free port.
func workerEnv(t *testing.T, url, host string) env {
	t.Helper()
	return env{
		"VIRTBUS_NATS_URL":       url,
		"VIRTBUS_HOST":           host,
		"VIRTBUS_METRICS_ADDR":   freeAddr(t),
		"VIRTBUS_API_ADDR":       freeAddr(t),
		"VIRTBUS_LIBVIRT_SOCKET": testbed.Socket(),
		"VIRTBUS_DISK_ROOTS":     testbed.ImageRoot(),
		"VIRTBUS_STATE_DIR":      t.TempDir(),
		"VIRTBUS_LOG_LEVEL":      "warn",
	}
}

// hostID is a host id of the test's own.
func hostID() string { return testbed.Name("hv") }

// inProcess is a worker running through run in this process.
type inProcess struct {
	env    env
	stdout *bustest.Buffer
	stderr *bustest.Buffer
	cancel context.CancelFunc
	done   chan error

	once sync.Once
	err  error
}

// startWorker runs the worker in-process and waits until /readyz says it
// is connected to NATS and libvirt. It is stopped when the test ends.
func startWorker(t *testing.T, e env) *inProcess {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &inProcess{env: e, stdout: &bustest.Buffer{}, stderr: &bustest.Buffer{}, cancel: cancel, done: make(chan error, 1)}
	go func() { w.done <- run(ctx, nil, e.getenv, w.stdout, w.stderr) }()
	t.Cleanup(func() {
		if err := w.stop(t); err != nil {
			t.Errorf("worker: run returned %v", err)
		}
		if t.Failed() {
			t.Logf("worker log:\n%s", w.stderr)
		}
	})
	waitReady(t, e["VIRTBUS_METRICS_ADDR"], func() error {
		select {
		case err := <-w.done:
			w.once.Do(func() { w.err = err })
			return fmt.Errorf("worker ended before it was ready: %v\n%s", err, w.stderr)
		default:
			return nil
		}
	})
	return w
}

// stop cancels run's context, as SIGTERM does, and returns run's error.
func (w *inProcess) stop(t *testing.T) error {
	t.Helper()
	w.once.Do(func() {
		w.cancel()
		select {
		case w.err = <-w.done:
		case <-time.After(waitTimeout):
			t.Fatalf("worker did not return within %s of its context ending\n%s", waitTimeout, w.stderr)
		}
	})
	return w.err
}

// process is a worker running as a real subprocess, so it can be killed.
type process struct {
	cmd    *exec.Cmd
	output *bustest.Buffer
	done   chan struct{}
	err    error // Wait's, once done is closed
}

// startProcess starts the built worker with exactly the environment e. It
// does not wait for readiness: a worker with a backlog may be busy at once.
func startProcess(t *testing.T, e env) *process {
	t.Helper()
	p := &process{cmd: exec.Command(binary(t, "worker")), output: &bustest.Buffer{}, done: make(chan struct{})}
	p.cmd.Env = e.list()
	p.cmd.Stdout, p.cmd.Stderr = p.output, p.output
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start worker: %v", err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("worker process %d output:\n%s", p.cmd.Process.Pid, p.output)
		}
	})
	return p
}

func (p *process) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("worker process exited: %v\n%s", p.err, p.output)
	default:
		return nil
	}
}

// signal sends sig and waits for the process to end; it returns Wait's
// error.
func (p *process) signal(t *testing.T, sig syscall.Signal) error {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to worker: %v", sig, err)
	}
	select {
	case <-p.done:
	case <-time.After(waitTimeout):
		t.Fatalf("worker did not exit within %s of %v\n%s", waitTimeout, sig, p.output)
	}
	return p.err
}

// waitReady polls GET /readyz until it answers 200. failed ends the wait
// early when the worker is gone.
func waitReady(t *testing.T, addr string, failed func() error) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(waitTimeout)
	for {
		if err := failed(); err != nil {
			t.Fatal(err)
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker at %s not ready within %s (last: %v)", addr, waitTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// httpDo sends one request to the worker's HTTP API and returns the status
// and body.
func httpDo(t *testing.T, method, url string, header http.Header, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Timeout: waitTimeout}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, string(b)
}

// metric returns the value of the sample named exactly series (name plus
// labels as Prometheus prints them, e.g. `m{a="b"}`) in a /metrics page.
func metric(page, series string) (float64, bool) {
	sc := bufio.NewScanner(strings.NewReader(page))
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || name != series {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		return v, err == nil
	}
	return 0, false
}

// waitMetrics polls a /metrics page until every series has its value, and
// returns the last page.
func waitMetrics(t *testing.T, url string, want map[string]float64) string {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		_, page := httpDo(t, "GET", url, nil, "")
		var wrong []string
		for series, v := range want {
			if got, ok := metric(page, series); !ok || got != v {
				wrong = append(wrong, fmt.Sprintf("%s = %v (present %v), want %v", series, got, ok, v))
			}
		}
		if len(wrong) == 0 {
			return page
		}
		if time.Now().After(deadline) {
			slices.Sort(wrong)
			t.Fatalf("%s after %s:\n%s", url, waitTimeout, strings.Join(wrong, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pubResult is what one run of the publish binary did.
type pubResult struct {
	args   []string
	code   int
	stdout string
	stderr string
}

// publish runs the publish binary with -json against the worker for host
// (none: publish finds it), waiting for the completion unless args say
// otherwise.
func publish(t *testing.T, url, host string, args ...string) pubResult {
	t.Helper()
	full := []string{"-url", url, "-json", "-timeout", "90s"}
	if host != "" {
		full = append(full, "-host", host)
	}
	full = append(full, args...)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "publish"), full...)
	cmd.Env = env{}.list()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	r := pubResult{args: args}
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("publish %q: %v", args, err)
		}
		r.code = ee.ExitCode()
	}
	r.stdout, r.stderr = out.String(), errb.String()
	return r
}

// completion decodes the completion publish printed, after checking its
// exit code.
func (r pubResult) completion(t *testing.T, wantCode int) bus.Completion {
	t.Helper()
	if r.code != wantCode {
		t.Fatalf("publish %q exited %d, want %d\nstdout: %s\nstderr: %s", r.args, r.code, wantCode, r.stdout, r.stderr)
	}
	var c bus.Completion
	if err := json.Unmarshal([]byte(r.stdout), &c); err != nil {
		t.Fatalf("publish %q printed no completion: %v\nstdout: %s\nstderr: %s", r.args, err, r.stdout, r.stderr)
	}
	return c
}

// command publishes one command straight to JetStream, as any producer
// would: id goes to Nats-Msg-Id, reply (if any) to Virtbus-Reply.
func command(t *testing.T, js jetstream.JetStream, host, vm, action, id, body, reply string) *jetstream.PubAck {
	t.Helper()
	msg := nats.NewMsg(bus.CommandSubject(host, vm, action))
	if id != "" {
		msg.Header.Set(bus.HeaderMsgID, id)
	}
	if reply != "" {
		msg.Header.Set(bus.HeaderReply, reply)
	}
	msg.Data = []byte(body)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		t.Fatalf("publish %s %s (id %s): %v", action, vm, id, err)
	}
	return ack
}

// received is one completion as a subscriber saw it.
type received struct {
	bus.Completion
	raw map[string]any // the whole message, to compare copies of a completion
}

// String is the completion in brief, for failure messages.
func (r received) String() string {
	s := fmt.Sprintf("%s:%s/%s=%s", r.ID, r.VM, r.Action, r.Status)
	if r.Error != nil {
		s += "(" + r.Error.Code + ")"
	}
	return s
}

// collect gathers every completion published to subject (wildcards
// allowed), in arrival order, from before anything is published until the
// test ends. A message that is not a completion with an id fails the test.
func collect(t *testing.T, nc *nats.Conn, subject string) *bustest.Collector[received] {
	t.Helper()
	return bustest.Collect(t, nc, subject, waitTimeout, func(m *nats.Msg) (received, string, error) {
		var r received
		if err := json.Unmarshal(m.Data, &r.Completion); err != nil {
			return r, "", err
		}
		if err := json.Unmarshal(m.Data, &r.raw); err != nil {
			return r, "", err
		}
		if r.ID == "" {
			return r, "", errors.New("completion without an id")
		}
		return r, r.ID, nil
	})
}

func distinctIDs(got []received) map[string]bool {
	seen := make(map[string]bool, len(got))
	for _, r := range got {
		seen[r.ID] = true
	}
	return seen
}
