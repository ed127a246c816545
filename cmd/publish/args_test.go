package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
)

func envFunc(env map[string]string) func(string) string {
	return func(k string) string { return env[k] }
}

func TestParseArgs(t *testing.T) {
	hostname = func() (string, error) { return "HV1.Example.com", nil }
	t.Cleanup(func() { hostname = os.Hostname })

	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		check func(t *testing.T, c *config)
	}{
		{
			name: "defaults",
			args: []string{"stop", "web-1"},
			check: func(t *testing.T, c *config) {
				want := config{host: "hv1-example-com", wait: true, timeout: 2 * time.Minute, action: "stop", vm: "web-1"}
				if c.host != want.host || c.wait != want.wait || c.timeout != want.timeout || c.action != want.action || c.vm != want.vm {
					t.Errorf("got %+v", c)
				}
				if c.conn.URL != defaultURL || c.conn.Name == "" {
					t.Errorf("conn = %+v", c.conn)
				}
				if c.id == "" {
					t.Error("no fresh id")
				}
				if string(c.params) != "{}" {
					t.Errorf("params = %s, want {}", c.params)
				}
			},
		},
		{
			name: "key=value: true/false are booleans, the rest strings",
			args: []string{"stop", "web-1", "mode=force", "timeout=90s", "persistent=false", "readonly=true", "n=7", "target="},
			check: func(t *testing.T, c *config) {
				want := `{"mode":"force","n":"7","persistent":false,"readonly":true,"target":"","timeout":"90s"}`
				if string(c.params) != want {
					t.Errorf("params = %s\nwant     %s", c.params, want)
				}
			},
		},
		{
			name: "value may contain =",
			args: []string{"attach-disk", "web-1", "path=/var/lib/libvirt/images/a=b.img"},
			check: func(t *testing.T, c *config) {
				if string(c.params) != `{"path":"/var/lib/libvirt/images/a=b.img"}` {
					t.Errorf("params = %s", c.params)
				}
			},
		},
		{
			name: "-params is sent as given",
			args: []string{"-params", ` {"timeout":"5s","retries":3} `, "stop", "web-1"},
			check: func(t *testing.T, c *config) {
				if string(c.params) != `{"timeout":"5s","retries":3}` {
					t.Errorf("params = %s", c.params)
				}
			},
		},
		{
			name: "environment fills the connection, flags win",
			args: []string{"-user", "alice", "-id", "cmd-1", "start", "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21"},
			env: map[string]string{
				"VIRTBUS_NATS_URL": "nats://nats.internal:4222", "VIRTBUS_HOST": "hv7",
				"VIRTBUS_NATS_USER": "bob", "VIRTBUS_NATS_PASSWORD": "secret", "VIRTBUS_NATS_TLS_CA": "/ca.pem",
			},
			check: func(t *testing.T, c *config) {
				if c.conn.URL != "nats://nats.internal:4222" || c.conn.User != "alice" || c.conn.Password != "secret" || c.conn.TLSCA != "/ca.pem" {
					t.Errorf("conn = %+v", c.conn)
				}
				if c.host != "hv7" || c.id != "cmd-1" {
					t.Errorf("host %q id %q", c.host, c.id)
				}
			},
		},
		{
			name: "inbox prefix from the environment",
			args: []string{"stop", "web-1"},
			env:  map[string]string{"VIRTBUS_NATS_INBOX_PREFIX": "_INBOX_tenant-a"},
			check: func(t *testing.T, c *config) {
				if c.conn.InboxPrefix != "_INBOX_tenant-a" {
					t.Errorf("inbox prefix %q", c.conn.InboxPrefix)
				}
			},
		},
		{
			name: "-inbox-prefix wins over the environment",
			args: []string{"-inbox-prefix", "virtbus.reply", "stop", "web-1"},
			env:  map[string]string{"VIRTBUS_NATS_INBOX_PREFIX": "_INBOX_tenant-a"},
			check: func(t *testing.T, c *config) {
				if c.conn.InboxPrefix != "virtbus.reply" {
					t.Errorf("inbox prefix %q", c.conn.InboxPrefix)
				}
			},
		},
		{
			name: "an id of 128 bytes of the id alphabet",
			args: []string{"-id", "Az09._:-" + strings.Repeat("x", bus.MaxIDLen-8), "stop", strings.Repeat("v", bus.MaxTokenLen)},
			check: func(t *testing.T, c *config) {
				if len(c.id) != bus.MaxIDLen || len(c.vm) != bus.MaxTokenLen {
					t.Errorf("id %d bytes, vm %d bytes", len(c.id), len(c.vm))
				}
			},
		},
		{
			name: "load mode over -vms",
			args: []string{"-count", "5", "-vms", "a, b,,c", "-concurrency", "2", "reboot", "mode=hard"},
			check: func(t *testing.T, c *config) {
				if c.count != 5 || c.concurrency != 2 || strings.Join(c.vms, ",") != "a,b,c" || string(c.params) != `{"mode":"hard"}` {
					t.Errorf("got count %d conc %d vms %q params %s", c.count, c.concurrency, c.vms, c.params)
				}
				if c.id != "" {
					t.Errorf("load mode without -id has a fixed id %q", c.id)
				}
			},
		},
		{
			name: "flags after the action and the VM",
			args: []string{"start", "web-1", "-json", "mode=x", "--timeout", "5s", "-s", "nats://a:4222"},
			check: func(t *testing.T, c *config) {
				if !c.json || c.timeout != 5*time.Second || c.action != "start" || c.vm != "web-1" || c.conn.URL != "nats://a:4222" {
					t.Errorf("got %+v", c)
				}
				if string(c.params) != `{"mode":"x"}` {
					t.Errorf("params = %s", c.params)
				}
			},
		},
		{
			name: "-- ends the flags",
			args: []string{"-json", "stop", "--", "web-1", "mode=force"},
			check: func(t *testing.T, c *config) {
				if !c.json || c.vm != "web-1" || string(c.params) != `{"mode":"force"}` {
					t.Errorf("got %+v params %s", c, c.params)
				}
			},
		},
		{
			name: "flags after a subcommand",
			args: []string{"watch", "web-1", "--json"},
			check: func(t *testing.T, c *config) {
				if c.sub != "watch" || c.vm != "web-1" || !c.json {
					t.Errorf("got %+v", c)
				}
			},
		},
		{
			name: "NATS_URL when no VIRTBUS_NATS_URL",
			args: []string{"stop", "web-1"},
			env:  map[string]string{"NATS_URL": "nats://n:1"},
			check: func(t *testing.T, c *config) {
				if c.conn.URL != "nats://n:1" {
					t.Errorf("url %q", c.conn.URL)
				}
			},
		},
		{
			name: "VIRTBUS_NATS_URL wins over NATS_URL",
			args: []string{"stop", "web-1"},
			env:  map[string]string{"NATS_URL": "nats://n:1", "VIRTBUS_NATS_URL": "nats://v:1"},
			check: func(t *testing.T, c *config) {
				if c.conn.URL != "nats://v:1" {
					t.Errorf("url %q", c.conn.URL)
				}
			},
		},
		{
			name: "-s wins over both",
			args: []string{"-s", "nats://s:1", "stop", "web-1"},
			env:  map[string]string{"NATS_URL": "nats://n:1", "VIRTBUS_NATS_URL": "nats://v:1"},
			check: func(t *testing.T, c *config) {
				if c.conn.URL != "nats://s:1" {
					t.Errorf("url %q", c.conn.URL)
				}
			},
		},
		{
			name: "--server and -url still work",
			args: []string{"stop", "web-1", "--server", "nats://s:2"},
			check: func(t *testing.T, c *config) {
				if c.conn.URL != "nats://s:2" {
					t.Errorf("url %q", c.conn.URL)
				}
			},
		},
		{
			name: "password: VIRTBUS_ over NATS_, NATS_ fills in",
			args: []string{"stop", "web-1"},
			env:  map[string]string{"NATS_PASSWORD": "n", "VIRTBUS_NATS_PASSWORD": "v", "NATS_USER": "nu"},
			check: func(t *testing.T, c *config) {
				if c.conn.Password != "v" || c.conn.User != "nu" {
					t.Errorf("conn %+v", c.conn)
				}
			},
		},
		{
			name: "default wait: reboot outlasts its 120s default",
			args: []string{"reboot", "web-1"},
			check: func(t *testing.T, c *config) {
				if c.timeout < 150*time.Second {
					t.Errorf("timeout %s", c.timeout)
				}
			},
		},
		{
			name: "default wait: the action's timeout parameter plus a margin",
			args: []string{"stop", "web-1", "timeout=10m"},
			check: func(t *testing.T, c *config) {
				if c.timeout != 10*time.Minute+waitMargin {
					t.Errorf("timeout %s", c.timeout)
				}
			},
		},
		{
			name: "default wait: at least the old default",
			args: []string{"detach-disk", "web-1", "target=vdb"},
			check: func(t *testing.T, c *config) {
				if c.timeout != minWait {
					t.Errorf("timeout %s", c.timeout)
				}
			},
		},
		{
			name: "-timeout given wins over the action's",
			args: []string{"reboot", "web-1", "-timeout", "5s"},
			check: func(t *testing.T, c *config) {
				if c.timeout != 5*time.Second {
					t.Errorf("timeout %s", c.timeout)
				}
			},
		},
		{
			name: "load mode over the VM argument",
			args: []string{"-count", "3", "start", "web-1"},
			check: func(t *testing.T, c *config) {
				if strings.Join(c.vms, ",") != "web-1" {
					t.Errorf("vms = %q", c.vms)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseArgs(tt.args, envFunc(tt.env), io.Discard)
			if err != nil {
				t.Fatalf("parseArgs: %v", err)
			}
			tt.check(t, c)
		})
	}
}

