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
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/virtbus/virtbus/internal/buildinfo"
	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

func main() {
	oneProcessor(os.Getenv)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// oneProcessor runs the worker's goroutines on one processor (P) unless
// GOMAXPROCS is set. The worker waits on libvirtd and NATS far more than it
// computes, beside libvirtd and the guests on the CPUs it would share: a
// second P brings it no speed, only spinning and wakeups between threads.
// On a 2-CPU machine one P cut the worker's CPU per command by a fifth,
// one command at a time and with a backlog, and the one-at-a-time median by
// 80 µs, with no loss at concurrency 8 (BENCHMARKS.md). It does not bind
// the commands' own work: libvirtd and QEMU run in their own processes.
func oneProcessor(getenv func(string) string) {
	if getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}

// errUsage marks the errors of a worker started wrong: an unknown flag, an
// argument, or a configuration configure refuses (a bad VIRTBUS_* value, or
// a file one names that is missing or bad). Its exit status, 2, tells them
// from a worker that started and then failed (1), which a retry may fix.
var errUsage = errors.New("usage error")

// usageError is err, marked as errUsage without a word added to its text.
type usageError struct{ err error }

func (e usageError) Error() string   { return e.err.Error() }
func (e usageError) Unwrap() []error { return []error{errUsage, e.err} }

// exitCode prints err and maps it to the exit status `worker -h` documents.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "worker:", err)
	if errors.Is(err, errUsage) {
		return 2
	}
	return 1
}

// flagsHelp ends `worker -h`, after the variables.
const flagsHelp = `
Flags: -h prints this help, -version the build (version, commit, Go version),
-healthcheck asks the running worker's /readyz (on VIRTBUS_METRICS_ADDR) and
exits 0 if it answers 200, 1 otherwise (for a container's HEALTHCHECK).

Exit status: 0 after SIGTERM or SIGINT and a graceful drain; 2 on a usage error:
an unknown flag, an argument, or a configuration refused at start (a bad
VIRTBUS_* value, or a file one names that cannot be used); 1 on any other error.
`

// embeddedAddr is where the embedded NATS server listens when no
// VIRTBUS_NATS_URL is set: loopback only, the standard port, so `publish`
// and the `nats` CLI find it with their defaults.
const (
	embeddedHost = "127.0.0.1"
	embeddedPort = 4222
)

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := configure(args, getenv, stdout, stderr)
	if cfg == nil || err != nil {
		return err // -h or -version printed, or the configuration is bad
	}
	log, reg := newLogger(cfg.config, stderr), newRegistry()

	// Each part is built after what it needs, and its teardown is deferred
	// where it is built, so shutdown runs in the reverse order: the HTTP
	// listeners close first, then the libvirt connection with the domain
	// watcher (no command runs any more once w.Run has drained) and the
	// state publisher's last writes, then the NATS connection (after the
	// drain's naks were flushed), and the embedded server last.
	nc, closeNATS, err := openNATS(cfg.config, log)
	if err != nil {
		return err
	}
	defer closeNATS()

	conn := vm.NewConn(cfg.LibvirtSocket, cfg.LibvirtURI, cfg.LibvirtTimeout, log)
	watcher := vm.NewWatcher(conn, log) // the executor finds domains in its view
	w, err := newBusWorker(cfg.config, nc, vm.NewExecutor(conn, vm.Config{Roots: cfg.roots, View: watcher}, log), log, reg)
	if err != nil {
		return err
	}
	watchLibvirt(conn, w, reg) // before the connection runs: it reports every change
	states, err := newStateFeed(cfg.config, nc, watcher, w, log, reg)
	if err != nil {
		return err
	}
	closeLibvirt := keepConnected(conn, states)
	defer closeLibvirt()

	api, err := newHTTPAPI(nc, cfg.Host, cfg.Delivery == bus.DeliveryCore, cfg.apiToken)
	if err != nil {
		return err
	}
	closeHTTP, err := serveHTTP(cfg.config, api, reg, readiness(w, conn), log)
	if err != nil {
		return err
	}
	defer closeHTTP()
	// systemd hears of the worker from here on: READY=1 once it is ready
	// or standing by, and watchdog pings through the drain.
	defer notifySystemd(ctx, newNotifier(getenv, log), serviceState(readiness(w, conn), w.Standby))()

	fmt.Fprintf(stdout, "virtbus worker %s: commands on %s, delivery %s\n", cfg.Host, bus.CommandSubject(cfg.Host, "*", "*"), cfg.Delivery)
	// Discovery (`publish hosts`, `nats micro ls virtbus`) from when the
	// worker is ready or standing by until shutdown begins.
	stopDiscovery := serveDiscovery(ctx, nc, w, cfg.Host, conn, watcher, log)
	return drain(ctx, w, nc, stopDiscovery, log)
}

