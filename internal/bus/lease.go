package bus

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// LeaseBucket is the KV bucket whose key <host> names the worker that may
// take that host's commands. Its entries expire one lease after their last
// write, by the server's clock, so a worker that died loses its lease
// without anyone comparing clocks.
const LeaseBucket = "VIRTBUS_LEASE"

// ErrLeaseLost is what Run returns when another worker took this worker's
// lease (after this one could not renew it in time): it must stop taking
// commands at once.
var ErrLeaseLost = errors.New("host lease lost to another worker")

// lease is this worker's hold on its host.
type lease struct {
	kv     jetstream.KeyValue
	key    string
	holder []byte
	rev    uint64
}

// acquireLease returns once this worker holds its host's lease. While
// another worker holds it, this one is a standby: not ready, fetching
// nothing, asking again every quarter lease.
func (w *Worker) acquireLease(ctx context.Context, js jetstream.JetStream) (*lease, error) {
	hostname, _ := os.Hostname()
	l := &lease{key: keyPart(w.cfg.Host), holder: fmt.Appendf(nil, "%s pid %d %s", hostname, os.Getpid(), nuid.Next())}
	for {
		err := l.open(ctx, js, w)
		if err == nil {
			err = l.create(ctx)
		}
		if err == nil {
			if w.standby.Swap(false) {
				w.log.Info("lease taken over; this worker is now active", "host", w.cfg.Host)
			}
			w.leased.Store(true)
			return l, nil
		}
		if errors.Is(err, jetstream.ErrKeyExists) {
			if !w.standby.Swap(true) {
				w.log.Info("another worker holds this host's lease; standing by", "host", w.cfg.Host, "lease", w.cfg.Lease)
			}
		} else {
			w.log.Warn("lease not taken; retrying", "err", err)
		}
		if sleep(ctx, w.cfg.Lease/4); ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

func (l *lease) open(ctx context.Context, js jetstream.JetStream, w *Worker) error {
	if l.kv != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	kv, err := findOrCreate(ctx, w.log, "kv bucket "+LeaseBucket, jetstream.ErrBucketNotFound,
		func() (jetstream.KeyValue, error) { return js.KeyValue(ctx, LeaseBucket) },
		func() (jetstream.KeyValue, error) {
			return js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
				Bucket:      LeaseBucket,
				Description: "virtbus: which worker takes each host's commands",
				History:     1,
				TTL:         w.cfg.Lease,
				Storage:     jetstream.FileStorage,
				Replicas:    w.cfg.StreamReplicas,
			})
		})
	if err != nil {
		return err
	}
	if st, err := kv.Status(ctx); err == nil && st.TTL() != w.cfg.Lease && !w.warned[LeaseBucket] {
		w.warned[LeaseBucket] = true
		w.log.Warn("the lease bucket's TTL differs from VIRTBUS_LEASE; the bucket's wins", "ttl", st.TTL(), "lease", w.cfg.Lease)
	}
	l.kv = kv
	return nil
}

func (l *lease) create(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	rev, err := l.kv.Create(ctx, l.key, l.holder)
	if err != nil {
		return err
	}
	l.rev = rev
	return nil
}

// keep renews the lease every third of its length until ctx ends. A
// renewal refused because the entry changed means another worker took the
// lease: keep returns ErrLeaseLost at once. One that fails for another
// reason (NATS down) is tried again; once the entry expired unrenewed,
// the lease is taken afresh if nobody else did.
func (l *lease) keep(ctx context.Context, every time.Duration) error {
	for {
		if sleep(ctx, every); ctx.Err() != nil {
			return nil
		}
		rctx, cancel := context.WithTimeout(ctx, recordTimeout)
		rev, err := l.kv.Update(rctx, l.key, l.holder, l.rev)
		cancel()
		if err == nil {
			l.rev = rev
			continue
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			continue // not reachable now; the next renewal tries again
		}
		if cerr := l.create(ctx); cerr == nil {
			continue // expired while unreachable, and nobody took it
		} else if errors.Is(cerr, jetstream.ErrKeyExists) {
			return ErrLeaseLost
		}
	}
}

// release gives the lease up at a clean shutdown, so a standby takes over
// at once rather than after the lease runs out.
func (l *lease) release() error {
	ctx, cancel := context.WithTimeout(context.Background(), recordTimeout)
	defer cancel()
	return l.kv.Delete(ctx, l.key, jetstream.LastRevision(l.rev))
}