// Usage errors end the run before it connects anywhere: exit 2, and a
// message saying what is wrong.
func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"nothing", nil, "missing ACTION"},
		{"no vm", []string{"stop"}, "missing VM"},
		{"vm with a dot", []string{"stop", "web.example"}, "address it by its UUID"},
		{"vm with a space", []string{"stop", "my vm"}, "address it by its UUID"},
		{"vm wildcard", []string{"stop", "*"}, "address it by its UUID"},
		{"vm full wildcard", []string{"stop", ">"}, "address it by its UUID"},
		{"action with a dot", []string{"stop.now", "web-1"}, "action"},
		{"param without =", []string{"stop", "web-1", "force"}, "not key=value"},
		{"flag after -- is a parameter", []string{"stop", "web-1", "--", "-json"}, "not key=value"},
		{"param without key", []string{"stop", "web-1", "=x"}, "not key=value"},
		{"param twice", []string{"stop", "web-1", "mode=force", "mode=graceful"}, "given twice"},
		{"params and key=value", []string{"-params", `{"a":1}`, "stop", "web-1", "mode=force"}, "cannot be combined"},
		{"params not an object", []string{"-params", `[1,2]`, "stop", "web-1"}, "one JSON object"},
		{"params null", []string{"-params", `null`, "stop", "web-1"}, "one JSON object"},
		{"params broken", []string{"-params", `{"a":`, "stop", "web-1"}, "one JSON object"},
		{"unknown flag", []string{"-bogus", "stop", "web-1"}, "flag provided but not defined"},
		{"bad duration", []string{"-timeout", "soon", "stop", "web-1"}, "invalid value"},
		{"zero timeout", []string{"-timeout", "0s", "stop", "web-1"}, "-timeout must be positive"},
		{"id with a space", []string{"-id", "a b", "stop", "web-1"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{"id with a slash", []string{"-id", "a/b", "stop", "web-1"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{"id with a tilde", []string{"-id", "~worker-made", "stop", "web-1"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{"id not ASCII", []string{"-id", "caf\u00e9", "stop", "web-1"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{"id too long", []string{"-id", strings.Repeat("x", bus.MaxIDLen+1), "stop", "web-1"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{"load ids too long", []string{"-id", strings.Repeat("x", bus.MaxIDLen-2), "-count", "10", "stop", "web-1"}, "load mode sends ids up to"},
		{"vm too long", []string{"stop", strings.Repeat("v", bus.MaxTokenLen+1)}, "1 to 128 bytes"},
		{"action too long", []string{strings.Repeat("a", bus.MaxTokenLen+1), "web-1"}, "action"},
		{"vms token too long", []string{"-count", "2", "-vms", "a," + strings.Repeat("v", bus.MaxTokenLen+1), "stop"}, "UUID"},
		{"inbox prefix wildcard", []string{"-inbox-prefix", "_INBOX_tenant-a.*", "stop", "web-1"}, "-inbox-prefix"},
		{"inbox prefix ends in a dot", []string{"-inbox-prefix", "_INBOX_tenant-a.", "stop", "web-1"}, "-inbox-prefix"},
		{"inbox prefix with a space", []string{"-inbox-prefix", "my inbox", "stop", "web-1"}, "-inbox-prefix"},
		{"inbox prefix too long", []string{"-inbox-prefix", "_INBOX_" + strings.Repeat("t", 250), "stop", "web-1"}, "-inbox-prefix"},
		{"bad host", []string{"-host", "hv1.example", "stop", "web-1"}, "host"},
		{"vms without count", []string{"-vms", "a,b", "stop"}, "give -count too"},
		{"negative count", []string{"-count", "-1", "stop", "web-1"}, "-count"},
		{"zero concurrency", []string{"-count", "2", "-concurrency", "0", "stop", "web-1"}, "-concurrency"},
		{"vms and a VM", []string{"-count", "2", "-vms", "a,b", "stop", "web-1"}, "not both"},
		{"vms empty", []string{"-count", "2", "-vms", ",", "stop"}, "names no VM"},
		{"vms bad token", []string{"-count", "2", "-vms", "a,b.c", "stop"}, "UUID"},
		{"unknown flag after the VM", []string{"stop", "web-1", "-bogus"}, "flag provided but not defined: -bogus"},
		{"short usage", []string{"-bogus"}, usageLine},
		{"bad context name", []string{"-context", "../x", "stop", "web-1"}, "want a context name"},
		{"password and password file", []string{"-password", "x", "-password-file", "/dev/null", "stop", "web-1"}, "not both"},
	}
	env := envFunc(map[string]string{"VIRTBUS_HOST": "hv1", "VIRTBUS_NATS_URL": "nats://127.0.0.1:1"})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := exitCode(run(context.Background(), tt.args, env, &stdout, &stderr), &stderr)
			if code != exitUsage {
				t.Errorf("exit %d, want %d; stderr: %s", code, exitUsage, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("stderr does not say %q:\n%s", tt.want, stderr.String())
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout not empty: %s", stdout.String())
			}
		})
	}
}

func TestHelp(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"-h"}, envFunc(map[string]string{"VIRTBUS_NATS_PASSWORD": "hunter2"}), &stdout, &stderr)
	if code := exitCode(err, &stderr); code != exitOK {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"ACTION VM [key=value ...]", "true\n             and false become booleans", "-count", "Exit status"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("usage lacks %q", want)
		}
	}
	if strings.Contains(stderr.String(), "hunter2") {
		t.Error("usage prints a password from the environment")
	}
}

func TestSubjectSafe(t *testing.T) {
	for in, want := range map[string]string{
		"hv1":             "hv1",
		"HV1.Example.com": "hv1-example-com",
		"node_7-b":        "node_7-b",
		"h v*>x":          "h-v--x",
		"Ünïcode":         "-n-code",
	} {
		got := bus.HostToken(in)
		if got != want {
			t.Errorf("HostToken(%q) = %q, want %q", in, got, want)
		}
		if !bus.ValidToken(got) {
			t.Errorf("HostToken(%q) = %q is not a valid token", in, got)
		}
	}
}

func TestFormatCompletion(t *testing.T) {
	tests := []struct {
		c    bus.Completion
		want string
	}{
		{
			bus.Completion{Action: "stop", VM: "web-1", Status: "ok", Changed: true, State: "shutoff",
				Detail: map[string]any{"forced": true, "method": "acpi then destroy"}, DurationMS: 61003.2},
			`ok    stop web-1 changed=true state=shutoff 61003ms detail: forced=true method="acpi then destroy"`,
		},
		{
			bus.Completion{Action: "start", VM: "web-1", Status: "ok", State: "running", DurationMS: 0.4, Attempt: 2},
			`ok    start web-1 changed=false state=running 0ms attempt=2`,
		},
		{
			bus.Completion{Action: "stop", VM: "web-1", Status: "error", Error: &bus.Error{Code: "not_found", Message: `domain "web-1" not found`}},
			`error stop web-1 code=not_found: domain "web-1" not found`,
		},
	}
	for _, tt := range tests {
		if got := formatCompletion(&tt.c); got != tt.want {
			t.Errorf("got  %s\nwant %s", got, tt.want)
		}
	}
}

func TestExitCode(t *testing.T) {
	var stderr bytes.Buffer
	for _, tt := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("boom"), 1},
		{&exitError{code: exitTimeout, err: errors.New("late")}, 3},
		{&exitError{code: exitFailed}, 1},
	} {
		if got := exitCode(tt.err, &stderr); got != tt.want {
			t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	for p, want := range map[float64]time.Duration{50: 50 * time.Millisecond, 90: 90 * time.Millisecond, 99: 99 * time.Millisecond, 100: 100 * time.Millisecond} {
		if got := percentile(d, p); got != want {
			t.Errorf("p%v = %s, want %s", p, got, want)
		}
	}
	if percentile(nil, 50) != 0 {
		t.Error("empty")
	}
}
