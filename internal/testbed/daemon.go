package testbed

import (
	"errors"
	"fmt"
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
	if !ownDaemon() {
		Unavailable(t, "libvirtd was not started by scripts/libvirt-up.sh, so this test may not restart it")
	}
}

// ownDaemon reports whether scripts/libvirt-up.sh started the libvirtd the
// tests use.
func ownDaemon() bool {
	_, err := os.Stat(filepath.Join(markDir(), "libvirtd"))
	return err == nil
}

// StopLibvirtd stops the test bed's libvirtd and waits until it is gone.
// Running QEMU domains survive it, as on a real host. Should the test end
// before it starts the daemon again (a failure in between), the daemon is
// started at the end of the test, before the test's domains are removed:
// otherwise they would be left behind, and every later test would fail.
func StopLibvirtd(t testing.TB) {
	t.Helper()
	OwnLibvirtd(t)
	pid := libvirtdPid(t)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("stop libvirtd (pid %d): %v", pid, err)
	}
	t.Cleanup(func() {
		if !libvirtdRunning() {
			t.Log("libvirtd was left stopped; starting it again")
			StartLibvirtd(t)
		}
	})
	if exited(pid, stopWait) {
		return
	}
	// A QEMU monitor call that never returns holds libvirtd's shutdown
	// until its own 30 s timer forces it; past that, do what an init
	// system would.
	t.Logf("libvirtd (pid %d) did not exit within %s of SIGTERM; sending SIGKILL", pid, stopWait)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("kill libvirtd (pid %d): %v", pid, err)
	}
	if !exited(pid, 10*time.Second) {
		t.Fatalf("libvirtd (pid %d) did not exit within 10s of SIGKILL", pid)
	}
}

// stopWait is how long StopLibvirtd waits after SIGTERM: beyond the 30 s
// libvirtd gives its running calls before it forces its own shutdown
// ("Make forcefull daemon shutdown" in its log).
const stopWait = 40 * time.Second

// exited waits up to d for pid to be gone.
func exited(pid int, d time.Duration) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if !alive(pid) {
			return true
		}
	}
	return !alive(pid)
}

// FreezeLibvirtd stops the test bed's libvirtd with SIGSTOP: its socket
// still accepts connections but nothing is answered, as with a daemon that
// deadlocked. Other tests share the daemon, so keep the frozen window to a
// few seconds. It is thawed (SIGCONT) when the test ends, whatever happened
// in it; and should the test binary die before that (a -timeout panic, a
// kill), a watchdog process of its own thaws the daemon after at most limit.
func FreezeLibvirtd(t testing.TB, limit time.Duration) {
	t.Helper()
	OwnLibvirtd(t)
	pid := libvirtdPid(t)
	watchdog := exec.Command("sh", "-c", `sleep "$1"; kill -CONT "$2"`, "libvirtd-thaw",
		strconv.FormatFloat(limit.Seconds(), 'f', 3, 64), strconv.Itoa(pid))
	// A session of its own: a signal to the test's process group spares it.
	watchdog.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := watchdog.Start(); err != nil {
		t.Fatalf("start libvirtd thaw watchdog: %v", err)
	}
	// Registered before the freeze, so that no failure below leaves it frozen.
	t.Cleanup(func() {
		thaw(t, pid)
		_ = syscall.Kill(-watchdog.Process.Pid, syscall.SIGKILL)
		_ = watchdog.Wait()
	})
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("freeze libvirtd (pid %d): %v", pid, err)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if st, _ := procState(pid); strings.HasPrefix(st, "T") {
			return
		}
	}
	t.Fatalf("libvirtd (pid %d) not stopped 5s after SIGSTOP", pid)
}

// ThawLibvirtd lets the test bed's libvirtd run again after FreezeLibvirtd.
// Thawing a daemon that runs changes nothing.
func ThawLibvirtd(t testing.TB) {
	t.Helper()
	OwnLibvirtd(t)
	thaw(t, libvirtdPid(t))
}

func thaw(t testing.TB, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
		t.Errorf("thaw libvirtd (pid %d): %v", pid, err)
	}
}

// libvirtdRunning reports whether the pid in libvirtd's pid file runs.
func libvirtdRunning() bool {
	pid, err := LibvirtdPID()
	return err == nil && alive(pid)
}

// libvirtdPIDFile is where the test bed's libvirtd (scripts/libvirt-up.sh,
// StartLibvirtd) writes its pid.
const libvirtdPIDFile = "/run/libvirtd.pid"

// LibvirtdPID is the running libvirtd's pid, from its pid file.
func LibvirtdPID() (int, error) {
	b, err := os.ReadFile(libvirtdPIDFile)
	if err != nil {
		return 0, fmt.Errorf("read libvirtd pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("parse libvirtd pid %q: %w", b, err)
	}
	return pid, nil
}

// libvirtdPid is LibvirtdPID, failing t when there is none.
func libvirtdPid(t testing.TB) int {
	t.Helper()
	pid, err := LibvirtdPID()
	if err != nil {
		t.Fatal(err)
	}
	return pid
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
	st, ok := procState(pid)
	return ok && !strings.HasPrefix(st, "Z")
}

// procState is the State line of /proc/<pid>/status ("S (sleeping)",
// "T (stopped)", "Z (zombie)", ...); ok is false when pid is gone.
func procState(pid int) (state string, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if st, found := strings.CutPrefix(line, "State:"); found {
			return strings.TrimSpace(st), true
		}
	}
	return "", true
}

// KillQEMU kills the QEMU of the test's running domain name with SIGKILL,
// as a crash or the OOM killer would, around libvirtd.
func KillQEMU(t testing.TB, name string) {
	t.Helper()
	b, err := os.ReadFile("/run/libvirt/qemu/" + name + ".pid")
	if err != nil {
		t.Fatalf("QEMU pid of %s: %v", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		t.Fatalf("QEMU pid of %s: %q", name, b)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill QEMU of %s (pid %d): %v", name, pid, err)
	}
}
