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
	for {
		every := max(time.Duration(w.ackWait.Load())/3, 10*time.Millisecond)
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		if !w.nc.IsConnected() {
			continue
		}
		for _, j := range w.held.snapshot() {
			if err := j.msg().InProgress(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
				w.log.Debug("in-progress failed", "id", j.cmd.ID, "err", err)
			}
		}
	}
}

// heldSet is the messages this worker holds and has not answered yet,
// also by stream message.
type heldSet struct {
	mu    sync.Mutex
	jobs  map[*job]struct{}
	bySeq map[streamMsg]*job
	ids   map[string]int // how many held jobs carry each command id
}

// streamMsg names one stored message: its sequence, and its stored time,
// since a stream deleted and made again counts from 1 again.
type streamMsg struct {
	seq    uint64
	stored int64
}

func newHeldSet() heldSet {
	return heldSet{jobs: make(map[*job]struct{}), bySeq: make(map[streamMsg]*job), ids: make(map[string]int)}
}

// add holds j, unless a job for the same stream message is held already:
// then the server redelivered a message this worker is still working on
// (its in-progress notes could not reach the server for longer than the
// ack wait). The held job takes the new delivery's handle, so that one
// completion and one ack answer both, and add reports false. shared
// reports that another held message carries j's command id: a publisher
// sent it again after the stream's duplicate window.
func (h *heldSet) add(j *job) (added, shared bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if j.stored.seq != 0 {
		if held, ok := h.bySeq[j.stored]; ok {
			held.setMsg(j.msg())
			return false, false
		}
		h.bySeq[j.stored] = j
	}
	h.jobs[j] = struct{}{}
	shared = h.ids[j.cmd.ID] > 0
	h.ids[j.cmd.ID]++
	return true, shared
}

func (h *heldSet) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.jobs)
}

func (h *heldSet) remove(j *job) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.jobs[j]; !ok {
		return
	}
	delete(h.jobs, j)
	if h.ids[j.cmd.ID]--; h.ids[j.cmd.ID] <= 0 {
		delete(h.ids, j.cmd.ID)
	}
	if h.bySeq[j.stored] == j {
		delete(h.bySeq, j.stored)
	}
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
