package bench

import (
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus"
)

// collector takes the completions of one row off the host's event
// subject, matches them to the commands sent by id, and keeps the
// latency of each: from just before its publish to the completion's
// arrival. Anything off (an id answered twice, an id never sent, an error
// completion, a message that is no completion) is kept for the checks.
type collector struct {
	sub *nats.Subscription
	// states counts the host's state messages (virtbus.state.<host>.>):
	// the worker publishes one per change libvirt's events tell it of.
	states    atomic.Int64
	statesSub *nats.Subscription

	mu      sync.Mutex
	sent    map[string]time.Time // awaiting a completion, with the time it was sent
	seen    map[string]int       // completions per id
	lat     []time.Duration
	want    int
	last    time.Time // the latest first completion arrived
	errs    []string  // error completions and anything else that fails the row
	strange []string  // duplicates, strays, undecodable messages
	// tokens gets one back per completion: the sender's window.
	tokens chan struct{}
	// done is closed once every id sent has its completion, or at the
	// first error.
	done   chan struct{}
	closed bool
}

// collect subscribes to host's event subject; close it when the row is
// over. Commands must be expected before they are published.
func collect(nc *nats.Conn, host string, want, window int) (*collector, error) {
	c := &collector{sent: map[string]time.Time{}, seen: make(map[string]int, want), want: want,
		lat: make([]time.Duration, 0, want), done: make(chan struct{})}
	if window > 0 {
		c.tokens = make(chan struct{}, window)
		for range window {
			c.tokens <- struct{}{}
		}
	}
	sub, err := nc.Subscribe(bus.EventPrefix+"."+host+".>", c.take)
	if err != nil {
		return nil, fmt.Errorf("subscribe to %s's completions: %w", host, err)
	}
	// A slow consumer would drop completions, which would read as lost.
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		return nil, err
	}
	c.sub = sub
	if c.statesSub, err = nc.Subscribe(bus.StatePrefix+"."+host+".>", func(*nats.Msg) { c.states.Add(1) }); err != nil {
		return nil, fmt.Errorf("subscribe to %s's state changes: %w", host, err)
	}
	if err := c.statesSub.SetPendingLimits(-1, -1); err != nil {
		return nil, err
	}
	return c, nc.Flush()
}

// expect notes that id is about to be published.
func (c *collector) expect(id string, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sent[id] = at
}

func (c *collector) take(m *nats.Msg) {
	now := time.Now()
	var comp outcome
	err := json.Unmarshal(m.Data, &comp)
	c.mu.Lock()
	defer c.mu.Unlock()
	switch sentAt, ok := c.sent[comp.ID]; {
	case err != nil || comp.ID == "":
		c.strange = append(c.strange, fmt.Sprintf("not a completion on %s: %.200s", m.Subject, m.Data))
	case c.seen[comp.ID] > 0:
		c.seen[comp.ID]++
		c.strange = append(c.strange, fmt.Sprintf("completion %s arrived %d times", comp.ID, c.seen[comp.ID]))
	case !ok:
		c.strange = append(c.strange, fmt.Sprintf("completion of %s, which this row never sent", comp.ID))
	default:
		delete(c.sent, comp.ID)
		c.seen[comp.ID] = 1
		c.lat = append(c.lat, now.Sub(sentAt))
		c.last = now
		if c.tokens != nil {
			c.tokens <- struct{}{}
		}
		if comp.Status != bus.StatusOK {
			msg := "no error object"
			if comp.Error != nil {
				msg = comp.Error.Code + ": " + comp.Error.Message
			}
			c.errs = append(c.errs, fmt.Sprintf("%s %s %s ended %s: %s", comp.ID, comp.Action, comp.VM, comp.Status, msg))
		}
		if len(c.seen) == c.want || len(c.errs) > 0 {
			c.finish()
		}
	}
}

// outcome is what the collector reads of a completion: decoding the
// rest (three timestamps, the detail) would cost the load generator CPU
// that the worker and libvirtd share on a small machine.
type outcome struct {
	ID     string     `json:"id"`
	VM     string     `json:"vm"`
	Action string     `json:"action"`
	Status string     `json:"status"`
	Error  *bus.Error `json:"error"`
}

func (c *collector) finish() {
	if !c.closed {
		c.closed = true
		close(c.done)
	}
}

// progress is how many ids have their completion.
func (c *collector) progress() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

// failed is the first error completion, if any.
func (c *collector) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errs) > 0 {
		return fmt.Errorf("error completion (%d in all): %s", len(c.errs), c.errs[0])
	}
	return nil
}

// stallLimit is how long a row may go without a single completion before
// it counts as stuck.
const stallLimit = time.Minute

// waitAll waits until every expected id has its completion; it fails at
// the first error completion, or when no completion came for stallLimit.
func (c *collector) waitAll() error {
	last, since := -1, time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return c.failed()
		case <-tick.C:
		}
		if n := c.progress(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) > stallLimit {
			return fmt.Errorf("stuck: no completion for %s, %d of %d arrived", stallLimit, n, c.want)
		}
	}
}

// token waits for room in the sender's window.
func (c *collector) token() error {
	select {
	case <-c.tokens:
		return nil
	case <-c.done:
		if err := c.failed(); err != nil {
			return err
		}
		return nil
	case <-time.After(stallLimit):
		return fmt.Errorf("stuck: no completion for %s, %d of %d arrived", stallLimit, c.progress(), c.want)
	}
}

// settle lets the completions already on their way arrive, then ends the
// subscription and says what was off: every id sent exactly one
// completion, nothing else. Call it after the worker stopped.
func (c *collector) settle(nc *nats.Conn) error {
	if err := nc.Flush(); err != nil {
		return err
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if n, _, _ := c.sub.Pending(); n == 0 {
			break
		}
	}
	time.Sleep(100 * time.Millisecond) // a message the callback just took
	dropped, _ := c.sub.Dropped()
	_ = c.sub.Unsubscribe()
	_ = c.statesSub.Unsubscribe()
	c.mu.Lock()
	defer c.mu.Unlock()
	var problems []string
	if dropped > 0 {
		problems = append(problems, fmt.Sprintf("%d completions dropped by the client (slow consumer)", dropped))
	}
	if len(c.sent) > 0 {
		problems = append(problems, fmt.Sprintf("%d commands without a completion (lost)", len(c.sent)))
	}
	problems = append(problems, c.errs...)
	problems = append(problems, c.strange...)
	if len(problems) > 0 {
		if len(problems) > 10 {
			problems = append(problems[:10], fmt.Sprintf("… and %d more", len(problems)-10))
		}
		return fmt.Errorf("%d of %d commands completed; %v", len(c.seen), c.want, problems)
	}
	return nil
}

// sample is the row's measurement, from start to the last completion.
func (c *collector) sample(start time.Time) sample {
	c.mu.Lock()
	defer c.mu.Unlock()
	return newSample(len(c.seen), c.last.Sub(start), c.lat)
}
