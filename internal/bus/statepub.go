package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/virtbus/virtbus/internal/backoff"
)

const (
	// stateTimeout bounds one NATS call of the state publisher.
	stateTimeout = 3 * time.Second
	// stateFinalWait bounds the last writes at shutdown: the worker's
	// exit must not wait on a NATS server that is away.
	stateFinalWait = 2 * time.Second
	// stateIdle is how often an idle publisher looks whether NATS
	// reconnected, after which the bucket is looked up again: the server
	// may be a new one that lost it.
	stateIdle = 2 * time.Second
	// stateMaxGone bounds the undefined domains held for the subject
	// while NATS is away, beyond one entry per live domain. Past it the
	// sweep after the outage finds their keys and reports them instead.
	stateMaxGone = 1024

	stateUndefined = "undefined"
	stateResync    = "resync"
)

// domainStates are the values of the gauge's state label, a closed set:
// a state outside it counts as nostate.
var domainStates = []string{"running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended", "nostate"}

// kvKey is what a JetStream KV key may hold (nats.go refuses the rest).
var kvKey = regexp.MustCompile(`^[-/_=.a-zA-Z0-9]+$`)

// StateVM is a domain's <vm> token in StateSubject and StateKey: its name,
// or its UUID when the name cannot be a subject token or a KV key (KV keys
// take fewer characters than subjects do).
func StateVM(name, uuid string) string {
	if ValidToken(name) && kvKey.MatchString(name) {
		return name
	}
	return uuid
}

// StateConfig configures a StatePublisher.
type StateConfig struct {
	Host string
	// Replicas of StateBucket, used only when the publisher creates it.
	Replicas int
	// SubjectOnly leaves StateBucket out, for a server without JetStream
	// (VIRTBUS_DELIVERY=core).
	SubjectOnly bool
	// Active, when set, says whether this worker is its host's active one.
	// A standby keeps the latest states like an unconnected publisher and
	// writes them, with its resync, once it takes over: one worker's view
	// of a host is written, not two.
	Active func() bool
}

// StatePublisher puts the domain states it is given on the bus: each
// change on StateSubject, and every live domain under its key in
// StateBucket. Update and Resync only note what is to be written and never
// wait on NATS, so nothing that reports a change waits for it; Run writes,
// each call bounded. While NATS is away the latest state of each domain
// is kept (one entry per domain, however many changes come) and written
// once NATS is back.
//
// A state whose Event is "resync" was found by reading everything again
// (after a restart of the worker or of libvirtd), not told by an event, so
// it may be old news: it is written, and published, only where the bucket
// holds something else. A key then keeps the time and event of the change
// that made it.
type StatePublisher struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	cfg   StateConfig
	log   *slog.Logger
	gauge *prometheus.GaugeVec
	wake  chan struct{}

	kv jetstream.KeyValue // Run's alone; nil until found, and after a failure

	mu      sync.Mutex
	known   map[string]DomainState  // live domains by vm token: the gauge, and the keys to keep
	pending map[string]pendingState // not written yet, by vm token
	gen     uint64
	sweep   uint64 // counts the sweeps asked for
	swept   uint64 // Run's alone: the sweep last done
}

// pendingState is one domain's latest unwritten state.
type pendingState struct {
	st  DomainState
	gen uint64
	// change: publish on the subject too. A resync rewrites every key,
	// but only what changed is news to the subject's readers.
	change bool
}

// NewStatePublisher returns a publisher for cfg.Host's domains, its gauge
// registered on reg (when not nil); Run starts its writes.
func NewStatePublisher(nc *nats.Conn, cfg StateConfig, log *slog.Logger, reg prometheus.Registerer) (*StatePublisher, error) {
	if !ValidToken(cfg.Host) {
		return nil, fmt.Errorf("state publisher: host %q is not a subject token", cfg.Host)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !cfg.SubjectOnly && !kvKey.MatchString(cfg.Host) {
		log.Warn("host id cannot be a KV key; domain states go to the subject only", "host", cfg.Host, "bucket", StateBucket)
		cfg.SubjectOnly = true
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("state publisher: %w", err)
	}
	p := &StatePublisher{
		nc: nc, js: js, cfg: cfg, log: log, wake: make(chan struct{}, 1),
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "virtbus_domains",
			Help: "Domains of this host by state, as libvirt last reported them."}, []string{"state"}),
		known: map[string]DomainState{}, pending: map[string]pendingState{},
	}
	for _, s := range domainStates {
		p.gauge.WithLabelValues(s)
	}
	if reg != nil {
		if err := reg.Register(p.gauge); err != nil {
			return nil, fmt.Errorf("state publisher: register metric: %w", err)
		}
	}
	return p, nil
}

