package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// errNoJetStream: the server (or the user's account) has no JetStream, so
// a JetStream publish would reach only core subscribers, such as a worker
// with VIRTBUS_DELIVERY=core, which would run the command, while publish
// would fail on the reply that is not a PubAck.
var errNoJetStream = errors.New("the server has no JetStream")

// apiStreamNames is the JetStream API subject of the stream lookup: run's
// error handler tells a permission violation on it (a user allowed to
// send commands but not to ask JetStream, as deploy/nats-server.conf's
// tenants) from one on the command itself.
const apiStreamNames = "$JS.API.STREAM.NAMES"

// lookupTimeout bounds the stream lookup: a server that does not answer it
// leaves the decision to the PubAck, as before the lookup existed.
const lookupTimeout = 5 * time.Second

// streamChecker asks JetStream, before a command is published, whether a
// stream takes its subject. It is not for concurrent use.
type streamChecker struct {
	js jetstream.JetStream
	// denied is signalled by run's error handler when the server refuses
	// the lookup; then no lookup is tried again.
	denied <-chan struct{}
	skip   bool
}

// check returns nil when the command may go out: a stream takes subject,
// or the answer is unknown (lookup refused or unanswered), and then the
// PubAck decides as before. It returns errNoJetStream or bus.ErrNoStream
// when publishing would hand the command to whatever core subscriber
// there is instead of a stream.
func (s *streamChecker) check(ctx context.Context, subject string) error {
	if s.skip {
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.js.StreamNameBySubject(lctx, subject)
		done <- err
	}()
	var err error
	select {
	case err = <-done:
	case <-s.denied:
		s.skip = true
		return nil
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("%w: %s", bus.ErrNoStream, subject)
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount),
		errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("%w: %s", errNoJetStream, subject)
	case ctx.Err() != nil:
		return stopped(ctx, "looking up the stream of "+subject)
	}
	return nil
}
