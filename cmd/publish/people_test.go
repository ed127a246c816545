package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// putStates creates the state bucket and puts states in it, as a worker
// publishing domain states would.
func putStates(t *testing.T, js jetstream.JetStream, states ...bus.DomainState) jetstream.KeyValue {
	t.Helper()
	kv, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: bus.StateBucket, Storage: jetstream.MemoryStorage})
	if err != nil {
		t.Fatalf("create bucket: %v", err)
	}
	for _, s := range states {
		b, _ := json.Marshal(s)
		if _, err := kv.Put(t.Context(), bus.StateKey(s.Host, s.VM), b); err != nil {
			t.Fatalf("put %s: %v", s.VM, err)
		}
	}
	return kv
}

func TestList(t *testing.T) {
	s := runServer(t, true)
	url := s.ClientURL()
	js := bustest.JetStream(t, bustest.Connect(t, url))
	at := time.Now().Add(-3*time.Minute - 12*time.Second).UTC().Truncate(time.Millisecond)
	states := []bus.DomainState{
		{Host: "hv1", VM: "web-2", UUID: "2b6f5e4d-0000-4000-8000-000000000002", State: "shutoff", Reason: "shutdown", Event: "stopped", At: at},
		{Host: "hv1", VM: "db-1", UUID: "2b6f5e4d-0000-4000-8000-000000000003", State: "paused", Reason: "user", Event: "suspended", At: at},
		{Host: "hv1", VM: "web-1", UUID: "2b6f5e4d-0000-4000-8000-000000000001", State: "running", Reason: "booted", Event: "started", At: at},
		{Host: "hv1", VM: "gone", State: "running", At: at},
		{Host: "hv2", VM: "elsewhere", State: "running", At: at},
	}
	kv := putStates(t, js, states...)
	// An undefined domain's key is deleted; a value that is not a state is
	// left out with a word on stderr.
	if err := kv.Delete(t.Context(), bus.StateKey("hv1", "gone")); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(t.Context(), "hv1.junk", []byte("not json")); err != nil {
		t.Fatal(err)
	}

	t.Run("table", func(t *testing.T) {
		r := runPublish(t.Context(), url, "list")
		r.want(t, exitOK)
		lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
		if len(lines) != 4 || !regexp.MustCompile(`^VM +STATE +REASON +SINCE +UUID$`).MatchString(lines[0]) {
			t.Fatalf("stdout:\n%s", r.stdout)
		}
		for i, want := range []string{
			`^db-1 +paused +user +3m1[2-9]s ago \(\d\d:\d\d:\d\d\) +2b6f5e4d-0000-4000-8000-000000000003$`,
			`^web-1 +running +booted +3m1[2-9]s ago \(.+\) +2b6f5e4d-0000-4000-8000-000000000001$`,
			`^web-2 +shutoff +shutdown +3m1[2-9]s ago \(.+\) +2b6f5e4d-0000-4000-8000-000000000002$`,
		} {
			if !regexp.MustCompile(want).MatchString(lines[i+1]) {
				t.Errorf("line %d %q does not match %s", i+1, lines[i+1], want)
			}
		}
		if !strings.Contains(r.stderr, "hv1.junk is not a domain state") {
			t.Errorf("stderr %q", r.stderr)
		}
	})

	t.Run("json", func(t *testing.T) {
		r := runPublish(t.Context(), url, "-json", "list")
		r.want(t, exitOK)
		var got []bus.DomainState
		if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
			t.Fatalf("stdout %q: %v", r.stdout, err)
		}
		want := []bus.DomainState{states[1], states[2], states[0]}
		if len(got) != len(want) {
			t.Fatalf("got %+v", got)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("got %+v\nwant %+v", got[i], want[i])
			}
		}
	})

	t.Run("host without domains", func(t *testing.T) {
		r := runPublish(t.Context(), url, "-host", "hv9", "list")
		r.want(t, exitOK)
		if strings.TrimSpace(r.stdout) != "VM  STATE  REASON  SINCE  UUID" || !strings.Contains(r.stderr, "no domains of host hv9") {
			t.Errorf("stdout %q\nstderr %q", r.stdout, r.stderr)
		}
		r = runPublish(t.Context(), url, "-host", "hv9", "-json", "list")
		r.want(t, exitOK)
		if r.stdout != "[]\n" {
			t.Errorf("stdout %q", r.stdout)
		}
	})
}