// Update notes a change of one domain: State "undefined" for a domain
// that is gone, whose key is then deleted.
func (p *StatePublisher) Update(st DomainState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.signal()
	if st.State != stateUndefined {
		p.known[st.VM] = st
		p.queue(st, true)
		p.count()
		return
	}
	delete(p.known, st.VM)
	p.count()
	if _, ok := p.pending[st.VM]; !ok && len(p.pending) >= len(p.known)+stateMaxGone {
		p.sweep++
		return
	}
	p.queue(st, true)
}

// Resync replaces what the publisher knows with all, the host's every
// domain: each key is put right where it is not, and the keys of this
// host that all does not name are deleted (and reported undefined on the
// subject). Changes among all should have come through Update first: here
// they go to the bucket only.
func (p *StatePublisher) Resync(all []DomainState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.known = make(map[string]DomainState, len(all))
	for _, st := range all {
		p.known[st.VM] = st
		if e, ok := p.pending[st.VM]; ok && sameState(e.st, st) {
			continue // already on its way, as the news it is
		}
		p.queue(st, false)
	}
	p.sweep++
	p.count()
	p.signal()
}

func sameState(a, b DomainState) bool {
	return a.UUID == b.UUID && a.State == b.State && a.Reason == b.Reason
}

// queue notes st as the latest state of its domain; a change stays one
// when a later state of the same domain takes its place.
func (p *StatePublisher) queue(st DomainState, change bool) {
	p.gen++
	prev, ok := p.pending[st.VM]
	p.pending[st.VM] = pendingState{st: st, gen: p.gen, change: change || (ok && prev.change)}
}

func (p *StatePublisher) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// count sets the gauge from the live domains.
func (p *StatePublisher) count() {
	n := make(map[string]int, len(domainStates))
	for _, st := range p.known {
		n[stateLabel(st.State)]++
	}
	for _, s := range domainStates {
		p.gauge.WithLabelValues(s).Set(float64(n[s]))
	}
}

func stateLabel(s string) string {
	for _, known := range domainStates {
		if s == known {
			return s
		}
	}
	return "nostate"
}

// Run writes what Update and Resync noted until ctx ends, then makes one
// last bounded try. A failed write is tried again with back-off; while
// NATS is disconnected nothing is tried.
func (p *StatePublisher) Run(ctx context.Context) {
	retry := backoff.Backoff{Min: 250 * time.Millisecond, Max: 5 * time.Second}
	reconnects := p.nc.Stats().Reconnects
	failing := false
	wait := time.Duration(0)
	for {
		wake := p.wake
		if failing {
			wake = nil // the back-off decides
		}
		select {
		case <-ctx.Done():
			p.final()
			return
		case <-wake:
		case <-time.After(wait):
		}
		if n := p.nc.Stats().Reconnects; n != reconnects {
			reconnects = n
			p.kv = nil
		}
		err := p.flush(ctx)
		switch {
		case err == nil:
			if failing {
				p.log.Info("domain states written again")
			}
			failing, wait = false, stateIdle
			retry.Reset()
		case errors.Is(err, errNotConnected):
			failing, wait = true, retry.Min // the bus logs the outage
		default:
			if !failing && ctx.Err() == nil {
				p.log.Warn("domain states not written; the latest of each domain is kept for later", "err", err)
			}
			failing, wait = true, retry.Next()
		}
	}
}

// final writes what is left at shutdown, within stateFinalWait.
func (p *StatePublisher) final() {
	p.mu.Lock()
	idle := len(p.pending) == 0
	p.mu.Unlock()
	if idle {
		return // a sweep can wait for the next start, which sweeps anyway
	}
	ctx, cancel := context.WithTimeout(context.Background(), stateFinalWait)
	defer cancel()
	err := p.flush(ctx)
	if err == nil {
		err = p.nc.FlushWithContext(ctx)
	}
	if err != nil && !errors.Is(err, errNotConnected) {
		p.log.Warn("domain states not all written at shutdown", "err", err)
	}
}

// flush writes every pending state, then sweeps when a sweep is due.
func (p *StatePublisher) flush(ctx context.Context) error {
	if !p.nc.IsConnected() || p.cfg.Active != nil && !p.cfg.Active() {
		return errNotConnected
	}
	if err := p.open(ctx); err != nil {
		return err
	}
	p.mu.Lock()
	batch := make([]pendingState, 0, len(p.pending))
	for _, e := range p.pending {
		batch = append(batch, e)
	}
	sweep := p.sweep
	p.mu.Unlock()
	for _, e := range batch {
		if err := p.write(ctx, e.st, e.change); err != nil {
			p.kv = nil
			return err
		}
		p.mu.Lock()
		if p.pending[e.st.VM].gen == e.gen {
			delete(p.pending, e.st.VM)
		}
		p.mu.Unlock()
	}
	if sweep == p.swept || p.cfg.SubjectOnly {
		p.swept = sweep
		return nil
	}
	if err := p.sweepKeys(ctx); err != nil {
		p.kv = nil
		return err
	}
	p.swept = sweep
	return nil
}

