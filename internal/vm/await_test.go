package vm

import (
	"log/slog"
	"testing"

	"github.com/digitalocean/go-libvirt"
)

func lifecycle(u libvirt.UUID, ev libvirt.DomainEventType) *libvirt.DomainEventCallbackLifecycleMsg {
	return &libvirt.DomainEventCallbackLifecycleMsg{Msg: libvirt.DomainEventLifecycleMsg{Dom: libvirt.Domain{Name: "d", UUID: u}, Event: int32(ev)}}
}

// Events reach a waiter as they come, never block the pump (the oldest go
// when nobody reads), and a waiter learns when its subscription ends; no
// registration is handed out while none is live.
func TestAwaitingHearsEvents(t *testing.T) {
	w := NewWatcher(nil, slog.New(slog.DiscardHandler))
	u, other := libvirt.UUID{1}, libvirt.UUID{2}
	if a := w.Await(u); a != nil {
		t.Fatal("Await before any subscription: want nil, no event would come")
	}
	w.subscribed(true)
	a := w.Await(u)
	if a == nil || a.down() {
		t.Fatal("Await on a live subscription: want a registration that hears")
	}
	w.hear(lifecycle(other, libvirt.DomainEventSuspended))
	w.hear(lifecycle(u, libvirt.DomainEventDefined)) // tells no state
	for range awaitBuffer + 3 {
		w.hear(lifecycle(u, libvirt.DomainEventSuspended))
	}
	w.hear(lifecycle(u, libvirt.DomainEventStarted))
	var got []string
	for len(a.events()) > 0 {
		got = append(got, <-a.events())
	}
	if len(got) != awaitBuffer || got[0] != "paused" || got[len(got)-1] != "running" {
		t.Fatalf("heard %v: want the latest %d, the start last", got, awaitBuffer)
	}

	w.subscribed(false)
	if !a.down() {
		t.Fatal("the subscription ended, and the waiter was not told")
	}
	a.Close()
	if a := w.Await(u); a != nil {
		t.Fatal("Await between subscriptions: want nil")
	}
	var zero *Awaiting
	zero.Close()
	if !zero.down() || zero.events() != nil {
		t.Fatal("a nil Awaiting must hear nothing and say so")
	}
}

// Lookup answers with the state the latest event implied until a read
// begun after that event replaces it.
func TestLookupTellsTheLatestEvent(t *testing.T) {
	w := NewWatcher(nil, slog.New(slog.DiscardHandler))
	u := libvirt.UUID{3}
	w.view[u] = DomainInfo{Name: "d", UUID: UUIDString(u), State: "shutoff", Reason: "destroyed"}
	read := w.mark() // a read begins before the event
	w.hear(lifecycle(u, libvirt.DomainEventStarted))
	if d, _ := w.Lookup("d"); d.State != "running" || d.Reason != "" {
		t.Fatalf("after a start event: %+v, want running with no reason", d)
	}
	w.mu.Lock()
	w.forget(u, read)
	w.mu.Unlock()
	if d, _ := w.Lookup(UUIDString(u)); d.State != "running" {
		t.Fatalf("a read begun before the event replaced it: %+v", d)
	}
	read = w.mark()
	w.mu.Lock()
	w.view[u] = DomainInfo{Name: "d", UUID: UUIDString(u), State: "running", Reason: "booted"}
	w.forget(u, read)
	w.mu.Unlock()
	if d, _ := w.Lookup("d"); d.State != "running" || d.Reason != "booted" {
		t.Fatalf("after the read: %+v, want what it read", d)
	}
	w.hear(lifecycle(u, libvirt.DomainEventUndefined))
	if d, _ := w.Lookup("d"); d.State != StateUndefined {
		t.Fatalf("after an undefine event: %+v", d)
	}
}
