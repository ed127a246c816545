package queue

import (
	"context"
	"strconv"
	"sync"
	"testing"
)

// BenchmarkQueue is the FIFO's cost per item: Push (PushWait, as the bus's
// fetch loop waits for room), a runner taking it, and the run call. one-at-a-time waits for each item to have run
// before pushing the next (a handoff both ways); the others keep the
// queue full, with one key and one runner, or eight keys and eight.
func BenchmarkQueue(b *testing.B) {
	b.Run("one-at-a-time", func(b *testing.B) {
		q, ran, stop := dispatching(64, 1)
		defer stop()
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if err := q.PushWait(context.Background(), "vm", i); err != nil {
				b.Fatal(err)
			}
			<-ran
			i++
		}
	})
	for _, c := range []struct {
		name              string
		keys, concurrency int
	}{
		{"full/1-key-c1", 1, 1},
		{"full/8-keys-c8", 8, 8},
	} {
		b.Run(c.name, func(b *testing.B) {
			q, ran, stop := dispatching(64, c.concurrency)
			defer stop()
			keys := make([]string, c.keys)
			for k := range keys {
				keys[k] = "vm-" + strconv.Itoa(k)
			}
			b.ReportAllocs()
			// ran is read as the items run: a b.N beyond its buffer would
			// block the runners otherwise.
			pushed := make(chan int, 1)
			drained := make(chan struct{})
			go func() {
				defer close(drained)
				for got := 0; ; got++ {
					select {
					case n := <-pushed:
						for ; got < n; got++ {
							<-ran
						}
						return
					case <-ran:
					}
				}
			}()
			n := 0
			for b.Loop() {
				if err := q.PushWait(context.Background(), keys[n%len(keys)], n); err != nil {
					b.Fatal(err)
				}
				n++
			}
			pushed <- n
			<-drained
		})
	}
}

// dispatching starts a queue's runners, whose items signal on ran when
// they have run; stop ends them.
func dispatching(capacity, concurrency int) (q *Queue[int], ran chan struct{}, stop func()) {
	q = New[int](capacity, concurrency, 512)
	// Buffered beyond what a run can leave unread: runners never block.
	ran = make(chan struct{}, 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		q.Run(ctx, func(string, int) {
			ran <- struct{}{}
		})
	})
	return q, ran, func() { cancel(); wg.Wait() }
}
