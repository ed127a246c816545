package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/bus"
)

const (
	deployConf   = "../../deploy/nats-server.conf"
	deployStream = "../../deploy/virtbus-cmd-stream.json"
	// UUIDs of web-1 (tenant A) and web-2 (tenant B) in deploy/nats-server.conf.
	uuidA = "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21"
	uuidB = "7d2e9a40-5c1b-4f3e-8a6d-1e0b9c8f7a65"
)

// The permission sets of deploy/nats-server.conf, checked against a real
// server started from the file and a real bus worker logged in as hv1:
// each user can do its job, shown by doing it, and no more, shown by the
// server's refusals.
func TestDeployNATSServerConf(t *testing.T) {
	t.Run("worker creates what is missing", func(t *testing.T) {
		url := startDeployServer(t)
		w := startDeployWorker(t, url)
		tenantRoundTrip(t, url)
		w.noViolations(t, url)
	})

	t.Run("operator created the stream", func(t *testing.T) {
		url := startDeployServer(t)
		createDeployStream(t, url)
		w := startDeployWorker(t, url)
		tenantRoundTrip(t, url)

		t.Run("publish", func(t *testing.T) { testDeployPublish(t, url) })
		t.Run("rules", func(t *testing.T) { testDeployRules(t, url) })
		t.Run("consumer filter in the body", func(t *testing.T) { testDeployConsumerFilter(t, url) })
		t.Run("reply injections", func(t *testing.T) { testDeployReplyInjections(t, url) })
		t.Run("discovery", func(t *testing.T) { testDeployDiscovery(t, url, w) })
		w.noViolations(t, url)
		t.Run("reply to the default inbox", func(t *testing.T) { testDeployDefaultInbox(t, url, w) })
	})
}

// testDeployPublish runs the publish command as each user.
func testDeployPublish(t *testing.T, url string) {
	publishAs := func(user string, args ...string) result {
		env := envFunc(map[string]string{"VIRTBUS_NATS_URL": url, "VIRTBUS_HOST": "hv1",
			"VIRTBUS_NATS_USER": user, "VIRTBUS_NATS_PASSWORD": "change-me-" + user,
			"VIRTBUS_NATS_INBOX_PREFIX": inboxPrefix(user)})
		var stdout, stderr strings.Builder
		code := exitCode(run(t.Context(), append([]string{"-timeout", "5s"}, args...), env, &stdout, &stderr), &stderr)
		return result{code, stdout.String(), stderr.String()}
	}
	refused := func(t *testing.T, r result) {
		t.Helper()
		r.want(t, exitFailed)
		if !strings.Contains(r.stderr, "Permissions Violation") {
			t.Errorf("stderr does not name the refusal: %s", r.stderr)
		}
	}

	t.Run("tenants command their own VMs only", func(t *testing.T) {
		publishAs("tenant-a", "stop", "web-1").want(t, exitOK)
		publishAs("tenant-a", "-wait=false", "start", uuidA).want(t, exitOK)
		publishAs("tenant-b", "stop", "web-2").want(t, exitOK)
		refused(t, publishAs("tenant-a", "stop", "web-2"))
		refused(t, publishAs("tenant-a", "-host", "hv3", "stop", "web-1"))
		refused(t, publishAs("tenant-b", "stop", "web-1"))
	})
	t.Run("a tenant needs its inbox prefix", func(t *testing.T) {
		// The PubAck would come to _INBOX., which only admin may read.
		// -wait=false: with a Virtbus-Reply in _INBOX. the worker's
		// answer there would be refused too, on the worker's connection.
		refused(t, publishAs("tenant-a", "-inbox-prefix", "_INBOX", "-wait=false", "stop", "web-1"))
	})
	t.Run("rebooter may only reboot", func(t *testing.T) {
		publishAs("rebooter", "reboot", "web-2").want(t, exitOK)
		refused(t, publishAs("rebooter", "stop", "web-2"))
	})
	t.Run("admin waits under virtbus.reply", func(t *testing.T) {
		publishAs("admin", "-inbox-prefix", "virtbus.reply", "status", "web-1").want(t, exitOK)
	})
}