// open finds StateBucket, or creates it when it is missing, never
// changing one that exists (see findOrCreate). A bucket that had to be
// created (a first start, or a server that lost it) gets every key again.
func (p *StatePublisher) open(ctx context.Context) error {
	if p.cfg.SubjectOnly || p.kv != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	missing := false
	kv, err := findOrCreate(ctx, p.log, "kv bucket "+StateBucket, jetstream.ErrBucketNotFound,
		func() (jetstream.KeyValue, error) { return p.js.KeyValue(ctx, StateBucket) },
		func() (jetstream.KeyValue, error) {
			missing = true
			return p.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
				Bucket:      StateBucket,
				Description: "virtbus: the last state of every domain, by <host>.<vm>",
				History:     1,
				Storage:     jetstream.FileStorage,
				Replicas:    p.cfg.Replicas,
			})
		})
	if err != nil {
		return err
	}
	p.kv = kv
	if missing {
		p.mu.Lock()
		for vm, st := range p.known {
			if _, ok := p.pending[vm]; !ok {
				p.queue(st, false)
			}
		}
		p.mu.Unlock()
	}
	return nil
}

// write puts st under its key (deletes the key when st is undefined), and
// publishes it on the subject when it is a change; a resync's state only
// where the bucket differs. The key comes first: a reader who hears of a
// change finds it in the bucket.
func (p *StatePublisher) write(ctx context.Context, st DomainState, change bool) error {
	if st.Event == stateResync && !p.cfg.SubjectOnly {
		if same, err := p.stored(ctx, st); same || err != nil {
			return err
		}
	}
	return p.put(ctx, st, change)
}

// put is write without the look at the bucket.
func (p *StatePublisher) put(ctx context.Context, st DomainState, change bool) error {
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode state of %s: %w", st.VM, err)
	}
	if !p.cfg.SubjectOnly {
		key := StateKey(p.cfg.Host, st.VM)
		cctx, cancel := context.WithTimeout(ctx, stateTimeout)
		defer cancel()
		if st.State == stateUndefined {
			err = p.kv.Delete(cctx, key)
		} else {
			_, err = p.kv.Put(cctx, key, data)
		}
		if err != nil {
			return fmt.Errorf("write key %s of %s: %w", key, StateBucket, err)
		}
	}
	if change {
		if err := p.nc.Publish(StateSubject(p.cfg.Host, st.VM), data); err != nil {
			return fmt.Errorf("publish state of %s: %w", st.VM, err)
		}
	}
	return nil
}

// stored reports whether the bucket holds st already: the same state, or
// no key for an undefined domain.
func (p *StatePublisher) stored(ctx context.Context, st DomainState) (bool, error) {
	key := StateKey(p.cfg.Host, st.VM)
	cctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	e, err := p.kv.Get(cctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return st.State == stateUndefined, nil
	}
	if err != nil {
		return false, fmt.Errorf("read key %s of %s: %w", key, StateBucket, err)
	}
	var old DomainState
	if st.State == stateUndefined || json.Unmarshal(e.Value(), &old) != nil {
		return false, nil
	}
	return sameState(old, st), nil
}

// sweepKeys deletes this host's keys whose domain the publisher does not
// know: domains undefined while no worker watched, or while libvirtd was
// away. Deleted keys stay in the stream as markers, so the listing
// includes them; a Get tells them from live keys.
func (p *StatePublisher) sweepKeys(ctx context.Context) error {
	prefix := "$KV." + StateBucket + "." + StateKey(p.cfg.Host, "")
	cctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	stream, err := p.js.Stream(cctx, "KV_"+StateBucket)
	if err != nil {
		return fmt.Errorf("list keys of %s: %w", StateBucket, err)
	}
	info, err := stream.Info(cctx, jetstream.WithSubjectFilter(prefix+">"))
	if err != nil {
		return fmt.Errorf("list keys of %s: %w", StateBucket, err)
	}
	for subject := range info.State.Subjects {
		vm := strings.TrimPrefix(subject, prefix)
		if p.keeps(vm) {
			continue
		}
		if err := p.removeStale(ctx, vm); err != nil {
			return err
		}
	}
	return nil
}

func (p *StatePublisher) keeps(vm string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, known := p.known[vm]
	_, pending := p.pending[vm]
	return known || pending
}

// removeStale deletes vm's key when it is live, and reports the domain
// undefined.
func (p *StatePublisher) removeStale(ctx context.Context, vm string) error {
	key := StateKey(p.cfg.Host, vm)
	cctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	e, err := p.kv.Get(cctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read key %s of %s: %w", key, StateBucket, err)
	}
	var old DomainState
	_ = json.Unmarshal(e.Value(), &old) // a value that is no state still names a key to delete
	st := DomainState{Host: p.cfg.Host, VM: vm, UUID: old.UUID, State: stateUndefined, Event: stateResync, At: time.Now().UTC()}
	// A key someone else wrote may not make a subject token.
	return p.put(ctx, st, ValidToken(vm))
}
