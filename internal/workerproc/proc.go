package workerproc

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Proc is one worker process of a harness, its output in a log file.
type Proc struct {
	Host    string // VIRTBUS_HOST, to name it in messages
	Metrics string // VIRTBUS_METRICS_ADDR, where /readyz is asked
	Log     string // its stdout and stderr
	Pid     int
	Started time.Time

	done chan struct{}
	err  error // Wait's, once done is closed
}

// Start runs the worker binary bin with exactly the variables env (see
// Env), its output going to logPath; it does not wait for it to be ready.
// env must name VIRTBUS_HOST and VIRTBUS_METRICS_ADDR.
func Start(bin, logPath string, env map[string]string) (*Proc, error) {
	p := &Proc{Host: env["VIRTBUS_HOST"], Metrics: env["VIRTBUS_METRICS_ADDR"], Log: logPath, done: make(chan struct{})}
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin)
	cmd.Env, cmd.Stdout, cmd.Stderr = Env(env), f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start worker for %s: %w", p.Host, err)
	}
	p.Pid, p.Started = cmd.Process.Pid, time.Now()
	go func() {
		p.err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	return p, nil
}

// Ready waits up to timeout for /readyz to answer 200, and fails at once
// when the worker exits first.
func (p *Proc) Ready(timeout time.Duration) error {
	ch := make(chan error, 1)
	go func() {
		_, err := WaitReady(p.Metrics, timeout)
		ch <- err
	}()
	select {
	case err := <-ch:
		return err
	case <-p.done:
		return fmt.Errorf("worker for %s exited before it was ready: %v", p.Host, p.err)
	}
}

// Stop sends SIGTERM and waits for a clean exit: a worker that needs
// longer than grace (then it is killed), or exits non-zero, is an error.
func (p *Proc) Stop(grace time.Duration) error {
	select {
	case <-p.done:
		return fmt.Errorf("worker for %s exited by itself: %v", p.Host, p.err)
	default:
	}
	_ = syscall.Kill(p.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("worker for %s at SIGTERM: %w", p.Host, p.err)
		}
		return nil
	case <-time.After(grace):
		_ = syscall.Kill(p.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("worker for %s did not exit within %s of SIGTERM", p.Host, grace)
	}
}

// Kill ends the worker whatever it is doing; for a run that failed.
func (p *Proc) Kill() {
	select {
	case <-p.done:
	default:
		_ = syscall.Kill(p.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// Done is closed once the worker has exited; Err is then how.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the worker's exit error (nil for status 0), once Done is closed.
func (p *Proc) Err() error {
	<-p.done
	return p.err
}

// Warnings are the lines the worker logged at level WARN or ERROR (text
// format).
func (p *Proc) Warnings() []string {
	data, err := os.ReadFile(p.Log)
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

// Logs is the last 4 KiB of the worker's output under a header naming
// it, for a failure message.
func (p *Proc) Logs() string {
	data, err := os.ReadFile(p.Log)
	if err != nil {
		return err.Error()
	}
	if len(data) > 4096 {
		data = data[len(data)-4096:]
	}
	return fmt.Sprintf("==== worker for %s, pid %d (%s) ====\n%s", p.Host, p.Pid, filepath.Base(p.Log), data)
}
