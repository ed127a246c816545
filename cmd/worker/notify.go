package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The sd_notify protocol, written here rather than taken from a library:
// it is one datagram of "KEY=value" lines to the socket systemd names in
// NOTIFY_SOCKET, and the worker needs four keys of it. systemd checks the
// sender's pid from the socket's credentials (NotifyAccess=main), which the
// kernel attaches itself.

// notifyPoll is how often the state is looked at for a change to report.
// Readiness has no change events of its own (it is what /readyz computes),
// and systemd only needs the first READY promptly, so polling suffices.
const notifyPoll = 250 * time.Millisecond

// notifier sends to systemd's notification socket. The zero addr (no
// NOTIFY_SOCKET) sends nothing.
type notifier struct {
	addr     *net.UnixAddr
	watchdog time.Duration // WATCHDOG_USEC, when it is meant for this process; 0: none
	log      *slog.Logger
	failing  bool // the last send failed: log the next failure at debug only
}

// newNotifier reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID through
// getenv (run's, so tests can inject them). A value it cannot use is
// logged and that part turned off: a worker that runs is worth more than a
// notification, and systemd's start timeout still reports a missing READY.
func newNotifier(getenv func(string) string, log *slog.Logger) *notifier {
	n := &notifier{log: log}
	name := getenv("NOTIFY_SOCKET")
	switch {
	case name == "":
		return n
	case strings.HasPrefix(name, "@"): // abstract namespace: a leading NUL on the wire
		name = "\x00" + name[1:]
	case !strings.HasPrefix(name, "/"):
		log.Warn("NOTIFY_SOCKET is neither a path nor an abstract socket; not notifying systemd", "NOTIFY_SOCKET", name)
		return n
	}
	n.addr = &net.UnixAddr{Name: name, Net: "unixgram"}
	n.watchdog = watchdogInterval(getenv, log)
	return n
}

// watchdogInterval is WATCHDOG_USEC as a duration, or 0 when it is unset,
// bad, or meant for another process (WATCHDOG_PID names the main process,
// which a child that inherited the variables is not).
func watchdogInterval(getenv func(string) string, log *slog.Logger) time.Duration {
	usec := getenv("WATCHDOG_USEC")
	if usec == "" {
		return 0
	}
	if pid := getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	n, err := strconv.ParseUint(usec, 10, 63)
	if err != nil || n == 0 {
		log.Warn("WATCHDOG_USEC is not a positive number of microseconds; no watchdog pings", "WATCHDOG_USEC", usec)
		return 0
	}
	return time.Duration(n) * time.Microsecond
}

// send writes one datagram of lines. Each send dials afresh, as
// sd_notify(3) does, so a systemd that re-executed itself (and made its
// socket anew) is still reached.
func (n *notifier) send(lines ...string) {
	if n.addr == nil {
		return
	}
	err := n.write(strings.Join(lines, "\n"))
	switch {
	case err != nil && !n.failing:
		n.log.Warn("notify systemd", "err", err)
	case err != nil:
		n.log.Debug("notify systemd", "err", err)
	}
	n.failing = err != nil
}

func (n *notifier) write(msg string) error {
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(msg))
	return err
}

// notifySystemd reports the worker's state to systemd until the returned
// stop is called, at the end of run: READY=1 the first time state says
// started (ready, or standing by), STATUS= on every change, STOPPING=1 once
// ctx ends (or stop comes first: Run ended on its own), and WATCHDOG=1 every
// half watchdog interval throughout, the drain of a long command included,
// since systemd keeps the watchdog while the unit stops. The pings only say
// the process still schedules its goroutines: an outage of NATS or libvirt
// is waited out by the worker itself and shows in STATUS, not as a restart.
func notifySystemd(ctx context.Context, n *notifier, state func() (started bool, status string)) (stop func()) {
	if n.addr == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { n.loop(ctx, done, state) })
	return func() { close(done); wg.Wait() }
}

func (n *notifier) loop(ctx context.Context, done <-chan struct{}, state func() (bool, string)) {
	poll := time.NewTicker(notifyPoll)
	defer poll.Stop()
	var ping <-chan time.Time
	if n.watchdog > 0 {
		t := time.NewTicker(n.watchdog / 2)
		defer t.Stop()
		ping = t.C
		n.send("WATCHDOG=1")
	}
	ready, last, stopping := false, "", ctx.Done()
	for {
		if stopping != nil {
			ready, last = n.report(ready, last, state)
		}
		select {
		case <-poll.C:
		case <-ping:
			n.send("WATCHDOG=1")
		case <-stopping:
			stopping = nil // report no more changes: the worker is going
			n.send("STOPPING=1", "STATUS=stopping: finishing the running commands")
		case <-done:
			if stopping != nil {
				n.send("STOPPING=1", "STATUS=stopping")
			}
			return
		}
	}
}

// report sends what changed since the last call: READY=1 with the first
// started state, a STATUS line whenever the status text changes.
func (n *notifier) report(ready bool, last string, state func() (bool, string)) (bool, string) {
	started, status := state()
	switch {
	case started && !ready:
		n.send("READY=1", "STATUS="+status)
	case status != last:
		n.send("STATUS=" + status)
	}
	return ready || started, status
}

// serviceState is readiness as systemd is told it: a standby has started
// (it is doing its job, waiting for the lease) though /readyz says 503.
func serviceState(ready func() (bool, string), standby func() bool) func() (bool, string) {
	return func() (bool, string) {
		ok, why := ready()
		switch {
		case ok:
			return true, "ready: taking commands"
		case standby():
			return true, why
		}
		return false, fmt.Sprintf("not ready: %s", why)
	}
}
