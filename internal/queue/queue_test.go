package queue

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

// within fails the test when ch does not deliver in a generous time: the
// bound only turns a deadlock into a readable failure, it measures nothing.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

type item struct {
	key string
	seq int
}

func TestOrderPerKey(t *testing.T) {
	tests := []struct {
		name        string
		keys        int
		items       int
		capacity    int
		concurrency int
		park        int
	}{
		{name: "one key, one worker", keys: 1, items: 100, capacity: 4, concurrency: 1},
		{name: "one key, four workers", keys: 1, items: 100, capacity: 8, concurrency: 4},
		{name: "eight keys, four workers", keys: 8, items: 400, capacity: 16, concurrency: 4},
		{name: "two keys, four workers", keys: 2, items: 200, capacity: 64, concurrency: 4},
		{name: "many keys, capacity one", keys: 5, items: 100, capacity: 1, concurrency: 4},
		{name: "two keys, parking", keys: 2, items: 200, capacity: 4, concurrency: 2, park: 16},
		{name: "eight keys, parking", keys: 8, items: 400, capacity: 6, concurrency: 3, park: 5},
		{name: "one key, parking", keys: 1, items: 100, capacity: 4, concurrency: 2, park: 50},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := New[item](tc.capacity, tc.concurrency, tc.park)

			var (
				mu       sync.Mutex
				seen     = map[string][]int{}
				runningK = map[string]int{}
				running  int
				peak     int
				faults   []string
			)
			done := make(chan struct{}, tc.items)
			run := func(key string, it item) {
				mu.Lock()
				runningK[key]++
				running++
				peak = max(peak, running)
				if runningK[key] > 1 {
					faults = append(faults, fmt.Sprintf("key %s: two items at once", key))
				}
				if running > tc.concurrency {
					faults = append(faults, fmt.Sprintf("%d running, concurrency %d", running, tc.concurrency))
				}
				seen[key] = append(seen[key], it.seq)
				mu.Unlock()

				// Vary how long items take so that keys overtake each other.
				time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)

				mu.Lock()
				runningK[key]--
				running--
				mu.Unlock()
				done <- struct{}{}
			}

			ctx, cancel := context.WithCancel(t.Context())
			left := make(chan []item, 1)
			go func() { left <- q.Run(ctx, run) }()

			next := map[string]int{}
			for i := range tc.items {
				key := fmt.Sprintf("vm-%d", rand.IntN(tc.keys))
				if err := q.PushWait(t.Context(), key, item{key: key, seq: next[key]}); err != nil {
					t.Fatalf("push %d: %v", i, err)
				}
				next[key]++
			}
			for range tc.items {
				within(t, done, "items to run")
			}
			cancel()
			if rest := within(t, left, "Run to return"); len(rest) != 0 {
				t.Errorf("Run handed back %d items, want 0", len(rest))
			}

			mu.Lock()
			defer mu.Unlock()
			for _, f := range faults {
				t.Error(f)
			}
			for key, n := range next {
				got := seen[key]
				if len(got) != n {
					t.Errorf("key %s: ran %d items, want %d", key, len(got), n)
					continue
				}
				for i, seq := range got {
					if seq != i {
						t.Errorf("key %s: position %d ran item %d (order %v)", key, i, seq, got)
						break
					}
				}
			}
		})
	}
}

// started is a run func that reports each start and blocks until released.
type gate struct {
	started chan string
	release chan struct{}
}

func newGate() *gate {
	return &gate{started: make(chan string, 100), release: make(chan struct{})}
}

func (g *gate) run(key string, it string) {
	g.started <- it
	<-g.release
}

func runQueue[T any](t *testing.T, q *Queue[T], run func(string, T)) (cancel func() []T) {
	t.Helper()
	ctx, stop := context.WithCancel(t.Context())
	left := make(chan []T, 1)
	go func() { left <- q.Run(ctx, run) }()
	var once sync.Once
	var rest []T
	cancel = func() []T {
		once.Do(func() {
			stop()
			rest = within(t, left, "Run to return")
		})
		return rest
	}
	t.Cleanup(func() { cancel() })
	return cancel
}

