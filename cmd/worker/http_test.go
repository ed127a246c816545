package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/testbed"
)

// TestHTTPAPI: the worker's HTTP API publishes commands like any producer
// and, with ?wait=, answers with the completion; health, readiness and
// metrics are served next to it.
func TestHTTPAPI(t *testing.T) {
	t.Parallel()
	lv := testbed.RequireLive(t)
	srv := startNATS(t)
	host := hostID()
	dom := lv.Domain("http", testbed.DomainOptions{})
	e := workerEnv(t, srv.ClientURL(), host)
	startWorker(t, e)
	base := "http://" + e["VIRTBUS_HTTP_ADDR"]

	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpDo(t, "GET", base+path, nil, ""); code != http.StatusOK {
			t.Errorf("GET %s = %d %q, want 200", path, code, body)
		}
	}

	completion := func(code int, body string) bus.Completion {
		t.Helper()
		if code != http.StatusOK {
			t.Fatalf("answer %d %q, want 200 with the completion", code, body)
		}
		var c bus.Completion
		if err := json.Unmarshal([]byte(body), &c); err != nil {
			t.Fatalf("answer is not a completion: %v: %s", err, body)
		}
		return c
	}
	key := http.Header{"Idempotency-Key": {"http-status-1"}}
	c := completion(httpDo(t, "POST", base+"/v1/vms/"+dom.Name+"/status?wait=10s", key, ""))
	wantCompletion(t, c, "http-status-1", host, dom.Name, "status")
	wantOK(t, c, false, "shutoff")
	// A retried POST with the same key is dropped by the stream as a
	// duplicate and answered with the first one's recorded completion.
	again := completion(httpDo(t, "POST", base+"/v1/vms/"+dom.Name+"/status?wait=10s", key, ""))
	if again.ID != c.ID || !again.StartedAt.Equal(c.StartedAt) {
		t.Errorf("retried POST got %+v, want the first completion %+v", again, c)
	}

	c = completion(httpDo(t, "POST", base+"/v1/vms/"+dom.Name+"/start?wait=30s", nil, ""))
	if c.ID == "" {
		t.Error("a POST without Idempotency-Key got a completion without id")
	}
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	c = completion(httpDo(t, "POST", base+"/v1/vms/"+dom.Name+"/stop?wait=30s", nil, `{"mode":"sideways"}`))
	if c.Status != bus.StatusError || c.Error == nil || c.Error.Code != bus.CodeInvalid {
		t.Errorf("stop mode=sideways: status %q error %+v, want invalid", c.Status, c.Error)
	}

	// Without ?wait the command is only queued: 202 with its id.
	nc := connect(t, srv.ClientURL())
	events := collect(t, nc, bus.EventPrefix+"."+host+".>")
	code, body := httpDo(t, "POST", base+"/v1/vms/"+dom.Name+"/stop", http.Header{"Idempotency-Key": {"http-stop"}}, `{"mode":"force"}`)
	var queued struct {
		ID string `json:"id"`
	}
	if code != http.StatusAccepted || json.Unmarshal([]byte(body), &queued) != nil || queued.ID != "http-stop" {
		t.Fatalf("POST stop without wait = %d %q, want 202 with id http-stop", code, body)
	}
	wantOK(t, events.waitID(t, "http-stop").Completion, true, "shutoff")
	wantState(t, lv, dom, libvirt.DomainShutoff)

	for _, tt := range []struct {
		path string
		code int
	}{
		{"/v1/vms/" + dom.Name + "/explode", http.StatusBadRequest},
		{"/v1/vms/a.b/start", http.StatusBadRequest},
		{"/v1/vms/" + dom.Name + "/status?wait=forever", http.StatusBadRequest},
	} {
		if code, body := httpDo(t, "POST", base+tt.path, nil, ""); code != tt.code {
			t.Errorf("POST %s = %d %q, want %d", tt.path, code, body, tt.code)
		}
	}

	// The counters move just after the completion goes out: wait for them.
	page := waitMetrics(t, base+"/metrics", map[string]float64{
		"virtbus_libvirt_up": 1,
		"virtbus_nats_up":    1,
		`virtbus_commands_completed_total{action="status",status="ok"}`:  1,
		`virtbus_commands_completed_total{action="start",status="ok"}`:   1,
		`virtbus_commands_completed_total{action="stop",status="ok"}`:    1,
		`virtbus_commands_completed_total{action="stop",status="error"}`: 1,
		`virtbus_command_errors_total{action="stop",code="invalid"}`:     1,
		`virtbus_commands_received_total{action="stop"}`:                 2,
		`virtbus_command_duration_seconds_count{action="start"}`:         1,
		`virtbus_queue_wait_seconds_count{action="status"}`:              1,
		"virtbus_queue_capacity":                                         64,
		"virtbus_queue_depth":                                            0,
		"virtbus_in_flight":                                              0,
		"virtbus_duplicates_suppressed_total":                            0,
	})
	// Present, whatever their value (another package's test may restart
	// libvirtd meanwhile).
	for _, series := range []string{`virtbus_reconnects_total{target="libvirt"}`, `virtbus_reconnects_total{target="nats"}`, "virtbus_redeliveries_total"} {
		if _, ok := metric(page, series); !ok {
			t.Errorf("/metrics lacks %s", series)
		}
	}
	if !strings.Contains(page, "\nvirtbus_libvirt_up 1\n") {
		t.Errorf("/metrics lacks the line \"virtbus_libvirt_up 1\"")
	}
}
