package bench

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// command is one command of a load.
type command struct {
	vm, action string
}

// bodies are the parameters each action is sent with: stop destroys at
// once, as the baseline's DomainDestroy does.
var bodies = map[string][]byte{
	"start":  []byte(`{}`),
	"stop":   []byte(`{"mode":"force"}`),
	"pause":  []byte(`{}`),
	"resume": []byte(`{}`),
}

// alternate is perVM commands for each of vms, p's two actions by turns,
// round-robin over the vms: start a, start b, …, stop a, stop b, ….
func alternate(vms []string, perVM int, p pair) []command {
	cmds := make([]command, 0, perVM*len(vms))
	for k := range perVM {
		for _, vm := range vms {
			cmds = append(cmds, command{vm: vm, action: p.actions[k%2]})
		}
	}
	return cmds
}

// publishAckWait bounds a PubAck, and a stall of the async publisher.
const publishAckWait = 30 * time.Second

// sender publishes a row's commands to its host, the way a producer
// should: JetStream with the PubAck checked, a unique Nats-Msg-Id each.
type sender struct {
	js   jetstream.JetStream
	host string
	col  *collector
}

func (s *sender) message(i int, c command) (*nats.Msg, string) {
	id := s.host + "-" + strconv.Itoa(i)
	m := nats.NewMsg(bus.CommandSubject(s.host, c.vm, c.action))
	m.Header.Set(bus.HeaderMsgID, id)
	m.Data = bodies[c.action]
	return m, id
}

// oneAtATime publishes each command and waits for its completion before
// the next.
func (s *sender) oneAtATime(cmds []command) error {
	for i, c := range cmds {
		if err := s.col.token(); err != nil {
			return err
		}
		m, id := s.message(i, c)
		s.col.expect(id, time.Now())
		ctx, cancel := context.WithTimeout(context.Background(), publishAckWait)
		ack, err := s.js.PublishMsg(ctx, m)
		cancel()
		if err != nil {
			return fmt.Errorf("publish %s: %w", id, err)
		}
		if ack.Duplicate {
			return fmt.Errorf("publish %s: the stream dropped it as a duplicate", id)
		}
	}
	return s.col.waitAll()
}

// windowed keeps up to the collector's window of commands in flight
// (published, not yet completed), publishing asynchronously; the PubAcks
// are checked at the end. Without a window (a backlog row) it publishes
// everything as fast as the PubAcks allow.
func (s *sender) windowed(cmds []command) error {
	futures := make([]jetstream.PubAckFuture, 0, len(cmds))
	for i, c := range cmds {
		if s.col.tokens != nil {
			if err := s.col.token(); err != nil {
				return err
			}
		}
		m, id := s.message(i, c)
		s.col.expect(id, time.Now())
		f, err := s.js.PublishMsgAsync(m, jetstream.WithStallWait(publishAckWait))
		if err != nil {
			return fmt.Errorf("publish %s: %w", id, err)
		}
		futures = append(futures, f)
	}
	select {
	case <-s.js.PublishAsyncComplete():
	case <-time.After(publishAckWait):
		return fmt.Errorf("%d PubAcks still missing after %s", s.js.PublishAsyncPending(), publishAckWait)
	}
	for _, f := range futures {
		select {
		case ack := <-f.Ok():
			if ack.Duplicate {
				return fmt.Errorf("publish %s: the stream dropped it as a duplicate", f.Msg().Header.Get(bus.HeaderMsgID))
			}
		case err := <-f.Err():
			return fmt.Errorf("publish %s: %w", f.Msg().Header.Get(bus.HeaderMsgID), err)
		}
	}
	return nil
}
