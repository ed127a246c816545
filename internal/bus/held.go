package bus

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// heartbeat tells the server, every third of AckWait, that each held
// message (queued or running) is still being worked on, so that a command
// waiting behind a long one is not redelivered.
func (w *Worker) heartbeat(ctx context.Context) {
	t := time.NewTicker(max(w.cfg.AckWait/3, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !w.nc.IsConnected() {
			continue
		}
		for _, j := range w.held.snapshot() {
			if err := j.js.InProgress(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
				w.log.Debug("in-progress failed", "id", j.cmd.ID, "err", err)
			}
		}
	}
}

// heldSet is the messages this worker holds and has not answered yet.
type heldSet struct {
	mu   sync.Mutex
	jobs map[*job]struct{}
}

func (h *heldSet) add(j *job) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.jobs[j] = struct{}{}
}

func (h *heldSet) remove(j *job) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.jobs, j)
}

func (h *heldSet) snapshot() []*job {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*job, 0, len(h.jobs))
	for j := range h.jobs {
		out = append(out, j)
	}
	return out
}
