package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/envload"
	"github.com/virtbus/virtbus/internal/queue"
)

// Delivery modes (VIRTBUS_DELIVERY).
const (
	DeliveryJetStream = "jetstream"
	DeliveryCore      = "core"
)

// Config is what the worker needs to know about its place on the bus. The
// fields an operator sets are read from VIRTBUS_* variables (their names
// follow envconfig's split_words rule); their defaults, in the tags, are
// the only ones: New takes a zero field as its default. The ignored fields
// have no variable; their defaults are in withDefaults.
type Config struct {
	Host        string `desc:"host id in the subjects (default: the hostname, subject-safe)"`
	Delivery    string `default:"jetstream" desc:"jetstream (nothing lost) or core (at most once)"`
	QueueSize   int    `split_words:"true" default:"64" desc:"FIFO capacity (queued plus running)"`
	Concurrency int    `default:"1" desc:"commands for different VMs run side by side"`
	MaxDeliver  int    `split_words:"true" default:"5" desc:"attempts of a command that keeps ending unavailable before its final error"`
	// CommandMaxAge is how long after it reached the stream a command is
	// still run; after that, or after its Virtbus-Expires deadline, it ends
	// in CodeExpired without running.
	CommandMaxAge time.Duration `split_words:"true" default:"24h" desc:"a command older than this (from its stream timestamp) ends in expired without running"`
	// StreamReplicas is used only when the worker creates the stream and
	// the buckets.
	StreamReplicas int `split_words:"true" default:"1" desc:"replicas of the stream and buckets, used only when the worker creates them"`
	// Lease is how long the active worker of a host holds its lease
	// without renewing it; a standby takes over within it.
	Lease time.Duration `default:"15s" desc:"one active worker per host: a standby takes over within this long after the active one stops or dies"`
	// ReplyPrefixes are the prefixes a Virtbus-Reply subject must start
	// with: the worker publishes nowhere else a client names.
	ReplyPrefixes []string `split_words:"true" default:"_INBOX.,_INBOX_,virtbus.reply." desc:"comma-separated subject prefixes a Virtbus-Reply header must start with"`

	AckWait   time.Duration `ignored:"true"` // redelivery timer of the consumer (default 30s)
	DupWindow time.Duration `ignored:"true"` // stream duplicate window (default 2m)
	RecordTTL time.Duration `ignored:"true"` // how long completions are kept by id (default 24h)
	// DeliveryLimit ends, unrun, a command delivered this often: one that
	// kills the worker every time it runs (default 100). Hand-backs at
	// shutdown count as deliveries too, hence a limit far above MaxDeliver,
	// which counts the attempts of a command that keeps ending unavailable.
	DeliveryLimit int `ignored:"true"`
	// RetryBackoff is the delay before the second delivery of a command that
	// ended `unavailable`; it doubles with each delivery up to
	// RetryBackoffMax (defaults 1s and 30s).
	RetryBackoff    time.Duration `ignored:"true"`
	RetryBackoffMax time.Duration `ignored:"true"`
	// Actions are the action names the handler knows. Metrics label any
	// other action "unknown", so client text never becomes a label value.
	Actions []string `ignored:"true"`
}

// DefaultConfig is the configuration with every variable unset.
func DefaultConfig() Config {
	var c Config
	if err := envload.Load(EnvPrefix, func(string) string { return "" }, &c); err != nil {
		panic("bus config defaults do not parse: " + err.Error())
	}
	return c
}

// EnvPrefix is the prefix of the variables the worker and publish read.
const EnvPrefix = "virtbus"

// CheckReplyPrefixes refuses prefixes that would let a client name a
// subject the worker must never publish to: empty ones (anything goes),
// wildcards, and anything that reaches the JetStream API, KV buckets or the
// command subjects.
func CheckReplyPrefixes(prefixes []string) error {
	for _, p := range prefixes {
		switch {
		case p == "":
			return errors.New("an empty prefix would allow any subject")
		case strings.ContainsAny(p, "*> \t\r\n"):
			return fmt.Errorf("prefix %q: no wildcards or white space", p)
		case strings.HasPrefix(p, "$"), strings.HasPrefix(CommandPrefix+".", p), strings.HasPrefix(p, CommandPrefix+"."),
			strings.HasPrefix(EventPrefix+".", p), strings.HasPrefix(p, EventPrefix+"."):
			return fmt.Errorf("prefix %q reaches the system, command or event subjects", p)
		}
	}
	return nil
}

