package bustest

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// Decoder turns a message into a value and the command id it belongs to,
// or fails for a message that is not what the subject should carry.
type Decoder[T any] func(m *nats.Msg) (v T, id string, err error)

// Collector gathers every message published on one subject, decoded, in
// arrival order. It is generic so that bustest need not know bus's
// Completion (see the package comment).
type Collector[T any] struct {
	nc      *nats.Conn
	decode  Decoder[T]
	timeout time.Duration
	// ch is filled by the connection's reader itself, in order, before it
	// reads on; so once a flush round trip has returned, everything routed
	// to us ahead of it is in ch. An async handler would give no such
	// promise: it runs on a goroutine of its own, maybe later.
	ch chan *nats.Msg

	mu  sync.Mutex
	all []entry[T]
	bad []string
}

type entry[T any] struct {
	v     T
	id    string
	taken bool // handed out by Take or TakeSettled
}

// collectBuffer is how many messages may wait in ch between two looks at
// it; the client drops what does not fit, as for any slow consumer.
const collectBuffer = 1 << 16

// Collect subscribes to subject (wildcards allowed) before anything is
// published, and keeps what arrives until the test ends. The waits that
// take no timeout of their own give up after timeout. A message decode
// rejects fails the test when it ends.
func Collect[T any](t testing.TB, nc *nats.Conn, subject string, timeout time.Duration, decode Decoder[T]) *Collector[T] {
	t.Helper()
	c := &Collector[T]{nc: nc, decode: decode, timeout: timeout, ch: make(chan *nats.Msg, collectBuffer)}
	sub, err := nc.ChanSubscribe(subject, c.ch)
	if err != nil {
		t.Fatalf("subscribe %s: %v", subject, err)
	}
	// The server must know the subscription before the first command goes
	// out, or a fast reply is missed.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sub.Unsubscribe()
		c.mu.Lock()
		defer c.mu.Unlock()
		c.pull()
		for _, b := range c.bad {
			t.Errorf("a message on %s is not what it should be: %s", subject, b)
		}
	})
	return c
}

// pull decodes what has arrived into all; c.mu is held.
func (c *Collector[T]) pull() {
	for {
		select {
		case m := <-c.ch:
			v, id, err := c.decode(m)
			if err != nil {
				c.bad = append(c.bad, fmt.Sprintf("%v: %s", err, m.Data))
				continue
			}
			c.all = append(c.all, entry[T]{v: v, id: id})
		default:
			return
		}
	}
}

// entries pulls and returns a copy of all.
func (c *Collector[T]) entries() []entry[T] {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pull()
	return slices.Clone(c.all)
}

// values is the values of es that keep selects.
func values[T any](es []entry[T], keep func(entry[T]) bool) []T {
	out := make([]T, 0, len(es))
	for _, e := range es {
		if keep(e) {
			out = append(out, e.v)
		}
	}
	return out
}

func every[T any](entry[T]) bool { return true }

func ofID[T any](id string) func(entry[T]) bool {
	return func(e entry[T]) bool { return e.id == id }
}

// Snapshot is everything that has arrived so far.
func (c *Collector[T]) Snapshot() []T { return values(c.entries(), every[T]) }

// WaitFor waits until done holds for what has arrived, and returns that.
func (c *Collector[T]) WaitFor(t testing.TB, timeout time.Duration, what string, done func([]T) bool) []T {
	t.Helper()
	es := c.waitFor(t, timeout, what, func(es []entry[T]) bool { return done(values(es, every[T])) })
	return values(es, every[T])
}

func (c *Collector[T]) waitFor(t testing.TB, timeout time.Duration, what string, done func([]entry[T]) bool) []entry[T] {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		es := c.entries()
		if done(es) {
			return es
		}
		if time.Now().After(deadline) {
			got := values(es, every[T])
			t.Fatalf("timed out after %s waiting for %s; %d messages arrived: %v", timeout, what, len(got), got)
		}
		time.Sleep(pollInterval)
	}
}

// WaitIDs waits until every id has at least one message, and returns
// everything that has arrived.
func (c *Collector[T]) WaitIDs(t testing.TB, timeout time.Duration, ids ...string) []T {
	t.Helper()
	return values(c.waitIDs(t, timeout, ids...), every[T])
}

func (c *Collector[T]) waitIDs(t testing.TB, timeout time.Duration, ids ...string) []entry[T] {
	t.Helper()
	return c.waitFor(t, timeout, fmt.Sprintf("replies to %d commands", len(ids)), func(es []entry[T]) bool {
		seen := make(map[string]bool, len(es))
		for _, e := range es {
			seen[e.id] = true
		}
		for _, id := range ids {
			if !seen[id] {
				return false
			}
		}
		return true
	})
}

// WaitID waits for a message of id and returns the first one.
func (c *Collector[T]) WaitID(t testing.TB, id string) T {
	t.Helper()
	return values(c.waitIDs(t, c.timeout, id), ofID[T](id))[0]
}

// settle returns once everything published to us before the call has
// arrived in ch: the server answers a flush round trip only after it.
func (c *Collector[T]) settle(t testing.TB) {
	t.Helper()
	if err := c.nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// SettledID is every message of id, once what was published before the
// call has arrived.
func (c *Collector[T]) SettledID(t testing.TB, id string) []T {
	t.Helper()
	c.settle(t)
	return values(c.entries(), ofID[T](id))
}

// Settled is every message, once what was published before the call has
// arrived.
func (c *Collector[T]) Settled(t testing.TB) []T {
	t.Helper()
	c.settle(t)
	return c.Snapshot()
}

// Take waits for the first message that match accepts and no Take or
// TakeSettled has handed out yet, and hands it out: a test that expects
// several alike messages gets each one once.
func (c *Collector[T]) Take(t testing.TB, what string, match func(T) bool) T {
	t.Helper()
	var got T
	Eventually(t, c.timeout, what, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.pull()
		for i := range c.all {
			if e := &c.all[i]; !e.taken && match(e.v) {
				e.taken, got = true, e.v
				return true
			}
		}
		return false
	})
	return got
}

// TakeSettled hands out every message no Take or TakeSettled has handed
// out yet, once what was published before the call has arrived.
func (c *Collector[T]) TakeSettled(t testing.TB) []T {
	t.Helper()
	c.settle(t)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pull()
	var out []T
	for i := range c.all {
		if !c.all[i].taken {
			out = append(out, c.all[i].v)
			c.all[i].taken = true
		}
	}
	return out
}