func TestBusyKeyDoesNotBlockOtherKeys(t *testing.T) {
	q := New[string](8, 2, 0)
	started := make(chan string, 10)
	release := map[string]chan struct{}{"a1": make(chan struct{}), "a2": make(chan struct{}), "b1": make(chan struct{})}
	runQueue(t, q, func(_ string, it string) {
		started <- it
		<-release[it]
	})
	defer func() {
		for _, ch := range release {
			close(ch)
		}
	}()

	if err := q.Push("a", "a1"); err != nil {
		t.Fatal(err)
	}
	if got := within(t, started, "a1 to start"); got != "a1" {
		t.Fatalf("started %s, want a1", got)
	}
	if err := q.Push("a", "a2"); err != nil {
		t.Fatal(err)
	}
	if err := q.Push("b", "b1"); err != nil {
		t.Fatal(err)
	}
	// a1 holds key a, so the free worker must take b1 from behind a2.
	if got := within(t, started, "second start"); got != "b1" {
		t.Fatalf("second started %s, want b1", got)
	}
	release["a1"] <- struct{}{}
	if got := within(t, started, "third start"); got != "a2" {
		t.Fatalf("third started %s, want a2", got)
	}
}

func TestDifferentKeysRunSideBySide(t *testing.T) {
	const workers = 4
	q := New[int](workers, workers, 0)
	arrived := make(chan struct{}, workers)
	all := make(chan struct{})
	var once sync.Once
	var n int
	var mu sync.Mutex
	runQueue(t, q, func(string, int) {
		mu.Lock()
		n++
		if n == workers {
			once.Do(func() { close(all) })
		}
		mu.Unlock()
		// Each item waits for all the others: this only ends if four run at once.
		<-all
		arrived <- struct{}{}
	})
	for i := range workers {
		if err := q.Push(fmt.Sprintf("vm-%d", i), i); err != nil {
			t.Fatal(err)
		}
	}
	for range workers {
		within(t, arrived, "four items to run together")
	}
}

func TestCapacityCountsQueuedAndRunning(t *testing.T) {
	q := New[string](3, 1, 0)
	g := newGate()
	runQueue(t, q, g.run)
	defer close(g.release)

	if got := q.Free(); got != 3 {
		t.Fatalf("Free() = %d on an empty queue, want 3", got)
	}
	for i, it := range []string{"x1", "x2", "x3"} {
		if err := q.Push("x", it); err != nil {
			t.Fatalf("push %d: %v", i, err)
		}
	}
	within(t, g.started, "x1 to start")
	if got, want := q.Len(), 3; got != want {
		t.Errorf("Len() = %d, want %d (one running, two queued)", got, want)
	}
	if got := q.Running(); got != 1 {
		t.Errorf("Running() = %d, want 1", got)
	}
	if got := q.Free(); got != 0 {
		t.Errorf("Free() = %d with one running and two queued, want 0", got)
	}
	if err := q.Push("y", "y1"); !errors.Is(err, ErrFull) {
		t.Errorf("push into a full queue: %v, want ErrFull", err)
	}

	room := make(chan int, 1)
	go func() {
		n, err := q.WaitRoom(t.Context())
		if err != nil {
			t.Error(err)
		}
		room <- n
	}()
	g.release <- struct{}{} // x1 ends
	if got := within(t, room, "room"); got != 1 {
		t.Errorf("WaitRoom() = %d after one item ended, want 1", got)
	}
}

