package bus

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// RecordBucket is the JetStream KV bucket that keeps each completion by
// command id, so that a command delivered again is answered, not run again.
const RecordBucket = "VIRTBUS_DONE"

// recordTimeout bounds one KV call; a NATS outage is retried by the caller.
const recordTimeout = 5 * time.Second

type records struct {
	kv   jetstream.KeyValue
	js   jetstream.JetStream // for writes sent ahead (putAsync); nil for readers
	host string
	ttl  time.Duration // the bucket's, as the server has it; 0 if unknown or none
}

func openRecords(ctx context.Context, js jetstream.JetStream, log *slog.Logger, host string, ttl time.Duration, replicas int) (*records, error) {
	kv, err := findOrCreate(ctx, log, "kv bucket "+RecordBucket, jetstream.ErrBucketNotFound,
		func() (jetstream.KeyValue, error) { return js.KeyValue(ctx, RecordBucket) },
		func() (jetstream.KeyValue, error) {
			return js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
				Bucket:      RecordBucket,
				Description: "virtbus completions by command id",
				History:     1,
				TTL:         ttl,
				Storage:     jetstream.FileStorage,
				Replicas:    replicas,
			})
		})
	if err != nil {
		return nil, err
	}
	return &records{kv: kv, js: js, host: host}, nil
}

// get returns the recorded completion of id, or nil when there is none.
func (r *records) get(ctx context.Context, id string) (*Completion, error) {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	raw, err := r.raw(ctx, id)
	if errors.Is(err, ErrNotRecorded) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var c Completion
	if err := json.Unmarshal(raw, &c); err != nil {
		// A record we cannot read is no answer: run the command again (all
		// actions are idempotent) and overwrite it.
		return nil, nil
	}
	return &c, nil
}

// raw is the record of id as stored, or ErrNotRecorded.
func (r *records) raw(ctx context.Context, id string) ([]byte, error) {
	e, err := r.kv.Get(ctx, recordKey(r.host, id))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, ErrNotRecorded
	}
	if err != nil {
		return nil, fmt.Errorf("look up completion %s: %w", id, err)
	}
	return e.Value(), nil
}

// putAsync sends the record of command id, data being its completion,
// without waiting for the server's confirmation, which the returned future
// brings: the worker writes the records of many commands at once and
// confirms each in order. It writes what Put would, to the bucket's
// subject for the key.
func (r *records) putAsync(id string, data []byte) (jetstream.PubAckFuture, error) {
	f, err := r.js.PublishAsync("$KV."+RecordBucket+"."+recordKey(r.host, id), data)
	if err != nil {
		return nil, fmt.Errorf("record completion %s: %w", id, err)
	}
	return f, nil
}

// lookup is a record lookup started ahead of the command's turn: when the
// command runs, its answer is usually there already.
type lookup struct {
	done chan struct{}
	rec  *Completion
	err  error
}

// lookAhead starts looking up the record of id.
func (r *records) lookAhead(id string) *lookup {
	l := &lookup{done: make(chan struct{})}
	go func() {
		defer close(l.done)
		l.rec, l.err = r.get(context.Background(), id)
	}()
	return l
}

// put writes the record of command id, data being its completion, and
// waits for the server's confirmation.
func (r *records) put(ctx context.Context, id string, data []byte) error {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	if _, err := r.kv.Put(ctx, recordKey(r.host, id), data); err != nil {
		return fmt.Errorf("record completion %s: %w", id, err)
	}
	return nil
}

// stoppedKey holds when host's worker last shut down cleanly. Its three
// tokens cannot clash with a record's two.
func stoppedKey(host string) string { return keyPart(host) + ".worker.stopped" }

func (r *records) markStopped(ctx context.Context, t time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	if _, err := r.kv.PutString(ctx, stoppedKey(r.host), t.UTC().Format(time.RFC3339Nano)); err != nil {
		return fmt.Errorf("record clean shutdown: %w", err)
	}
	return nil
}

// stoppedAt is when the worker last shut down cleanly, by the server's
// clock (the time it stored the mark); zero if never (or longer ago than
// the bucket's TTL).
func (r *records) stoppedAt(ctx context.Context) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	e, err := r.kv.Get(ctx, stoppedKey(r.host))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("read clean shutdown: %w", err)
	}
	return e.Created(), nil
}

// serverNow is the server's time: when it stores a write to this host's
// clock key.
func (r *records) serverNow(ctx context.Context) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	key := keyPart(r.host) + ".worker.clock"
	if _, err := r.kv.Put(ctx, key, nil); err != nil {
		return time.Time{}, fmt.Errorf("write clock key: %w", err)
	}
	e, err := r.kv.Get(ctx, key)
	if err != nil {
		return time.Time{}, fmt.Errorf("read clock key: %w", err)
	}
	return e.Created(), nil
}

// recordKey is "<host>.<id>", each part kept readable when it is made of
// KV-safe characters and base64url-encoded (marked by a leading "=", which
// plain parts never have) otherwise: command ids are chosen by publishers.
func recordKey(host, id string) string {
	return keyPart(host) + "." + keyPart(id)
}

func keyPart(s string) string {
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			continue
		}
		return "=" + base64.RawURLEncoding.EncodeToString([]byte(s))
	}
	if s == "" {
		return "="
	}
	return s
}

// answers reports whether a recorded completion is the answer to a
// command for vm and action with its id: an id reused for another command
// is not answered from the first one's record.
func (c *Completion) answers(vm, action string) bool { return c.VM == vm && c.Action == action }

// reusedBy is the error of a command that reuses the id of the recorded c.
func (c *Completion) reusedBy(id string) *Error {
	return &Error{Code: CodeConflict, Message: fmt.Sprintf("command id %s was already used for %s on %s", id, c.Action, c.VM)}
}

// AwaitCompletion returns the recorded completion of command id for vm
// and action on host, looking again until it is there or ctx ends. It
// answers a publisher whose command the stream dropped as a duplicate: no
// completion will reach that publisher's reply subject, but the first
// copy's is recorded. When the record is of another command (the id was
// reused), the answer is the conflict the worker would give.
func AwaitCompletion(ctx context.Context, js jetstream.JetStream, host, vm, action, id string) (*Completion, error) {
	kv, err := js.KeyValue(ctx, RecordBucket)
	if err != nil {
		return nil, fmt.Errorf("open completion records: %w", err)
	}
	r := &records{kv: kv, host: host}
	for {
		c, err := r.get(ctx, id)
		if err != nil {
			return nil, err
		}
		if c != nil && !c.answers(vm, action) {
			now := time.Now().UTC()
			return &Completion{ID: id, Host: host, VM: vm, Action: action, Status: StatusError,
				Error: c.reusedBy(id), ReceivedAt: now, StartedAt: now, FinishedAt: now}, nil
		}
		if c != nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("completion %s not recorded yet: %w", id, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
