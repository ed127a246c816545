package main

import (
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
)

// TestHostileTenantCannotHurtOthers replays the attacks of a tenant with
// publish rights on one VM against a real worker and a real VM: an id of
// 4,050 bytes, a reply header aimed at the victim's record key, at another
// VM's command subject and at its event subject. Each ends in one invalid
// completion; the worker stays connected and ready; the victim's later
// stop runs and libvirt shows the VM shut off.
func TestHostileTenantCannotHurtOthers(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	victim := lv.Domain("victim", testbed.DomainOptions{Running: true})
	attacker := lv.Domain("attacker", testbed.DomainOptions{Running: true})
	e := workerEnv(t, url, host)
	startWorker(t, e)
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	events := collect(t, nc, bus.EventPrefix+"."+host+".>")
	injected := make(chan *nats.Msg, 16)
	sub, err := nc.ChanSubscribe(bus.CommandPrefix+"."+host+"."+victim.Name+".>", injected)
	if err != nil {
		t.Fatal(err)
	}

	attacks := []struct{ name, id, reply string }{
		{"id of 4050 bytes", strings.Repeat("x", 4050), ""},
		{"reply into the victim's record", "attack-kv", "$KV." + bus.RecordBucket + "." + host + ".victim-stop"},
		{"reply onto the victim's command subject", "attack-cmd", bus.CommandSubject(host, victim.Name, "stop")},
		{"reply onto the victim's event subject", "attack-evt", bus.EventSubject(host, victim.Name, "start")},
		{"reply of 4050 bytes", "attack-long-reply", "_INBOX." + strings.Repeat("r", 4050)},
	}
	for _, a := range attacks {
		command(t, js, host, attacker.Name, "status", a.id, "", a.reply)
	}
	got := events.WaitFor(t, waitTimeout, "one completion per attack", func(got []received) bool { return len(got) >= len(attacks) })
	for _, c := range got {
		if c.VM != attacker.Name || c.Status != bus.StatusError || c.Error == nil || c.Error.Code != bus.CodeInvalid {
			t.Errorf("completion %+v: want an invalid error on the attacker's VM", c.Completion)
		}
	}
	if code, _ := httpDo(t, http.MethodGet, "http://"+e["VIRTBUS_METRICS_ADDR"]+"/readyz", nil, ""); code != http.StatusOK {
		t.Errorf("/readyz %d after the attacks, want 200", code)
	}

	// Everything the worker published before its completions has reached
	// this connection by now: the flush is answered after it.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := sub.Unsubscribe(); err != nil {
		t.Fatal(err)
	}
	if n := len(injected); n != 0 {
		t.Errorf("%d messages injected onto the victim's command subject", n)
	}

	command(t, js, host, victim.Name, "stop", "victim-stop", `{"mode":"force"}`, "")
	if c := events.WaitID(t, "victim-stop"); c.Status != bus.StatusOK || c.State != "shutoff" {
		t.Errorf("victim's stop: %+v", c.Completion)
	}
	wantState(t, lv, victim, libvirt.DomainShutoff)
	wantState(t, lv, attacker, libvirt.DomainRunning)
	n := 0
	for _, c := range events.Snapshot() {
		if c.VM == attacker.Name {
			n++
		}
	}
	if n != len(attacks) {
		t.Errorf("%d completions for %d attacks, want exactly one each", n, len(attacks))
	}
}

// TestWorkerExitsWhenNATSClosesForGood: a connection NATS will never take
// back (the worker's password was changed) makes run return an error, so
// the process exits non-zero and systemd restarts it.
func TestWorkerExitsWhenNATSClosesForGood(t *testing.T) {
	t.Parallel()
	testbed.Require(t)
	dir := t.TempDir()
	opts := func(port int, password string) *server.Options {
		return &server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir,
			Username: "hv", Password: password, NoLog: true, NoSigs: true}
	}
	s := runServer(t, opts(-1, "before"))
	port := s.Addr().(*net.TCPAddr).Port
	e := workerEnv(t, s.ClientURL(), hostID()).with("VIRTBUS_NATS_USER", "hv", "VIRTBUS_NATS_PASSWORD", "before")
	w := startWorker(t, e)

	s.Shutdown()
	s.WaitForShutdown()
	runServer(t, opts(port, "after"))
	select {
	case err := <-w.done:
		w.once.Do(func() { w.err = nil })
		if !errors.Is(err, bus.ErrConnectionClosed) {
			t.Errorf("run returned %v, want the connection-closed error", err)
		}
		if !strings.Contains(w.stderr.String(), "closed for good") {
			t.Errorf("no log line says why the worker stops:\n%s", w.stderr)
		}
	case <-time.After(waitTimeout):
		t.Fatal("worker still running on a connection NATS closed for good")
	}
}

func runServer(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}
