package main

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/envload"
)

// TestConfigRefusesBadValues: a bad value stops the worker at start, before
// it connects anywhere, with a message that names the variable.
func TestConfigRefusesBadValues(t *testing.T) {
	t.Parallel()
	// Nothing listens here: a value that slipped through would leave the
	// worker waiting for NATS until the context below ends.
	base := env{
		"VIRTBUS_NATS_URL":     "nats://" + freeAddr(t),
		"VIRTBUS_HOST":         "hv1",
		"VIRTBUS_METRICS_ADDR": "off",
		"VIRTBUS_API_ADDR":     "off",
		"VIRTBUS_STATE_DIR":    t.TempDir(),
	}
	emptyToken := filepath.Join(t.TempDir(), "empty-token")
	newlineToken := filepath.Join(t.TempDir(), "newline-token")
	spacedToken := filepath.Join(t.TempDir(), "spaced-token")
	for path, content := range map[string]string{emptyToken: "", newlineToken: "\n", spacedToken: "two words\n"} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		key, value string
		want       string // besides the variable's name
	}{
		{"VIRTBUS_QUEUE_SIZE", "abc", "not a whole number"},
		{"VIRTBUS_QUEUE_SIZE", "0", "at least 1"},
		{"VIRTBUS_DELIVERY", "x", "want jetstream or core"},
		{"VIRTBUS_CONCURRENCY", "four", "not a whole number"},
		{"VIRTBUS_CONCURRENCY", "0", "between 1 and"},
		{"VIRTBUS_CONCURRENCY", "65", "between 1 and"}, // more than the default queue size
		{"VIRTBUS_MAX_DELIVER", "0", "at least 1"},
		{"VIRTBUS_LIBVIRT_TIMEOUT", "30", "missing unit"},
		{"VIRTBUS_LIBVIRT_TIMEOUT", "-1s", "must be positive"},
		{"VIRTBUS_HOST", "hv1.example.com", "not a subject token"},
		{"VIRTBUS_LOG_LEVEL", "loud", "want debug, info, warn or error"},
		{"VIRTBUS_LOG_FORMAT", "xml", "want text or json"},
		{"VIRTBUS_DISK_ROOTS", " , ", "empty"},
		{"VIRTBUS_DISK_ROOTS", "images", "not an absolute path"},
		{"VIRTBUS_DISK_ROOTS", "/nonexistent/virtbus-images", "no such file"},
		{"VIRTBUS_METRICS_ADDR", "not-an-address", "missing port"},
		{"VIRTBUS_API_ADDR", "not-an-address", "missing port"},
		{"VIRTBUS_API_ADDR", "127.0.0.1", "missing port"},
		// Beyond loopback the command API needs a token.
		{"VIRTBUS_API_ADDR", ":9481", "VIRTBUS_API_TOKEN_FILE"},
		{"VIRTBUS_API_ADDR", "0.0.0.0:9481", "VIRTBUS_API_TOKEN_FILE"},
		{"VIRTBUS_API_ADDR", "[::]:9481", "VIRTBUS_API_TOKEN_FILE"},
		{"VIRTBUS_API_ADDR", "192.0.2.1:9481", "VIRTBUS_API_TOKEN_FILE"},
		{"VIRTBUS_API_ADDR", "hv1.example.com:9481", "VIRTBUS_API_TOKEN_FILE"},
		// The profiler has no token: loopback only.
		{"VIRTBUS_PPROF_ADDR", ":6060", "not a loopback address"},
		{"VIRTBUS_PPROF_ADDR", "0.0.0.0:6060", "not a loopback address"},
		{"VIRTBUS_PPROF_ADDR", "6060", "missing port"},
		{"VIRTBUS_API_TOKEN_FILE", "/nonexistent/virtbus-token", "no such file"},
		{"VIRTBUS_API_TOKEN_FILE", emptyToken, "empty"},
		{"VIRTBUS_API_TOKEN_FILE", newlineToken, "empty"},
		{"VIRTBUS_API_TOKEN_FILE", spacedToken, "printable ASCII without spaces"},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var stdout, stderr bustest.Buffer
			err := run(ctx, nil, base.with(tt.key, tt.value).getenv, &stdout, &stderr)
			if err == nil {
				t.Fatalf("run started with %s=%q (ended only by the test's deadline)\nstderr: %s", tt.key, tt.value, stderr.String())
			}
			if msg := err.Error(); !strings.Contains(msg, tt.key) || !strings.Contains(msg, tt.want) {
				t.Errorf("run with %s=%q: error %q, want it to name %s and say %q", tt.key, tt.value, msg, tt.key, tt.want)
			}
			if ctx.Err() != nil {
				t.Errorf("run with %s=%q failed only after the test's deadline", tt.key, tt.value)
			}
		})
	}
}