// drain runs the bus worker until ctx ends. Run returns once the running
// commands are finished and what was still queued is handed back; then
// discovery stops, and the naks of the drain, fire-and-forget, are pushed
// out before the connection closes.
func drain(ctx context.Context, w *bus.Worker, nc *nats.Conn, stopDiscovery func(), log *slog.Logger) error {
	err := w.Run(ctx)
	stopDiscovery()
	if err != nil {
		return err
	}
	if err := nc.Flush(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		log.Warn("flush on shutdown", "err", err)
	}
	log.Info("worker stopped")
	return nil
}

// serveHTTP starts the listeners; closeHTTP closes them and waits for
// their handlers.
func serveHTTP(cfg config, api *httpAPI, reg *prometheus.Registry, ready func() (bool, string), log *slog.Logger) (closeHTTP func(), err error) {
	var serving sync.WaitGroup
	stop, err := startHTTP(cfg, api, reg, ready, &serving, log)
	if err != nil {
		return nil, err
	}
	return func() { stop(); serving.Wait() }, nil
}

// newRegistry holds the worker's metrics, with the Go runtime's and the
// process's, and virtbus_build_info, so a dashboard shows which build each
// host runs (the labels of `worker -version`; the value is always 1).
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	info := buildinfo.Read()
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "virtbus_build_info", Help: "Build of the running worker; always 1.",
		ConstLabels: prometheus.Labels{"version": info.Version, "revision": info.LabelRevision(), "goversion": info.GoVersion}})
	build.Set(1)
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), build)
	return reg
}

// newBusWorker is the bus worker that runs this host's commands on ex.
func newBusWorker(cfg config, nc *nats.Conn, ex *vm.Executor, log *slog.Logger, reg prometheus.Registerer) (*bus.Worker, error) {
	busCfg := cfg.Config
	busCfg.Actions = actionNames()
	return bus.New(nc, busCfg, handler(ex), log, reg)
}

// settings are the configuration with the files and directories it
// names read and checked.
type settings struct {
	config
	apiToken []byte
	roots    vm.DiskRoots
}

// configure reads the flags and the environment, and everything they name
// that could be wrong, before anything starts. It returns nil settings
// and no error when -h or -version printed what they print, and nil
// settings with the check's result after -healthcheck; every other error
// it returns is a usage error (see errUsage).
func configure(args []string, getenv func(string) string, stdout, stderr io.Writer) (*settings, error) {
	switch m, err := parseFlags(args, stdout, stderr); {
	case err != nil || m == modeDone:
		return nil, err
	case m == modeHealthcheck:
		return nil, healthcheck(getenv, stdout)
	}
	s, err := readSettings(getenv)
	if err != nil {
		return nil, usageError{err}
	}
	return s, nil
}

// readSettings loads the configuration and reads and checks the files and
// directories it names.
func readSettings(getenv func(string) string) (*settings, error) {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return nil, err
	}
	s := &settings{config: cfg}
	if s.apiToken, err = readAPIToken(cfg.APITokenFile); err != nil {
		return nil, err
	}
	if s.roots, err = vm.NewDiskRoots(cfg.DiskRoots); err != nil {
		return nil, fmt.Errorf("VIRTBUS_DISK_ROOTS: %w", err)
	}
	return s, nil
}

// mode is what the flags ask of the process.
type mode int

const (
	modeRun         mode = iota // run the worker
	modeDone                    // -h or -version printed what it prints
	modeHealthcheck             // ask a running worker's /readyz
)

// parseFlags takes -h, -version and -healthcheck and nothing else: the
// configuration is in the environment.
func parseFlags(args []string, stdout, stderr io.Writer) (mode, error) {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	version := fs.Bool("version", false, "print the build and exit")
	check := fs.Bool("healthcheck", false, "ask the running worker's /readyz; exit 0 if ready, else 1")
	fs.Usage = func() { _ = usage(stderr); fmt.Fprint(stderr, flagsHelp) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return modeDone, nil
		}
		return modeRun, usageError{err}
	}
	switch {
	case fs.NArg() > 0:
		return modeRun, usageError{fmt.Errorf("unexpected arguments %q: the worker is configured through VIRTBUS_* variables (worker -h lists them)", fs.Args())}
	case *version && *check:
		return modeRun, usageError{errors.New("-version and -healthcheck: give one")}
	case *version:
		_, err := fmt.Fprintln(stdout, buildinfo.Read().Line("worker"))
		return modeDone, err
	case *check:
		return modeHealthcheck, nil
	}
	return modeRun, nil
}

