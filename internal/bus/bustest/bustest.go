// Package bustest is the test kit shared by the tests of internal/bus and
// cmd/worker: a real embedded NATS server with JetStream, connections to
// it, the state of a stream, and a collector of the messages published on
// a subject. Like nats-server's own test package, it runs real servers
// rather than fakes, so a test sees what production sees.
//
// It does not import internal/bus, on purpose: internal/bus's tests are
// in-package (they reach unexported fields such as the fetch wait), and an
// in-package test that imported a package importing bus would be an import
// cycle. So whatever is bus's is handed in by the caller: the server
// starter (bus.RunEmbedded), stream and consumer names, and a decoder that
// turns a message into a completion. The helpers that need bus's
// unexported parts stay in each package's helpers_test.go.
package bustest

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// apiTimeout bounds one JetStream API request made by a helper: a server
// that does not answer fails the test instead of hanging it.
const apiTimeout = 10 * time.Second

// pollInterval is how often the waits look again.
const pollInterval = 10 * time.Millisecond

// Starter starts a NATS server with JetStream, its store under storeDir,
// on host:port (-1: a free port), and returns once it takes connections.
// bus.RunEmbedded is one: the tests run the server the worker embeds.
type Starter func(storeDir, host string, port int) (*server.Server, error)

// RunServer starts a server with start on the loopback interface for one
// test and shuts it down when the test ends. A test that restarts the
// server passes the same storeDir and port again, so that the stream and
// the clients' URL survive.
func RunServer(t testing.TB, start Starter, storeDir string, port int) *server.Server {
	t.Helper()
	s, err := start(storeDir, "127.0.0.1", port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// RunCoreServer starts a plain core-NATS server, without JetStream, on a
// free loopback port for one test.
func RunCoreServer(t testing.TB) *server.Server {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatalf("nats server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(apiTimeout) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// Connect dials url with opts, the test's name as the connection's name
// (so the server's view of clients reads), and closes the connection when
// the test ends.
func Connect(t testing.TB, url string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, append([]nats.Option{nats.Name(t.Name())}, opts...)...)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// JetStream is nc's JetStream context.
func JetStream(t testing.TB, nc *nats.Conn) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// FreePort finds a loopback port nothing listens on, for a server or
// listener started later with a fixed address. Another process may take it
// in between; tests live with that small chance.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return port
}

// FreeAddr is FreePort as host:port.
func FreeAddr(t testing.TB) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(t)))
}

// ServerPort is the port s listens on, for starting it again on the same
// one.
func ServerPort(t testing.TB, s *server.Server) int {
	t.Helper()
	addr, ok := s.Addr().(*net.TCPAddr)
	if !ok {
		t.Fatalf("server address %v", s.Addr())
	}
	return addr.Port
}

// StreamMsgs is how many messages stream holds: for a work queue, the
// commands not acked yet.
func StreamMsgs(t testing.TB, js jetstream.JetStream, stream string) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), apiTimeout)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatalf("stream %s: %v", stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatalf("stream %s info: %v", stream, err)
	}
	return info.State.Msgs
}

// ConsumerInfo is the state of consumer on stream.
func ConsumerInfo(t testing.TB, js jetstream.JetStream, stream, consumer string) *jetstream.ConsumerInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), apiTimeout)
	defer cancel()
	cons, err := js.Consumer(ctx, stream, consumer)
	if err != nil {
		t.Fatalf("consumer %s on %s: %v", consumer, stream, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		t.Fatalf("consumer %s on %s info: %v", consumer, stream, err)
	}
	return info
}

// WaitStreamEmpty waits until stream holds no message and none of
// consumers has a delivery waiting for its ack: every command was acked.
func WaitStreamEmpty(t testing.TB, js jetstream.JetStream, timeout time.Duration, stream string, consumers ...string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		n, pending := StreamMsgs(t, js, stream), 0
		// Only an empty stream needs its consumers asked: before that, one
		// may not even exist yet (its worker has not started).
		if n == 0 {
			for _, c := range consumers {
				pending += ConsumerInfo(t, js, stream, c).NumAckPending
			}
		}
		if n == 0 && pending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream %s still holds %d messages (%d unacked by %v) after %s", stream, n, pending, consumers, timeout)
		}
		time.Sleep(2 * pollInterval)
	}
}

// Eventually polls cond until it holds, and fails the test after timeout.
// The timeout only turns a hang into a readable failure; nothing is
// asserted about how long anything takes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(pollInterval)
	}
}
