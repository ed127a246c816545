package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrNotRecorded: no completion is recorded for the command id on the
// host. The command may not have run yet, never have reached the stream,
// or have been answered longer ago than the record bucket's TTL.
var ErrNotRecorded = errors.New("no completion recorded")

// ReadRecord returns the completion recorded for command id on host, and
// the record as stored, for a person or a tool that asks after the fact
// (where AwaitCompletion waits for it). It is ErrNotRecorded when there is
// none, and also jetstream.ErrBucketNotFound when there is no bucket. The
// key is made from id whatever it holds, so the caller need only bound its
// length.
func ReadRecord(ctx context.Context, js jetstream.JetStream, host, id string) (*Completion, []byte, error) {
	kv, err := js.KeyValue(ctx, RecordBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil, fmt.Errorf("%w: bucket %s: %w", ErrNotRecorded, RecordBucket, err)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("open completion records: %w", err)
	}
	raw, err := (&records{kv: kv, host: host}).raw(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	var c Completion
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, raw, fmt.Errorf("the record of %s is not a completion: %w", id, err)
	}
	return &c, raw, nil
}
