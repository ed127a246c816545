package main

import (
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// jsonHeader is what an API client sends: a JSON body, plus the header
// pairs kv.
func jsonHeader(kv ...string) http.Header {
	h := http.Header{"Content-Type": {"application/json"}}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

// answer decodes the completion an API answer carries, after checking its
// status: answer(t, 200)(httpDo(…)).
func answer(t *testing.T, wantCode int) func(code int, body string) bus.Completion {
	return func(code int, body string) bus.Completion {
		t.Helper()
		if code != wantCode {
			t.Fatalf("answer %d %q, want %d with the completion", code, body, wantCode)
		}
		var c bus.Completion
		if err := json.Unmarshal([]byte(body), &c); err != nil || c.ID == "" {
			t.Fatalf("answer is not a completion: %v: %s", err, body)
		}
		return c
	}
}

// TestHTTPAPI: the command API publishes commands like any producer and,
// with ?wait=, answers with the completion, its HTTP status mapped from the
// completion's error code; health, readiness and metrics are served on the
// other, read-only listener.
func TestHTTPAPI(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	host := hostID()
	dom := lv.Domain("http", testbed.DomainOptions{})
	e := workerEnv(t, srv.ClientURL(), host)
	startWorker(t, e)
	metrics, api := "http://"+e["VIRTBUS_METRICS_ADDR"], "http://"+e["VIRTBUS_API_ADDR"]
	cmdURL := func(vmName, action, query string) string { return api + "/v1/vms/" + vmName + "/" + action + query }

	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpDo(t, "GET", metrics+path, nil, ""); code != http.StatusOK {
			t.Errorf("GET %s = %d %q, want 200", path, code, body)
		}
	}

	key := jsonHeader("Idempotency-Key", "http-status-1")
	c := answer(t, http.StatusOK)(httpDo(t, "POST", cmdURL(dom.Name, "status", "?wait=10s"), key, ""))
	wantCompletion(t, c, "http-status-1", host, dom.Name, "status")
	wantOK(t, c, false, "shutoff")
	// A retried POST with the same key is dropped by the stream as a
	// duplicate and answered with the first one's recorded completion.
	again := answer(t, http.StatusOK)(httpDo(t, "POST", cmdURL(dom.Name, "status", "?wait=10s"), key, ""))
	if again.ID != c.ID || !again.StartedAt.Equal(c.StartedAt) {
		t.Errorf("retried POST got %+v, want the first completion %+v", again, c)
	}

	c = answer(t, http.StatusOK)(httpDo(t, "POST", cmdURL(dom.Name, "start", "?wait=30s"), jsonHeader(), ""))
	if c.ID == "" {
		t.Error("a POST without Idempotency-Key got a completion without id")
	}
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	// An error completion answers with the status of its code, and the
	// completion as the body.
	missing := testbed.Name("missing")
	for _, tt := range []struct {
		vm, action, body string
		code             int
		errCode          string
	}{
		{dom.Name, "stop", `{"mode":"sideways"}`, http.StatusBadRequest, bus.CodeInvalid},
		{missing, "status", "", http.StatusNotFound, bus.CodeNotFound},
		{dom.Name, "attach-disk", `{"path":"/etc/shadow"}`, http.StatusForbidden, bus.CodeForbidden},
	} {
		c := answer(t, tt.code)(httpDo(t, "POST", cmdURL(tt.vm, tt.action, "?wait=30s"), jsonHeader(), tt.body))
		wantCompletion(t, c, c.ID, host, tt.vm, tt.action)
		if c.Status != bus.StatusError || c.Error == nil || c.Error.Code != tt.errCode {
			t.Errorf("%s %s %s: status %q error %+v, want code %s", tt.action, tt.vm, tt.body, c.Status, c.Error, tt.errCode)
		}
	}
	wantState(t, lv, dom, libvirt.DomainRunning)

	// Without ?wait the command is only queued: 202 with its id.
	nc := bustest.Connect(t, srv.ClientURL())
	events := collect(t, nc, bus.EventPrefix+"."+host+".>")
	code, body := httpDo(t, "POST", cmdURL(dom.Name, "stop", ""), jsonHeader("Idempotency-Key", "http-stop"), `{"mode":"force"}`)
	var queued struct {
		ID string `json:"id"`
	}
	if code != http.StatusAccepted || json.Unmarshal([]byte(body), &queued) != nil || queued.ID != "http-stop" {
		t.Fatalf("POST stop without wait = %d %q, want 202 with id http-stop", code, body)
	}
	wantOK(t, events.WaitID(t, "http-stop").Completion, true, "shutoff")
	wantState(t, lv, dom, libvirt.DomainShutoff)

	for _, tt := range []struct {
		path string
		code int
	}{
		{"/v1/vms/" + dom.Name + "/explode", http.StatusBadRequest},
		{"/v1/vms/a.b/start", http.StatusBadRequest},
		{"/v1/vms/" + dom.Name + "/status?wait=forever", http.StatusBadRequest},
	} {
		if code, body := httpDo(t, "POST", api+tt.path, jsonHeader(), ""); code != tt.code {
			t.Errorf("POST %s = %d %q, want %d", tt.path, code, body, tt.code)
		}
	}

	// The metrics listener changes nothing: it has no command route, and
	// its pages are GET only. The API serves no metrics.
	for _, tt := range []struct {
		method, url string
		code        int
	}{
		{"POST", metrics + "/v1/vms/" + dom.Name + "/start?wait=10s", http.StatusNotFound},
		{"POST", metrics + "/metrics", http.StatusMethodNotAllowed},
		{"POST", metrics + "/readyz", http.StatusMethodNotAllowed},
		{"GET", api + "/metrics", http.StatusNotFound},
		{"GET", api + "/readyz", http.StatusNotFound},
	} {
		if code, body := httpDo(t, tt.method, tt.url, jsonHeader(), ""); code != tt.code {
			t.Errorf("%s %s = %d %q, want %d", tt.method, tt.url, code, body, tt.code)
		}
	}

	// The counters move just after the completion goes out: wait for them.
	// They also prove the POST on the metrics listener ran nothing: one
	// start only.
	page := waitMetrics(t, metrics+"/metrics", map[string]float64{
		"virtbus_libvirt_up": 1,
		"virtbus_nats_up":    1,
		`virtbus_commands_completed_total{action="status",status="ok"}`:         1,
		`virtbus_commands_completed_total{action="status",status="error"}`:      1,
		`virtbus_commands_completed_total{action="start",status="ok"}`:          1,
		`virtbus_commands_completed_total{action="stop",status="ok"}`:           1,
		`virtbus_commands_completed_total{action="stop",status="error"}`:        1,
		`virtbus_commands_completed_total{action="attach-disk",status="error"}`: 1,
		`virtbus_command_errors_total{action="stop",code="invalid"}`:            1,
		`virtbus_command_errors_total{action="status",code="not_found"}`:        1,
		`virtbus_command_errors_total{action="attach-disk",code="forbidden"}`:   1,
		`virtbus_commands_received_total{action="start"}`:                       1,
		`virtbus_commands_received_total{action="stop"}`:                        2,
		`virtbus_command_duration_seconds_count{action="start"}`:                1,
		`virtbus_queue_wait_seconds_count{action="status"}`:                     2,
		"virtbus_queue_capacity":                                                64,
		"virtbus_queue_depth":                                                   0,
		"virtbus_in_flight":                                                     0,
		"virtbus_duplicates_suppressed_total":                                   0,
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
	wantBucketAgrees(t, srv.ClientURL(), host, lv, dom)
}

// TestHTTPAPIRefusesHostileInput: what a browser can send cross-site (no
// JSON content type) and values beyond the bus's bounds are refused before
// anything is published, the answer does not repeat them whole, and the
// worker keeps serving.
func TestHTTPAPIRefusesHostileInput(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	host := hostID()
	dom := lv.Domain("hostile", testbed.DomainOptions{Running: true})
	e := workerEnv(t, srv.ClientURL(), host)
	startWorker(t, e)
	api := "http://" + e["VIRTBUS_API_ADDR"]
	stop := api + "/v1/vms/" + dom.Name + "/stop?wait=30s"

	// A form or a fetch without preflight from another site can send
	// text/plain and the form types, never application/json.
	for _, ct := range []string{"text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/jsonx", "json"} {
		h := http.Header{}
		if ct != "" {
			h.Set("Content-Type", ct)
		}
		if code, body := httpDo(t, "POST", stop, h, `{"mode":"force"}`); code != http.StatusUnsupportedMediaType {
			t.Errorf("POST stop with Content-Type %q = %d %q, want 415", ct, code, body)
		}
	}

	long := strings.Repeat("v", 200)
	for _, tt := range []struct {
		what, url string
		header    http.Header
		body      string
		code      int
		secret    string // must not come back whole
	}{
		{"200-byte vm", api + "/v1/vms/" + long + "/stop", jsonHeader(), "", http.StatusBadRequest, long},
		{"200-byte action", api + "/v1/vms/" + dom.Name + "/" + long, jsonHeader(), "", http.StatusBadRequest, long},
		{"key with a space", stop, jsonHeader("Idempotency-Key", "a b"), "", http.StatusBadRequest, ""},
		{"key with a slash", stop, jsonHeader("Idempotency-Key", "a/b"), "", http.StatusBadRequest, ""},
		{"key with ~", stop, jsonHeader("Idempotency-Key", "~worker-made"), "", http.StatusBadRequest, ""},
		{"129-byte key", stop, jsonHeader("Idempotency-Key", strings.Repeat("k", 129)), "", http.StatusBadRequest, strings.Repeat("k", 129)},
		{"body over 64 KiB", stop, jsonHeader(), `{"mode":"` + strings.Repeat("f", 64<<10) + `"}`, http.StatusRequestEntityTooLarge, ""},
	} {
		code, body := httpDo(t, "POST", tt.url, tt.header, tt.body)
		var refused struct {
			Error string `json:"error"`
		}
		if code != tt.code || json.Unmarshal([]byte(body), &refused) != nil || refused.Error == "" {
			t.Errorf("%s: %d %.200q, want %d with a JSON error", tt.what, code, body, tt.code)
		}
		if tt.secret != "" && strings.Contains(body, tt.secret) {
			t.Errorf("%s: the answer repeats the whole value: %.300q", tt.what, body)
		}
	}

	// Still serving; and nothing refused above reached the VM: this status
	// runs after any stop that had been published.
	c := answer(t, http.StatusOK)(httpDo(t, "POST", api+"/v1/vms/"+dom.Name+"/status?wait=30s",
		http.Header{"Content-Type": {"application/json; charset=utf-8"}, "Idempotency-Key": {"still-serving:1"}}, ""))
	wantCompletion(t, c, "still-serving:1", host, dom.Name, "status")
	wantOK(t, c, false, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)
}

// TestHTTPAPIToken: with VIRTBUS_API_TOKEN_FILE the API may listen beyond
// loopback, and answers only requests that carry the token.
func TestHTTPAPIToken(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	host := hostID()
	dom := lv.Domain("token", testbed.DomainOptions{})
	tokenFile := filepath.Join(t.TempDir(), "api-token")
	if err := os.WriteFile(tokenFile, []byte("s3cret-Token_1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(freeAddr(t))
	// Every interface: not loopback, so the token is what guards it.
	e := workerEnv(t, srv.ClientURL(), host).with("VIRTBUS_API_ADDR", ":"+port, "VIRTBUS_API_TOKEN_FILE", tokenFile)
	startWorker(t, e)
	start := "http://127.0.0.1:" + port + "/v1/vms/" + dom.Name + "/start"

	for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer s3cret-Token_", "Bearer s3cret-Token_12", "Basic s3cret-Token_1", "s3cret-Token_1"} {
		req, err := http.NewRequestWithContext(t.Context(), "POST", start+"?wait=10s", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if auth != "" {
			req.Header["Authorization"] = []string{auth}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("POST with Authorization %q: %v", auth, err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != "Bearer" {
			t.Errorf("POST with Authorization %q = %d, WWW-Authenticate %q; want 401, Bearer", auth, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
	// None of those started the VM.
	c := answer(t, http.StatusOK)(httpDo(t, "POST", "http://127.0.0.1:"+port+"/v1/vms/"+dom.Name+"/status?wait=30s",
		jsonHeader("Authorization", "Bearer s3cret-Token_1"), ""))
	wantOK(t, c, false, "shutoff")
	wantState(t, lv, dom, libvirt.DomainShutoff)

	code, body := httpDo(t, "POST", start, jsonHeader("Authorization", "Bearer s3cret-Token_1", "Idempotency-Key", "token-start"), "")
	if code != http.StatusAccepted {
		t.Fatalf("POST start with the token = %d %q, want 202", code, body)
	}
	c = answer(t, http.StatusOK)(httpDo(t, "POST", start+"?wait=30s", jsonHeader("Authorization", "bearer s3cret-Token_1", "Idempotency-Key", "token-start"), ""))
	wantCompletion(t, c, "token-start", host, dom.Name, "start")
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)
}

// TestHTTPAPIOff: VIRTBUS_API_ADDR=off opens no command listener at all,
// not even the default one, while metrics are served.
func TestHTTPAPIOff(t *testing.T) {
	t.Parallel()
	testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	const defaultAPI = "127.0.0.1:9481"
	ln, err := net.Listen("tcp", defaultAPI)
	if err != nil {
		t.Skipf("%s is taken by something else, so it cannot show that the worker leaves it alone: %v", defaultAPI, err)
	}
	_ = ln.Close()
	e := workerEnv(t, srv.ClientURL(), hostID()).with("VIRTBUS_API_ADDR", "off")
	startWorker(t, e)

	if code, page := httpDo(t, "GET", "http://"+e["VIRTBUS_METRICS_ADDR"]+"/metrics", nil, ""); code != http.StatusOK || !strings.Contains(page, "\nvirtbus_nats_up 1\n") {
		t.Errorf("GET /metrics = %d, want 200 with virtbus_nats_up 1:\n%.500s", code, page)
	}
	conn, err := net.Dial("tcp", defaultAPI)
	if err == nil {
		_ = conn.Close()
		t.Fatalf("with VIRTBUS_API_ADDR=off something listens on %s", defaultAPI)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial %s: %v, want connection refused", defaultAPI, err)
	}
}

// TestHTTPAPICore: with VIRTBUS_DELIVERY=core the API publishes at most
// once, waits on the event subject all the same (the worker answers no
// reply in its own inbox), and maps the completion's code the same way.
func TestHTTPAPICore(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	host := hostID()
	dom := lv.Domain("http-core", testbed.DomainOptions{})
	e := workerEnv(t, srv.ClientURL(), host).with("VIRTBUS_DELIVERY", "core")
	startWorker(t, e)
	api := "http://" + e["VIRTBUS_API_ADDR"]

	c := answer(t, http.StatusOK)(httpDo(t, "POST", api+"/v1/vms/"+dom.Name+"/start?wait=30s", jsonHeader("Idempotency-Key", "core-http-start"), ""))
	wantCompletion(t, c, "core-http-start", host, dom.Name, "start")
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	missing := testbed.Name("missing")
	c = answer(t, http.StatusNotFound)(httpDo(t, "POST", api+"/v1/vms/"+missing+"/status?wait=30s", jsonHeader(), ""))
	if c.VM != missing || c.Error == nil || c.Error.Code != bus.CodeNotFound {
		t.Errorf("status of %s: vm %q error %+v, want not_found", missing, c.VM, c.Error)
	}
	if code, body := httpDo(t, "POST", api+"/v1/vms/"+dom.Name+"/stop?wait=30s", http.Header{"Content-Type": {"text/plain"}}, `{"mode":"force"}`); code != http.StatusUnsupportedMediaType {
		t.Errorf("core: POST stop as text/plain = %d %q, want 415", code, body)
	}
	wantState(t, lv, dom, libvirt.DomainRunning)
}

// TestPprofListener: VIRTBUS_PPROF_ADDR serves Go's profiler on its own
// loopback listener, and only there: the metrics listener has no profiler.
func TestPprofListener(t *testing.T) {
	t.Parallel()
	testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	pprofAddr := bustest.FreeAddr(t)
	e := workerEnv(t, srv.ClientURL(), hostID()).with("VIRTBUS_PPROF_ADDR", pprofAddr)
	startWorker(t, e)

	if code, page := httpDo(t, "GET", "http://"+pprofAddr+"/debug/pprof/goroutine?debug=1", nil, ""); code != http.StatusOK || !strings.Contains(page, "goroutine profile:") {
		t.Errorf("GET /debug/pprof/goroutine = %d, want 200 with a goroutine profile:\n%.300s", code, page)
	}
	if code, _ := httpDo(t, "GET", "http://"+e["VIRTBUS_METRICS_ADDR"]+"/debug/pprof/", nil, ""); code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/ on the metrics listener = %d, want 404", code)
	}
}
