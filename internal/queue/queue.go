// Package queue is the worker's bounded in-process FIFO. Items carry a key
// (the VM they are for): items of one key run strictly in arrival order and
// never two at once, while up to a fixed number of items with different keys
// run side by side. The queue reports its free room so that the bus takes
// only as many messages off NATS as it can hold, which keeps back-pressure in
// NATS and memory flat however deep the backlog is.
//
// When items may run side by side, one key may fill at most its share of
// the queue: capacity minus concurrency plus one, which leaves a slot for
// every other runner. Its items beyond the share are parked, up to a fixed
// number, and move into the queue one by one as the key's earlier items
// finish. Parking lets the bus read past one VM's deep backlog to another
// VM's command, which then runs on an idle runner instead of waiting for
// the whole backlog.
package queue

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
)

var (
	// ErrFull is returned by Push when queued and running items fill the
	// capacity.
	ErrFull = errors.New("queue full")
	// ErrClosed is returned once the dispatch loop is shutting down: the
	// caller keeps the item and hands it back to where it came from.
	ErrClosed = errors.New("queue closed")
)

type entry[T any] struct {
	key  string
	item T
	n    uint64 // arrival number
}

// Queue is a bounded FIFO with per-key ordering. Its zero value is not
// usable; build one with New. Push, PushWait, WaitRoom and the counters may
// be called from any goroutine; Run is called once.
type Queue[T any] struct {
	capacity    int
	concurrency int
	share       int // most items of one key queued and running
	parkLimit   int

	mu       sync.Mutex
	arrivals uint64
	waiting  []entry[T]            // arrival order
	admitted map[string]int        // per key: queued plus running
	parked   map[string][]entry[T] // per key: beyond its share, arrival order
	nparked  int
	busy     map[string]struct{} // keys with an item running, or held (see Hold)
	holds    map[string]holdState
	running  int
	closed   bool
	// changed is closed and replaced on every change of room or work, so any
	// number of waiters can select on it alongside their context.
	changed chan struct{}
}

// New returns a queue that holds at most capacity items (queued plus
// running), runs at most concurrency of them at once, and parks at most
// park items beyond their key's share. Capacity and concurrency below 1 are
// taken as 1; with park 0 or concurrency 1 nothing is parked and one key may
// fill the whole queue.
func New[T any](capacity, concurrency, park int) *Queue[T] {
	q := &Queue[T]{
		capacity:    max(capacity, 1),
		concurrency: max(concurrency, 1),
		parkLimit:   max(park, 0),
		admitted:    make(map[string]int),
		parked:      make(map[string][]entry[T]),
		busy:        make(map[string]struct{}),
		holds:       make(map[string]holdState),
		changed:     make(chan struct{}),
	}
	q.share = q.capacity
	if q.parkLimit > 0 && q.concurrency > 1 {
		q.share = max(q.capacity-q.concurrency+1, 1)
	}
	return q
}

// Cap is the capacity: the most items queued and running together.
func (q *Queue[T]) Cap() int { return q.capacity }

// Len is the number of items held: queued plus running.
func (q *Queue[T]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiting) + q.running
}

// Parked is the number of items held beyond their key's share.
func (q *Queue[T]) Parked() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.nparked
}

// Running is the number of items being run right now.
func (q *Queue[T]) Running() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.running
}

// Free is how many more items Push accepts right now, whatever their keys:
// each needs either room in the queue or room to park. 0 once closed.
func (q *Queue[T]) Free() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.freeLocked()
}

func (q *Queue[T]) freeLocked() int {
	if q.closed {
		return 0
	}
	free := q.capacity - len(q.waiting) - q.running
	if q.share < q.capacity {
		free = min(free, q.parkLimit-q.nparked)
	}
	return free
}

// WaitRoom blocks until there is room for at least one item and reports how
// much. It returns ErrClosed once the queue is shutting down, or the
// context's error.
func (q *Queue[T]) WaitRoom(ctx context.Context) (int, error) {
	return q.WaitRoomFor(ctx, 1)
}

// WaitRoomFor is WaitRoom that waits for room for want items, or for any
// room while a runner is idle (nothing it may start is queued): a caller
// that fills the queue in batches then fetches fewer, larger ones, and no
// runner waits for it.
func (q *Queue[T]) WaitRoomFor(ctx context.Context, want int) (int, error) {
	for {
		q.mu.Lock()
		closed, free, changed := q.closed, q.freeLocked(), q.changed
		starving := q.idleLocked()
		q.mu.Unlock()
		switch {
		case closed:
			return 0, ErrClosed
		case free >= want || free > 0 && starving:
			return free, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-changed:
		}
	}
}

// Push appends an item without waiting, parking it when its key holds its
// share already: ErrFull when there is no room, ErrClosed once the queue is
// shutting down.
func (q *Queue[T]) Push(key string, item T) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	park := q.admitted[key] >= q.share || len(q.parked[key]) > 0
	switch {
	case park && q.nparked >= q.parkLimit,
		!park && len(q.waiting)+q.running >= q.capacity:
		return ErrFull
	}
	q.arrivals++
	e := entry[T]{key: key, item: item, n: q.arrivals}
	if park {
		q.parked[key] = append(q.parked[key], e)
		q.nparked++
	} else {
		q.admitLocked(e)
	}
	q.notifyLocked()
	return nil
}

