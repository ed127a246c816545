package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// pubRetryFor bounds the tries of one publish. It stays inside the
// stream's 2-minute duplicate window, so a try whose PubAck was lost and
// the try after it are one message.
const pubRetryFor = 90 * time.Second

// published is what became of one step's publish.
type published struct {
	Step
	Seq   uint64    // stream sequence from the PubAck
	At    time.Time // when the PubAck came
	Tries int
	Dup   bool // the PubAck said duplicate: an earlier try had got through
}

// ledger is every publish the producers made.
type ledger struct {
	mu   sync.Mutex
	byID map[string]published
	errs []string
}

func (l *ledger) add(p published) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.byID[p.ID] = p
}

func (l *ledger) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errs = append(l.errs, err.Error())
}

// producer publishes its steps with JetStream, one at a time, each only
// after the PubAck of the one before: that is the publish order of the
// VMs it owns.
type producer struct {
	N     int
	js    jetstream.JetStream
	steps []Step
	reply string // Virtbus-Reply of its commands
}

// dialProducer connects as a client that outlives a NATS restart.
func dialProducer(url, name string) (*nats.Conn, error) {
	return nats.Connect(url, nats.Name(name), nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond), nats.ReconnectJitter(0, 0))
}

// maxBurst bounds how many commands a producer sends back to back.
const maxBurst = 24

// paced gives each of n steps its moment: bursts of 1 to maxBurst steps
// back to back, at an average of one step per every. Bursts give the
// workers a backlog deeper than their FIFO now and then, so that a fault
// finds commands queued, running and waiting in the stream.
func paced(rng *rand.Rand, n int, start time.Time, every time.Duration) []time.Time {
	out := make([]time.Time, 0, n)
	for len(out) < n {
		at := start.Add(time.Duration(len(out)) * every)
		for range min(1+rng.IntN(maxBurst), n-len(out)) {
			out = append(out, at)
		}
	}
	return out
}

// run publishes each step at its moment, or as soon as the one before it
// has its PubAck when publishing fell behind.
func (p *producer) run(ctx context.Context, at []time.Time, l *ledger) {
	for i, s := range p.steps {
		select {
		case <-ctx.Done():
			l.fail(fmt.Errorf("producer %d stopped after %d of %d commands: %w", p.N, i, len(p.steps), ctx.Err()))
			return
		case <-time.After(time.Until(at[i])):
		}
		pub, err := p.publish(ctx, s)
		if err != nil {
			l.fail(err)
			return
		}
		l.add(pub)
	}
}

// publish sends one command and tries again, with the same Nats-Msg-Id,
// until the stream confirms it.
func (p *producer) publish(ctx context.Context, s Step) (published, error) {
	msg := nats.NewMsg(bus.CommandSubject(s.VM.Host, s.VM.Name, s.Action))
	msg.Header.Set(bus.HeaderMsgID, s.ID)
	msg.Header.Set(bus.HeaderReply, p.reply)
	msg.Data = []byte(s.Body)
	first := time.Now()
	for tries := 1; ; tries++ {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := p.js.PublishMsg(actx, msg)
		cancel()
		if err == nil {
			return published{Step: s, Seq: ack.Sequence, At: time.Now(), Tries: tries, Dup: ack.Duplicate}, nil
		}
		if ctx.Err() != nil || time.Since(first) > pubRetryFor {
			return published{}, fmt.Errorf("publish %s (%s %s) not confirmed after %d tries in %s: %w",
				s.ID, s.Action, s.VM.Name, tries, time.Since(first).Round(time.Millisecond), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
