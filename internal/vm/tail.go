package vm

import (
	"sync"

	"github.com/digitalocean/go-libvirt"
)

// tails are the requests whose change their event confirmed before
// libvirtd answered them, by domain UUID: the action is done, the answer
// still on its way. A domain's next request waits for it, so that one
// domain never has two requests in libvirtd at once, as when every request
// waited for its answer. The answer comes within the call timeout (see
// Conn.run).
type tails struct {
	mu sync.Mutex
	m  map[libvirt.UUID]chan struct{}
}

// keep runs answered, which waits for the answer of the request just
// confirmed on the domain u, and holds u's next request until it returns.
func (t *tails) keep(u libvirt.UUID, answered func()) {
	done := make(chan struct{})
	t.mu.Lock()
	if t.m == nil {
		t.m = make(map[libvirt.UUID]chan struct{})
	}
	t.m[u] = done
	t.mu.Unlock()
	go func() {
		answered()
		t.mu.Lock()
		if t.m[u] == done {
			delete(t.m, u)
		}
		t.mu.Unlock()
		close(done)
	}()
}

// wait returns once the domain u has no request unanswered.
func (t *tails) wait(u libvirt.UUID) {
	t.mu.Lock()
	done := t.m[u]
	t.mu.Unlock()
	if done != nil {
		<-done
	}
}