func TestPushWait(t *testing.T) {
	t.Run("waits for room", func(t *testing.T) {
		q := New[string](1, 1, 0)
		g := newGate()
		runQueue(t, q, g.run)
		defer close(g.release)

		if err := q.Push("a", "a1"); err != nil {
			t.Fatal(err)
		}
		within(t, g.started, "a1 to start")
		pushed := make(chan error, 1)
		go func() { pushed <- q.PushWait(t.Context(), "b", "b1") }()
		g.release <- struct{}{}
		if err := within(t, pushed, "PushWait"); err != nil {
			t.Fatal(err)
		}
		if got := within(t, g.started, "b1 to start"); got != "b1" {
			t.Fatalf("started %s, want b1", got)
		}
	})
	t.Run("gives up with its context", func(t *testing.T) {
		q := New[string](1, 1, 0)
		if err := q.Push("a", "a1"); err != nil { // no Run: a1 stays queued
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if err := q.PushWait(ctx, "b", "b1"); !errors.Is(err, context.Canceled) {
			t.Fatalf("PushWait = %v, want context.Canceled", err)
		}
	})
}

func TestShutdownHandsBackQueued(t *testing.T) {
	q := New[string](8, 1, 0)
	var (
		mu       sync.Mutex
		finished []string
	)
	g := newGate()
	stop := runQueue(t, q, func(key, it string) {
		g.run(key, it)
		mu.Lock()
		finished = append(finished, it)
		mu.Unlock()
	})

	for _, p := range []struct{ key, item string }{{"a", "a1"}, {"a", "a2"}, {"b", "b1"}, {"c", "c1"}} {
		if err := q.Push(p.key, p.item); err != nil {
			t.Fatal(err)
		}
	}
	within(t, g.started, "a1 to start")

	left := make(chan []string, 1)
	go func() { left <- stop() }()
	// Free drops to 0 once the loop has seen the end of its context; until
	// then a2, b1 and c1 wait behind a1 (concurrency 1).
	deadline := time.Now().Add(10 * time.Second)
	for q.Free() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("queue never closed")
		}
		time.Sleep(time.Millisecond)
	}
	close(g.release) // a1 may finish now; nothing else may start

	got := within(t, left, "shutdown")
	if want := []string{"a2", "b1", "c1"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("handed back %v, want %v", got, want)
	}
	mu.Lock()
	if fmt.Sprint(finished) != "[a1]" {
		t.Errorf("finished %v before Run returned, want [a1]", finished)
	}
	mu.Unlock()

	if err := q.Push("d", "d1"); !errors.Is(err, ErrClosed) {
		t.Errorf("Push after shutdown: %v, want ErrClosed", err)
	}
	if _, err := q.WaitRoom(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitRoom after shutdown: %v, want ErrClosed", err)
	}
	if err := q.PushWait(t.Context(), "d", "d1"); !errors.Is(err, ErrClosed) {
		t.Errorf("PushWait after shutdown: %v, want ErrClosed", err)
	}
}

// TestDeepBacklogDoesNotHoldUpOtherKeys is the fairness promise: with
// concurrency 2, a key with far more items than the queue holds parks them,
// so another key's item, pushed behind the whole backlog, runs at once on
// the idle runner.
func TestDeepBacklogDoesNotHoldUpOtherKeys(t *testing.T) {
	const backlog = 20
	q := New[string](4, 2, backlog)
	g := newGate()
	runQueue(t, q, g.run)

	for i := range backlog {
		if err := q.Push("a", fmt.Sprintf("a%d", i)); err != nil {
			t.Fatalf("push a%d: %v", i, err)
		}
	}
	if got := within(t, g.started, "a0 to start"); got != "a0" {
		t.Fatalf("first started %s, want a0", got)
	}
	if got, want := q.Len(), 3; got != want {
		t.Errorf("Len with a deep backlog = %d, want %d (the key's share)", got, want)
	}
	if got, want := q.Parked(), backlog-3; got != want {
		t.Errorf("Parked = %d, want %d", got, want)
	}
	if got := q.Free(); got != 1 {
		t.Errorf("Free = %d, want 1: the slot kept for other keys", got)
	}
	if err := q.Push("b", "b0"); err != nil {
		t.Fatalf("push b0: %v", err)
	}
	if got := within(t, g.started, "b0 to start"); got != "b0" {
		t.Fatalf("started %s while a0 runs, want b0", got)
	}

	// Everything of a runs, in order, once released.
	close(g.release)
	for i := 1; i < backlog; i++ {
		if got, want := within(t, g.started, "a's backlog"), fmt.Sprintf("a%d", i); got != want {
			t.Fatalf("started %s, want %s", got, want)
		}
	}
}

// TestParkingIsBounded: when the park is full, Free is 0, so the bus stops
// taking messages off NATS; Push refuses the full key's next item and still
// takes another key's while the queue has room.
func TestParkingIsBounded(t *testing.T) {
	q := New[string](3, 2, 2)
	for i := range 4 { // share 2, then two parked
		if err := q.Push("a", fmt.Sprint(i)); err != nil {
			t.Fatalf("push %d: %v", i, err)
		}
	}
	if got := q.Free(); got != 0 {
		t.Errorf("Free with a full park = %d, want 0", got)
	}
	if err := q.Push("a", "4"); !errors.Is(err, ErrFull) {
		t.Errorf("Push of a parking key with a full park = %v, want ErrFull", err)
	}
	if err := q.Push("b", "b"); err != nil {
		t.Errorf("Push of another key with room in the queue = %v, want nil", err)
	}
}

