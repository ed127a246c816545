package chaos

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus"
)

// arrival is one completion as the harness received it.
type arrival struct {
	Seq   int       // arrival order over both subjects
	At    time.Time // when it arrived
	Reply bool      // on the command's reply subject, not the event subject
	C     bus.Completion
	Raw   map[string]any // the whole message, to compare copies
}

// collector keeps every completion published on virtbus.evt.> and on the
// harness's reply subjects, in arrival order.
type collector struct {
	mu      sync.Mutex
	all     []arrival
	bad     []string
	events  map[string]int // event arrivals per command id
	changed chan struct{}  // closed and replaced on every arrival
}

// collect subscribes on nc before anything is published.
func collect(nc *nats.Conn, replySubjects string) (*collector, error) {
	c := &collector{events: map[string]int{}, changed: make(chan struct{})}
	for subject, reply := range map[string]bool{bus.EventPrefix + ".>": false, replySubjects: true} {
		sub, err := nc.Subscribe(subject, c.handler(reply))
		if err != nil {
			return nil, fmt.Errorf("subscribe %s: %w", subject, err)
		}
		if err := sub.SetPendingLimits(-1, -1); err != nil {
			return nil, err
		}
	}
	// The server must know the subscriptions before the first command.
	return c, nc.Flush()
}

func (c *collector) handler(reply bool) nats.MsgHandler {
	return func(m *nats.Msg) {
		a := arrival{At: time.Now(), Reply: reply}
		errC := json.Unmarshal(m.Data, &a.C)
		errR := json.Unmarshal(m.Data, &a.Raw)
		c.mu.Lock()
		defer c.mu.Unlock()
		if errC != nil || errR != nil || a.C.ID == "" {
			c.bad = append(c.bad, fmt.Sprintf("%s: %q", m.Subject, m.Data))
			return
		}
		a.Seq = len(c.all)
		c.all = append(c.all, a)
		if !reply {
			c.events[a.C.ID]++
		}
		close(c.changed)
		c.changed = make(chan struct{})
	}
}

func (c *collector) snapshot() (all []arrival, bad []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.all), slices.Clone(c.bad)
}

// waitEvents waits until every id has a completion on the event subject,
// or until deadline; it returns the ids still without one.
func (c *collector) waitEvents(ids []string, deadline time.Time) []string {
	for {
		c.mu.Lock()
		var missing []string
		for _, id := range ids {
			if c.events[id] == 0 {
				missing = append(missing, id)
			}
		}
		changed := c.changed
		c.mu.Unlock()
		left := time.Until(deadline)
		if len(missing) == 0 || left <= 0 {
			return missing
		}
		select {
		case <-changed:
		case <-time.After(min(left, time.Second)):
		}
	}
}

// nextAfter is the first event completion from host that arrived at or
// after t.
func (c *collector) nextAfter(host string, t time.Time) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, a := range c.all {
		if !a.Reply && a.C.Host == host && !a.At.Before(t) {
			return a.At, true
		}
	}
	return time.Time{}, false
}
