package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// writeContext saves a nats CLI context file as `nats context save` would,
// under configDir/nats/context.
func writeContext(t *testing.T, configDir, name, body string) {
	t.Helper()
	dir := filepath.Join(configDir, "nats", "context")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".json"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestNATSContext(t *testing.T) {
	home := t.TempDir()
	writeContext(t, filepath.Join(home, ".config"), "prod",
		`{"description":"prod","url":"nats://ctx:4222","creds":"~/prod.creds","inbox_prefix":"_INBOX_ctx","jetstream_domain":"x"}`)
	writeContext(t, filepath.Join(home, ".config"), "dev", `{"url":"nats://dev:4222","user":"devu","password":"devpw"}`)
	xdg := t.TempDir()
	writeContext(t, xdg, "dev", `{"url":"nats://xdg:4222"}`)

	parse := func(t *testing.T, env map[string]string, args ...string) *config {
		t.Helper()
		env["HOME"], env["VIRTBUS_HOST"] = home, "hv1"
		c, err := parseArgs(append(args, "stop", "web-1"), envFunc(env), &bytes.Buffer{})
		if err != nil {
			t.Fatalf("parseArgs: %v", err)
		}
		return c
	}
	t.Run("url, creds and inbox prefix from --context", func(t *testing.T) {
		c := parse(t, map[string]string{}, "--context", "prod")
		if c.conn.URL != "nats://ctx:4222" || c.conn.Creds != filepath.Join(home, "prod.creds") || c.conn.InboxPrefix != "_INBOX_ctx" {
			t.Errorf("conn %+v", c.conn)
		}
	})
	t.Run("NATS_CONTEXT, user and password", func(t *testing.T) {
		c := parse(t, map[string]string{"NATS_CONTEXT": "dev"})
		if c.conn.URL != "nats://dev:4222" || c.conn.User != "devu" || c.conn.Password != "devpw" {
			t.Errorf("conn %+v", c.conn)
		}
	})
	t.Run("--context wins over NATS_CONTEXT", func(t *testing.T) {
		if c := parse(t, map[string]string{"NATS_CONTEXT": "dev"}, "--context", "prod"); c.conn.URL != "nats://ctx:4222" {
			t.Errorf("url %q", c.conn.URL)
		}
	})
	t.Run("XDG_CONFIG_HOME", func(t *testing.T) {
		if c := parse(t, map[string]string{"XDG_CONFIG_HOME": xdg}, "--context", "dev"); c.conn.URL != "nats://xdg:4222" {
			t.Errorf("url %q", c.conn.URL)
		}
	})
	t.Run("environment and flags win over the context", func(t *testing.T) {
		c := parse(t, map[string]string{"NATS_URL": "nats://env:1"}, "--context", "prod", "--user", "alice")
		// The login comes whole from the flags: no creds from the context.
		if c.conn.URL != "nats://env:1" || c.conn.User != "alice" || c.conn.Creds != "" || c.conn.InboxPrefix != "_INBOX_ctx" {
			t.Errorf("conn %+v", c.conn)
		}
		c = parse(t, map[string]string{"NATS_URL": "nats://env:1", "VIRTBUS_NATS_URL": "nats://v:1"}, "--context", "prod")
		if c.conn.URL != "nats://v:1" {
			t.Errorf("url %q", c.conn.URL)
		}
	})
	t.Run("no context is read unless asked for", func(t *testing.T) {
		if c := parse(t, map[string]string{}); c.conn.URL != defaultURL {
			t.Errorf("url %q", c.conn.URL)
		}
	})
	t.Run("a missing context is an error", func(t *testing.T) {
		_, err := parseArgs([]string{"--context", "nope", "stop", "web-1"}, envFunc(map[string]string{"HOME": home}), &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), "nats context nope") {
			t.Errorf("err %v", err)
		}
	})
}

func TestPasswordFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(f, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := parseArgs([]string{"stop", "web-1", "--user", "u", "--password-file", f},
		envFunc(map[string]string{"VIRTBUS_HOST": "hv1", "VIRTBUS_NATS_PASSWORD": "env"}), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.conn.Password != "s3cret" {
		t.Errorf("password %q", c.conn.Password)
	}
}

// A usage error prints the error and one usage line; -h the whole usage.
func TestShortUsage(t *testing.T) {
	var stderr bytes.Buffer
	code := exitCode(run(context.Background(), []string{"stop"}, envFunc(nil), &bytes.Buffer{}, &stderr), &stderr)
	if code != exitUsage || stderr.String() != "publish: missing VM after ACTION \"stop\"\n"+usageLine+"\n" {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
	stderr.Reset()
	code = exitCode(run(context.Background(), []string{"--help"}, envFunc(nil), &bytes.Buffer{}, &stderr), &stderr)
	if code != exitOK || !strings.Contains(stderr.String(), "Exit status") || !strings.Contains(stderr.String(), "-password-file") {
		t.Errorf("exit %d, --help printed %q", code, stderr.String())
	}
}

// --nkey logs in with a seed file, against a server that knows only that
// NKey user.
func TestNKey(t *testing.T) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	seedFile := filepath.Join(t.TempDir(), "user.nk")
	if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(s.Shutdown)
	opt, err := nats.NkeyOptionFromSeed(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	startCoreResponderOpts(t, s.ClientURL(), opt)

	r := runPublish(t.Context(), s.ClientURL(), "-core", "stop", "web-1", "--nkey", seedFile)
	r.want(t, exitOK)
	r = runPublish(t.Context(), s.ClientURL(), "-core", "stop", "web-1")
	r.want(t, exitFailed)
	if !strings.Contains(r.stderr, "uthorization") {
		t.Errorf("without --nkey: stderr %q", r.stderr)
	}
}

// startCoreResponderOpts is startCoreResponder on a connection made with
// opts.
func startCoreResponderOpts(t *testing.T, url string, opts ...nats.Option) {
	t.Helper()
	nc := bustest.Connect(t, url, opts...)
	r := &responder{sent: map[string][]byte{}}
	if _, err := nc.Subscribe("virtbus.cmd.hv1.>", func(m *nats.Msg) {
		if b := r.answer(m.Subject, m.Header, m.Data); b != nil {
			_ = m.Respond(b)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// Without -core, publish must not hand a command to a core subscriber
// (a worker with VIRTBUS_DELIVERY=core would run it) when no stream will
// take it: it says why and sends nothing.
func TestNoStreamSendsNothing(t *testing.T) {
	for _, tt := range []struct {
		name      string
		jetStream bool
		want      string
	}{
		{"core-only server", false, "the server has no JetStream"},
		{"JetStream without the stream", true, "no JetStream stream takes this subject"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			url := runServer(t, tt.jetStream).ClientURL()
			nc := bustest.Connect(t, url)
			got := make(chan *nats.Msg, 16)
			sub, err := nc.ChanSubscribe("virtbus.cmd.>", got)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = sub.Unsubscribe() })
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			for _, args := range [][]string{
				{"reboot", "web-1"},
				{"-wait=false", "stop", "web-1"},
				{"-count", "3", "-vms", "a,b", "start"},
			} {
				r := runPublish(t.Context(), url, args...)
				r.want(t, exitFailed)
				if !strings.Contains(r.stderr, tt.want) || !strings.Contains(r.stderr, "-core") {
					t.Errorf("%q: stderr %q", args, r.stderr)
				}
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-got:
				t.Errorf("a command was delivered: %s", m.Subject)
			case <-time.After(200 * time.Millisecond):
			}
		})
	}
}
