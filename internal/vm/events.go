package vm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// An unplug learns from libvirt's device-removed and device-removal-failed
// events whether the guest let go of a device. libvirtd takes one
// subscription per event and connection (a second SubscribeEvents for the
// same event fails "event callback already tracked", whatever the domain),
// so each connection holds one per event, made when the first unplug needs
// it, and fans the events out to the unplugs waiting on it, by domain UUID:
// go-libvirt ignores the domain argument, and every domain's events arrive.

// removalEvents are the events a removalHub subscribes to.
var removalEvents = [...]struct {
	id   libvirt.DomainEventID
	name string
}{
	{libvirt.DomainEventIDDeviceRemoved, "device-removed"},
	{libvirt.DomainEventIDDeviceRemovalFailed, "device-removal-failed"},
}

type removalOutcome int

const (
	waitOver      removalOutcome = iota // time is up: look at the XML
	deviceRemoved                       // the event for our alias arrived
	removalFailed                       // the guest refused
	watchLost                           // the subscription ended with its connection
	ctxDone
)

// errSubscriptionEnded carries no sentinel on purpose: Conn.withSession
// tries again on the next connection when this one is gone, and reports it
// as unavailable when it is not.
var errSubscriptionEnded = errors.New("device event subscription ended with its connection")

// removalHub is one connection's subscriptions to removalEvents and the
// unplugs watching them. It lives and ends with its session.
type removalHub struct {
	// subscribing is held while subscribing: two unplugs subscribing side
	// by side would make the second subscription libvirtd refuses.
	subscribing chan struct{}

	mu      sync.Mutex
	ended   bool
	subs    [len(removalEvents)]*removalSub // nil: not subscribed (yet, or any more)
	waiters map[libvirt.UUID]map[*removalWatch]struct{}
}

// removalSub is one live SubscribeEvents.
type removalSub struct{ cancel context.CancelFunc }

// removalWatch is one unplug's registration: it hears of the events of its
// domain, for its device alias.
type removalWatch struct {
	hub   *removalHub
	uuid  libvirt.UUID
	alias string              // empty: any device (old daemons may not report aliases)
	out   chan removalOutcome // holds the first outcome; later ones do not matter
}

func newRemovalHub() *removalHub {
	return &removalHub{subscribing: make(chan struct{}, 1), waiters: map[libvirt.UUID]map[*removalWatch]struct{}{}}
}

// watchRemoval registers for the removal events of dom's device alias on
// the current connection, subscribing there first when no unplug has yet.
// Register before asking for the unplug: the event may come before the
// request returns. A subscription libvirtd refuses is not the client's
// fault: it ends libvirt, or unavailable when the daemon did not answer.
func (e *Executor) watchRemoval(ctx context.Context, dom libvirt.Domain, alias string) (*removalWatch, error) {
	var w *removalWatch
	err := e.conn.withSession(ctx, "watch device removals of "+dom.Name, func(s *session) (err error) {
		w, err = s.removals.watch(ctx, e.conn, s, dom.UUID, alias)
		return err
	})
	return w, err
}

func (h *removalHub) watch(ctx context.Context, c *Conn, s *session, uuid libvirt.UUID, alias string) (*removalWatch, error) {
	w := &removalWatch{hub: h, uuid: uuid, alias: alias, out: make(chan removalOutcome, 1)}
	if h.register(w) {
		return w, nil
	}
	select {
	case h.subscribing <- struct{}{}:
		defer func() { <-h.subscribing }()
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: wait for another subscription: %v", ErrUnavailable, context.Cause(ctx))
	}
	for i := range removalEvents {
		if err := h.subscribe(c, s, i); err != nil {
			return nil, err
		}
	}
	if !h.register(w) {
		return nil, errSubscriptionEnded
	}
	return w, nil
}

// register adds w when every subscription is live, and says whether it did.
func (h *removalHub) register(w *removalWatch) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended || slices.Contains(h.subs[:], nil) {
		return false
	}
	if h.waiters[w.uuid] == nil {
		h.waiters[w.uuid] = map[*removalWatch]struct{}{}
	}
	h.waiters[w.uuid][w] = struct{}{}
	return true
}