// A rule is one operation of one user and whether the server allows it.
type rule struct {
	user    string
	op      string // "pub" or "sub"
	subject string
	allowed bool
}

// testDeployRules checks each rule on a connection of its own: the
// server answers a refused publish or subscription with an -ERR before the
// PONG of the Flush that follows, and the client records it as the
// connection's last error.
func testDeployRules(t *testing.T, url string) {
	const allow, deny = true, false
	rules := []rule{
		// The worker: its host, its consumer, its records; no stream
		// update, delete or purge; no other host's subjects, consumer or
		// keys. The real worker above shows the allowed JetStream calls.
		{"hv1", "pub", "virtbus.evt.hv1.web-1.stop", allow},
		{"hv1", "pub", "virtbus.cmd.hv1.web-1.status", allow},
		{"hv1", "pub", "$KV.VIRTBUS_DONE.hv1.x", allow},
		{"hv1", "pub", "$JS.API.STREAM.INFO.VIRTBUS_CMD", allow},
		{"hv1", "pub", "$JS.API.STREAM.UPDATE.VIRTBUS_CMD", deny},
		{"hv1", "pub", "$JS.API.STREAM.DELETE.VIRTBUS_CMD", deny},
		{"hv1", "pub", "$JS.API.STREAM.PURGE.VIRTBUS_CMD", deny},
		{"hv1", "pub", "$JS.API.STREAM.UPDATE.KV_VIRTBUS_DONE", deny},
		{"hv1", "pub", "$JS.API.STREAM.DELETE.KV_VIRTBUS_DONE", deny},
		{"hv1", "pub", "$JS.API.STREAM.PURGE.KV_VIRTBUS_DONE", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.DELETE.VIRTBUS_CMD.virtbus-hv1", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv2.virtbus.cmd.hv2.>", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv1.virtbus.cmd.hv2.>", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv1", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.DURABLE.CREATE.VIRTBUS_CMD.virtbus-hv1", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.MSG.NEXT.VIRTBUS_CMD.virtbus-hv2", deny},
		{"hv1", "pub", "$JS.API.CONSUMER.RESET.VIRTBUS_CMD.virtbus-hv1", allow},
		{"hv1", "pub", "$JS.API.CONSUMER.RESET.VIRTBUS_CMD.virtbus-hv2", deny},
		{"hv1", "pub", "$JS.ACK.VIRTBUS_CMD.virtbus-hv2.1.1.1.1.1", deny},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_DONE", deny},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_DONE.$KV.VIRTBUS_DONE.hv2.x", deny},
		{"hv1", "pub", "$KV.VIRTBUS_DONE.hv2.x", deny},
		{"hv1", "pub", "$KV.VIRTBUS_LEASE.hv2", deny},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_LEASE.$KV.VIRTBUS_LEASE.hv2", deny},
		{"tenant-a", "pub", "$KV.VIRTBUS_LEASE.hv1", deny},
		// Domain states: its host's subjects and keys, no other host's.
		{"hv1", "pub", "virtbus.state.hv1.web-1", allow},
		{"hv1", "pub", "$KV.VIRTBUS_VMS.hv1.web-1", allow},
		{"hv1", "pub", "$JS.API.STREAM.INFO.KV_VIRTBUS_VMS", allow},
		{"hv1", "pub", "$JS.API.STREAM.CREATE.KV_VIRTBUS_VMS", allow},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_VMS.$KV.VIRTBUS_VMS.hv1.web-1", allow},
		{"hv1", "pub", "virtbus.state.hv2.web-1", deny},
		{"hv1", "pub", "$KV.VIRTBUS_VMS.hv2.web-1", deny},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_VMS.$KV.VIRTBUS_VMS.hv2.web-1", deny},
		{"hv1", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_VMS", deny},
		{"hv1", "pub", "$JS.API.STREAM.UPDATE.KV_VIRTBUS_VMS", deny},
		{"hv1", "pub", "$JS.API.STREAM.DELETE.KV_VIRTBUS_VMS", deny},
		{"hv1", "pub", "$JS.API.STREAM.PURGE.KV_VIRTBUS_VMS", deny},
		{"tenant-a", "pub", "virtbus.state.hv1.web-1", deny},
		{"tenant-a", "pub", "$KV.VIRTBUS_VMS.hv1.web-1", deny},
		{"hv1", "pub", "virtbus.evt.hv2.x.stop", deny},
		{"hv1", "pub", "virtbus.cmd.hv2.x.stop", deny},
		// Replies: the tenants' inboxes and virtbus.reply; not another
		// worker's inbox or its own (a forged fetch), not _INBOX. (admin's).
		{"hv1", "pub", "_INBOX_tenant-a.x", allow},
		{"hv1", "pub", "_INBOX_tenant-b.x", allow},
		{"hv1", "pub", "_INBOX_rebooter.x", allow},
		{"hv1", "pub", "virtbus.reply.x", allow},
		{"hv1", "pub", "_INBOX_virtbus-hv2.x", deny},
		{"hv1", "pub", "_INBOX_virtbus-hv1.x", deny},
		{"hv1", "pub", "_INBOX.x", deny},
		{"hv1", "sub", "_INBOX_virtbus-hv1.>", allow},
		{"hv1", "sub", "virtbus.cmd.hv1.>", allow},
		{"hv1", "sub", "virtbus.evt.hv1.>", allow},
		{"hv1", "sub", "_INBOX.>", deny},
		{"hv1", "sub", "_INBOX_tenant-a.>", deny},
		{"hv1", "sub", "_INBOX_virtbus-hv2.>", deny},
		{"hv1", "sub", "virtbus.cmd.hv2.>", deny},
		{"hv1", "sub", "virtbus.evt.hv2.>", deny},

		// Tenant A: commands to its VMs, their events, its own inbox.
		{"tenant-a", "pub", "virtbus.cmd.hv1.web-1.status", allow},
		{"tenant-a", "pub", "virtbus.cmd.hv1." + uuidA + ".status", allow},
		{"tenant-a", "pub", "virtbus.cmd.hv2.db-1.status", allow},
		{"tenant-a", "pub", "virtbus.cmd.hv1.web-2.stop", deny},
		{"tenant-a", "pub", "virtbus.cmd.hv1." + uuidB + ".stop", deny},
		{"tenant-a", "pub", "virtbus.evt.hv1.web-1.stop", deny},
		{"tenant-a", "pub", "_INBOX_tenant-b.x", deny},
		{"tenant-a", "pub", "$KV.VIRTBUS_DONE.hv1.x", deny},
		{"tenant-a", "pub", "$JS.API.DIRECT.GET.KV_VIRTBUS_DONE.$KV.VIRTBUS_DONE.hv1.x", deny},
		{"tenant-a", "pub", "$JS.API.STREAM.INFO.VIRTBUS_CMD", deny},
		{"tenant-a", "pub", "$JS.API.STREAM.DELETE.VIRTBUS_CMD", deny},
		{"tenant-a", "pub", "$JS.API.CONSUMER.RESET.VIRTBUS_CMD.virtbus-hv1", deny},
		{"tenant-a", "sub", "_INBOX_tenant-a.>", allow},
		{"tenant-a", "sub", "virtbus.evt.hv1.web-1.>", allow},
		{"tenant-a", "sub", "virtbus.evt.hv1." + uuidA + ".>", allow},
		{"tenant-a", "sub", "virtbus.evt.hv2.db-1.>", allow},
		{"tenant-a", "sub", "_INBOX.>", deny},
		{"tenant-a", "sub", "_INBOX_tenant-b.>", deny},
		{"tenant-a", "sub", "_INBOX_virtbus-hv1.>", deny},
		{"tenant-a", "sub", "virtbus.evt.hv1.web-2.>", deny},
		{"tenant-a", "sub", "virtbus.evt.>", deny},
		{"tenant-a", "sub", "virtbus.cmd.hv1.web-1.>", deny},

		// Tenant B, the mirror image.
		{"tenant-b", "pub", "virtbus.cmd.hv1.web-2.status", allow},
		{"tenant-b", "pub", "virtbus.cmd.hv1." + uuidB + ".status", allow},
		{"tenant-b", "pub", "virtbus.cmd.hv1.web-1.stop", deny},
		{"tenant-b", "sub", "_INBOX_tenant-b.>", allow},
		{"tenant-b", "sub", "virtbus.evt.hv1.web-2.>", allow},
		{"tenant-b", "sub", "_INBOX.>", deny},
		{"tenant-b", "sub", "_INBOX_tenant-a.>", deny},
		{"tenant-b", "sub", "virtbus.evt.hv1.web-1.>", deny},

		// The rebooter: reboot anything, nothing else.
		{"rebooter", "pub", "virtbus.cmd.hv2.db-1.reboot", allow},
		{"rebooter", "pub", "virtbus.cmd.hv1.web-1.stop", deny},
		{"rebooter", "sub", "_INBOX_rebooter.>", allow},
		{"rebooter", "sub", "virtbus.evt.hv1.web-1.reboot", allow},
		{"rebooter", "sub", "virtbus.evt.hv1.web-1.stop", deny},
		{"rebooter", "sub", "_INBOX.>", deny},
		{"rebooter", "sub", "_INBOX_tenant-a.>", deny},

		// Only admin reads the default inbox.
		{"admin", "sub", "_INBOX.>", allow},

		// Discovery: the worker hears the micro requests to all services,
		// to virtbus and to its instance, and its own status endpoint; it
		// asks no other service and answers only to a request's reply
		// (allow_responses), as the "discovery" test shows. Tenants may
		// ask nothing, so they cannot aim a worker's answer.
		{"hv1", "sub", "$SRV.PING", allow},
		{"hv1", "sub", "$SRV.PING.virtbus", allow},
		{"hv1", "sub", "$SRV.INFO.virtbus.x", allow},
		{"hv1", "sub", "$SRV.STATS.virtbus.x", allow},
		{"hv1", "sub", "virtbus.hosts.hv1.status", allow},
		{"hv1", "sub", "virtbus.hosts.hv2.status", deny},
		{"hv1", "sub", "$SRV.PING.other", deny},
		{"hv1", "sub", "$SRV.>", deny},
		{"hv1", "pub", "$SRV.PING.virtbus", deny},
		{"hv1", "pub", "virtbus.hosts.hv2.status", deny},
		{"tenant-a", "pub", "$SRV.STATS.virtbus", deny},
		{"tenant-a", "pub", "$SRV.PING", deny},
		{"tenant-a", "pub", "virtbus.hosts.hv1.status", deny},
		{"tenant-a", "sub", "$SRV.PING.virtbus", deny},
	}
	for _, r := range rules {
		checkRule(t, url, r)
	}
}

