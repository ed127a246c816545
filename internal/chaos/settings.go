package chaos

import (
	"fmt"
	"strconv"
	"time"
)

// Settings size one chaos run.
type Settings struct {
	Name      string
	QEMUVMs   int // real TCG domains on qemu:///system
	TestVMs   int // domains of libvirt's test driver (test:///default)
	Commands  int // in all, spread over the VMs
	QEMUShare int // percent of the commands that go to the QEMU VMs
	Producers int
	Kills     int // SIGKILLs of worker processes

	PublishFor time.Duration // publishing is spread over this long; faults fall inside it
	Deadline   time.Duration // how long to wait for the last completion after publishing
	// LibvirtTimeout is the workers' VIRTBUS_LIBVIRT_TIMEOUT; libvirtd is
	// frozen for twice as long.
	LibvirtTimeout time.Duration
	Concurrency    int // the workers' VIRTBUS_CONCURRENCY
	Seed           int64
}

// sizes are the settings VIRTBUS_CHAOS names. short is for CI on a 2-core
// machine; full is the default of `make chaos`.
var sizes = map[string]Settings{
	"short": {
		Name: "short", QEMUVMs: 2, TestVMs: 4, Commands: 360, QEMUShare: 25, Producers: 3, Kills: 3,
		PublishFor: time.Minute, Deadline: 5 * time.Minute, LibvirtTimeout: 3 * time.Second, Concurrency: 2,
	},
	"full": {
		Name: "full", QEMUVMs: 4, TestVMs: 10, Commands: 2400, QEMUShare: 25, Producers: 4, Kills: 10,
		PublishFor: 5 * time.Minute, Deadline: 15 * time.Minute, LibvirtTimeout: 3 * time.Second, Concurrency: 2,
	},
}

// LoadSettings reads VIRTBUS_CHAOS (short or full, default full),
// VIRTBUS_CHAOS_SEED (default: the clock), and the overrides
// VIRTBUS_CHAOS_COMMANDS and VIRTBUS_CHAOS_KILLS.
func LoadSettings(getenv func(string) string, now time.Time) (Settings, error) {
	name := getenv("VIRTBUS_CHAOS")
	if name == "" {
		name = "full"
	}
	s, ok := sizes[name]
	if !ok {
		return s, fmt.Errorf("VIRTBUS_CHAOS=%q: want short or full", name)
	}
	s.Seed = now.UnixNano()
	if raw := getenv("VIRTBUS_CHAOS_SEED"); raw != "" {
		seed, err := strconv.ParseInt(raw, 10, 64)
		if err != nil {
			return s, fmt.Errorf("VIRTBUS_CHAOS_SEED=%q: not a whole number", raw)
		}
		s.Seed = seed
	}
	for key, v := range map[string]*int{"VIRTBUS_CHAOS_COMMANDS": &s.Commands, "VIRTBUS_CHAOS_KILLS": &s.Kills} {
		if raw := getenv(key); raw != "" {
			n, err := strconv.Atoi(raw)
			if err != nil || n < 0 {
				return s, fmt.Errorf("%s=%q: not a count", key, raw)
			}
			*v = n
		}
	}
	return s, nil
}

// perVM is how many commands each QEMU and each test-driver VM gets.
func (s Settings) perVM() (qemu, test int) {
	q := s.Commands * s.QEMUShare / 100
	return q / max(s.QEMUVMs, 1), (s.Commands - q) / max(s.TestVMs, 1)
}
