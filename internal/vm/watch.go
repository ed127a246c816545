package vm

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/backoff"
)

const (
	// StateUndefined is the state reported for a domain that is gone.
	StateUndefined = "undefined"
	// EventResync names a change that a resync found rather than an event
	// told: one made while no subscription was live (libvirtd or the
	// worker restarting).
	EventResync = "resync"
)

// burstWait is how long the watcher lets the events of one operation
// gather before it reads the domains they name.
const burstWait = 100 * time.Millisecond

// resyncEvery is how often the watcher reads every domain again while its
// subscription lives. libvirt sends events without a promise (a read
// that fails, or one made while a domain is half way through a change,
// may leave the view behind with no event to come): this bounds how long
// the view, and the bucket fed from it, can stay wrong. A resync that
// finds nothing changed says nothing.
const resyncEvery = 30 * time.Second

// DomainInfo is a domain as the watcher last saw it.
type DomainInfo struct {
	Name   string
	UUID   string // 36 characters, lower case
	State  string // StateName's words, or StateUndefined
	Reason string // ReasonName's words; empty once undefined
}

// Watcher keeps a view of every domain of its Conn's libvirtd, defined or
// running, whoever changed it: virtbus, virsh, a guest that powered off, a
// QEMU that died. It subscribes to lifecycle events on each connection,
// since a subscription ends with its connection, and after subscribing
// reads every domain again (a resync): events sent while no subscription
// was live are lost, and subscribing first means nothing falls in a gap.
// An event is only a prompt: the state and reason are read from libvirtd
// after it, because a burst of events for one domain is looked at once,
// and the event's own detail may be older than the domain's state. Until
// that read, Lookup answers with the state the event implies, and the
// actions awaiting the domain's events hear of it at once (see await.go).
type Watcher struct {
	conn *Conn
	log  *slog.Logger

	// OnChange, when set before Run, hears of every change of a domain's
	// name, state or reason: with the (last) event that told of it, or
	// EventResync for a difference a resync found (a domain gone
	// meanwhile comes with StateUndefined). It runs on
	// Run's goroutine, one call at a time, and must not wait on anything:
	// events queue behind it.
	OnChange func(d DomainInfo, event string)
	// OnResync, when set before Run, is handed the whole view after each
	// resync, once OnChange has heard of its differences: what a receiver
	// holds beyond it is gone.
	OnResync func(all []DomainInfo)

	resyncEvery time.Duration // resyncEvery, unless a test wants it sooner

	mu   sync.Mutex
	view map[libvirt.UUID]DomainInfo
	// heard is what the events since a domain's last read told of its
	// state (see await.go): Lookup answers with it, so that an action
	// right after another does not decide on the state from before it.
	heard map[libvirt.UUID]heardState
	seq   uint64 // events heard so far: orders them against the reads
	live  bool   // a subscription is live: events reach the waiters
	// defined and subscribedAt number define and undefine events and new
	// subscriptions, from defSeq (see Definition).
	defined      map[libvirt.UUID]uint64
	subscribedAt uint64
	defSeq       uint64
	waiters      map[libvirt.UUID]map[*Awaiting]struct{}
}

// NewWatcher returns a watcher of conn's libvirtd; Run starts it.
func NewWatcher(conn *Conn, log *slog.Logger) *Watcher {
	return &Watcher{
		conn:        conn,
		log:         log,
		resyncEvery: resyncEvery,
		view:        map[libvirt.UUID]DomainInfo{},
		heard:       map[libvirt.UUID]heardState{},
		defined:     map[libvirt.UUID]uint64{},
		waiters:     map[libvirt.UUID]map[*Awaiting]struct{}{},
	}
}

// Domains returns the view, sorted by name. Until the first resync it is
// empty; while libvirtd is out of reach it is what was last seen.
func (w *Watcher) Domains() []DomainInfo {
	w.mu.Lock()
	out := make([]DomainInfo, 0, len(w.view))
	for _, d := range w.view {
		out = append(out, d)
	}
	w.mu.Unlock()
	slices.SortFunc(out, func(a, b DomainInfo) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// Lookup finds a domain of the view by name or UUID. Its state is the
// latest libvirtd told: that of an event heard since the domain was last
// read, if any, with no reason then (an event does not tell it). After an
// undefine that is StateUndefined until the next read, which may find the
// domain running on as a transient one.
func (w *Watcher) Lookup(vm string) (DomainInfo, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if u, ok := parseUUID(vm); ok {
		if d, ok := w.view[u]; ok {
			return w.latest(u, d), true
		}
	}
	for u, d := range w.view {
		if d.Name == vm {
			return w.latest(u, d), true
		}
	}
	return DomainInfo{}, false
}

// errWatchEnded ends a session's watch whose subscription closed: its
// connection is gone, and the next one is watched anew.
var errWatchEnded = errors.New("lifecycle event subscription ended")

// Run watches until ctx ends, every connection Conn makes in turn. Run
// the Conn too: the watcher only uses its connections.
func (w *Watcher) Run(ctx context.Context) {
	retry := backoff.Backoff{Min: 200 * time.Millisecond, Max: 10 * time.Second}
	for ctx.Err() == nil {
		s, err := w.conn.client(ctx)
		if err != nil {
			continue // libvirtd is out of reach: client waited for it
		}
		err = w.watch(ctx, s)
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, errWatchEnded) || !s.l.IsConnected():
			retry.Reset()
			w.waitGone(ctx, s)
		default:
			// The connection lives on, so libvirtd refused something: try
			// again on it, slowly.
			w.log.Warn("watching libvirt domains failed; retrying", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(retry.Next()):
			}
		}
	}
}

