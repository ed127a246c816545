package vm

import (
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// IntentURI is the namespace of the reboot intent in a domain's metadata,
// for tests that look at it through libvirt.
const IntentURI = intentURI

// CutRebootsAfterShutdown makes e's soft reboots end once their shutdown is
// done, before the start, as a worker that crashed there (or lost libvirtd)
// would leave them. The error is unavailable: the command is not over, and
// the worker delivers it again.
func CutRebootsAfterShutdown(e *Executor) {
	e.afterShutdown = func() error {
		return fmt.Errorf("%w: reboot cut off after its shutdown (test)", ErrUnavailable)
	}
}

// BeforeUnplugAsk makes e run fn before every unplug request it sends to
// libvirtd, after the unplug registered for the removal events.
func BeforeUnplugAsk(e *Executor, fn func()) { e.beforeUnplugAsk = fn }

// SetView gives e a view of the domains to find them in (the worker gives
// it its Watcher).
func SetView(e *Executor, v DomainView) { e.cfg.View = v }

// EventPoll is how long a wait hears only events before it asks libvirtd.
const EventPoll = eventPoll

// ResyncEvery makes w read every domain again every d; call before Run.
func ResyncEvery(w *Watcher, d time.Duration) { w.resyncEvery = d }

// Misremember puts a wrong state for the domain with UUID u into w's
// view, as a lost event would leave it.
func Misremember(w *Watcher, u libvirt.UUID, state string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	d := w.view[u]
	d.State = state
	w.view[u] = d
}

// Unanswered reports whether a request on the domain u was confirmed by
// its event and libvirtd has not answered it yet.
func Unanswered(e *Executor, u libvirt.UUID) bool {
	e.tails.mu.Lock()
	defer e.tails.mu.Unlock()
	return e.tails.m[u] != nil
}
