package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// findHostTimeout bounds the lookup of a VM's host, whatever -timeout
// gives the command itself.
const findHostTimeout = 10 * time.Second

// errStateDenied: the server refused this user the read of VIRTBUS_VMS.
var errStateDenied = errors.New("not allowed to read " + bus.StateBucket)

// findHost sets c.host to the host VIRTBUS_VMS has c.vm on, by name or
// UUID, and says so on stderr: no -host and no VIRTBUS_HOST named one. A
// VM on several hosts or on none is refused. When the bucket cannot be
// read (no JetStream, no bucket yet, or the user may not), the host stays
// this machine's, as it was before the lookup existed.
func findHost(ctx context.Context, nc *nats.Conn, c *config, stderr io.Writer) error {
	lctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	lctx, cancelTimeout := context.WithTimeout(lctx, min(c.timeout, findHostTimeout))
	defer cancelTimeout()
	go func() {
		select {
		case <-c.stateDenied:
			cancel(errStateDenied)
		case <-lctx.Done():
		}
	}()
	states, err := readStates(lctx, nc, "", io.Discard)
	if cause := context.Cause(lctx); errors.Is(cause, errStateDenied) {
		err = cause
	}
	switch {
	case errors.Is(err, errNoStateBucket), errors.Is(err, errStateDenied), errors.Is(err, jetstream.ErrJetStreamNotEnabled),
		errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount), errors.Is(err, nats.ErrNoResponders):
		fmt.Fprintf(stderr, "publish: no -host and no VIRTBUS_HOST, and %s cannot be read (%v): host %s, this machine's\n", bus.StateBucket, err, c.host)
		return nil
	case err != nil:
		return readError(ctx, err, "looking up the host of "+c.vm+" in bucket "+bus.StateBucket, min(c.timeout, findHostTimeout))
	}
	hosts := hostsOf(states, c.vm)
	switch len(hosts) {
	case 0:
		return &exitError{code: exitFailed, err: fmt.Errorf("%s is on no host in bucket %s: give -host", quoteArg(c.vm), bus.StateBucket)}
	case 1:
		c.host = hosts[0]
		fmt.Fprintf(stderr, "publish: %s is on %s\n", oneLine(c.vm), c.host)
		return nil
	}
	return usageErrorf("%s is on %d hosts (%s): give -host", quoteArg(c.vm), len(hosts), strings.Join(hosts, ", "))
}

// hostsOf lists, sorted, the hosts with a domain named vm or with UUID vm.
func hostsOf(states []bus.DomainState, vm string) []string {
	var hosts []string
	for _, s := range states {
		if (s.VM == vm || strings.EqualFold(s.UUID, vm)) && bus.ValidToken(s.Host) && !slices.Contains(hosts, s.Host) {
			hosts = append(hosts, s.Host)
		}
	}
	slices.Sort(hosts)
	return hosts
}
