package fleet

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// PublishOptions shape a Publisher's load.
type PublishOptions struct {
	// Producers are the connections commands go out on: VM i's on
	// Producers[i%len(Producers)].
	Producers []jetstream.JetStream
	// Phases split each VM's commands into equal rounds, each sent only
	// once Release lets it go.
	Phases int
	// Pace is the pause after each command of one VM.
	Pace time.Duration
	// GiveUp bounds the tries of one command, and the waits.
	GiveUp time.Duration
}

// Publisher sends commands the way a careful producer does on a cluster:
// a PubAck that does not come is asked for again with the same
// Nats-Msg-Id, which the stream's duplicate window makes safe. One
// goroutine per VM sends that VM's commands one after the other, each once
// the last one's PubAck came and its phase is released.
type Publisher struct {
	o        PublishOptions
	perPhase int
	gates    []chan struct{} // closed when the phase may be sent
	done     chan struct{}
	errs     chan error // one per VM at most, so cap is the number of VMs

	mu                        sync.Mutex
	sent, retried, duplicates int
	sentOf                    []int                // by phase
	firstTry, acked           map[string]time.Time // by command id: its first publish began; its PubAck came
}

// Publish starts sending vms' commands, which must be as many for every
// VM, a multiple of o.Phases; none goes before Release(0).
func Publish(t testing.TB, vms []*VM, o PublishOptions) *Publisher {
	t.Helper()
	p := &Publisher{o: o, perPhase: len(vms[0].Cmds) / o.Phases, done: make(chan struct{}), errs: make(chan error, len(vms)),
		sentOf: make([]int, o.Phases), firstTry: map[string]time.Time{}, acked: map[string]time.Time{}}
	for range o.Phases {
		p.gates = append(p.gates, make(chan struct{}))
	}
	ctx := t.Context()
	var wg sync.WaitGroup
	for i, v := range vms {
		if len(v.Cmds) != p.perPhase*o.Phases {
			t.Fatalf("VM %s has %d commands, not %d phases of %d", v.Name, len(v.Cmds), o.Phases, p.perPhase)
		}
		js := o.Producers[i%len(o.Producers)]
		wg.Go(func() {
			if err := p.sendAll(ctx, js, v); err != nil {
				p.errs <- err
			}
		})
	}
	go func() { wg.Wait(); close(p.done) }()
	return p
}

func (p *Publisher) sendAll(ctx context.Context, js jetstream.JetStream, v *VM) error {
	for k, c := range v.Cmds {
		phase := k / p.perPhase
		select {
		case <-p.gates[phase]:
		case <-ctx.Done():
			return ctx.Err()
		}
		if err := p.send(ctx, js, v.Host, v.Name, c); err != nil {
			return err
		}
		p.mu.Lock()
		p.sentOf[phase]++
		p.mu.Unlock()
		time.Sleep(p.o.Pace)
	}
	return nil
}

// Release lets phase's commands go.
func (p *Publisher) Release(phase int) { close(p.gates[phase]) }

// WaitHalf waits until half of phase's commands have their PubAck.
func (p *Publisher) WaitHalf(t testing.TB, phase int) {
	t.Helper()
	half := (cap(p.errs)*p.perPhase + 1) / 2
	bustest.Eventually(t, p.o.GiveUp, fmt.Sprintf("half of phase %d sent", phase), func() bool {
		p.Fail(t)
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.sentOf[phase] >= half
	})
}

// Wait waits until every command has its PubAck.
func (p *Publisher) Wait(t testing.TB) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(p.o.GiveUp):
		t.Fatalf("commands not all sent after %s", p.o.GiveUp)
	}
	p.Fail(t)
}

// Fail ends the test when a producer gave up.
func (p *Publisher) Fail(t testing.TB) {
	t.Helper()
	select {
	case err := <-p.errs:
		t.Fatal(err)
	default:
	}
}

// Counts are the commands sent, those that needed more than one try, and
// those whose PubAck said the stream already had them.
func (p *Publisher) Counts() (sent, retried, duplicates int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent, p.retried, p.duplicates
}

// Times are when the first publish of command id began and when its
// PubAck came.
func (p *Publisher) Times(id string) (firstTry, acked time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.firstTry[id], p.acked[id]
}

func (p *Publisher) send(ctx context.Context, js jetstream.JetStream, host, name string, c Cmd) error {
	deadline := time.Now().Add(p.o.GiveUp)
	p.mu.Lock()
	p.firstTry[c.ID] = time.Now()
	p.mu.Unlock()
	for try := 1; ; try++ {
		msg := nats.NewMsg(bus.CommandSubject(host, name, c.Action))
		msg.Header.Set(bus.HeaderMsgID, c.ID)
		msg.Data = []byte(c.Body)
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := js.PublishMsg(actx, msg)
		cancel()
		if err == nil {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.acked[c.ID] = time.Now()
			p.sent++
			if try > 1 {
				p.retried++
			}
			if ack.Duplicate {
				p.duplicates++
			}
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("publish %s %s (id %s), %d tries: %w", c.Action, name, c.ID, try, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
