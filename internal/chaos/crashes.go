package chaos

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// qemuLogDir is where libvirtd writes a log per QEMU domain, named after
// the domain.
const qemuLogDir = "/var/log/libvirt/qemu"

// crashedLine ends the line libvirtd writes to a domain's QEMU log when it
// stops the domain as crashed: its QEMU went away without libvirtd being
// asked to stop it. No command makes that (a forced stop is
// "reason=destroyed", a graceful one "reason=shutdown"), so it is a fault
// from outside the worker, like a libvirtd restart. libvirt 9.0 makes it
// itself when it handles a destroyed QEMU's monitor EOF late and takes it
// for the EOF of the QEMU started after it (see the README's Chaos
// section).
const crashedLine = ": shutting down, reason=crashed"

// qemuLogTime is the layout of the time that starts libvirtd's lines in a
// QEMU log.
const qemuLogTime = "2006-01-02 15:04:05.000-0700"

// crashes reads, for each QEMU VM, when libvirtd stopped it as crashed
// since from. A log that cannot be read says nothing.
func (h *Harness) crashes(from time.Time) map[string][]time.Time {
	out := map[string][]time.Time{}
	for _, v := range h.VMs {
		if v.Kind != KindQEMU {
			continue
		}
		data, err := os.ReadFile(filepath.Join(qemuLogDir, v.Name+".log"))
		if err != nil {
			continue
		}
		if at := crashesIn(data, from); len(at) > 0 {
			out[v.Name] = at
		}
	}
	return out
}

// crashesIn lists the times of the crashed lines of a QEMU log at or
// after from, in the log's order.
func crashesIn(log []byte, from time.Time) []time.Time {
	var out []time.Time
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		stamp, ok := strings.CutSuffix(line, crashedLine)
		if !ok {
			continue
		}
		at, err := time.Parse(qemuLogTime, stamp)
		if err == nil && !at.Before(from) {
			out = append(out, at)
		}
	}
	return out
}

// crashedBy reports whether libvirtd stopped vm as crashed before t.
func (e *evidence) crashedBy(vm string, t time.Time) bool {
	at := e.crashes[vm]
	return len(at) > 0 && at[0].Before(t)
}