func checkRule(t *testing.T, url string, r rule) {
	t.Helper()
	nc := connectAs(t, url, r.user)
	defer nc.Close()
	var err error
	switch r.op {
	case "pub":
		err = nc.Publish(r.subject, nil)
	case "sub":
		_, err = nc.SubscribeSync(r.subject)
	default:
		t.Fatalf("rule %+v: unknown op", r)
	}
	if err == nil {
		err = nc.Flush()
	}
	if err != nil {
		t.Fatalf("%s %s %s: %v", r.user, r.op, r.subject, err)
	}
	got := nc.LastError()
	switch {
	case r.allowed && got != nil:
		t.Errorf("%s %s %s: %v, want allowed", r.user, r.op, r.subject, got)
	case !r.allowed && got == nil:
		t.Errorf("%s %s %s: allowed, want refused", r.user, r.op, r.subject)
	case !r.allowed && (!errors.Is(got, nats.ErrPermissionViolation) || !strings.Contains(got.Error(), `"`+r.subject+`"`)):
		t.Errorf("%s %s %s: %v, want a permissions violation for this subject", r.user, r.op, r.subject, got)
	}
}

// testDeployConsumerFilter: the one consumer subject the worker may use
// names its filter, and the server refuses a request whose body asks for
// another, so hv1 cannot take hv2's commands through its own consumer.
func testDeployConsumerFilter(t *testing.T, url string) {
	nc := connectAs(t, url, "hv1")
	subject := "$JS.API.CONSUMER.CREATE." + bus.StreamName + "." + bus.ConsumerName("hv1") + ".virtbus.cmd.hv1.>"
	for _, cfg := range []string{
		`{"durable_name":"virtbus-hv1","filter_subject":"virtbus.cmd.hv2.>","ack_policy":"explicit"}`,
		`{"durable_name":"virtbus-hv1","filter_subjects":["virtbus.cmd.hv2.>"],"ack_policy":"explicit"}`,
		`{"durable_name":"virtbus-hv1","ack_policy":"explicit"}`,
	} {
		req := `{"stream_name":"` + bus.StreamName + `","config":` + cfg + `}`
		resp, err := nc.Request(subject, []byte(req), 5*time.Second)
		if err != nil {
			t.Fatalf("consumer create %s: %v", cfg, err)
		}
		var answer struct {
			Error *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if err := json.Unmarshal(resp.Data, &answer); err != nil || answer.Error == nil {
			t.Errorf("consumer create %s: answered %s, want an error", cfg, resp.Data)
		}
	}
	if err := nc.LastError(); err != nil {
		t.Errorf("hv1 on its own consumer subject: %v", err)
	}
}

// testDeployReplyInjections: a tenant names one of hv1's own subjects as
// Virtbus-Reply. hv1's permissions allow those subjects (the worker needs
// them), so here the worker's own check is the wall: the command ends in
// one `invalid` completion, and nothing reaches the named subject. The
// permissions are the wall for everything outside hv1 (see the rules:
// hv1 publishes to no virtbus.evt.hv2, virtbus.cmd.hv2, $KV.VIRTBUS_DONE.hv2).
func testDeployReplyInjections(t *testing.T, url string) {
	tenant := connectAs(t, url, "tenant-a")
	events, err := tenant.SubscribeSync("virtbus.evt.hv1.web-1.>")
	if err != nil {
		t.Fatal(err)
	}
	admin := connectAs(t, url, "admin")
	leaked, err := admin.SubscribeSync("virtbus.>")
	if err == nil {
		err = admin.Flush()
	}
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(tenant)
	for _, reply := range []string{
		"$KV.VIRTBUS_DONE.hv1.inj",
		"virtbus.cmd.hv1.web-2.stop",
		"virtbus.evt.hv1.web-2.stop",
	} {
		id := "inj-" + nuid.Next()
		msg := commandMsg(bus.CommandSubject("hv1", "web-1", "start"), id, nil)
		msg.Header.Set(bus.HeaderReply, reply)
		if _, err := js.PublishMsg(t.Context(), msg); err != nil {
			t.Fatalf("publish with reply %s: %v", reply, err)
		}
		c := nextCompletion(t, events, id)
		if c.Status != bus.StatusError || c.Error == nil || c.Error.Code != bus.CodeInvalid {
			t.Errorf("reply %s: completion %+v, want code %s", reply, c, bus.CodeInvalid)
		}
		for {
			m, err := leaked.NextMsg(100 * time.Millisecond)
			if err != nil {
				break
			}
			if m.Subject == reply {
				t.Errorf("reply %s: the worker published there", reply)
			}
		}
	}
	if err := tenant.LastError(); err != nil {
		t.Errorf("tenant-a: %v", err)
	}
	adminJS, _ := jetstream.New(admin)
	records, err := adminJS.KeyValue(t.Context(), bus.RecordBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := records.Get(t.Context(), "hv1.inj"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("record key hv1.inj: %v, want none: a reply injection wrote it", err)
	}
}

// testDeployDefaultInbox: a reply subject the worker's check lets by
// ("_INBOX." is among the default VIRTBUS_REPLY_PREFIXES) but this
// config does not: the server refuses the worker's publish, the worker's
// connection lives on, and the completion still reaches the event subject.
func testDeployDefaultInbox(t *testing.T, url string, w *deployWorker) {
	tenant := connectAs(t, url, "tenant-a")
	events, err := tenant.SubscribeSync("virtbus.evt.hv1.web-1.>")
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(tenant)
	reply := nats.NewInbox()
	id := "default-inbox-" + nuid.Next()
	msg := commandMsg(bus.CommandSubject("hv1", "web-1", "start"), id, nil)
	msg.Header.Set(bus.HeaderReply, reply)
	if _, err := js.PublishMsg(t.Context(), msg); err != nil {
		t.Fatal(err)
	}
	if c := nextCompletion(t, events, id); c.Status != bus.StatusOK {
		t.Errorf("completion %+v, want ok", c)
	}
	// The worker acks only after the server has both its publishes.
	w.settle(t, url)
	got := w.nc.LastError()
	if !errors.Is(got, nats.ErrPermissionViolation) || !strings.Contains(got.Error(), `"`+reply+`"`) {
		t.Errorf("worker's last error %v, want a permissions violation for %s", got, reply)
	}
	tenantRoundTrip(t, url)
}

// tenantRoundTrip is a tenant's command end to end: tenant-a publishes a
// command for web-1 with JetStream, its reply subject in its own inbox, and
// gets the worker's completion there.
func tenantRoundTrip(t *testing.T, url string) {
	t.Helper()
	nc := connectAs(t, url, "tenant-a")
	inbox := nc.NewInbox()
	if !strings.HasPrefix(inbox, "_INBOX_tenant-a.") {
		t.Fatalf("inbox %s", inbox)
	}
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	id := "rt-" + nuid.Next()
	msg := commandMsg(bus.CommandSubject("hv1", "web-1", "start"), id, nil)
	msg.Header.Set(bus.HeaderReply, inbox)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, msg); err != nil {
		t.Fatalf("tenant-a: publish: %v (last error %v)", err, nc.LastError())
	}
	c := nextCompletion(t, sub, id)
	if c.Status != bus.StatusOK || !c.Changed || c.State != "running" || c.Host != "hv1" || c.VM != "web-1" {
		t.Errorf("completion %+v", c)
	}
	if err := nc.LastError(); err != nil {
		t.Errorf("tenant-a: %v", err)
	}
}

// nextCompletion returns the completion of command id from sub.
func nextCompletion(t *testing.T, sub *nats.Subscription, id string) bus.Completion {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("no completion of %s on %s: %v", id, sub.Subject, err)
		}
		var c bus.Completion
		if err := json.Unmarshal(m.Data, &c); err != nil {
			t.Fatalf("not a completion on %s: %s", m.Subject, m.Data)
		}
		if c.ID == id {
			return c
		}
	}
}

