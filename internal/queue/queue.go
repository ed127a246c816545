// Package queue is the worker's bounded in-process FIFO. Items carry a key
// (the VM they are for): items of one key run strictly in arrival order and
// never two at once, while up to a fixed number of items with different keys
// run side by side. The queue reports its free room so that the bus takes
// only as many messages off NATS as it can hold, which keeps back-pressure in
// NATS and memory flat however deep the backlog is.
package queue

import (
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
}

// Queue is a bounded FIFO with per-key ordering. Its zero value is not
// usable; build one with New. Push, PushWait, WaitRoom and the counters may
// be called from any goroutine; Run is called once.
type Queue[T any] struct {
	capacity    int
	concurrency int

	mu      sync.Mutex
	waiting []entry[T]          // arrival order
	busy    map[string]struct{} // keys with an item running
	running int
	closed  bool
	// changed is closed and replaced on every change of room or work, so any
	// number of waiters can select on it alongside their context.
	changed chan struct{}
}

// New returns a queue that holds at most capacity items (queued plus
// running) and runs at most concurrency of them at once. Values below 1 are
// taken as 1.
func New[T any](capacity, concurrency int) *Queue[T] {
	return &Queue[T]{
		capacity:    max(capacity, 1),
		concurrency: max(concurrency, 1),
		busy:        make(map[string]struct{}),
		changed:     make(chan struct{}),
	}
}

// Cap is the capacity: the most items queued and running together.
func (q *Queue[T]) Cap() int { return q.capacity }

// Len is the number of items held: queued plus running.
func (q *Queue[T]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiting) + q.running
}

// Running is the number of items being run right now.
func (q *Queue[T]) Running() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.running
}

// Free is how many more items Push accepts right now; 0 once closed.
func (q *Queue[T]) Free() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.freeLocked()
}

func (q *Queue[T]) freeLocked() int {
	if q.closed {
		return 0
	}
	return q.capacity - len(q.waiting) - q.running
}

// WaitRoom blocks until there is room for at least one item and reports how
// much. It returns ErrClosed once the queue is shutting down, or the
// context's error.
func (q *Queue[T]) WaitRoom(ctx context.Context) (int, error) {
	for {
		q.mu.Lock()
		closed, free, changed := q.closed, q.freeLocked(), q.changed
		q.mu.Unlock()
		switch {
		case closed:
			return 0, ErrClosed
		case free > 0:
			return free, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-changed:
		}
	}
}

// Push appends an item without waiting: ErrFull when there is no room,
// ErrClosed once the queue is shutting down.
func (q *Queue[T]) Push(key string, item T) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.closed:
		return ErrClosed
	case q.freeLocked() <= 0:
		return ErrFull
	}
	q.waiting = append(q.waiting, entry[T]{key: key, item: item})
	q.notifyLocked()
	return nil
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

// Run is the dispatch loop: the one goroutine that decides what runs next,
// so order per key never depends on goroutine scheduling. It calls run for
// each item on a goroutine of its own. When ctx ends it stops starting items,
// waits for the running ones to return, and hands back the items still
// queued, in arrival order, for the caller to return to their source.
func (q *Queue[T]) Run(ctx context.Context, run func(key string, item T)) []T {
	var wg sync.WaitGroup
	for {
		// Checked before starting anything: when an item finishes just as ctx
		// ends, the select below may wake for either, and nothing may start
		// after shutdown began.
		if ctx.Err() != nil {
			return q.shutdown(&wg)
		}
		q.mu.Lock()
		for q.running < q.concurrency {
			e, ok := q.nextLocked()
			if !ok {
				break
			}
			q.busy[e.key] = struct{}{}
			q.running++
			wg.Go(func() {
				run(e.key, e.item)
				q.finish(e.key)
			})
		}
		changed := q.changed
		q.mu.Unlock()

		select {
		case <-ctx.Done():
			return q.shutdown(&wg)
		case <-changed:
		}
	}
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

func (q *Queue[T]) finish(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.busy, key)
	q.running--
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
	left := make([]T, 0, len(q.waiting))
	for _, e := range q.waiting {
		left = append(left, e.item)
	}
	q.waiting = nil
	q.notifyLocked()
	return left
}

func (q *Queue[T]) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}