// Without the bucket there is nothing to list, which is no failure;
// without JetStream, or without a server, list fails.
func TestListWithoutBucket(t *testing.T) {
	url := runServer(t, true).ClientURL()
	r := runPublish(t.Context(), url, "list")
	r.want(t, exitOK)
	if strings.TrimSpace(r.stdout) != "VM  STATE  REASON  SINCE  UUID" || !strings.Contains(r.stderr, "bucket VIRTBUS_VMS does not exist") {
		t.Errorf("stdout %q\nstderr %q", r.stdout, r.stderr)
	}
	r = runPublish(t.Context(), url, "-json", "list")
	r.want(t, exitOK)
	if r.stdout != "[]\n" {
		t.Errorf("stdout %q", r.stdout)
	}

	r = runPublish(t.Context(), runServer(t, false).ClientURL(), "-timeout", "5s", "list")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "reading bucket VIRTBUS_VMS") || r.stdout != "" {
		t.Errorf("no JetStream: stdout %q\nstderr %q", r.stdout, r.stderr)
	}
	runPublish(t.Context(), "nats://127.0.0.1:1", "list").want(t, exitFailed)
}

// startWatch runs publish with args (watch ...) until the test cancels
// it, and returns once it is subscribed. stop ends it and returns its
// exit code.
func startWatch(t *testing.T, url string, args ...string) (stdout *bustest.Buffer, stop func() int) {
	t.Helper()
	env := envFunc(map[string]string{"VIRTBUS_NATS_URL": url, "VIRTBUS_HOST": "hv1"})
	ctx, cancel := context.WithCancel(t.Context())
	stdout, stderr := &bustest.Buffer{}, &bustest.Buffer{}
	done := make(chan int, 1)
	go func() { done <- exitCode(run(ctx, args, env, stdout, stderr), stderr) }()
	bustest.Eventually(t, 10*time.Second, "watch subscribed", func() bool {
		return strings.Contains(stderr.String(), "publish: watching ")
	})
	return stdout, func() int {
		cancel()
		select {
		case code := <-done:
			return code
		case <-time.After(10 * time.Second):
			t.Fatal("watch did not end when its context did")
			return -1
		}
	}
}

