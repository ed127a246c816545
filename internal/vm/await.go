package vm

import "github.com/digitalocean/go-libvirt"

// An action learns that its request took effect from libvirt's own
// lifecycle event, not by asking libvirtd again and again: the watcher's
// subscription hears every event anyway, and hands each to the actions
// awaiting its domain the moment it arrives, ahead of the burst wait that
// the view's reads keep. An action registers before its request, so the
// event the request causes cannot pass unheard.

// awaitBuffer is how many events an Awaiting holds unread. One request
// causes one or two (a destroy: shutdown, then stopped); when more come
// than are read, the oldest go, as the latest says the most.
const awaitBuffer = 8

// Awaiting is one action's registration for the lifecycle events of one
// domain, from DomainView.Await until Close. A nil Awaiting stands for no
// events at all: the view's subscription is not live, and the action asks
// libvirtd as it would without a view. The zero Awaiting hears nothing yet
// never learns of a loss: every event lost, as a test needs it.
type Awaiting struct {
	w      *Watcher
	uuid   libvirt.UUID
	states chan string   // the state each event implies (impliedState)
	lost   chan struct{} // closed when the subscription ended: no more come
}

// heardState is the state an event implied, numbered in the order the
// events came.
type heardState struct {
	state string
	seq   uint64
}

// Await registers for the lifecycle events of the domain with UUID u from
// now on. It is nil while no subscription is live (before the first one,
// or between connections): no event would come.
func (w *Watcher) Await(u libvirt.UUID) *Awaiting {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.live {
		return nil
	}
	a := &Awaiting{w: w, uuid: u, states: make(chan string, awaitBuffer), lost: make(chan struct{})}
	if w.waiters[u] == nil {
		w.waiters[u] = map[*Awaiting]struct{}{}
	}
	w.waiters[u][a] = struct{}{}
	return a
}

// hear takes an event as it comes off the subscription: Lookup answers
// with the state it implies from now on, the domain's waiters are told,
// and a define or undefine changes its Definition.
// It never waits on them: the pump must read on (see watch).
func (w *Watcher) hear(ev any) {
	m, ok := ev.(*libvirt.DomainEventCallbackLifecycleMsg)
	if !ok {
		return
	}
	u := m.Msg.Dom.UUID
	w.mu.Lock()
	defer w.mu.Unlock()
	w.noteDefinition(u, libvirt.DomainEventType(m.Msg.Event))
	st := impliedState(m.Msg.Event)
	if st == "" {
		return
	}
	w.seq++
	w.heard[u] = heardState{state: st, seq: w.seq}
	for a := range w.waiters[u] {
		a.tell(st)
	}
}

// subscribed records whether a subscription is live. Once it ended, every
// waiter is told so and let go: its events went with the connection.
func (w *Watcher) subscribed(live bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.live = live
	if live {
		// Events sent while no subscription was live are lost: every
		// definition may have changed.
		w.defSeq++
		w.subscribedAt = w.defSeq
		return
	}
	for _, as := range w.waiters {
		for a := range as {
			close(a.lost)
		}
	}
	clear(w.waiters)
}

// mark numbers the events heard so far: a read begun after them knows what
// they told.
func (w *Watcher) mark() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seq
}

// forget drops what events up to mark told of u, once a read begun after
// them has replaced it; a later event's word stands until it is read too.
// w.mu is held.
func (w *Watcher) forget(u libvirt.UUID, mark uint64) {
	if h, ok := w.heard[u]; ok && h.seq <= mark {
		delete(w.heard, u)
	}
}

// latest is d with the state an event told since d was read. w.mu is held.
func (w *Watcher) latest(u libvirt.UUID, d DomainInfo) DomainInfo {
	if h, ok := w.heard[u]; ok {
		d.State, d.Reason = h.state, ""
	}
	return d
}

// impliedState is the state a lifecycle event leaves its domain in, in
// StateName's words, or StateUndefined after an undefine (the domain is
// gone, or runs on as a transient one); empty for an event that tells no
// state (defined: a new or changed config).
func impliedState(ev int32) string {
	switch libvirt.DomainEventType(ev) {
	case libvirt.DomainEventStarted, libvirt.DomainEventResumed:
		return StateName(libvirt.DomainRunning)
	case libvirt.DomainEventSuspended:
		return StateName(libvirt.DomainPaused)
	case libvirt.DomainEventStopped:
		return StateName(libvirt.DomainShutoff)
	case libvirt.DomainEventShutdown:
		return StateName(libvirt.DomainShutdown)
	case libvirt.DomainEventCrashed:
		return StateName(libvirt.DomainCrashed)
	case libvirt.DomainEventPmsuspended:
		return StateName(libvirt.DomainPmsuspended)
	case libvirt.DomainEventUndefined:
		return StateUndefined
	}
	return ""
}

// tell passes st on without waiting: when the buffer is full, the oldest
// state goes. Only the pump sends, under w.mu, so the loop ends.
func (a *Awaiting) tell(st string) {
	for {
		select {
		case a.states <- st:
			return
		default:
		}
		select {
		case <-a.states:
		default:
		}
	}
}

// Close ends the registration. Safe on a nil and on a zero Awaiting.
func (a *Awaiting) Close() {
	if a == nil || a.w == nil {
		return
	}
	w := a.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if as := w.waiters[a.uuid]; as != nil {
		delete(as, a)
		if len(as) == 0 {
			delete(w.waiters, a.uuid)
		}
	}
}

// events delivers the states the events imply; never, for a nil Awaiting.
func (a *Awaiting) events() <-chan string {
	if a == nil {
		return nil
	}
	return a.states
}

// ended is closed once no more events come; never, for a zero Awaiting.
func (a *Awaiting) ended() <-chan struct{} {
	if a == nil {
		return nil
	}
	return a.lost
}

// down reports whether no (more) events come: the action has to ask.
func (a *Awaiting) down() bool {
	if a == nil {
		return true
	}
	select {
	case <-a.lost:
		return true
	default:
		return false
	}
}

// maxDefinitions bounds the domains whose definition events are counted;
// past it every count starts again, as after a new subscription.
const maxDefinitions = 10000

// noteDefinition counts a define or undefine event of the domain with
// UUID u (see Definition). w.mu is held.
func (w *Watcher) noteDefinition(u libvirt.UUID, ev libvirt.DomainEventType) {
	if ev != libvirt.DomainEventDefined && ev != libvirt.DomainEventUndefined {
		return
	}
	w.defSeq++
	if len(w.defined) >= maxDefinitions {
		clear(w.defined)
		w.subscribedAt = w.defSeq
		w.defSeq++
	}
	w.defined[u] = w.defSeq
}

// Definition numbers what the watcher knows of the definition of the
// domain with UUID u: it changes with every define or undefine event of
// the domain and with every new subscription (events in between were
// lost), and is 0 while no subscription is live.
func (w *Watcher) Definition(u libvirt.UUID) uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.live {
		return 0
	}
	return max(w.defined[u], w.subscribedAt)
}
