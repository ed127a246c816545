package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/virtbus/virtbus/internal/testbed"
)

// clockTick is USER_HZ, the unit of utime and stime in /proc/<pid>/stat:
// 100 Hz on every Linux architecture Go runs on.
const clockTick = 10 * time.Millisecond

// CPUTime is the CPU time the process has used so far, user plus system.
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of pid %d: %w", pid, err)
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// the fields from after its closing one, where field 3 (state) starts.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu time of pid %d: no command name in %q", pid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time of pid %d: %d fields after the name", pid, len(f))
	}
	var ticks int64
	for _, s := range f[11:13] { // fields 14 and 15: utime, stime
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("cpu time of pid %d: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}

// PeakRSS is the most resident memory the process has had (VmHWM), in
// bytes.
func PeakRSS(pid int) (uint64, error) {
	kb, err := procField(fmt.Sprintf("/proc/%d/status", pid), "VmHWM:")
	if err != nil {
		return 0, fmt.Errorf("peak RSS of pid %d: %w", pid, err)
	}
	return kb << 10, nil
}

// memTotal is the machine's memory, in bytes.
func memTotal() (uint64, error) {
	kb, err := procField("/proc/meminfo", "MemTotal:")
	return kb << 10, err
}

// procField reads a "Name:   123 kB" line of a /proc file.
func procField(path, name string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name); ok {
			v := strings.Fields(rest)
			if len(v) == 0 {
				break
			}
			return strconv.ParseUint(v[0], 10, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no %s line", path, name)
}

// machineBusy is the CPU time all processes of the machine have used so
// far, over all its CPUs: /proc/stat's first line without idle and
// iowait (guest time is counted in user already).
func machineBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("machine cpu time: %w", err)
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("machine cpu time: unexpected /proc/stat line %q", line)
	}
	var ticks int64
	for i, s := range f[1:9] { // user nice system idle iowait irq softirq steal
		if i == 3 || i == 4 {
			continue
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("machine cpu time: %w", err)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}

// machineMeter measures the machine's CPU time over a row's measured
// part, and the shares of libvirtd and of this process (the harness: the
// embedded NATS server and the load generator, or a baseline's client).
type machineMeter struct {
	start    time.Duration
	libvirtd int // pid; 0 when not found
	lvStart  time.Duration
	self     time.Duration
}

// rowCPU is what a meter measured; a part that could not be read is 0.
type rowCPU struct {
	machine, libvirtd, harness time.Duration
}

func startMachineMeter() machineMeter {
	busy, _ := machineBusy()
	m := machineMeter{start: busy}
	if pid, err := testbed.LibvirtdPID(); err == nil {
		if t, err := CPUTime(pid); err == nil {
			m.libvirtd, m.lvStart = pid, t
		}
	}
	m.self, _ = CPUTime(os.Getpid())
	return m
}

// used is the CPU time used since the meter started.
func (m machineMeter) used() rowCPU {
	var u rowCPU
	if busy, err := machineBusy(); err == nil && m.start != 0 {
		u.machine = busy - m.start
	}
	if m.libvirtd != 0 {
		if t, err := CPUTime(m.libvirtd); err == nil && t >= m.lvStart {
			u.libvirtd = t - m.lvStart
		}
	}
	if t, err := CPUTime(os.Getpid()); err == nil && m.self != 0 {
		u.harness = t - m.self
	}
	return u
}
