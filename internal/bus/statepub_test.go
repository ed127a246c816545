package bus

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// runStates starts a state publisher for testHost on nc, stopped when the
// test ends.
func runStates(t *testing.T, nc *nats.Conn, cfg StateConfig) (*StatePublisher, *prometheus.Registry) {
	t.Helper()
	if cfg.Host == "" {
		cfg.Host = testHost
	}
	reg := prometheus.NewRegistry()
	p, err := NewStatePublisher(nc, cfg, testLogger(t), reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return p, reg
}

// collectStates gathers the state messages on subject, by vm.
func collectStates(t *testing.T, nc *nats.Conn, subject string) *bustest.Collector[DomainState] {
	t.Helper()
	return bustest.Collect(t, nc, subject, waitTimeout, func(m *nats.Msg) (DomainState, string, error) {
		var s DomainState
		err := json.Unmarshal(m.Data, &s)
		if err == nil && m.Subject != StateSubject(s.Host, s.VM) {
			err = errors.New("state of " + s.VM + " on " + m.Subject)
		}
		return s, s.VM, err
	})
}

func domState(vm, state, reason, event string) DomainState {
	return DomainState{Host: testHost, VM: vm, UUID: "uuid-of-" + vm, State: state, Reason: reason, Event: event, At: time.Now().UTC()}
}

// waitKey waits until key holds a state with want's state, or, for
// "undefined", until key is gone.
func waitKey(t *testing.T, js jetstream.JetStream, key string, want string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		got := keyState(t, js, key)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %s: %s after %s, want %s", key, got, waitTimeout, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// keyState is the state key holds: "undefined" when it has none, or what
// went wrong reading it.
func keyState(t *testing.T, js jetstream.JetStream, key string) string {
	t.Helper()
	kv, err := js.KeyValue(t.Context(), StateBucket)
	if err != nil {
		return err.Error()
	}
	e, err := kv.Get(t.Context(), key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return stateUndefined
	}
	if err != nil {
		return err.Error()
	}
	var s DomainState
	if err := json.Unmarshal(e.Value(), &s); err != nil {
		t.Fatalf("key %s: %s is not a state", key, e.Value())
	}
	return s.State
}

func TestStateVM(t *testing.T) {
	const uuid = "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21"
	for name, want := range map[string]string{
		"web-1": "web-1", "Web_2": "Web_2",
		"web.1": uuid, "web 1": uuid, "web*": uuid, "web>": uuid, "": uuid,
		"web:1": uuid, "wéb": uuid, // subject tokens, but no KV keys
	} {
		if got := StateVM(name, uuid); got != want {
			t.Errorf("StateVM(%q) = %q, want %q", name, got, want)
		}
	}
}

// A change goes to the subject and the key; an undefined domain's key is
// deleted; the gauge counts the live domains by state, every state there
// from the start.
func TestStatePublisherChanges(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	msgs := collectStates(t, nc, StateSubject(testHost, "*"))
	p, reg := runStates(t, connect(t, s.ClientURL()), StateConfig{Replicas: 1})
	for _, st := range domainStates {
		checkCounter(t, reg, 0, "virtbus_domains", "state", st)
	}

	p.Update(domState("web-1", "running", "booted", "started"))
	p.Update(domState("web-2", "shutoff", "destroyed", "stopped"))
	got := msgs.WaitIDs(t, waitTimeout, "web-1", "web-2")
	waitKey(t, js, StateKey(testHost, "web-1"), "running")
	waitKey(t, js, StateKey(testHost, "web-2"), "shutoff")
	if i := slices.IndexFunc(got, func(s DomainState) bool { return s.VM == "web-1" }); got[i].Reason != "booted" || got[i].Event != "started" || got[i].UUID != "uuid-of-web-1" {
		t.Errorf("message %+v", got[i])
	}
	checkCounter(t, reg, 1, "virtbus_domains", "state", "running")
	checkCounter(t, reg, 1, "virtbus_domains", "state", "shutoff")

	p.Update(domState("web-1", stateUndefined, "", "undefined"))
	msgs.Take(t, "web-1 undefined", func(s DomainState) bool { return s.VM == "web-1" && s.State == stateUndefined })
	waitKey(t, js, StateKey(testHost, "web-1"), stateUndefined)
	checkCounter(t, reg, 0, "virtbus_domains", "state", "running")

	kv, err := js.KeyValue(t.Context(), StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := kv.Status(t.Context()); err != nil || st.History() != 1 || st.TTL() != 0 {
		t.Errorf("bucket status %+v, %v: want one value per key, kept for good", st, err)
	}
}

// Resync rewrites every key, reports only what it removes on the subject,
// deletes this host's keys of domains it does not name (not the markers
// of keys deleted before, not another host's keys), and sets the gauge
// from the list.
func TestStatePublisherResync(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	kv, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: StateBucket, History: 1})
	if err != nil {
		t.Fatal(err)
	}
	put := func(key string, st DomainState) {
		data, _ := json.Marshal(st)
		if _, err := kv.Put(t.Context(), key, data); err != nil {
			t.Fatal(err)
		}
	}
	put(StateKey(testHost, "old"), domState("old", "running", "booted", "started"))
	put(StateKey(testHost, "web-1"), domState("web-1", "paused", "user", "suspended"))
	put(StateKey(testHost, "deleted"), domState("deleted", "running", "booted", "started"))
	if err := kv.Delete(t.Context(), StateKey(testHost, "deleted")); err != nil {
		t.Fatal(err)
	}
	put(StateKey("hv2", "other"), DomainState{Host: "hv2", VM: "other", State: "running"})
	put(StateKey(testHost, "web-3"), domState("web-3", "running", "booted", "started"))
	kept, err := kv.Get(t.Context(), StateKey(testHost, "web-3"))
	if err != nil {
		t.Fatal(err)
	}
	msgs := collectStates(t, nc, StatePrefix+".>")

	p, reg := runStates(t, connect(t, s.ClientURL()), StateConfig{})
	p.Resync([]DomainState{
		domState("web-1", "running", "unpaused", stateResync),
		domState("web-2", "shutoff", "shutdown", stateResync),
		domState("web-3", "running", "booted", stateResync),
	})
	waitKey(t, js, StateKey(testHost, "web-1"), "running")
	waitKey(t, js, StateKey(testHost, "web-2"), "shutoff")
	waitKey(t, js, StateKey(testHost, "old"), stateUndefined)
	// A key that was right already keeps the event and time of its change.
	if e, err := kv.Get(t.Context(), StateKey(testHost, "web-3")); err != nil || e.Revision() != kept.Revision() {
		t.Errorf("web-3 at revision %v (%v), want it untouched at %d", e, err, kept.Revision())
	}
	gone := msgs.WaitID(t, "old")
	if gone.State != stateUndefined || gone.Event != stateResync || gone.UUID != "uuid-of-old" {
		t.Errorf("message of the swept key %+v", gone)
	}
	if e, err := kv.Get(t.Context(), StateKey("hv2", "other")); err != nil {
		t.Errorf("another host's key: %v, %v", e, err)
	}
	if got := msgs.Settled(t); len(got) != 1 {
		t.Errorf("messages %+v: want the swept key's only", got)
	}
	checkCounter(t, reg, 2, "virtbus_domains", "state", "running")
	checkCounter(t, reg, 1, "virtbus_domains", "state", "shutoff")
	checkCounter(t, reg, 0, "virtbus_domains", "state", "paused")

	// What a resync tells as a change reaches the subject only where the
	// bucket differs.
	p.Update(domState("web-3", "running", "booted", stateResync))
	p.Update(domState("web-4", "paused", "user", stateResync))
	p.Update(domState("web-5", stateUndefined, "", stateResync))
	waitKey(t, js, StateKey(testHost, "web-4"), "paused")
	if got := msgs.Settled(t); len(got) != 2 || got[1].VM != "web-4" {
		t.Errorf("messages %+v: want the swept key's, then web-4's only", got)
	}
}

// Through a NATS outage, Update does not wait, one entry per domain is
// kept whatever the number of changes, and the latest state of each is
// written once the server is back.
func TestStatePublisherOutage(t *testing.T) {
	dir := t.TempDir()
	s := bustest.RunServer(t, RunEmbedded, dir, -1)
	port := bustest.ServerPort(t, s)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	pnc := connect(t, s.ClientURL())
	p, _ := runStates(t, pnc, StateConfig{})
	p.Update(domState("web-1", "running", "booted", "started"))
	waitKey(t, js, StateKey(testHost, "web-1"), "running")

	s.Shutdown()
	s.WaitForShutdown()
	bustest.Eventually(t, waitTimeout, "publisher's connection down", func() bool { return !pnc.IsConnected() })
	for range 1000 {
		p.Update(domState("web-1", "paused", "user", "suspended"))
		p.Update(domState("web-2", "running", "booted", "started"))
	}
	p.Update(domState("web-1", "shutoff", "destroyed", "stopped"))
	p.mu.Lock()
	held := len(p.pending)
	p.mu.Unlock()
	if held != 2 {
		t.Errorf("%d states held during the outage, want one per domain (2)", held)
	}

	bustest.RunServer(t, RunEmbedded, dir, port)
	waitKey(t, js, StateKey(testHost, "web-1"), "shutoff")
	waitKey(t, js, StateKey(testHost, "web-2"), "running")
	bustest.Eventually(t, waitTimeout, "nothing held", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.pending) == 0
	})
}

