package main

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// The permission sets of deploy/nats-server.conf, checked against a real
// server started from the file: each user can do its job and no more.
func TestDeployNATSServerConf(t *testing.T) {
	opts, err := server.ProcessConfigFile("../../deploy/nats-server.conf")
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
	url := s.ClientURL()
	ctx := t.Context()

	// The operator creates the stream from deploy/ before any worker ran.
	admin, _ := connectAs(t, url, "admin", "change-me-admin")
	adminJS, _ := jetstream.New(admin)
	raw, err := os.ReadFile("../../deploy/virtbus-cmd-stream.json")
	if err != nil {
		t.Fatal(err)
	}
	var streamCfg jetstream.StreamConfig
	if err := json.Unmarshal(raw, &streamCfg); err != nil {
		t.Fatalf("deploy/virtbus-cmd-stream.json: %v", err)
	}
	if streamCfg.Name != bus.StreamName || streamCfg.Retention != jetstream.WorkQueuePolicy || streamCfg.Duplicates == 0 {
		t.Errorf("deploy/virtbus-cmd-stream.json: %+v", streamCfg)
	}
	if _, err := adminJS.CreateStream(ctx, streamCfg); err != nil {
		t.Fatalf("create stream from deploy/virtbus-cmd-stream.json: %v", err)
	}

	// The worker on hv1 makes the calls internal/bus makes at start.
	worker, workerErrs := connectAs(t, url, "hv1", "change-me-hv1")
	js, _ := jetstream.New(worker)
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: bus.StreamName, Description: streamCfg.Description, Subjects: []string{bus.CommandPrefix + ".>"},
		Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
	}); err != nil {
		t.Fatalf("worker: create or update stream: %v", err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, bus.StreamName, jetstream.ConsumerConfig{
		Durable: bus.ConsumerName("hv1"), FilterSubject: bus.CommandPrefix + ".hv1.>",
		AckPolicy: jetstream.AckExplicitPolicy, AckWait: 30 * time.Second, MaxDeliver: -1,
	})
	if err != nil {
		t.Fatalf("worker: create or update consumer: %v", err)
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: bus.RecordBucket, History: 1, TTL: 24 * time.Hour, Storage: jetstream.FileStorage,
	})
	if err != nil {
		t.Fatalf("worker: create or update kv bucket: %v", err)
	}

	// It answers each command: in progress, record, event, reply, ack.
	resp := &responder{sent: map[string][]byte{}}
	workerFailed := make(chan error, 16)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		err := func() error {
			if err := m.InProgress(); err != nil {
				return err
			}
			b := resp.answer(m.Subject(), m.Headers(), m.Data())
			if b == nil {
				return m.Ack()
			}
			_, vm, action, _ := bus.ParseCommandSubject(m.Subject())
			key := "hv1." + m.Headers().Get(bus.HeaderMsgID)
			if _, err := kv.Put(ctx, key, b); err != nil {
				return err
			}
			if _, err := kv.Get(ctx, key); err != nil {
				return err
			}
			if err := worker.Publish(bus.EventSubject("hv1", vm, action), b); err != nil {
				return err
			}
			if reply := m.Headers().Get(bus.HeaderReply); reply != "" {
				if err := worker.Publish(reply, b); err != nil {
					return err
				}
			}
			return m.DoubleAck(ctx)
		}()
		if err != nil {
			workerFailed <- err
		}
	})
	if err != nil {
		t.Fatalf("worker: consume: %v", err)
	}
	t.Cleanup(cc.Stop)

	publishAs := func(user string, args ...string) result {
		env := envFunc(map[string]string{"VIRTBUS_NATS_URL": url, "VIRTBUS_HOST": "hv1",
			"VIRTBUS_NATS_USER": user, "VIRTBUS_NATS_PASSWORD": "change-me-" + user})
		var stdout, stderr strings.Builder
		code := exitCode(run(ctx, append([]string{"-timeout", "5s"}, args...), env, &stdout, &stderr), &stderr)
		return result{code, stdout.String(), stderr.String()}
	}
	refused := func(t *testing.T, r result) {
		t.Helper()
		r.want(t, exitFailed)
		if !strings.Contains(r.stderr, "Permissions Violation") {
			t.Errorf("stderr does not name the refusal: %s", r.stderr)
		}
	}

	t.Run("tenant commands its own VMs only", func(t *testing.T) {
		publishAs("tenant-a", "stop", "web-1").want(t, exitOK)
		publishAs("tenant-a", "-wait=false", "start", "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21").want(t, exitOK)
		refused(t, publishAs("tenant-a", "stop", "web-2"))
		refused(t, publishAs("tenant-a", "-host", "hv3", "stop", "web-1"))
	})
	t.Run("rebooter may only reboot", func(t *testing.T) {
		publishAs("rebooter", "reboot", "web-2").want(t, exitOK)
		refused(t, publishAs("rebooter", "stop", "web-2"))
	})
	select {
	case err := <-workerFailed:
		t.Fatalf("worker refused: %v", err)
	case err := <-workerErrs:
		t.Fatalf("worker refused: %v", err)
	default:
	}

	t.Run("worker stays inside its host", func(t *testing.T) {
		for _, subject := range []string{
			"$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv2.virtbus.cmd.hv2.>",
			"$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv1.virtbus.cmd.hv2.>",
			"$JS.API.CONSUMER.CREATE.VIRTBUS_CMD.virtbus-hv1",
			"$JS.API.CONSUMER.DURABLE.CREATE.VIRTBUS_CMD.virtbus-hv1",
			"$JS.API.CONSUMER.MSG.NEXT.VIRTBUS_CMD.virtbus-hv2",
			"$JS.ACK.VIRTBUS_CMD.virtbus-hv2.1.1.1.1.1",
			"$JS.API.STREAM.DELETE.VIRTBUS_CMD",
			"$KV.VIRTBUS_DONE.hv2.x",
			"virtbus.evt.hv2.web-1.stop",
			"virtbus.cmd.hv2.web-1.stop",
		} {
			wantDenied(t, worker, workerErrs, "publish "+subject, func() error { return worker.Publish(subject, nil) })
		}
		wantDenied(t, worker, workerErrs, "subscribe virtbus.cmd.hv2.>", func() error {
			_, err := worker.SubscribeSync("virtbus.cmd.hv2.>")
			return err
		})
	})
	t.Run("tenant reads its own events only", func(t *testing.T) {
		nc, errs := connectAs(t, url, "tenant-a", "change-me-tenant-a")
		if _, err := nc.SubscribeSync("virtbus.evt.hv1.web-1.>"); err != nil {
			t.Fatal(err)
		}
		for _, subject := range []string{"virtbus.evt.hv1.web-2.>", "virtbus.evt.>"} {
			wantDenied(t, nc, errs, "subscribe "+subject, func() error {
				_, err := nc.SubscribeSync(subject)
				return err
			})
		}
		wantDenied(t, nc, errs, "stream info", func() error { return nc.Publish("$JS.API.STREAM.INFO.VIRTBUS_CMD", nil) })
	})
}

// connectAs connects as user; the channel receives the connection's
// asynchronous errors, where the server's refusals arrive.
func connectAs(t *testing.T, url, user, password string) (*nats.Conn, chan error) {
	t.Helper()
	errs := make(chan error, 64)
	nc, err := nats.Connect(url, nats.UserInfo(user, password),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	return nc, errs
}

func wantDenied(t *testing.T, nc *nats.Conn, errs chan error, what string, do func() error) {
	t.Helper()
	if err := do(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatalf("%s: flush: %v", what, err)
	}
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Errorf("%s: %v, want a permissions violation", what, err)
		}
	case <-time.After(2 * time.Second):
		t.Errorf("%s: allowed, want refused", what)
	}
}
