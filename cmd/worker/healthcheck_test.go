package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// runHealthcheck is `worker -healthcheck` in-process, through run and
// exitCode as main calls them: its exit status and output.
func runHealthcheck(t *testing.T, e env) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bustest.Buffer
	err := run(context.Background(), []string{"-healthcheck"}, e.getenv, &out, &errb)
	return exitCode(err, &errb), out.String(), errb.String()
}

// A ready worker passes the check, found through its own
// VIRTBUS_METRICS_ADDR.
func TestHealthcheckReadyWorker(t *testing.T) {
	t.Parallel()
	testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	e := workerEnv(t, srv.ClientURL(), hostID())
	startWorker(t, e)
	code, stdout, stderr := runHealthcheck(t, e)
	if code != 0 || !strings.Contains(stdout, "200") || stderr != "" {
		t.Errorf("healthcheck of a ready worker: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// Nothing listening, a worker that is not ready, a listener switched off
// or a configuration the worker would refuse: 1 every time (never 2, which
// Docker reserves), saying why.
func TestHealthcheckFails(t *testing.T) {
	t.Parallel()
	notReady := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "not ready: libvirt not connected", http.StatusServiceUnavailable)
	}))
	t.Cleanup(notReady.Close)
	for _, c := range []struct {
		name string
		env  env
		why  string
	}{
		{"nothing listening", env{"VIRTBUS_METRICS_ADDR": freeAddr(t)}, "connect"},
		{"not ready", env{"VIRTBUS_METRICS_ADDR": strings.TrimPrefix(notReady.URL, "http://")}, "503 Service Unavailable: not ready: libvirt not connected"},
		{"metrics off", env{"VIRTBUS_METRICS_ADDR": "off"}, "VIRTBUS_METRICS_ADDR=off"},
		{"bad configuration", env{"VIRTBUS_METRICS_ADDR": freeAddr(t), "VIRTBUS_DELIVERY": "carrier-pigeon"}, "VIRTBUS_DELIVERY"},
	} {
		code, stdout, stderr := runHealthcheck(t, c.env)
		if code != 1 || stdout != "" || !strings.Contains(stderr, "healthcheck") || !strings.Contains(stderr, c.why) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want 1 and %q", c.name, code, stdout, stderr, c.why)
		}
	}
}

// The check asks a listener on every interface on loopback, and one on a
// single address there.
func TestHealthcheckURL(t *testing.T) {
	t.Parallel()
	for addr, want := range map[string]string{
		":9480":          "http://127.0.0.1:9480/readyz",
		"0.0.0.0:9480":   "http://127.0.0.1:9480/readyz",
		"[::]:9480":      "http://127.0.0.1:9480/readyz",
		"127.0.0.1:9999": "http://127.0.0.1:9999/readyz",
		"10.1.2.3:9480":  "http://10.1.2.3:9480/readyz",
		"[::1]:9480":     "http://[::1]:9480/readyz",
	} {
		if got, err := readyzURL(addr); got != want || err != nil {
			t.Errorf("readyzURL(%q) = %q, %v; want %q", addr, got, err, want)
		}
	}
}

// The built binary takes the flag, as the Dockerfile's HEALTHCHECK runs it.
func TestHealthcheckBinary(t *testing.T) {
	t.Parallel()
	ready := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ready\n")
	}))
	t.Cleanup(ready.Close)
	code, stdout, stderr := runBinary(t, "worker", env{"VIRTBUS_METRICS_ADDR": strings.TrimPrefix(ready.URL, "http://")}, "-healthcheck")
	if code != 0 || !strings.Contains(stdout, "ready") {
		t.Errorf("worker -healthcheck: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}
