package bus

import (
	"context"
	"fmt"
	"hash/maphash"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// maxKnown bounds the ids knownIDs keeps, 24 to 36 bytes each with the
// map's slack (2.3 MiB for 100,000, 9 MiB at the bound): three commands a
// second around the clock under the default TTL. Past it the worker looks
// every command up again, as before it had the set.
const maxKnown = 1 << 18

// knownIDs is the set of command ids this host may have a record of: every
// record key the bucket held for the host when the worker took the lease,
// and every record the worker wrote since. Only the lease holder writes
// its host's records, so an id outside the set has none, and the command
// runs without a lookup: one NATS round trip less on the path of every
// new command. An id in the set is looked up as before: the set only says
// where a record may be, the record says what it holds.
//
// The set keeps 64-bit hashes, in two generations that turn every bucket
// TTL (plus a margin): an id is forgotten no sooner than its record
// expires. Until it is loaded, after a failed listing and past maxKnown it
// says "may have" of every id.
type knownIDs struct {
	seed maphash.Seed
	log  *slog.Logger

	mu        sync.Mutex
	cur, prev map[uint64]struct{}
	turned    time.Time
	every     time.Duration // 0: never turn (records never expire)
	ready     bool
	off       bool
}

func newKnownIDs(log *slog.Logger) *knownIDs {
	return &knownIDs{seed: maphash.MakeSeed(), log: log}
}

// turnMargin is added to the bucket's TTL between generations: the record
// is stored a moment after its id is added, and expires a moment late.
const turnMargin = time.Minute

// mayHave reports whether id may have a record. A nil set says yes.
func (k *knownIDs) mayHave(id string) bool {
	return k == nil || k.mayHaveKey(keyPart(id), time.Now())
}

func (k *knownIDs) mayHaveKey(key string, now time.Time) bool {
	h := maphash.String(k.seed, key)
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.ready || k.off {
		return true
	}
	k.turn(now)
	_, inCur := k.cur[h]
	_, inPrev := k.prev[h]
	return inCur || inPrev
}

// add notes that id has, or is about to have, a record. It is called
// before the record is written, so that no lookup can miss it.
func (k *knownIDs) add(id string) {
	if k != nil {
		k.addKey(keyPart(id), time.Now())
	}
}

func (k *knownIDs) addKey(key string, now time.Time) {
	h := maphash.String(k.seed, key)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.off {
		return
	}
	k.turn(now)
	k.cur[h] = struct{}{}
	if len(k.cur)+len(k.prev) > maxKnown {
		k.log.Info("more records than the worker keeps ids of; looking up every command's record", "max", maxKnown)
		k.giveUp()
	}
}

// turn starts a new generation when the current one is a TTL old. The
// ids of a generation idle that long before are older than the TTL too.
func (k *knownIDs) turn(now time.Time) {
	age := now.Sub(k.turned)
	if k.every <= 0 || age < k.every {
		return
	}
	k.prev = k.cur
	if age >= 2*k.every {
		k.prev = nil
	}
	k.cur, k.turned = make(map[uint64]struct{}), now
}

func (k *knownIDs) giveUp() {
	k.off, k.cur, k.prev = true, nil, nil
}

// load lists the host's record keys and marks the set ready. ttl is the
// bucket's (0: records never expire). A failed listing leaves the set off:
// every command is looked up, which costs time, not correctness.
func (k *knownIDs) load(ctx context.Context, js jetstream.JetStream, host string, ttl time.Duration) error {
	k.reset(ttl, time.Now())
	keys, err := listRecordKeys(ctx, js, host)
	if err != nil {
		k.mu.Lock()
		k.giveUp()
		k.mu.Unlock()
		return err
	}
	k.fill(keys, time.Now())
	return nil
}

// reset empties the set, not ready, for a bucket whose TTL is ttl. Ids
// added from now on are kept.
func (k *knownIDs) reset(ttl time.Duration, now time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cur, k.prev, k.turned, k.ready, k.off, k.every = make(map[uint64]struct{}), nil, now, false, false, 0
	if ttl > 0 {
		k.every = ttl + turnMargin
	}
}

// keepFor follows a change of the bucket's TTL to ttl: ids are kept at
// least that long from now on. A shorter TTL keeps them as long as before,
// which is more than needed; none (0) keeps them for good.
func (k *knownIDs) keepFor(ttl time.Duration) {
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	switch {
	case ttl <= 0:
		k.every = 0
	case k.every > 0:
		k.every = max(k.every, ttl+turnMargin)
	default:
		k.every = ttl + turnMargin
	}
}

// fill adds the record keys listed and makes the set ready.
func (k *knownIDs) fill(keys []string, now time.Time) {
	for _, key := range keys {
		k.addKey(key, now)
	}
	k.mu.Lock()
	k.ready = true
	k.mu.Unlock()
}

// listRecordKeys is the id part of every record key the bucket holds for
// host: the stream's subjects under the host, through the stream info the
// worker may already read. Two tokens only: the worker's own keys
// (stoppedKey) have three.
func listRecordKeys(ctx context.Context, js jetstream.JetStream, host string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	stream, err := js.Stream(ctx, "KV_"+RecordBucket)
	if err != nil {
		return nil, fmt.Errorf("list record keys: %w", err)
	}
	prefix := "$KV." + RecordBucket + "." + keyPart(host) + "."
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(prefix+"*"))
	if err != nil {
		return nil, fmt.Errorf("list record keys: %w", err)
	}
	keys := make([]string, 0, len(info.State.Subjects))
	for subject := range info.State.Subjects {
		keys = append(keys, strings.TrimPrefix(subject, prefix))
	}
	return keys, nil
}