// publishJSON publishes v as the worker would, on subject.
func publishJSON(t *testing.T, nc *nats.Conn, subject string, v any) []byte {
	t.Helper()
	b, _ := json.Marshal(v)
	if err := nc.Publish(subject, b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestWatch(t *testing.T) {
	url := runServer(t, false).ClientURL()
	nc := bustest.Connect(t, url)
	at := time.Date(2026, 11, 27, 15, 4, 5, 0, time.UTC)
	state := bus.DomainState{Host: "hv1", VM: "web-1", UUID: "u-1", State: "running", Reason: "booted", Event: "started", At: at}
	done := bus.Completion{ID: "cmd-7", Host: "hv1", VM: "web-1", Action: "stop", Status: bus.StatusOK, Changed: true,
		State: "shutoff", Attempt: 1, FinishedAt: at.Add(100 * time.Millisecond), DurationMS: 1234}
	failed := bus.Completion{ID: "cmd-8", Host: "hv1", VM: "web-1", Action: "start", Status: bus.StatusError,
		Error: &bus.Error{Code: bus.CodeLibvirt, Message: "two\nlines"}, FinishedAt: at.Add(200 * time.Millisecond)}

	t.Run("one VM", func(t *testing.T) {
		stdout, stop := startWatch(t, url, "watch", "web-1")
		// Another VM's and another host's messages come first: were they
		// shown, they would be before the ones awaited below.
		publishJSON(t, nc, bus.StateSubject("hv1", "web-2"), bus.DomainState{Host: "hv1", VM: "web-2", State: "paused"})
		publishJSON(t, nc, bus.StateSubject("hv2", "web-1"), bus.DomainState{Host: "hv2", VM: "web-1", State: "paused"})
		publishJSON(t, nc, bus.StateSubject("hv1", "web-1"), state)
		publishJSON(t, nc, bus.EventSubject("hv1", "web-1", "stop"), done)
		publishJSON(t, nc, bus.EventSubject("hv1", "web-1", "start"), failed)
		bustest.Eventually(t, 10*time.Second, "three lines", func() bool { return strings.Count(stdout.String(), "\n") >= 3 })
		if code := stop(); code != exitOK {
			t.Errorf("exit %d after the context ended, want 0", code)
		}
		clock := func(d time.Duration) string { return at.Add(d).Local().Format("15:04:05.000") }
		want := clock(0) + " state  web-1 running (booted, started)\n" +
			clock(100*time.Millisecond) + " done   web-1 stop ok changed shutoff 1.2s id=cmd-7\n" +
			clock(200*time.Millisecond) + ` done   web-1 start error libvirt: two\nlines id=cmd-8` + "\n"
		if got := stdout.String(); got != want {
			t.Errorf("stdout\n%s\nwant\n%s", got, want)
		}
	})

	t.Run("all VMs, json", func(t *testing.T) {
		stdout, stop := startWatch(t, url, "-json", "watch")
		other := bus.DomainState{Host: "hv1", VM: "web-2", State: "paused", Reason: "user", Event: "suspended", At: at}
		want := string(publishJSON(t, nc, bus.StateSubject("hv1", "web-2"), other)) + "\n" +
			string(publishJSON(t, nc, bus.EventSubject("hv1", "web-1", "stop"), done)) + "\n"
		bustest.Eventually(t, 10*time.Second, "two lines", func() bool { return strings.Count(stdout.String(), "\n") >= 2 })
		if code := stop(); code != exitOK {
			t.Errorf("exit %d", code)
		}
		if got := stdout.String(); got != want {
			t.Errorf("stdout\n%s\nwant\n%s", got, want)
		}
	})
}

func TestGet(t *testing.T) {
	url := runServer(t, true).ClientURL()
	startBusWorker(t, url)
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)

	t.Run("ok", func(t *testing.T) {
		sent := runPublish(t.Context(), url, "-id", "g-1", "-timeout", "10s", "status", "web-1")
		sent.want(t, exitOK)
		r := runPublish(t.Context(), url, "get", "g-1")
		r.want(t, exitOK)
		if r.stdout != sent.stdout {
			t.Errorf("get printed %q, the wait %q", r.stdout, sent.stdout)
		}
		r = runPublish(t.Context(), url, "-json", "get", "g-1")
		r.want(t, exitOK)
		var c bus.Completion
		if err := json.Unmarshal([]byte(r.stdout), &c); err != nil || c.ID != "g-1" || c.VM != "web-1" || c.Status != bus.StatusOK {
			t.Errorf("stdout %q: %v", r.stdout, err)
		}
	})

	t.Run("id the worker made", func(t *testing.T) {
		// A command without Nats-Msg-Id gets a '~' id; its completion on
		// the event subject is where a person would see it.
		sub, err := nc.SubscribeSync(bus.EventSubject("hv1", "web-1", "start"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(t.Context(), bus.CommandSubject("hv1", "web-1", "start"), nil); err != nil {
			t.Fatal(err)
		}
		m, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var c bus.Completion
		if err := json.Unmarshal(m.Data, &c); err != nil || !strings.HasPrefix(c.ID, "~") {
			t.Fatalf("completion %s: %v", m.Data, err)
		}
		r := runPublish(t.Context(), url, "get", c.ID)
		r.want(t, exitOK)
		if !strings.HasPrefix(r.stdout, "ok    start web-1 ") {
			t.Errorf("stdout %q", r.stdout)
		}
	})

	t.Run("error completion", func(t *testing.T) {
		kv, err := js.KeyValue(t.Context(), bus.RecordBucket)
		if err != nil {
			t.Fatal(err)
		}
		rec, _ := json.Marshal(bus.Completion{ID: "e-1", Host: "hv1", VM: "web-1", Action: "stop", Status: bus.StatusError,
			Error: &bus.Error{Code: bus.CodeNotFound, Message: `domain "web-1" not found`}})
		// "<host>.<id>": an id of KV-safe characters stands as it is (record.go).
		if _, err := kv.Put(t.Context(), "hv1.e-1", rec); err != nil {
			t.Fatal(err)
		}
		r := runPublish(t.Context(), url, "get", "e-1")
		r.want(t, exitFailed)
		if want := "error stop web-1 code=not_found: domain \"web-1\" not found\n"; r.stdout != want {
			t.Errorf("stdout %q, want %q", r.stdout, want)
		}
	})

	t.Run("unknown id", func(t *testing.T) {
		r := runPublish(t.Context(), url, "get", "never-sent")
		r.want(t, exitNotRecorded)
		if !strings.Contains(r.stderr, "no completion recorded for id never-sent on host hv1") || r.stdout != "" {
			t.Errorf("stdout %q\nstderr %q", r.stdout, r.stderr)
		}
		// Another host's record is not this one's.
		runPublish(t.Context(), url, "-host", "hv2", "get", "g-1").want(t, exitNotRecorded)
	})
}

func TestGetWithoutBucket(t *testing.T) {
	r := runPublish(t.Context(), runServer(t, true).ClientURL(), "get", "g-1")
	r.want(t, exitNotRecorded)
	if !strings.Contains(r.stderr, "bucket VIRTBUS_DONE does not exist") {
		t.Errorf("stderr %q", r.stderr)
	}
}

func TestSubcommandArgs(t *testing.T) {
	for _, tt := range []struct {
		args          []string
		sub, vm, id   string
		host, timeout string
	}{
		{args: []string{"list"}, sub: "list"},
		{args: []string{"-host", "hv2", "-json", "-timeout", "5s", "list"}, sub: "list", host: "hv2", timeout: "5s"},
		{args: []string{"watch"}, sub: "watch"},
		{args: []string{"watch", "web-1"}, sub: "watch", vm: "web-1"},
		{args: []string{"get", "g-1"}, sub: "get", id: "g-1"},
		{args: []string{"get", "~12-1795800103884988992"}, sub: "get", id: "~12-1795800103884988992"},
	} {
		c, err := parseArgs(tt.args, envFunc(map[string]string{"VIRTBUS_HOST": "hv1"}), &bytes.Buffer{})
		if err != nil {
			t.Errorf("%q: %v", tt.args, err)
			continue
		}
		host, timeout := cmp.Or(tt.host, "hv1"), cmp.Or(tt.timeout, "2m0s")
		if c.sub != tt.sub || c.vm != tt.vm || c.id != tt.id || c.host != host || c.timeout.String() != timeout {
			t.Errorf("%q: sub %q vm %q id %q host %q timeout %s", tt.args, c.sub, c.vm, c.id, c.host, c.timeout)
		}
	}
}

// A subcommand's bad arguments end the run before it connects: exit 2.
func TestSubcommandUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "web-1"}, `unexpected argument "web-1"`},
		{[]string{"list", "-count", "3"}, "list sends no command: -count cannot go with it"}, // flags after the subcommand are read too
		{[]string{"watch", "a", "b"}, `unexpected argument "b"`},
		{[]string{"watch", "web.example"}, "watch it by its UUID"},
		{[]string{"watch", "*"}, "watch it by its UUID"},
		{[]string{"watch", ">"}, "watch it by its UUID"},
		{[]string{"watch", strings.Repeat("v", bus.MaxTokenLen+1)}, "1 to 128 bytes"},
		{[]string{"get"}, "missing ID after get"},
		{[]string{"get", "a", "b"}, `unexpected argument "b"`},
		{[]string{"get", "a b"}, "at most 128 bytes of [A-Za-z0-9._:-]"},
		{[]string{"get", "~"}, "at most 128 bytes"},
		{[]string{"get", "~~x"}, "at most 128 bytes"},
		{[]string{"get", "a/b"}, "at most 128 bytes"},
		{[]string{"get", strings.Repeat("x", bus.MaxIDLen+1)}, "at most 128 bytes"},
		{[]string{"-count", "3", "list"}, "list sends no command: -count cannot go with it"},
		{[]string{"-id", "x", "-core", "get", "x"}, "-core, -id cannot go with it"},
		{[]string{"-wait=false", "watch"}, "-wait"},
		{[]string{"-host", "hv1.x", "list"}, "host"},
		{[]string{"-timeout", "0s", "watch"}, "-timeout must be positive"},
	} {
		env := envFunc(map[string]string{"VIRTBUS_HOST": "hv1", "VIRTBUS_NATS_URL": "nats://127.0.0.1:1"})
		var stdout, stderr bytes.Buffer
		code := exitCode(run(context.Background(), tt.args, env, &stdout, &stderr), &stderr)
		if code != exitUsage || !strings.Contains(stderr.String(), tt.want) || stdout.Len() != 0 {
			t.Errorf("%q: exit %d, stderr %q, want exit 2 and %q", tt.args, code, stderr.String(), tt.want)
		}
	}
}

