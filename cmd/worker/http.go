package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

// The worker listens twice. The metrics listener (metrics, health,
// readiness) changes nothing, so it may face the network Prometheus scrapes
// from. The command API can stop any VM of the host: it listens on loopback
// unless given a bearer token, and takes only application/json bodies, a
// type no browser sends cross-site without a CORS preflight it never
// answers, so a web page cannot POST commands through a user's browser.
const (
	// maxWait bounds ?wait= so a client cannot pin a connection for good.
	maxWait = 10 * time.Minute
	// maxBody bounds a command's parameters: they are a few small fields.
	maxBody = 64 << 10
	// maxEcho bounds how much of a refused value an error answer repeats.
	maxEcho = 64
)

// codeStatus is the HTTP status of a failed completion, by its error code.
// A completion with status ok is 200.
var codeStatus = map[string]int{
	bus.CodeInvalid:     http.StatusBadRequest,
	bus.CodeNotFound:    http.StatusNotFound,
	bus.CodeForbidden:   http.StatusForbidden,
	bus.CodeConflict:    http.StatusConflict,
	bus.CodeExpired:     http.StatusGone,
	bus.CodeTimeout:     http.StatusGatewayTimeout,
	bus.CodeLibvirt:     http.StatusBadGateway,
	bus.CodeUnavailable: http.StatusServiceUnavailable,
}

func completionStatus(c *bus.Completion) int {
	if c.Status == bus.StatusOK {
		return http.StatusOK
	}
	if c.Error != nil {
		if code, ok := codeStatus[c.Error.Code]; ok {
			return code
		}
	}
	return http.StatusInternalServerError
}

// startHTTP opens the listeners cfg turns on and serves them until stop.
// Both addresses are opened before either serves, so a bad one fails the
// start with nothing half up.
func startHTTP(cfg config, api *httpAPI, reg *prometheus.Registry, ready func() (bool, string), wg *sync.WaitGroup, log *slog.Logger) (stop func(), err error) {
	listeners := []struct {
		key, addr string
		handler   http.Handler
	}{
		{"VIRTBUS_METRICS_ADDR", cfg.MetricsAddr, metricsRoutes(reg, ready)},
		{"VIRTBUS_API_ADDR", cfg.APIAddr, api.routes()},
		{"VIRTBUS_PPROF_ADDR", cfg.PprofAddr, pprofRoutes()},
	}
	var lns []net.Listener
	var handlers []http.Handler
	for _, l := range listeners {
		if l.addr == "off" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			for _, open := range lns {
				_ = open.Close()
			}
			return nil, fmt.Errorf("%s=%s: %w", l.key, l.addr, err)
		}
		lns, handlers = append(lns, ln), append(handlers, l.handler)
		log.Info("http listening", "on", l.key, "addr", ln.Addr().String())
	}
	// Cancelled at stop, so a request waiting for a completion ends with
	// the worker instead of holding the shutdown.
	base, cancel := context.WithCancel(context.Background())
	servers := make([]*http.Server, len(lns))
	for i, ln := range lns {
		srv := &http.Server{
			Handler:           handlers[i],
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    64 << 10,
			BaseContext:       func(net.Listener) context.Context { return base },
		}
		servers[i] = srv
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server", "addr", ln.Addr().String(), "err", err)
			}
		})
	}
	return func() {
		cancel()
		ctx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		for _, srv := range servers {
			_ = srv.Shutdown(ctx)
		}
	}, nil
}

// metricsRoutes is the read-only listener: nothing here changes anything.
func metricsRoutes(reg *prometheus.Registry, ready func() (bool, string)) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, why := ready(); !ok {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	return mux
}

// pprofRoutes is Go's profiler, for a loopback listener only (see
// checkHTTP): `go tool pprof http://127.0.0.1:PORT/debug/pprof/profile`.
func pprofRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// readAPIToken reads the API's bearer token from VIRTBUS_API_TOKEN_FILE;
// no file, no token.
func readAPIToken(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("VIRTBUS_API_TOKEN_FILE: %w", err)
	}
	token := strings.TrimRight(string(b), "\r\n")
	if token == "" {
		return nil, fmt.Errorf("VIRTBUS_API_TOKEN_FILE=%s: the file is empty: put the API's bearer token in it", path)
	}
	// An Authorization header cannot carry anything else, so such a token
	// would lock every client out.
	for i := range len(token) {
		if c := token[i]; c <= ' ' || c >= 0x7f {
			return nil, fmt.Errorf("VIRTBUS_API_TOKEN_FILE=%s: the token must be printable ASCII without spaces", path)
		}
	}
	return []byte(token), nil
}

// httpAPI publishes commands to this host's subject like any producer, so
// HTTP commands queue, order and complete exactly like the others.
type httpAPI struct {
	client *bus.Client
	// tokenSum is the SHA-256 of the bearer token, nil when none is asked.
	// Comparing sums keeps the comparison's time independent of the
	// token's length too.
	tokenSum *[sha256.Size]byte
}

