package main

import (
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/vm"
)

// The supervisors' stop timeouts cover the longest command the worker
// accepts: SIGTERM lets running commands finish, and one may wait up to
// vm.MaxTimeout before the libvirt calls that end it.
func TestStopTimeoutsFitTheLongestCommand(t *testing.T) {
	t.Parallel()
	need := vm.MaxTimeout + 2*time.Minute
	files := []struct {
		path string
		re   *regexp.Regexp
	}{
		{"../../deploy/virtbus-worker.service", regexp.MustCompile(`(?m)^TimeoutStopSec=(\S+)$`)},
		{"../../docker-compose.yml", regexp.MustCompile(`(?m)^\s+stop_grace_period:\s*(\S+)$`)},
	}
	for _, f := range files {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		m := f.re.FindSubmatch(b)
		if m == nil {
			t.Errorf("%s: no stop timeout", f.path)
			continue
		}
		d, err := time.ParseDuration(systemdDuration(string(m[1])))
		if err != nil {
			t.Errorf("%s: stop timeout %q: %v", f.path, m[1], err)
			continue
		}
		if d < need {
			t.Errorf("%s: stop timeout %s, want at least %s (longest action timeout plus a margin)", f.path, d, need)
		}
	}
}

// systemdDuration turns systemd's "65min" into Go's "65m".
func systemdDuration(s string) string {
	return regexp.MustCompile(`min$`).ReplaceAllString(s, "m")
}