// A server that comes back without the bucket (a new node, a lost store)
// gets it created again with every live domain's key.
func TestStatePublisherRecreatesLostBucket(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	port := bustest.ServerPort(t, s)
	pnc := connect(t, s.ClientURL())
	p, _ := runStates(t, pnc, StateConfig{})
	p.Resync([]DomainState{domState("web-1", "running", "booted", stateResync)})
	p.Update(domState("web-2", "paused", "user", "suspended"))
	js := bustest.JetStream(t, connect(t, s.ClientURL()))
	waitKey(t, js, StateKey(testHost, "web-1"), "running")
	waitKey(t, js, StateKey(testHost, "web-2"), "paused")

	s.Shutdown()
	s.WaitForShutdown()
	bustest.RunServer(t, RunEmbedded, t.TempDir(), port)
	waitKey(t, js, StateKey(testHost, "web-1"), "running")
	waitKey(t, js, StateKey(testHost, "web-2"), "paused")
}

// An operator's bucket is used as it is, not rewritten.
func TestStatePublisherKeepsOperatorBucket(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	js := bustest.JetStream(t, connect(t, s.ClientURL()))
	if _, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: StateBucket, History: 5, Description: "operator's"}); err != nil {
		t.Fatal(err)
	}
	p, _ := runStates(t, connect(t, s.ClientURL()), StateConfig{Replicas: 1})
	p.Update(domState("web-1", "running", "booted", "started"))
	waitKey(t, js, StateKey(testHost, "web-1"), "running")
	kv, err := js.KeyValue(t.Context(), StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := kv.Status(t.Context()); err != nil || st.History() != 5 {
		t.Errorf("bucket status %+v, %v: want the operator's history of 5", st, err)
	}
}

