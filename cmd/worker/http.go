package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

// maxWait bounds ?wait= so a client cannot pin a connection for good.
const maxWait = 10 * time.Minute

// httpAPI serves metrics, health, and the same commands as the bus: a
// POST publishes to this host's subject like any producer, so HTTP
// commands queue, order and complete exactly like the others.
type httpAPI struct {
	nc    *nats.Conn
	host  string
	core  bool
	ready func() bool
}

func (a *httpAPI) routes(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.ready() {
			http.Error(w, "not ready: NATS or libvirt not connected", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	mux.HandleFunc("POST /v1/vms/{vm}/{action}", a.command)
	return mux
}

func (a *httpAPI) command(w http.ResponseWriter, r *http.Request) {
	name, action := r.PathValue("vm"), r.PathValue("action")
	if !bus.ValidToken(name) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("vm %q is not a subject token: address it by UUID", name)})
		return
	}
	if _, err := vm.ParseAction(action); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		writeJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": err.Error()})
		return
	}
	var wait time.Duration
	if s := r.URL.Query().Get("wait"); s != "" {
		if wait, err = time.ParseDuration(s); err != nil || wait < 0 || wait > maxWait {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("wait=%q: want a duration up to %s", s, maxWait)})
			return
		}
	}
	// A client that retries a POST sends the same Idempotency-Key, and the
	// stream's duplicate window drops the second copy.
	id := r.Header.Get("Idempotency-Key")
	if id == "" {
		id = nuid.Next()
	}
	msg := nats.NewMsg(bus.CommandSubject(a.host, name, action))
	msg.Header.Set(bus.HeaderMsgID, id)
	msg.Data = body

	ctx := r.Context()
	if wait > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, wait)
		defer cancel()
	}
	if a.core {
		a.commandCore(ctx, w, msg, id, wait)
		return
	}
	var sub *nats.Subscription
	if wait > 0 {
		// Subscribe before publishing, or a fast completion is missed.
		if sub, err = a.nc.SubscribeSync(a.nc.NewRespInbox()); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
			return
		}
		defer func() { _ = sub.Unsubscribe() }()
		msg.Header.Set(bus.HeaderReply, sub.Subject)
	}
	js, err := jetstream.New(a.nc)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	pctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	ack, err := js.PublishMsg(pctx, msg)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"id": id, "error": "publish: " + err.Error()})
		return
	}
	if wait == 0 {
		writeJSON(w, http.StatusAccepted, map[string]any{"id": id, "seq": ack.Sequence, "duplicate": ack.Duplicate})
		return
	}
	if ack.Duplicate {
		// The stream dropped this copy, so nothing answers our inbox: the
		// first copy's recorded completion is the answer.
		c, err := bus.AwaitCompletion(ctx, js, a.host, id)
		if err != nil {
			writeJSON(w, http.StatusGatewayTimeout, map[string]string{"id": id, "error": fmt.Sprintf("duplicate of a command whose completion is not recorded within %s: %v", wait, err)})
			return
		}
		writeJSON(w, http.StatusOK, c)
		return
	}
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			writeJSON(w, http.StatusGatewayTimeout, map[string]string{"id": id, "error": fmt.Sprintf("no completion within %s; the command is queued", wait)})
			return
		}
		var c bus.Completion
		if json.Unmarshal(m.Data, &c) == nil && c.ID == id {
			writeRaw(w, http.StatusOK, m.Data)
			return
		}
	}
}

func (a *httpAPI) commandCore(ctx context.Context, w http.ResponseWriter, msg *nats.Msg, id string, wait time.Duration) {
	if wait == 0 {
		if err := a.nc.PublishMsg(msg); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"id": id, "error": err.Error()})
			return
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"id": id})
		return
	}
	reply, err := a.nc.RequestMsgWithContext(ctx, msg)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		writeJSON(w, http.StatusGatewayTimeout, map[string]string{"id": id, "error": fmt.Sprintf("no completion within %s", wait)})
	case err != nil:
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"id": id, "error": err.Error()})
	default:
		writeRaw(w, http.StatusOK, reply.Data)
	}
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