// TestShutdownHandsBackParkedInArrivalOrder: parked items go back with the
// queued ones, all in the order they came.
func TestShutdownHandsBackParkedInArrivalOrder(t *testing.T) {
	q := New[string](4, 2, 10) // share 3
	g := newGate()
	stop := runQueue(t, q, g.run)
	for _, it := range []string{"a0", "a1", "a2", "a3", "b0", "a4"} {
		if err := q.Push(it[:1], it); err != nil {
			t.Fatalf("push %s: %v", it, err)
		}
	}
	if got, want := q.Parked(), 2; got != want {
		t.Fatalf("Parked = %d, want %d (a3, a4)", got, want)
	}
	within(t, g.started, "a0 or b0")
	within(t, g.started, "a0 or b0")

	left := make(chan []string, 1)
	go func() { left <- stop() }()
	deadline := time.Now().Add(10 * time.Second)
	for !q.isClosed() {
		if time.Now().After(deadline) {
			t.Fatal("queue never closed")
		}
		time.Sleep(time.Millisecond)
	}
	close(g.release) // a0 and b0 finish; a3 moves up; nothing starts

	got := within(t, left, "shutdown")
	if want := []string{"a1", "a2", "a3", "a4"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("handed back %v, want %v", got, want)
	}
	if q.Len() != 0 || q.Parked() != 0 {
		t.Errorf("after shutdown Len %d, Parked %d; want 0, 0", q.Len(), q.Parked())
	}
}

func (q *Queue[T]) isClosed() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.closed
}

// TestWaitRoomForBatches: while the runner is busy and items wait behind
// it, WaitRoomFor waits for the room it asked for; once the runner is
// idle it reports any room at once, so the runner never waits for a batch.
func TestWaitRoomForBatches(t *testing.T) {
	q := New[string](4, 1, 0)
	g := newGate()
	runQueue(t, q, g.run)
	defer close(g.release)
	for _, it := range []string{"x1", "x2", "x3", "x4"} {
		if err := q.Push("x", it); err != nil {
			t.Fatal(err)
		}
	}
	within(t, g.started, "x1 to start")
	room := make(chan int, 1)
	go func() {
		n, err := q.WaitRoomFor(t.Context(), 2)
		if err != nil {
			t.Error(err)
		}
		room <- n
	}()
	g.release <- struct{}{} // x1 ends, x2 starts: room for one, not two
	within(t, g.started, "x2 to start")
	select {
	case n := <-room:
		t.Fatalf("WaitRoomFor(2) = %d with room for one and the runner busy", n)
	case <-time.After(50 * time.Millisecond):
	}
	g.release <- struct{}{} // x2 ends: room for two
	if got := within(t, room, "room for two"); got != 2 {
		t.Errorf("WaitRoomFor(2) = %d, want 2", got)
	}
	within(t, g.started, "x3 to start")
	g.release <- struct{}{}
	within(t, g.started, "x4 to start")
	g.release <- struct{}{} // all done: the runner is idle
	for q.Running() > 0 {
		time.Sleep(time.Millisecond)
	}
	n, err := q.WaitRoomFor(t.Context(), 100)
	if err != nil || n != 4 {
		t.Errorf("WaitRoomFor(100) on an idle queue = %d, %v; want 4 at once", n, err)
	}
}

// TestHoldKeepsKeyBusy: an item that holds its key frees the runner when
// it returns, so another key's item runs, but its own key's next item
// waits for the release; a release before the item returns holds nothing.
func TestHoldKeepsKeyBusy(t *testing.T) {
	q := New[string](4, 1, 0)
	releases := make(chan func(), 4)
	started := make(chan string, 4)
	runQueue(t, q, func(key, it string) {
		started <- it
		if it == "x1" {
			releases <- q.Hold(key)
		}
		if it == "y1" {
			q.Hold(key)() // released while running: no effect on order
		}
	})
	for _, p := range [][2]string{{"x", "x1"}, {"x", "x2"}, {"y", "y1"}, {"y", "y2"}} {
		if err := q.Push(p[0], p[1]); err != nil {
			t.Fatal(err)
		}
	}
	release := within(t, releases, "x1's hold")
	var got []string
	for range 3 {
		got = append(got, within(t, started, "an item to start"))
	}
	if want := []string{"x1", "y1", "y2"}; !slices.Equal(got, want) {
		t.Fatalf("started %v while x was held, want %v", got, want)
	}
	select {
	case it := <-started:
		t.Fatalf("%s started while x was held", it)
	case <-time.After(50 * time.Millisecond):
	}
	release()
	release() // a second call does nothing
	if it := within(t, started, "x2 after the release"); it != "x2" {
		t.Fatalf("started %s after the release, want x2", it)
	}
}