// deployWorker is a real bus worker for host hv1, logged in as user hv1.
type deployWorker struct {
	nc *nats.Conn

	mu     sync.Mutex
	errs   []error // the connection's asynchronous errors
	logBuf bytes.Buffer
}

func startDeployWorker(t *testing.T, url string) *deployWorker {
	t.Helper()
	d := &deployWorker{}
	log := slog.New(slog.NewTextHandler(lockedWriter{&d.mu, &d.logBuf}, nil))
	nc, err := bus.Connect(bus.ConnOptions{URL: url, Name: "virtbus-worker-hv1", User: "hv1", Password: "change-me-hv1",
		InboxPrefix: bus.WorkerInboxPrefix("hv1")}, log)
	if err != nil {
		t.Fatal(err)
	}
	d.nc = nc
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		d.mu.Lock()
		d.errs = append(d.errs, err)
		d.mu.Unlock()
	})
	handler := func(context.Context, bus.Command) bus.Outcome { return bus.Outcome{Changed: true, State: "running"} }
	w, err := bus.New(nc, bus.Config{Host: "hv1"}, handler, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("worker: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("worker did not stop")
		}
		nc.Close()
		if t.Failed() {
			d.mu.Lock()
			t.Logf("worker log:\n%s", d.logBuf.String())
			d.mu.Unlock()
		}
	})
	for deadline := time.Now().Add(15 * time.Second); !w.Ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			d.mu.Lock()
			defer d.mu.Unlock()
			t.Fatalf("worker not ready; async errors %v; log:\n%s", d.errs, d.logBuf.String())
		}
	}
	return d
}

