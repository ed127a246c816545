package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/buildinfo"
	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

// serviceCheckEvery is how often the worker looks whether it is ready (or
// standing by) to register its discovery service.
const serviceCheckEvery = 100 * time.Millisecond

// serveDiscovery registers the host's instance of the micro service
// bus.ServiceName once the worker is ready or standing by, and stops it
// (draining its subscriptions) when ctx ends, or when stop is called (Run
// may end on its own, a lease lost); stop returns once it is stopped, so
// the connection can close after it.
func serveDiscovery(ctx context.Context, nc *nats.Conn, w *bus.Worker, host string, conn *vm.Conn, watcher *vm.Watcher, log *slog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	version := buildinfo.Read().Version
	status := func() bus.HostStatus {
		s := w.Status(version)
		s.LibvirtUp, s.Domains = conn.Up(), len(watcher.Domains())
		return s
	}
	var done sync.WaitGroup
	done.Go(func() {
		if !waitRegistrable(ctx, w) {
			return
		}
		svc, err := bus.AddService(nc, host, version, status)
		if err != nil {
			log.Warn("discovery service not registered", "err", err)
			return
		}
		log.Debug("discovery service registered", "service", bus.ServiceName, "host", host)
		<-ctx.Done()
		if err := svc.Stop(); err != nil {
			log.Warn("stop discovery service", "err", err)
		}
	})
	return func() { cancel(); done.Wait() }
}

// waitRegistrable waits until w is ready or standing by; false if ctx
// ended first.
func waitRegistrable(ctx context.Context, w *bus.Worker) bool {
	tick := time.NewTicker(serviceCheckEvery)
	defer tick.Stop()
	for !w.Ready() && !w.Standby() {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	return true
}
