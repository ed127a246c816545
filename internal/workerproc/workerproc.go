// Package workerproc builds cmd/worker and runs it the way the harnesses
// (chaos, bench, fleet) need it: a separate process with an environment of its
// own, watched through its /readyz, so that a SIGKILL, a restart or a
// measurement of its CPU and memory hits the worker alone.
package workerproc

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Build builds cmd/worker into dir and returns the binary's path. The go
// tool is the one `go test` put first in PATH.
func Build(dir string) (string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("find the go tool: %w", err)
	}
	out, err := exec.Command(goTool, "build", "-o", dir+string(os.PathSeparator),
		"github.com/virtbus/virtbus/cmd/worker").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build cmd/worker: %v\n%s", err, out)
	}
	return filepath.Join(dir, "worker"), nil
}

// Revision says which commit a worker built now comes from (12 hex
// digits), and which tracked files had uncommitted changes: the code under
// test moves while it runs. (Build cannot stamp it: this machine's GOFLAGS
// has -buildvcs=false.)
func Revision() (commit string, changed []string, err error) {
	head, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "", nil, fmt.Errorf("git rev-parse: %w", err)
	}
	status, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output()
	if err != nil {
		return strings.TrimSpace(string(head)), nil, fmt.Errorf("git status: %w", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(status)), "\n") {
		if line != "" {
			changed = append(changed, strings.TrimSpace(line[min(2, len(line)):]))
		}
	}
	return strings.TrimSpace(string(head)), changed, nil
}

// Env is the environment of a worker process: PATH and the given
// variables, nothing else of the harness's own, sorted.
func Env(vars map[string]string) []string {
	env := []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	return env
}

// WaitReady polls http://addr/readyz until it answers 200 or timeout
// passes, and returns how long that took.
func WaitReady(addr string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	client := &http.Client{Timeout: time.Second}
	for time.Since(start) < timeout {
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(start), nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start), fmt.Errorf("worker not ready on %s within %s", addr, timeout)
}