// settle waits until the worker has acked every command of its host. It
// acks a command only after publishing its completion on the same
// connection, so by then the server has answered every publish of the
// worker's, refusals included; a flush of that connection then makes sure
// the worker has read those answers.
func (d *deployWorker) settle(t *testing.T, url string) {
	t.Helper()
	js, err := jetstream.New(connectAs(t, url, "admin"))
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		cons, err := js.Consumer(t.Context(), bus.StreamName, bus.ConsumerName("hv1"))
		if err != nil {
			t.Fatal(err)
		}
		info := cons.CachedInfo()
		if info.NumPending == 0 && info.NumAckPending == 0 {
			if err := d.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker left %d commands pending and %d unacked", info.NumPending, info.NumAckPending)
		}
	}
}

// noViolations fails when the server refused anything the worker did.
func (d *deployWorker) noViolations(t *testing.T, url string) {
	t.Helper()
	d.settle(t, url)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.nc.LastError(); err != nil || len(d.errs) > 0 {
		t.Errorf("worker's connection: last error %v, async errors %v", err, d.errs)
	}
	// A record-key listing the server refuses costs only speed, so the
	// worker goes on, and says so in its log.
	if strings.Contains(d.logBuf.String(), "record keys not listed") {
		t.Error("the worker could not list its record keys:\n" + d.logBuf.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// startDeployServer runs a server from deploy/nats-server.conf on a free
// port, its store in a temporary directory.
func startDeployServer(t *testing.T) string {
	t.Helper()
	opts, err := server.ProcessConfigFile(deployConf)
	if err != nil {
		t.Fatalf("deploy/nats-server.conf: %v", err)
	}
	if !opts.JetStream {
		t.Fatal("deploy/nats-server.conf does not enable JetStream")
	}
	opts.Host, opts.Port = "127.0.0.1", -1
	opts.HTTPHost, opts.HTTPPort = "", 0
	opts.StoreDir = t.TempDir()
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("server from deploy/nats-server.conf: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(5 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s.ClientURL()
}

// createDeployStream creates the stream as admin from
// deploy/virtbus-cmd-stream.json, as the README tells an operator to.
func createDeployStream(t *testing.T, url string) {
	t.Helper()
	raw, err := os.ReadFile(deployStream)
	if err != nil {
		t.Fatal(err)
	}
	var cfg jetstream.StreamConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("deploy/virtbus-cmd-stream.json: %v", err)
	}
	if cfg.Name != bus.StreamName || cfg.Retention != jetstream.WorkQueuePolicy || cfg.Duplicates == 0 {
		t.Errorf("deploy/virtbus-cmd-stream.json: %+v", cfg)
	}
	js, err := jetstream.New(connectAs(t, url, "admin"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(t.Context(), cfg); err != nil {
		t.Fatalf("create stream from deploy/virtbus-cmd-stream.json: %v", err)
	}
}

// inboxPrefix is each user's inbox prefix in deploy/nats-server.conf;
// admin keeps NATS's default.
func inboxPrefix(user string) string {
	switch user {
	case "admin":
		return ""
	case "hv1":
		return bus.WorkerInboxPrefix("hv1")
	default:
		return "_INBOX_" + user
	}
}

// connectAs connects as user, with the user's inbox prefix and the
// placeholder password of deploy/nats-server.conf.
func connectAs(t *testing.T, url, user string) *nats.Conn {
	t.Helper()
	opts := []nats.Option{nats.UserInfo(user, "change-me-"+user)}
	if p := inboxPrefix(user); p != "" {
		opts = append(opts, nats.CustomInboxPrefix(p))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// testDeployDiscovery registers the worker's discovery service as hv1 and
// asks for it as admin, the way the nats CLI and `publish hosts` do: the
// answers reach admin's "_INBOX." through allow_responses alone. A
// tenant may not ask.
func testDeployDiscovery(t *testing.T, url string, w *deployWorker) {
	svc, err := bus.AddService(w.nc, "hv1", "v1.2.3", func() bus.HostStatus { return bus.HostStatus{Host: "hv1", Role: bus.RoleActive} })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = svc.Stop() }()
	admin := connectAs(t, url, "admin")
	if err := admin.Flush(); err != nil {
		t.Fatal(err)
	}
	w.settle(t, url) // the worker's subscriptions are in place once its connection did a round trip
	if err := w.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, subject := range []string{"$SRV.PING.virtbus", bus.StatusSubject("hv1")} {
		m, err := admin.Request(subject, nil, 5*time.Second)
		if err != nil {
			t.Fatalf("admin asks %s: %v", subject, err)
		}
		if !strings.Contains(string(m.Data), `"hv1"`) {
			t.Errorf("%s answered %s, want hv1 in it", subject, m.Data)
		}
	}
	reports, err := bus.DiscoverHosts(t.Context(), admin, 2*time.Second)
	if err != nil || len(reports) != 1 || reports[0].Host != "hv1" {
		t.Errorf("admin discovers %+v (%v), want hv1 alone", reports, err)
	}

	env := envFunc(map[string]string{"VIRTBUS_NATS_URL": url, "VIRTBUS_NATS_USER": "tenant-a",
		"VIRTBUS_NATS_PASSWORD": "change-me-tenant-a", "VIRTBUS_NATS_INBOX_PREFIX": inboxPrefix("tenant-a")})
	var stdout, stderr strings.Builder
	if code := exitCode(run(t.Context(), []string{"hosts"}, env, &stdout, &stderr), &stderr); code != exitFailed || !strings.Contains(stderr.String(), "Permissions Violation") {
		t.Errorf("tenant-a's publish hosts: exit %d, stderr %s; want 1 and the refusal", code, stderr.String())
	}
	// Without -host and VIRTBUS_HOST a tenant, who may not read
	// VIRTBUS_VMS, is told so and falls back to this machine's host id,
	// where it may command nothing here.
	stdout.Reset()
	stderr.Reset()
	code := exitCode(run(t.Context(), []string{"-timeout", "30s", "stop", "web-1"}, env, &stdout, &stderr), &stderr)
	if code != exitFailed || !strings.Contains(stderr.String(), "cannot be read") || !strings.Contains(stderr.String(), "Permissions Violation") {
		t.Errorf("tenant-a's publish stop web-1 without a host: exit %d, stderr %s; want 1, the fallback and the refusal", code, stderr.String())
	}
	w.noViolations(t, url)
}