// openNATS connects to VIRTBUS_NATS_URL, or to an embedded server it
// starts when that is empty. closeNATS closes the connection, then the
// server.
func openNATS(cfg config, log *slog.Logger) (nc *nats.Conn, closeNATS func(), err error) {
	opts := cfg.NATS.ConnOptions("virtbus-worker-" + cfg.Host)
	opts.InboxPrefix = bus.WorkerInboxPrefix(cfg.Host)
	opts.WaitForServer = true
	stopServer := func() {}
	if opts.URL == "" {
		store := filepath.Join(cfg.StateDir, "nats")
		srv, err := bus.RunEmbedded(store, embeddedHost, embeddedPort)
		if err != nil {
			return nil, nil, fmt.Errorf("start embedded NATS (VIRTBUS_NATS_URL is empty): %w", err)
		}
		stopServer = func() { srv.Shutdown(); srv.WaitForShutdown() }
		opts.URL = srv.ClientURL()
		log.Info("embedded NATS server started", "url", opts.URL, "store", store)
	}
	if nc, err = bus.Connect(opts, log); err != nil {
		stopServer()
		return nil, nil, err
	}
	return nc, func() { nc.Close(); stopServer() }, nil
}

// keepConnected runs the libvirt connection's reconnect loop and the feed
// of domain states until the returned function is called; that stops the
// watcher (after its last read of every domain), closes the connection,
// and then lets the publisher make its last writes, while NATS is still
// there.
func keepConnected(conn *vm.Conn, states *stateFeed) (closeLibvirt func()) {
	connCtx, closeConn := context.WithCancel(context.Background())
	watchCtx, stopWatch := context.WithCancel(context.Background())
	pubCtx, stopPub := context.WithCancel(context.Background())
	var connDone, watchDone, pubDone sync.WaitGroup
	pubDone.Go(func() { states.pub.Run(pubCtx) })
	watchDone.Go(func() { states.watcher.Run(watchCtx) })
	connDone.Go(func() { conn.Run(connCtx) })
	return func() {
		stopWatch()
		watchDone.Wait()
		closeConn()
		connDone.Wait()
		stopPub()
		pubDone.Wait()
	}
}

// stateFeed carries every change of the host's domains, from libvirt's
// lifecycle events (whoever caused them), to the state subjects and
// bucket.
type stateFeed struct {
	watcher *vm.Watcher
	pub     *bus.StatePublisher
}

// newStateFeed feeds the watcher's changes to a publisher of domain states. In
// core delivery there is no JetStream, so no bucket: the subject only.
func newStateFeed(cfg config, nc *nats.Conn, watcher *vm.Watcher, w *bus.Worker, log *slog.Logger, reg prometheus.Registerer) (*stateFeed, error) {
	pub, err := bus.NewStatePublisher(nc, bus.StateConfig{Host: cfg.Host, Replicas: cfg.StreamReplicas,
		SubjectOnly: cfg.Delivery == bus.DeliveryCore, Active: w.Active}, log, reg)
	if err != nil {
		return nil, err
	}
	watcher.OnChange = func(d vm.DomainInfo, event string) { pub.Update(domainState(cfg.Host, d, event)) }
	watcher.OnResync = func(all []vm.DomainInfo) {
		states := make([]bus.DomainState, len(all))
		for i, d := range all {
			states[i] = domainState(cfg.Host, d, vm.EventResync)
		}
		pub.Resync(states)
	}
	return &stateFeed{watcher: watcher, pub: pub}, nil
}

// domainState is d on host's bus, seen now.
func domainState(host string, d vm.DomainInfo, event string) bus.DomainState {
	return bus.DomainState{Host: host, VM: bus.StateVM(d.Name, d.UUID), UUID: d.UUID, State: d.State,
		Reason: d.Reason, Event: event, At: time.Now().UTC()}
}

// handler runs one command on the executor and turns the result into the
// bus's outcome, its error mapped by completionError.
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
		return bus.Outcome{Err: completionError(err)}
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