func TestSubcommandsInUsage(t *testing.T) {
	var stderr bytes.Buffer
	if err := run(context.Background(), []string{"-h"}, envFunc(nil), &bytes.Buffer{}, &stderr); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"publish [flags] list", "publish [flags] watch [VM]", "publish [flags] get ID", "no completion recorded"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("usage lacks %q", want)
		}
	}
}

func TestAgo(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:                                "0s",
		45*time.Second + 600*time.Millisecond:       "45s",
		3*time.Minute + 12*time.Second:              "3m12s",
		5*time.Hour + 3*time.Minute + 9*time.Second: "5h3m",
		50 * time.Hour:                              "2d2h",
	} {
		if got := ago(d); got != want {
			t.Errorf("ago(%s) = %q, want %q", d, got, want)
		}
	}
}

// A user whose permissions do not cover the state and event subjects is
// told so at once, exit 1, rather than watching nothing forever.
func TestWatchRefused(t *testing.T) {
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Users: []*server.User{{Username: "tenant", Password: "pw", Permissions: &server.Permissions{
			Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.>", "virtbus.evt.hv1.web-1.>"}},
		}}}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(s.Shutdown)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	r := runPublish(ctx, s.ClientURL(), "-user", "tenant", "-password", "pw", "watch", "web-1")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "refused by the server") || ctx.Err() != nil {
		t.Errorf("stderr %q", r.stderr)
	}
}
