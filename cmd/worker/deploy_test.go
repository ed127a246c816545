package main

import (
	"os"
	"regexp"
	"slices"
	"strings"
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

// unitFile is a systemd unit's settings: section, then key, then every
// value in order (a key may repeat).
type unitFile map[string]map[string][]string

// parseUnit reads the assignments of a unit file, ignoring comments.
func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u, section := unitFile{}, ""
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: not an assignment in a section: %q", path, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// words is every space-separated item of key's values.
func (u unitFile) words(section, key string) []string {
	var out []string
	for _, v := range u[section][key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func (u unitFile) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s set %d times, want once: %q", section, key, len(v), v)
	}
	return v[0]
}

// The unit waits for the worker's READY=1, lets it (and only it) notify,
// and has a watchdog the worker's pings at half the interval can keep.
func TestUnitNotifyAndWatchdog(t *testing.T) {
	t.Parallel()
	u := parseUnit(t, "../../deploy/virtbus-worker.service")
	if got := u.one(t, "Service", "Type"); got != "notify" {
		t.Errorf("Type=%s, want notify", got)
	}
	if got := u.one(t, "Service", "NotifyAccess"); got != "main" {
		t.Errorf("NotifyAccess=%s, want main", got)
	}
	wd, err := time.ParseDuration(u.one(t, "Service", "WatchdogSec"))
	if err != nil {
		t.Fatalf("WatchdogSec: %v", err)
	}
	if wd < 10*time.Second || wd/2 < 4*notifyPoll {
		t.Errorf("WatchdogSec=%s: too short for a loaded hypervisor", wd)
	}
	stop, err := time.ParseDuration(systemdDuration(u.one(t, "Service", "TimeoutStopSec")))
	if err != nil || stop < vm.MaxTimeout {
		t.Errorf("TimeoutStopSec=%s (%v): the stop timeout must stay", stop, err)
	}
	if _, err := time.ParseDuration(systemdDuration(u.one(t, "Service", "TimeoutStartSec"))); err != nil {
		t.Errorf("TimeoutStartSec: %v", err)
	}
	after, wants := u.words("Unit", "After"), u.words("Unit", "Wants")
	for _, d := range []string{"libvirtd.service", "virtqemud.service"} {
		if !slices.Contains(after, d) {
			t.Errorf("After= does not name %s: %q", d, after)
		}
		// virtqemud.service conflicts with libvirtd.service: wanting both
		// would stop the daemon the host uses.
		if slices.Contains(wants, d) {
			t.Errorf("Wants= names %s: %q", d, wants)
		}
	}
}

// Each credential the unit loads (or offers, commented out) is the file a
// VIRTBUS_* variable names through %d, set in the unit, where systemd
// expands %d, and never in the environment file, where it does not.
func TestUnitCredentials(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../deploy/virtbus-worker.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	creds := regexp.MustCompile(`(?m)^#?LoadCredential=([^:\s]+):/\S+$`).FindAllStringSubmatch(unit, -1)
	if len(creds) < 2 {
		t.Fatalf("unit offers %d credentials, want nats.creds and api-token", len(creds))
	}
	for _, c := range creds {
		env := regexp.MustCompile(`(?m)^#?Environment=VIRTBUS_[A-Z_]+=%d/` + regexp.QuoteMeta(c[1]) + `$`)
		if !env.MatchString(unit) {
			t.Errorf("credential %s: no Environment=VIRTBUS_…=%%d/%s names it", c[1], c[1])
		}
	}
	example, err := os.ReadFile("../../deploy/worker.env.example")
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^VIRTBUS_\S*%d.*$`).Find(example); m != nil {
		t.Errorf("worker.env.example sets %q: systemd does not expand %%d in an EnvironmentFile", m)
	}
}