// waitGone waits, within a bound, for s to be marked lost: its
// subscription ends a moment before that, and client would hand it out
// again meanwhile.
func (w *Watcher) waitGone(ctx context.Context, s *session) {
	select {
	case <-ctx.Done():
	case <-s.l.Disconnected():
	case <-time.After(w.conn.timeout):
	}
}

// watch subscribes on s, resyncs and follows the events until s ends or
// ctx does. go-libvirt forwards events on an unbuffered channel and sends
// its unsubscribe only after the send it is in, so the channel is read to
// its end, by a goroutine that never waits on the watcher: its events
// only queue (see pendingEvents), and reach the actions awaiting them at
// once, ahead of the burst wait (see hear).
func (w *Watcher) watch(ctx context.Context, s *session) error {
	sctx, cancel := context.WithCancel(ctx)
	var ch <-chan any
	err := w.conn.run(s, "subscribe to lifecycle events", func(l *libvirt.Libvirt) (err error) {
		ch, err = l.SubscribeEvents(sctx, libvirt.DomainEventIDLifecycle, libvirt.OptDomain{})
		return err
	})
	if err != nil {
		cancel()
		return fmt.Errorf("subscribe to lifecycle events: %w", classify(err))
	}
	q := newPendingEvents()
	pumped := make(chan struct{})
	w.subscribed(true)
	go func() {
		defer close(pumped)
		defer w.subscribed(false)
		for ev := range ch {
			w.hear(ev)
			q.add(ev)
		}
	}()
	defer func() { cancel(); <-pumped }()

	if err := w.resync(s, true); err != nil {
		return err
	}
	return w.follows(ctx, s, q, pumped)
}

// follows reads the domains that events name, and every domain every
// resyncEvery, until s or its subscription ends, or ctx does: then it
// reads every domain once more, so that what it leaves behind (the view,
// and the bucket fed from it) is libvirt's state at a clean shutdown,
// even where a read made half way through a change left it behind.
func (w *Watcher) follows(ctx context.Context, s *session, q *pendingEvents, pumped <-chan struct{}) error {
	again := time.NewTicker(w.resyncEvery)
	defer again.Stop()
	for {
		select {
		case <-ctx.Done():
			return w.lastResync(s)
		case <-s.l.Disconnected():
			return errWatchEnded
		case <-pumped:
			return errWatchEnded
		case <-again.C:
			if err := w.resync(s, false); err != nil {
				return err
			}
		case <-q.ready:
			// One operation sends a burst (a start: resumed, then
			// started; a destroy: shutdown, then stopped): let it arrive,
			// so the domain is read once and named by the last event.
			select {
			case <-ctx.Done():
				return w.lastResync(s)
			case <-time.After(burstWait):
			}
			if err := w.follow(s, q.take()); err != nil {
				return err
			}
		}
	}
}

// lastResync is the read of every domain when the watcher stops; a
// failure is logged, as nothing is left to retry it.
func (w *Watcher) lastResync(s *session) error {
	if !s.l.IsConnected() {
		return nil
	}
	if err := w.resync(s, false); err != nil {
		w.log.Warn("reading libvirt's domains at shutdown failed; the last states written may be behind", "err", err)
	}
	return nil
}