// Without JetStream (core delivery) the states still reach the subject.
func TestStatePublisherSubjectOnly(t *testing.T) {
	s := bustest.RunCoreServer(t)
	nc := connect(t, s.ClientURL())
	msgs := collectStates(t, nc, StateSubject(testHost, "*"))
	p, _ := runStates(t, connect(t, s.ClientURL()), StateConfig{SubjectOnly: true})
	p.Resync([]DomainState{domState("web-1", "running", "booted", stateResync)})
	p.Update(domState("web-2", "crashed", "panicked", "crashed"))
	if got := msgs.WaitID(t, "web-2"); got.State != "crashed" || got.Reason != "panicked" {
		t.Errorf("message %+v", got)
	}
}

// The publisher does its whole job as user hv1 of deploy/nats-server.conf
// (create the bucket, write and delete its keys, sweep, publish), and the
// server refuses none of it.
func TestStatePublisherUnderDeployConf(t *testing.T) {
	url := startConfServer(t, "../../deploy/nats-server.conf")
	var mu sync.Mutex
	var asyncErrs []error
	nc, err := nats.Connect(url, nats.UserInfo("hv1", "change-me-hv1"), nats.CustomInboxPrefix(WorkerInboxPrefix("hv1")),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			mu.Lock()
			asyncErrs = append(asyncErrs, err)
			mu.Unlock()
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	admin := bustest.Connect(t, url, nats.UserInfo("admin", "change-me-admin"))
	js := bustest.JetStream(t, admin)
	msgs := collectStates(t, admin, StatePrefix+".>")

	p, _ := runStates(t, nc, StateConfig{Host: "hv1", Replicas: 1})
	p.Update(DomainState{Host: "hv1", VM: "old", State: "running"})
	waitKey(t, js, StateKey("hv1", "old"), "running")
	p.Resync([]DomainState{{Host: "hv1", VM: "web-1", State: "running"}})
	waitKey(t, js, StateKey("hv1", "web-1"), "running")
	waitKey(t, js, StateKey("hv1", "old"), stateUndefined)
	msgs.Take(t, "old undefined", func(s DomainState) bool { return s.VM == "old" && s.State == stateUndefined })

	if err := nc.FlushTimeout(waitTimeout); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if err := nc.LastError(); err != nil || len(asyncErrs) > 0 {
		t.Errorf("hv1's connection: last error %v, async errors %v", err, asyncErrs)
	}
}

// startConfServer runs a server from the config file at path on a free
// loopback port, its store in a temporary directory.
func startConfServer(t *testing.T, path string) string {
	t.Helper()
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	opts.Host, opts.Port = "127.0.0.1", -1
	opts.HTTPHost, opts.HTTPPort = "", 0
	opts.StoreDir = t.TempDir()
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("server from %s: %v", path, err)
	}
	go s.Start()
	if !s.ReadyForConnections(waitTimeout) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s.ClientURL()
}

// A standby worker's publisher writes nothing, so a host's states come
// from one worker; once it is the active one it writes the latest of
// each domain it kept meanwhile.
func TestStatePublisherWaitsWhileStandby(t *testing.T) {
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	msgs := collectStates(t, nc, StateSubject(testHost, "*"))
	var active atomic.Bool
	p, _ := runStates(t, connect(t, s.ClientURL()), StateConfig{Replicas: 1, Active: active.Load})

	p.Update(domState("web-1", "running", "booted", "started"))
	p.Update(domState("web-1", "paused", "user", "suspended"))
	time.Sleep(500 * time.Millisecond) // two of the publisher's standby polls
	if got := msgs.Snapshot(); len(got) != 0 {
		t.Fatalf("a standby published %+v", got)
	}
	if _, err := js.KeyValue(t.Context(), StateBucket); err == nil {
		t.Errorf("a standby made the bucket")
	}

	active.Store(true)
	got := msgs.Take(t, "web-1 once active", func(s DomainState) bool { return s.VM == "web-1" })
	if got.State != "paused" {
		t.Errorf("first state written once active: %+v, want the latest (paused)", got)
	}
	waitKey(t, js, StateKey(testHost, "web-1"), "paused")
}