func (q *Queue[T]) admitLocked(e entry[T]) {
	q.waiting = append(q.waiting, e)
	q.admitted[e.key]++
}

// PushWait appends an item, waiting for room first; this is how a producer
// that cannot leave work in NATS applies back-pressure.
func (q *Queue[T]) PushWait(ctx context.Context, key string, item T) error {
	for {
		if _, err := q.WaitRoom(ctx); err != nil {
			return err
		}
		// Another producer may have taken the room between WaitRoom and Push.
		if err := q.Push(key, item); !errors.Is(err, ErrFull) {
			return err
		}
	}
}

// Run runs the items: concurrency runners each take the oldest item they
// may start (one whose key is not busy), under the queue's lock, so order
// per key never depends on goroutine scheduling, and a runner takes its
// next item as soon as it finished one, with no hand-over in between.
// When ctx ends it stops starting items, waits for the running ones to
// return, and hands back the items still queued or parked, in arrival
// order, for the caller to return to their source.
func (q *Queue[T]) Run(ctx context.Context, run func(key string, item T)) []T {
	var wg sync.WaitGroup
	for range q.concurrency {
		wg.Go(func() {
			for {
				e, ok := q.take(ctx)
				if !ok {
					return
				}
				run(e.key, e.item)
				q.finish(e.key)
			}
		})
	}
	<-ctx.Done()
	return q.shutdown(&wg)
}

// take waits for an item a runner may start and marks its key busy; false
// once ctx ended or the queue closed: nothing starts after that.
func (q *Queue[T]) take(ctx context.Context) (entry[T], bool) {
	for {
		q.mu.Lock()
		if q.closed || ctx.Err() != nil {
			q.mu.Unlock()
			return entry[T]{}, false
		}
		if e, ok := q.nextLocked(); ok {
			q.busy[e.key] = struct{}{}
			q.running++
			q.mu.Unlock()
			return e, true
		}
		changed := q.changed
		q.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-changed:
		}
	}
}

// idleLocked reports whether a runner is free with nothing queued that it
// may start.
func (q *Queue[T]) idleLocked() bool {
	if q.running >= q.concurrency {
		return false
	}
	for _, e := range q.waiting {
		if _, busy := q.busy[e.key]; !busy {
			return false
		}
	}
	return true
}

// nextLocked takes the oldest item whose key is not running. Scanning in
// arrival order and skipping busy keys keeps each key's items in order while
// a busy key never holds up the keys queued behind it.
func (q *Queue[T]) nextLocked() (entry[T], bool) {
	for i, e := range q.waiting {
		if _, busy := q.busy[e.key]; busy {
			continue
		}
		q.waiting = slices.Delete(q.waiting, i, i+1)
		return e, true
	}
	return entry[T]{}, false
}

// holdState is where a Hold stands: taken while its item runs, or keeping
// the key busy after the item returned.
type holdState int

const (
	holdRunning holdState = iota + 1
	holdKept
)

// Hold is called by a run func for the key of the item it runs: the
// runner is free as soon as run returns, but the key stays busy, so its
// next item does not start, until the returned release is called (once).
// It lets the caller finish an item's work off the runner while the key's
// order still waits for it.
func (q *Queue[T]) Hold(key string) (release func()) {
	q.mu.Lock()
	q.holds[key] = holdRunning
	q.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			q.mu.Lock()
			defer q.mu.Unlock()
			st := q.holds[key]
			delete(q.holds, key)
			if st == holdKept {
				delete(q.busy, key)
				q.notifyLocked()
			}
		})
	}
}

// finish frees the slot of key's item that ended, and fills it with the
// key's oldest parked item: the room just freed is always enough for it.
// The key stays busy while a Hold on it is not released.
func (q *Queue[T]) finish(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.holds[key] == holdRunning {
		q.holds[key] = holdKept
	} else {
		delete(q.busy, key)
	}
	q.running--
	if q.admitted[key]--; q.admitted[key] == 0 {
		delete(q.admitted, key)
	}
	if p := q.parked[key]; len(p) > 0 {
		q.admitLocked(p[0])
		q.nparked--
		if q.parked[key] = p[1:]; len(q.parked[key]) == 0 {
			delete(q.parked, key)
		}
	}
	q.notifyLocked()
}

func (q *Queue[T]) shutdown(wg *sync.WaitGroup) []T {
	q.mu.Lock()
	q.closed = true
	q.notifyLocked()
	q.mu.Unlock()

	wg.Wait()

	q.mu.Lock()
	defer q.mu.Unlock()
	entries := q.waiting
	for _, p := range q.parked {
		entries = append(entries, p...)
	}
	slices.SortFunc(entries, func(a, b entry[T]) int { return cmp.Compare(a.n, b.n) })
	left := make([]T, 0, len(entries))
	for _, e := range entries {
		left = append(left, e.item)
	}
	q.waiting, q.parked, q.nparked = nil, map[string][]entry[T]{}, 0
	clear(q.admitted)
	q.notifyLocked()
	return left
}

func (q *Queue[T]) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}
