package vm

import (
	"context"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// removalEvents listens for device-removed and device-removal-failed events
// of one domain. go-libvirt ignores the domain argument of SubscribeEvents,
// so events of every domain arrive and are filtered here by UUID.
type removalEvents struct {
	dom     libvirt.Domain
	cancel  context.CancelFunc
	removed <-chan any
	failed  <-chan any
}

type removalOutcome int

const (
	waitOver      removalOutcome = iota // time is up, or the connection dropped: look at the XML
	deviceRemoved                       // the event for our alias arrived
	removalFailed                       // the guest refused
	ctxDone
)

// subscribeRemoval subscribes on the current connection. After a libvirtd
// restart the old subscription is gone with its client, which is why every
// wait subscribes afresh.
func (e *Executor) subscribeRemoval(ctx context.Context, dom libvirt.Domain) (*removalEvents, error) {
	sctx, cancel := context.WithCancel(context.Background())
	r := &removalEvents{dom: dom, cancel: cancel}
	err := e.conn.call(ctx, "subscribe to device events", func(l *libvirt.Libvirt) (err error) {
		if r.removed, err = l.SubscribeEvents(sctx, libvirt.DomainEventIDDeviceRemoved, libvirt.OptDomain{dom}); err != nil {
			return err
		}
		r.failed, err = l.SubscribeEvents(sctx, libvirt.DomainEventIDDeviceRemovalFailed, libvirt.OptDomain{dom})
		return err
	})
	if err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

// wait returns when an event for alias arrives, d has passed, the
// connection drops, or ctx ends. An empty alias matches any device of the
// domain (old daemons may not report aliases).
func (r *removalEvents) wait(ctx context.Context, alias string, d time.Duration) removalOutcome {
	timer := time.NewTimer(d)
	defer timer.Stop()
	removed, failed := r.removed, r.failed
	for {
		select {
		case <-ctx.Done():
			return ctxDone
		case <-timer.C:
			return waitOver
		case ev, ok := <-removed:
			if !ok {
				return waitOver
			}
			if m, is := ev.(*libvirt.DomainEventCallbackDeviceRemovedMsg); is &&
				m.Msg.Dom.UUID == r.dom.UUID && (alias == "" || m.Msg.DevAlias == alias) {
				return deviceRemoved
			}
		case ev, ok := <-failed:
			if !ok {
				return waitOver
			}
			if m, is := ev.(*libvirt.DomainEventCallbackDeviceRemovalFailedMsg); is &&
				m.Dom.UUID == r.dom.UUID && (alias == "" || m.DevAlias == alias) {
				return removalFailed
			}
		}
	}
}

// close cancels the subscriptions and drains their channels: go-libvirt's
// forwarding goroutine blocks on a full channel and would never unsubscribe.
func (r *removalEvents) close() {
	r.cancel()
	for _, ch := range []<-chan any{r.removed, r.failed} {
		if ch == nil {
			continue
		}
		go func() {
			for range ch {
			}
		}()
	}
}