// subscribe makes the subscription to removalEvents[i] on s, unless it is
// live already. The call goes through c.run: it is bounded like any other.
func (h *removalHub) subscribe(c *Conn, s *session, i int) error {
	h.mu.Lock()
	ended, live := h.ended, h.subs[i] != nil
	h.mu.Unlock()
	if ended {
		return errSubscriptionEnded
	}
	if live {
		return nil
	}
	ev := removalEvents[i]
	sctx, cancel := context.WithCancel(context.Background())
	var ch <-chan any
	err := c.run(s, "subscribe to "+ev.name+" events", func(l *libvirt.Libvirt) (err error) {
		ch, err = l.SubscribeEvents(sctx, ev.id, libvirt.OptDomain{})
		return err
	})
	if err != nil {
		cancel()
		if errors.Is(err, ErrUnavailable) || !s.l.IsConnected() {
			return err
		}
		return fmt.Errorf("%w: subscribe to %s events: %v", ErrLibvirt, ev.name, err)
	}
	sub := &removalSub{cancel: cancel}
	h.mu.Lock()
	if ended = h.ended; !ended {
		h.subs[i] = sub
	}
	h.mu.Unlock()
	go h.pump(i, sub, ch)
	if ended {
		// The session ended while the call ran, and end did not see
		// this subscription.
		cancel()
		return errSubscriptionEnded
	}
	return nil
}

// pump hands the events of one subscription to their waiters until it
// ends, and then tells every waiter to watch again elsewhere. It never
// blocks on a waiter: go-libvirt's forwarding goroutine blocks on an unread
// channel, and would never get to unsubscribe; reading to the end is the
// drain that cancelling needs.
func (h *removalHub) pump(i int, sub *removalSub, ch <-chan any) {
	for ev := range ch {
		h.deliver(ev)
	}
	sub.cancel()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.subs[i] == sub {
		h.subs[i] = nil
	}
	for _, ws := range h.waiters {
		for w := range ws {
			w.tell(watchLost)
		}
	}
}

func (h *removalHub) deliver(ev any) {
	var uuid libvirt.UUID
	var alias string
	var outcome removalOutcome
	switch m := ev.(type) {
	case *libvirt.DomainEventCallbackDeviceRemovedMsg:
		uuid, alias, outcome = m.Msg.Dom.UUID, m.Msg.DevAlias, deviceRemoved
	case *libvirt.DomainEventCallbackDeviceRemovalFailedMsg:
		uuid, alias, outcome = m.Dom.UUID, m.DevAlias, removalFailed
	default:
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for w := range h.waiters[uuid] {
		if w.alias == "" || w.alias == alias {
			w.tell(outcome)
		}
	}
}

// end cancels the subscriptions when their session ends; their pumps then
// tell the waiters, and the hub takes no more. go-libvirt unsubscribes on
// the cancel with a call of its own, which ends at the latest when the
// session's socket is closed, as Conn does with every session it gives up.
func (h *removalHub) end() {
	h.mu.Lock()
	h.ended = true
	subs := h.subs
	h.mu.Unlock()
	for _, sub := range subs {
		if sub != nil {
			sub.cancel()
		}
	}
}

// tell passes o on unless an outcome is waiting already: the first one
// decides.
func (w *removalWatch) tell(o removalOutcome) {
	select {
	case w.out <- o:
	default:
	}
}

// wait returns when an event for w arrives, its subscription ends, d has
// passed, or ctx ends.
func (w *removalWatch) wait(ctx context.Context, d time.Duration) removalOutcome {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctxDone
	case <-timer.C:
		return waitOver
	case o := <-w.out:
		return o
	}
}

// close takes w off its hub.
func (w *removalWatch) close() {
	h := w.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.waiters[w.uuid], w)
	if len(h.waiters[w.uuid]) == 0 {
		delete(h.waiters, w.uuid)
	}
}