// resync reads every domain on s, makes that the view and reports what
// differs from the view before. OnResync hears of the whole view after
// the first resync of a subscription (first), and after any that found a
// difference.
func (w *Watcher) resync(s *session, first bool) error {
	mark := w.mark()
	var doms []libvirt.Domain
	err := w.conn.run(s, "list domains", func(l *libvirt.Libvirt) (err error) {
		doms, _, err = l.ConnectListAllDomains(1, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("list domains: %w", classify(err))
	}
	view := make(map[libvirt.UUID]DomainInfo, len(doms))
	for _, dom := range doms {
		d, f, err := w.read(s, dom, false)
		if err != nil {
			return err
		}
		switch f {
		case present:
			view[dom.UUID] = d
		case unread:
			if d, ok := w.known(dom.UUID); ok {
				view[dom.UUID] = d
			}
		}
	}
	w.mu.Lock()
	var differ []DomainInfo
	for u, d := range w.view {
		if now, ok := view[u]; !ok || now.Name != d.Name {
			differ = append(differ, DomainInfo{Name: d.Name, UUID: d.UUID, State: StateUndefined})
		}
	}
	for u, d := range view {
		if w.view[u] != d {
			differ = append(differ, d)
		}
	}
	w.view = view
	for u := range w.heard {
		w.forget(u, mark)
	}
	w.mu.Unlock()
	for _, d := range differ {
		w.report(d, EventResync)
	}
	changed := len(differ) > 0
	if !changed && !first {
		return nil
	}
	w.log.Info("libvirt domains read", "domains", len(view), "changed", changed)
	if w.OnResync != nil {
		w.OnResync(w.Domains())
	}
	return nil
}

// follow reads the domains that events named, and reports each.
func (w *Watcher) follow(s *session, evs []pendingEvent) error {
	for _, ev := range evs {
		mark := w.mark()
		d, f, err := w.read(s, ev.dom, true)
		if err != nil {
			return err
		}
		if f == unread {
			continue
		}
		w.mu.Lock()
		w.forget(ev.dom.UUID, mark)
		old, known := w.view[ev.dom.UUID]
		if f == gone {
			delete(w.view, ev.dom.UUID)
		} else {
			w.view[ev.dom.UUID] = d
		}
		w.mu.Unlock()
		switch {
		case f == gone && !known:
			// Came and went between two looks: nobody saw it.
		case f == gone:
			w.report(DomainInfo{Name: old.Name, UUID: old.UUID, State: StateUndefined}, ev.event)
		case known && old == d:
			// Nothing changed that the view holds: a redefinition, or
			// the tail of a burst that outlasted burstWait.
		default:
			if known && old.Name != d.Name {
				// Renamed: the old name is gone.
				w.report(DomainInfo{Name: old.Name, UUID: old.UUID, State: StateUndefined}, ev.event)
			}
			w.report(d, ev.event)
		}
	}
	return nil
}

func (w *Watcher) known(u libvirt.UUID) (DomainInfo, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	d, ok := w.view[u]
	return d, ok
}

// found is what read made of a domain.
type found int

const (
	present found = iota
	gone
	unread // libvirtd would not say: keep what was known
)

// read looks dom up on s, by UUID when lookup is set (an event's name may
// be one a rename left behind), and reads its state. An error of libvirt's
// about this one domain is logged and leaves it unread, so one odd domain
// cannot stall the view; any other error means s is lost.
func (w *Watcher) read(s *session, dom libvirt.Domain, lookup bool) (DomainInfo, found, error) {
	var st, reason int32
	err := w.conn.run(s, "read state of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		if lookup {
			if dom, err = l.DomainLookupByUUID(dom.UUID); err != nil {
				return err
			}
		}
		st, reason, err = l.DomainGetState(dom, 0)
		return err
	})
	var lerr libvirt.Error
	switch {
	case err == nil:
		state := libvirt.DomainState(st)
		return DomainInfo{Name: dom.Name, UUID: UUIDString(dom.UUID), State: StateName(state), Reason: ReasonName(state, reason)}, present, nil
	case libvirt.IsNotFound(err):
		return DomainInfo{}, gone, nil
	case errors.As(err, &lerr) && s.l.IsConnected():
		w.log.Warn("reading a domain's state failed; keeping what was known", "domain", dom.Name, "err", err)
		return DomainInfo{}, unread, nil
	default:
		return DomainInfo{}, unread, fmt.Errorf("read state of %s: %w", dom.Name, classify(err))
	}
}

func (w *Watcher) report(d DomainInfo, event string) {
	if w.OnChange != nil {
		w.OnChange(d, event)
	}
}

// pendingEvents holds the domains events named that the watcher has not
// read yet, with the last event of each: memory stays one entry per
// domain however fast events come.
type pendingEvents struct {
	mu    sync.Mutex
	doms  map[libvirt.UUID]pendingEvent
	order []libvirt.UUID // first come, first read
	ready chan struct{}  // holds a token once something was added since the last look
}

type pendingEvent struct {
	dom   libvirt.Domain
	event string
}

func newPendingEvents() *pendingEvents {
	return &pendingEvents{doms: map[libvirt.UUID]pendingEvent{}, ready: make(chan struct{}, 1)}
}

func (q *pendingEvents) add(ev any) {
	m, ok := ev.(*libvirt.DomainEventCallbackLifecycleMsg)
	if !ok {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	u := m.Msg.Dom.UUID
	if _, queued := q.doms[u]; !queued {
		q.order = append(q.order, u)
	}
	q.doms[u] = pendingEvent{dom: m.Msg.Dom, event: EventName(m.Msg.Event)}
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// take empties the queue.
func (q *pendingEvents) take() []pendingEvent {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]pendingEvent, 0, len(q.order))
	for _, u := range q.order {
		out = append(out, q.doms[u])
	}
	clear(q.doms)
	q.order = q.order[:0]
	return out
}
