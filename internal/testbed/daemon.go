package testbed

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// markDir is where scripts/libvirt-up.sh notes the daemons it started.
func markDir() string {
	if s := os.Getenv("VIRTBUS_TESTBED_DIR"); s != "" {
		return s
	}
	return "/run/virtbus-testbed"
}

// OwnLibvirtd makes sure the running libvirtd is the test bed's own (started
// by scripts/libvirt-up.sh): only that one may be stopped by a test. A
// hypervisor's own daemon is never touched.
func OwnLibvirtd(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(markDir(), "libvirtd")); err != nil {
		Unavailable(t, "libvirtd was not started by scripts/libvirt-up.sh, so this test may not restart it")
	}
}

// StopLibvirtd stops the test bed's libvirtd and waits until it is gone.
// Running QEMU domains survive it, as on a real host.
func StopLibvirtd(t testing.TB) {
	t.Helper()
	OwnLibvirtd(t)
	b, err := os.ReadFile("/run/libvirtd.pid")
	if err != nil {
		t.Fatalf("read libvirtd pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("parse libvirtd pid %q: %v", b, err)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("stop libvirtd (pid %d): %v", pid, err)
	}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if !alive(pid) {
			return
		}
	}
	t.Fatalf("libvirtd (pid %d) did not exit within 30s", pid)
}

// StartLibvirtd starts the test bed's libvirtd again and waits for its
// socket.
func StartLibvirtd(t testing.TB) {
	t.Helper()
	_ = os.Remove(Socket())
	if out, err := exec.Command("libvirtd", "-d").CombinedOutput(); err != nil {
		t.Fatalf("start libvirtd: %v: %s", err, out)
	}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(Socket()); err == nil {
			return
		}
	}
	t.Fatalf("libvirtd socket %s did not appear within 30s", Socket())
}

// alive reports whether pid runs: it exists and is not a zombie that
// nothing reaped (a daemon's parent may be a container's init).
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if state, ok := strings.CutPrefix(line, "State:"); ok {
			return !strings.HasPrefix(strings.TrimSpace(state), "Z")
		}
	}
	return true
}
