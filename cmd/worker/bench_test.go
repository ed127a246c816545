package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// BenchmarkStatus measures one status command three ways on the same
// domain in the same run, so the cost virtbus adds reads as a ratio:
//
//	direct:  the go-libvirt calls status makes (lookup, state, XML)
//	executor: the same through internal/vm (deadlines, parsing, checks)
//	bus:     publish to JetStream, worker fetch, FIFO, executor, record,
//	         completion back to the publisher, ack: one command at a time
//
// scripts/bench.sh (make bench) prints the table.
func BenchmarkStatus(b *testing.B) {
	lv := testbed.Require(b)
	dom := lv.Domain("bench", testbed.DomainOptions{Running: true})
	// One client for the loop: asking Live for it on every call would add
	// its lock to what "direct" measures.
	l := lv.Conn()

	b.Run("direct", func(b *testing.B) {
		for b.Loop() {
			d, err := l.DomainLookupByName(dom.Name)
			if err != nil {
				b.Fatal(err)
			}
			if _, _, err := l.DomainGetState(d, 0); err != nil {
				b.Fatal(err)
			}
			if _, err := l.DomainGetXMLDesc(d, 0); err != nil {
				b.Fatal(err)
			}
		}
	})

	b.Run("executor", func(b *testing.B) {
		log := slog.New(slog.DiscardHandler)
		conn := vm.NewConn(testbed.Socket(), "qemu:///system", 30*time.Second, log)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { conn.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		roots, err := vm.NewDiskRoots([]string{testbed.ImageRoot()})
		if err != nil {
			b.Fatal(err)
		}
		ex := vm.NewExecutor(conn, vm.Config{Roots: roots}, log)
		for b.Loop() {
			if _, err := ex.Do(context.Background(), dom.Name, vm.Status, nil); err != nil {
				b.Fatal(err)
			}
		}
	})

	b.Run("bus", func(b *testing.B) {
		host, nc := benchWorker(b)
		js, err := jetstream.New(nc)
		if err != nil {
			b.Fatal(err)
		}
		inbox, err := nc.SubscribeSync(nc.NewRespInbox())
		if err != nil {
			b.Fatal(err)
		}
		subject := bus.CommandSubject(host, dom.Name, string(vm.Status))
		for b.Loop() {
			id := nuid.Next()
			msg := nats.NewMsg(subject)
			msg.Header.Set(bus.HeaderMsgID, id)
			msg.Header.Set(bus.HeaderReply, inbox.Subject)
			if _, err := js.PublishMsg(context.Background(), msg); err != nil {
				b.Fatal(err)
			}
			m, err := inbox.NextMsg(30 * time.Second)
			if err != nil {
				b.Fatal(err)
			}
			var c bus.Completion
			if err := json.Unmarshal(m.Data, &c); err != nil || c.ID != id || c.Status != bus.StatusOK {
				b.Fatalf("completion %s: %v", m.Data, err)
			}
		}
	})
}

// benchWorker runs the whole worker in-process (run, as main does) on an
// embedded NATS server and returns its host id and a client connection.
func benchWorker(b *testing.B) (string, *nats.Conn) {
	b.Helper()
	srv, err := bus.RunEmbedded(b.TempDir(), "127.0.0.1", -1)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	host := "bench-" + strconv.Itoa(int(time.Now().UnixNano()%1e6))
	env := map[string]string{
		"VIRTBUS_HOST":           host,
		"VIRTBUS_NATS_URL":       srv.ClientURL(),
		"VIRTBUS_LIBVIRT_SOCKET": testbed.Socket(),
		"VIRTBUS_DISK_ROOTS":     testbed.ImageRoot(),
		"VIRTBUS_STATE_DIR":      b.TempDir(),
		"VIRTBUS_METRICS_ADDR":   "off",
		"VIRTBUS_API_ADDR":       "off",
		"VIRTBUS_LOG_LEVEL":      "error",
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var stderr bytes.Buffer
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, &bytes.Buffer{}, &stderr) }()
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("worker: %v\n%s", err, stderr.String())
		}
	})
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	// The stream exists once the worker has set it up.
	js, _ := jetstream.New(nc)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := js.Stream(context.Background(), bus.StreamName); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("worker did not create the stream: %s", stderr.String())
		}
	}
	return host, nc
}