func newHTTPAPI(nc *nats.Conn, host string, core bool, token []byte) (*httpAPI, error) {
	// The answer comes from the command's event subject, where the worker
	// publishes every completion whoever sent the command: the worker
	// answers no reply subject in its own inbox, which is where this
	// connection's replies would go.
	client, err := bus.NewClient(nc, host, bus.Core(core), bus.ReplyOnEvents())
	if err != nil {
		return nil, err
	}
	a := &httpAPI{client: client}
	if token != nil {
		sum := sha256.Sum256(token)
		a.tokenSum = &sum
	}
	return a, nil
}

func (a *httpAPI) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/vms/{vm}/{action}", a.command)
	return a.authorize(mux)
}

// authorize lets a request through only with the bearer token, when there
// is one.
func (a *httpAPI) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.tokenSum != nil {
			scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
			sum := sha256.Sum256([]byte(token))
			if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(sum[:], a.tokenSum[:]) != 1 {
				w.Header().Set("WWW-Authenticate", "Bearer")
				writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "missing or wrong bearer token"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// apiCommand is one POST /v1/vms/{vm}/{action} that passed every check.
type apiCommand struct {
	vm, action, id string
	body           []byte
	wait           time.Duration
}

// refusal is why a request is not published: its status and message.
type refusal struct {
	status int
	msg    string
}

func (a *httpAPI) command(w http.ResponseWriter, r *http.Request) {
	cmd, no := readCommand(w, r)
	if no != nil {
		writeJSON(w, no.status, map[string]string{"error": no.msg})
		return
	}
	busCmd := bus.Cmd{VM: cmd.vm, Action: cmd.action, ID: cmd.id, Params: cmd.body}
	pctx, cancel := context.WithTimeout(r.Context(), publishTimeout)
	defer cancel()
	if cmd.wait == 0 {
		ack, err := a.client.Send(pctx, busCmd)
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"id": cmd.id, "error": "publish: " + err.Error()})
			return
		}
		queued := map[string]any{"id": cmd.id}
		if ack != nil {
			queued["seq"], queued["duplicate"] = ack.Sequence, ack.Duplicate
		}
		writeJSON(w, http.StatusAccepted, queued)
		return
	}
	p, err := a.client.Start(pctx, busCmd)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"id": cmd.id, "error": "publish: " + err.Error()})
		return
	}
	defer p.Close()
	ctx, cancelWait := context.WithTimeout(r.Context(), cmd.wait)
	defer cancelWait()
	res, err := p.Wait(ctx)
	switch {
	case err != nil && p.Duplicate():
		writeJSON(w, http.StatusGatewayTimeout, map[string]string{"id": cmd.id, "error": fmt.Sprintf("duplicate of a command whose completion is not recorded within %s: %v", cmd.wait, err)})
	case err != nil:
		writeJSON(w, http.StatusGatewayTimeout, map[string]string{"id": cmd.id, "error": fmt.Sprintf("no completion within %s; the command was published and may still run", cmd.wait)})
	default:
		writeRaw(w, completionStatus(res.Completion), res.Raw)
	}
}

// publishTimeout bounds the hand-over of a command to NATS (its PubAck,
// or the flush in core mode).
const publishTimeout = 10 * time.Second

// readCommand checks everything the client sent, before anything is
// published. An answer repeats at most maxEcho bytes of a refused value.
func readCommand(w http.ResponseWriter, r *http.Request) (apiCommand, *refusal) {
	cmd := apiCommand{vm: r.PathValue("vm"), action: r.PathValue("action"), id: r.Header.Get("Idempotency-Key")}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return cmd, &refusal{http.StatusUnsupportedMediaType, "Content-Type must be application/json"}
	}
	if !bus.ValidToken(cmd.vm) {
		return cmd, &refusal{http.StatusBadRequest, fmt.Sprintf("vm %s is not a subject token of at most %d bytes: address it by UUID", bus.Clip(cmd.vm, maxEcho), bus.MaxTokenLen)}
	}
	if _, err := vm.ParseAction(cmd.action); err != nil {
		return cmd, &refusal{http.StatusBadRequest, fmt.Sprintf("unknown action %s (known: %s)", bus.Clip(cmd.action, maxEcho), strings.Join(actionNames(), ", "))}
	}
	// A client that retries a POST sends the same Idempotency-Key, and the
	// stream's duplicate window drops the second copy.
	switch {
	case cmd.id == "":
		cmd.id = nuid.Next()
	case !bus.ValidID(cmd.id):
		return cmd, &refusal{http.StatusBadRequest, fmt.Sprintf("Idempotency-Key %s: want 1 to %d bytes of [A-Za-z0-9._:-]", bus.Clip(cmd.id, maxEcho), bus.MaxIDLen)}
	}
	if s := r.URL.Query().Get("wait"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d > maxWait {
			return cmd, &refusal{http.StatusBadRequest, fmt.Sprintf("wait=%s: want a duration up to %s", bus.Clip(s, maxEcho), maxWait)}
		}
		cmd.wait = d
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return cmd, &refusal{http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", maxBody)}
	case err != nil:
		return cmd, &refusal{http.StatusBadRequest, "read body: " + err.Error()}
	}
	cmd.body = body
	return cmd, nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, _ := json.Marshal(v)
	writeRaw(w, code, b)
}

func writeRaw(w http.ResponseWriter, code int, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}
