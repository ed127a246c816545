// Command worker is the virtbus daemon of one hypervisor host: it takes VM
// commands from NATS, runs them one VM at a time against the host's libvirt,
// and publishes one completion per command before acking it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}

// embeddedAddr is where the embedded NATS server listens when no
// VIRTBUS_NATS_URL is set: loopback only, the standard port, so `publish`
// and the `nats` CLI find it with their defaults.
const (
	embeddedHost = "127.0.0.1"
	embeddedPort = 4222
)

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { _ = usage(stderr) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: the worker is configured through VIRTBUS_* variables (worker -h lists them)", fs.Args())
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	apiToken, err := readAPIToken(cfg.APITokenFile)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	roots, err := vm.NewDiskRoots(cfg.DiskRoots)
	if err != nil {
		return fmt.Errorf("VIRTBUS_DISK_ROOTS: %w", err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	natsURL := cfg.NATS.URL
	if natsURL == "" {
		srv, err := bus.RunEmbedded(filepath.Join(cfg.StateDir, "nats"), embeddedHost, embeddedPort)
		if err != nil {
			return fmt.Errorf("start embedded NATS (VIRTBUS_NATS_URL is empty): %w", err)
		}
		defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
		natsURL = srv.ClientURL()
		log.Info("embedded NATS server started", "url", natsURL, "store", filepath.Join(cfg.StateDir, "nats"))
	}
	natsOpts := cfg.NATS.ConnOptions("virtbus-worker-" + cfg.Host)
	natsOpts.URL = natsURL
	natsOpts.InboxPrefix = bus.WorkerInboxPrefix(cfg.Host)
	natsOpts.WaitForServer = true
	nc, err := bus.Connect(natsOpts, log)
	if err != nil {
		return err
	}
	defer nc.Close()

	conn := vm.NewConn(cfg.LibvirtSocket, cfg.LibvirtURI, cfg.LibvirtTimeout, log)
	ex := vm.NewExecutor(conn, vm.Config{Roots: roots}, log)
	busCfg := cfg.Config
	busCfg.Actions = actionNames()
	w, err := bus.New(nc, busCfg, handler(ex), log, reg)
	if err != nil {
		return err
	}
	watchLibvirt(conn, w, reg)

	var wg sync.WaitGroup
	defer wg.Wait()
	connCtx, stopConn := context.WithCancel(context.Background())
	defer stopConn()
	wg.Go(func() { conn.Run(connCtx) })

	api, err := newHTTPAPI(nc, cfg.Host, cfg.Delivery == bus.DeliveryCore, apiToken)
	if err != nil {
		return err
	}
	stopHTTP, err := startHTTP(cfg, api, reg, readiness(w, conn), &wg, log)
	if err != nil {
		return err
	}
	defer stopHTTP()

	fmt.Fprintf(stdout, "virtbus worker %s: commands on %s, delivery %s\n", cfg.Host, bus.CommandSubject(cfg.Host, "*", "*"), cfg.Delivery)
	// Run returns once ctx has ended and the running commands are finished
	// and what was still queued is handed back.
	if err := w.Run(ctx); err != nil {
		return err
	}
	if err := nc.Flush(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		log.Warn("flush on shutdown", "err", err)
	}
	log.Info("worker stopped")
	return nil
}

// handler runs one command on the executor and turns the result into the
// bus's outcome. The error codes come from vm.Code, their one home.
func handler(ex *vm.Executor) bus.Handler {
	return func(ctx context.Context, cmd bus.Command) bus.Outcome {
		action, err := vm.ParseAction(cmd.Action)
		if err == nil {
			var res vm.Result
			res, err = ex.Do(ctx, cmd.VM, action, cmd.Params)
			if err == nil {
				return bus.Outcome{Changed: res.Changed, State: res.State, Detail: res.Detail}
			}
		}
		return bus.Outcome{Err: &bus.Error{Code: vm.Code(err), Message: vm.Message(err)}}
	}
}

// readiness is what /readyz answers: ready, or why not.
func readiness(w *bus.Worker, conn *vm.Conn) func() (bool, string) {
	return func() (bool, string) {
		switch {
		case w.Standby():
			return false, "standby: another worker holds this host's lease"
		case !w.Ready():
			return false, "NATS not connected, or the stream, consumer or buckets not set up"
		case !conn.Up():
			return false, "libvirt not connected"
		}
		return true, ""
	}
}

// actionNames lists the actions the executor knows, for the bus's metric
// labels: anything else is counted as "unknown".
func actionNames() []string {
	names := make([]string, len(vm.Actions))
	for i, a := range vm.Actions {
		names[i] = string(a)
	}
	return names
}

// watchLibvirt exports the libvirt connection's state and counts its
// reconnects (every connect after the first).
func watchLibvirt(conn *vm.Conn, w *bus.Worker, reg prometheus.Registerer) {
	up := prometheus.NewGauge(prometheus.GaugeOpts{Name: "virtbus_libvirt_up", Help: "1 while the worker is connected to libvirtd."})
	reg.MustRegister(up)
	reconnects := w.Reconnects("libvirt")
	connects := 0 // OnState calls are serialised by the Conn
	conn.OnState = func(isUp bool) {
		if !isUp {
			up.Set(0)
			return
		}
		up.Set(1)
		if connects++; connects > 1 {
			reconnects.Inc()
		}
	}
}