// TestUsageListsEveryVariable: `worker -h` prints every variable the worker
// reads with its default, and starts nothing.
func TestUsageListsEveryVariable(t *testing.T) {
	t.Parallel()
	var stdout, stderr bustest.Buffer
	getenv := func(k string) string {
		t.Errorf("-h read %s from the environment", k)
		return ""
	}
	if err := run(t.Context(), []string{"-h"}, getenv, &stdout, &stderr); err != nil {
		t.Fatalf("worker -h: %v", err)
	}
	out := stdout.String() + stderr.String()
	lines := strings.Split(out, "\n")
	keys, err := envload.Keys(bus.EnvPrefix, &config{})
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) < 27 {
		t.Fatalf("config reads %d variables; the README lists 27", len(keys))
	}
	for _, key := range keys {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, key+" ") }) {
			t.Errorf("-h does not list %s\n%s", key, out)
		}
	}
	for key, def := range map[string]string{"QUEUE_SIZE": "64", "LEASE": "15s", "METRICS_ADDR": ":9480",
		"API_ADDR": "127.0.0.1:9481", "DELIVERY": "jetstream", "LIBVIRT_URI": "qemu:///system", "COMMAND_MAX_AGE": "24h"} {
		line := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "VIRTBUS_"+key+" ") })
		if line < 0 || !strings.Contains(lines[line], " "+def+" ") {
			t.Errorf("-h does not show VIRTBUS_%s's default %q", key, def)
		}
	}
	// Every variable the README names, whatever the struct says.
	for _, key := range []string{"HOST", "NATS_URL", "NATS_CREDS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN",
		"NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY", "DELIVERY", "STATE_DIR", "LIBVIRT_URI", "LIBVIRT_SOCKET",
		"LIBVIRT_TIMEOUT", "QUEUE_SIZE", "CONCURRENCY", "MAX_DELIVER", "DISK_ROOTS", "METRICS_ADDR", "API_ADDR", "API_TOKEN_FILE", "REPLY_PREFIXES", "COMMAND_MAX_AGE", "STREAM_REPLICAS", "LEASE", "LOG_LEVEL", "LOG_FORMAT"} {
		if !strings.Contains(out, "VIRTBUS_"+key+" ") {
			t.Errorf("-h does not list VIRTBUS_%s", key)
		}
	}
}

// TestArgumentsRefused: the worker takes no arguments and no unknown
// flags; it says where its configuration goes instead.
func TestArgumentsRefused(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"start"}, {"-queue-size", "8"}} {
		var stdout, stderr bustest.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := run(ctx, args, func(string) string { return "" }, &stdout, &stderr)
		cancel()
		if err == nil {
			t.Errorf("worker %q: run returned nil", args)
		}
	}
	var stdout, stderr bustest.Buffer
	err := run(t.Context(), []string{"start"}, func(string) string { return "" }, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), "VIRTBUS_") {
		t.Errorf("worker start: error %v, want it to point at the VIRTBUS_* variables", err)
	}
}

// TestConfigAPIListeners: which addresses count as loopback, and that the
// API may listen anywhere once it has a token, or nowhere.
func TestConfigAPIListeners(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		addr     string
		loopback bool
	}{
		{"127.0.0.1:9481", true},
		{"127.3.2.1:9481", true},
		{"[::1]:9481", true},
		{"localhost:9481", true},
		{"LocalHost:9481", true},
		{":9481", false},
		{"0.0.0.0:9481", false},
		{"[::]:9481", false},
		{"192.0.2.1:9481", false},
		{"128.0.0.1:9481", false},
		{"localhost.example.com:9481", false},
		{"127.0.0.1.example.com:9481", false},
		{"127.0.0.1", false},
	} {
		if got := loopbackAddr(tt.addr); got != tt.loopback {
			t.Errorf("loopbackAddr(%q) = %v, want %v", tt.addr, got, tt.loopback)
		}
	}

	base := env{"VIRTBUS_HOST": "hv1"}
	for _, e := range []env{
		base,
		base.with("VIRTBUS_API_ADDR", "off"),
		base.with("VIRTBUS_API_ADDR", "off", "VIRTBUS_METRICS_ADDR", "off"),
		base.with("VIRTBUS_API_ADDR", "[::1]:9481"),
		base.with("VIRTBUS_API_ADDR", ":9481", "VIRTBUS_API_TOKEN_FILE", "/etc/virtbus/api-token"),
	} {
		if _, err := loadConfig(e.getenv); err != nil {
			t.Errorf("config %v: %v", e, err)
		}
	}
	c, err := loadConfig(base.getenv)
	if err != nil || c.MetricsAddr != ":9480" || c.APIAddr != "127.0.0.1:9481" || c.APITokenFile != "" {
		t.Errorf("defaults: metrics %q, API %q, token file %q (%v); want :9480, 127.0.0.1:9481, none", c.MetricsAddr, c.APIAddr, c.APITokenFile, err)
	}
	if _, err := loadConfig(base.with("VIRTBUS_METRICS_ADDR", "127.0.0.1:9481").getenv); err == nil || !strings.Contains(err.Error(), "VIRTBUS_API_ADDR") {
		t.Errorf("both listeners on 127.0.0.1:9481: error %v, want one naming VIRTBUS_API_ADDR", err)
	}

	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte("s3cret\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := readAPIToken(token); err != nil || string(got) != "s3cret" {
		t.Errorf("token file \"s3cret\\r\\n\": token %q, %v; want s3cret", got, err)
	}
}

// The worker takes one Go processor unless GOMAXPROCS says otherwise.
func TestOneProcessorUnlessGOMAXPROCSIsSet(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	runtime.GOMAXPROCS(2)
	oneProcessor(func(string) string { return "2" })
	if n := runtime.GOMAXPROCS(0); n != 2 {
		t.Errorf("with GOMAXPROCS=2 set: %d processors, want 2", n)
	}
	oneProcessor(func(string) string { return "" })
	if n := runtime.GOMAXPROCS(0); n != 1 {
		t.Errorf("with GOMAXPROCS unset: %d processors, want 1", n)
	}
}
