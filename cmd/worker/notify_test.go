package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// notifySocket is a stand-in for systemd's notification socket: a unixgram
// socket whose datagrams arrive on msgs.
func notifySocket(t *testing.T, name string) <-chan string {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen on %q: %v", name, err)
	}
	msgs := make(chan string, 1024)
	go func() {
		defer close(msgs)
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { _ = c.Close() })
	return msgs
}

// next waits for the first datagram that has line among its lines, and
// returns it with what came before.
func next(t *testing.T, msgs <-chan string, line string) (msg string, before []string) {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("socket closed before %q; got %q", line, before)
			}
			for l := range strings.Lines(m) {
				if strings.TrimSuffix(l, "\n") == line {
					return m, before
				}
			}
			before = append(before, m)
		case <-deadline:
			t.Fatalf("no %q within %s; got %q", line, waitTimeout, before)
		}
	}
}

// TestNotifySystemd: a worker started with NOTIFY_SOCKET and WATCHDOG_USEC
// (as systemd starts a Type=notify unit with WatchdogSec=) sends READY=1
// once it is ready, STATUS lines, watchdog pings, and STOPPING=1 when its
// context ends, all on a real unixgram socket.
func TestNotifySystemd(t *testing.T) {
	t.Parallel()
	testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	dir, err := os.MkdirTemp("", "vbn") // short: a socket path has 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "notify")
	msgs := notifySocket(t, sock)
	w := startWorker(t, workerEnv(t, srv.ClientURL(), hostID()).with(
		"NOTIFY_SOCKET", sock, "WATCHDOG_USEC", "200000", "WATCHDOG_PID", strconv.Itoa(os.Getpid())))

	ready, before := next(t, msgs, "READY=1")
	if !strings.Contains(ready, "\nSTATUS=ready") {
		t.Errorf("READY=1 came as %q, want a STATUS=ready line with it", ready)
	}
	for _, m := range before {
		if strings.HasPrefix(m, "STATUS=") && !strings.HasPrefix(m, "STATUS=not ready: ") {
			t.Errorf("before READY=1: %q, want only not-ready statuses and pings", m)
		}
	}
	next(t, msgs, "WATCHDOG=1")
	next(t, msgs, "WATCHDOG=1") // pings go on after READY, at 100ms
	if err := w.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	stopping, _ := next(t, msgs, "STOPPING=1")
	if !strings.Contains(stopping, "STATUS=stopping") {
		t.Errorf("STOPPING=1 came as %q, want a STATUS line with it", stopping)
	}
	// run has returned: the notifier is done, nothing more arrives.
	select {
	case m := <-msgs:
		if m != "WATCHDOG=1" { // a ping may have been on its way
			t.Errorf("after run returned: %q", m)
		}
	case <-time.After(300 * time.Millisecond):
	}
}

// An abstract socket name (systemd's "@…") is reached in the abstract
// namespace, and STATUS goes out on every change, READY once.
func TestNotifierAbstractSocket(t *testing.T) {
	t.Parallel()
	name := fmt.Sprintf("@virtbus-notify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	msgs := notifySocket(t, name)
	n := newNotifier(env{"NOTIFY_SOCKET": name}.getenv, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if n.addr == nil || n.addr.Name[0] != 0 {
		t.Fatalf("NOTIFY_SOCKET=%s: address %v, want the abstract name", name, n.addr)
	}
	states := []struct {
		started bool
		status  string
	}{{false, "not ready: a"}, {false, "not ready: a"}, {true, "standby: b"}, {true, "ready: c"}, {false, "not ready: d"}}
	ready, last := false, ""
	for _, s := range states {
		ready, last = n.report(ready, last, func() (bool, string) { return s.started, s.status })
	}
	want := []string{"STATUS=not ready: a", "READY=1\nSTATUS=standby: b", "STATUS=ready: c", "STATUS=not ready: d"}
	for _, w := range want {
		select {
		case m := <-msgs:
			if m != w {
				t.Errorf("got %q, want %q", m, w)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("no %q", w)
		}
	}
}

// Without NOTIFY_SOCKET nothing is sent and no goroutine runs; a watchdog
// meant for another process, or a bad one, is not pinged.
func TestNotifierEnvironment(t *testing.T) {
	t.Parallel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	n := newNotifier(env{"WATCHDOG_USEC": "1000000"}.getenv, log)
	if n.addr != nil || n.watchdog != 0 {
		t.Errorf("no NOTIFY_SOCKET: addr %v, watchdog %s; want neither", n.addr, n.watchdog)
	}
	notifySystemd(context.Background(), n, func() (bool, string) { t.Error("state read"); return false, "" })()

	me := strconv.Itoa(os.Getpid())
	for _, tt := range []struct {
		usec, pid string
		want      time.Duration
	}{
		{"30000000", "", 30 * time.Second},
		{"30000000", me, 30 * time.Second},
		{"30000000", "1", 0},
		{"", me, 0},
		{"soon", "", 0},
		{"0", "", 0},
	} {
		n := newNotifier(env{"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": tt.usec, "WATCHDOG_PID": tt.pid}.getenv, log)
		if n.watchdog != tt.want {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: watchdog %s, want %s", tt.usec, tt.pid, n.watchdog, tt.want)
		}
	}
	if n := newNotifier(env{"NOTIFY_SOCKET": "vsock:2:1234"}.getenv, log); n.addr != nil {
		t.Errorf("NOTIFY_SOCKET=vsock:…: address %v, want none", n.addr)
	}
}

// A standby has started, for systemd, though /readyz answers 503.
func TestServiceState(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		ready, standby bool
		why            string
		started        bool
		status         string
	}{
		{true, false, "", true, "ready: taking commands"},
		{false, true, "standby: another worker holds this host's lease", true, "standby: another worker holds this host's lease"},
		{false, false, "libvirt not connected", false, "not ready: libvirt not connected"},
	} {
		started, status := serviceState(func() (bool, string) { return tt.ready, tt.why }, func() bool { return tt.standby })()
		if started != tt.started || status != tt.status {
			t.Errorf("ready %v standby %v: (%v, %q), want (%v, %q)", tt.ready, tt.standby, started, status, tt.started, tt.status)
		}
	}
}
