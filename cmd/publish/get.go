package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtbus/virtbus/internal/bus"
)

// exitNotRecorded is get's exit status when no completion is recorded:
// the same as a wait's timeout, as to a script it means the same, that the
// outcome is not known (yet).
const exitNotRecorded = exitTimeout

// runGet prints the completion recorded for command id c.id on c.host, as
// a wait for it would have: the answer to a run that ended in exit 3.
func runGet(ctx context.Context, nc *nats.Conn, c *config, stdout io.Writer) error {
	tctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	comp, raw, err := bus.ReadRecord(tctx, js, c.host, c.id)
	if errors.Is(err, bus.ErrNotRecorded) {
		why := "it has not ended yet, was never queued, or ended longer ago than completions are kept"
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			why = "bucket " + bus.RecordBucket + " does not exist: no worker has recorded a completion on this bus"
		}
		return &exitError{code: exitNotRecorded, err: fmt.Errorf("no completion recorded for id %s on host %s: %s", c.id, c.host, why)}
	}
	if err != nil {
		return readError(ctx, err, "reading bucket "+bus.RecordBucket, c.timeout)
	}
	return report(stdout, c.json, comp, raw)
}