func (c Config) withDefaults() (Config, error) {
	if !ValidToken(c.Host) {
		return c, fmt.Errorf("host %q is not a subject token", c.Host)
	}
	d := DefaultConfig()
	if c.Delivery == "" {
		c.Delivery = d.Delivery
	}
	if c.Delivery != DeliveryJetStream && c.Delivery != DeliveryCore {
		return c, fmt.Errorf("delivery %q: want %s or %s", c.Delivery, DeliveryJetStream, DeliveryCore)
	}
	if len(c.ReplyPrefixes) == 0 {
		c.ReplyPrefixes = d.ReplyPrefixes
	}
	if err := CheckReplyPrefixes(c.ReplyPrefixes); err != nil {
		return c, fmt.Errorf("reply prefixes: %w", err)
	}
	ints := []struct {
		name string
		v    *int
		def  int
	}{
		{"queue size", &c.QueueSize, d.QueueSize},
		{"concurrency", &c.Concurrency, d.Concurrency},
		{"max deliver", &c.MaxDeliver, d.MaxDeliver},
		{"stream replicas", &c.StreamReplicas, d.StreamReplicas},
		{"delivery limit", &c.DeliveryLimit, 100},
	}
	for _, f := range ints {
		if *f.v < 0 {
			return c, fmt.Errorf("%s %d: must not be negative", f.name, *f.v)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	durations := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"ack wait", &c.AckWait, 30 * time.Second},
		{"duplicate window", &c.DupWindow, 2 * time.Minute},
		{"record ttl", &c.RecordTTL, 24 * time.Hour},
		{"command max age", &c.CommandMaxAge, d.CommandMaxAge},
		{"lease", &c.Lease, d.Lease},
		{"retry backoff", &c.RetryBackoff, time.Second},
		{"retry backoff max", &c.RetryBackoffMax, 30 * time.Second},
	}
	for _, f := range durations {
		if *f.v < 0 {
			return c, fmt.Errorf("%s %s: must not be negative", f.name, *f.v)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	return c, nil
}

// Handler runs one command and reports its outcome. The context is not
// cancelled by the worker's shutdown: a command that started is finished, so
// nothing is published half.
type Handler func(ctx context.Context, cmd Command) Outcome

// Worker takes this host's commands off NATS, runs them through the FIFO
// and the Handler, and answers each with one completion.
type Worker struct {
	nc      *nats.Conn
	cfg     Config
	handler Handler
	log     *slog.Logger
	m       *metrics
	q       *queue.Queue[*job]

	started atomic.Bool
	ready   atomic.Bool

	// JetStream mode only. records is set by the fetch loop's setup, which
	// runs again after reconnects, and read by the running commands.
	held    heldSet
	records atomic.Pointer[records]
	// known says which command ids may have a record, so that a new one
	// runs without a lookup; loaded once the lease is taken.
	known   *knownIDs
	answers *answerer // set by runJetStream before any command runs
	late    []*job    // fetched after shutdown began; only the fetch loop touches it
	// ackWait is the consumer's, as the server has it (an operator may
	// have changed it): the heartbeat must beat well within it.
	ackWait atomic.Int64
	// warned names the settings already logged as breaking a promise;
	// only the fetch loop touches it.
	warned map[string]bool
	// standby is set while another worker holds this host's lease;
	// leased once this worker took it.
	standby, leased atomic.Bool
	// cons is the consumer to fetch from, set by keepSetUp once everything
	// is set up and the lease is held; nil meanwhile.
	cons atomic.Pointer[jetstream.Consumer]
	// lost wakes keepSetUp when the fetch loop lost the consumer.
	lost chan struct{}

	// fetchWait is how long one pull waits for messages (fetchWait unless
	// a test wants quicker shutdowns).
	fetchWait time.Duration

	// crashAfterRecord lets a test stop a command between recording its
	// completion and publishing it, as a crash there would.
	crashAfterRecord func(Command) bool
}

// New checks the configuration and registers the metrics; it does no I/O,
// so a worker can be built while NATS is still unreachable.
func New(nc *nats.Conn, cfg Config, h Handler, log *slog.Logger, reg prometheus.Registerer) (*Worker, error) {
	if nc == nil {
		return nil, errors.New("new bus worker: no NATS connection")
	}
	if h == nil {
		return nil, errors.New("new bus worker: no handler")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("bus config: %w", err)
	}
	w := &Worker{
		nc:      nc,
		cfg:     cfg,
		handler: h,
		log:     log.With("delivery", cfg.Delivery),
		q:       queue.New[*job](cfg.QueueSize, cfg.Concurrency, parkLimit),
		held:    newHeldSet(),
		known:   newKnownIDs(log),
		warned:  map[string]bool{},
		lost:    make(chan struct{}, 1),

		fetchWait: fetchWait,
	}
	w.ackWait.Store(int64(cfg.AckWait))
	if w.m, err = newMetrics(reg, nc, w.q, cfg.Actions); err != nil {
		return nil, err
	}
	return w, nil
}

// Run takes commands until ctx ends, then drains: it stops taking work,
// lets running commands finish and hands back (JetStream: naks) those still
// queued. It returns nil after a graceful drain; NATS outages, however long,
// are waited out rather than returned. It ends early, after the same drain,
// with ErrConnectionClosed when NATS closed the connection for good and with
// ErrLeaseLost when another worker took this host over. Run may be called
// once.
func (w *Worker) Run(ctx context.Context) error {
	if w.started.Swap(true) {
		return errors.New("bus worker: Run called twice")
	}
	w.log.Info("bus worker starting", "host", w.cfg.Host, "queue_size", w.cfg.QueueSize,
		"concurrency", w.cfg.Concurrency, "max_deliver", w.cfg.MaxDeliver)
	// A connection NATS closed for good (a protocol error, repeated
	// authorization failures) never comes back: drain as at shutdown and
	// return the error, so the process exits and its supervisor restarts it
	// rather than leaving a live process that takes no commands.
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	w.nc.SetClosedHandler(func(nc *nats.Conn) {
		cancel(fmt.Errorf("%w: %v", ErrConnectionClosed, nc.LastError()))
	})
	if w.nc.IsClosed() {
		cancel(fmt.Errorf("%w before the worker started", ErrConnectionClosed))
	}
	var err error
	if w.cfg.Delivery == DeliveryCore {
		err = w.runCore(runCtx)
	} else {
		err = w.runJetStream(runCtx)
	}
	w.ready.Store(false)
	if cause := context.Cause(runCtx); err == nil && ctx.Err() == nil && errors.Is(cause, ErrConnectionClosed) {
		w.log.Error("nats connection closed for good; stopping so the supervisor restarts the worker", "err", cause)
		return cause
	}
	w.log.Info("bus worker stopped")
	return err
}

// ErrConnectionClosed is what Run returns when the NATS connection was
// closed for good while the worker ran.
var ErrConnectionClosed = errors.New("nats connection closed")

// Ready reports whether NATS is connected and the consumer (or core
// subscription) is set up: what /readyz asks of the bus.
func (w *Worker) Ready() bool {
	return w.ready.Load() && w.nc.IsConnected()
}

// Standby reports whether another worker holds this host's lease, so
// this one waits to take over (/readyz says "standby").
func (w *Worker) Standby() bool { return w.standby.Load() }

// Active reports whether this worker is the one that answers its host:
// it holds the host's lease (JetStream), or takes commands at all (core,
// where there is no lease). A standby, and a worker still looking at the
// lease, is not.
func (w *Worker) Active() bool {
	return w.cfg.Delivery == DeliveryCore || w.leased.Load()
}

// Reconnects is the virtbus_reconnects_total counter of target, for the
// other connections the worker keeps (target "libvirt"); the bus counts
// target "nats" itself.
func (w *Worker) Reconnects(target string) prometheus.Counter {
	return w.m.reconnects.WithLabelValues(target)
}

// handlerContext is the context a handler runs in: it keeps ctx's values
// but not its cancellation, because shutdown must not cut a command short.
func handlerContext(ctx context.Context) context.Context {
	return context.WithoutCancel(ctx)
}
