package bus

import (
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// The set of ids with a record says "may have" of every id until it is
// loaded, of the ids listed and added, for at least the bucket's TTL after
// they were added, and of every id again once it holds too many.
func TestKnownIDsMayHave(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const ttl = time.Hour
	every := ttl + turnMargin
	for _, tc := range []struct {
		name  string
		ttl   time.Duration
		adds  map[string]time.Duration // key: when, after t0
		asked time.Duration
		want  map[string]bool
	}{
		{"listed and added", ttl, map[string]time.Duration{"added": time.Minute}, 2 * time.Minute,
			map[string]bool{"listed": true, "added": true, "other": false}},
		{"kept a TTL after it was added", ttl, map[string]time.Duration{"late": every - time.Second}, every - time.Second + ttl,
			map[string]bool{"late": true}},
		{"forgotten two generations on", ttl, map[string]time.Duration{"late": every - time.Second}, 2*every + time.Second,
			map[string]bool{"late": false}},
		{"forgotten after a long idle", ttl, map[string]time.Duration{"early": 0}, 3 * every,
			map[string]bool{"early": false, "listed": false}},
		{"kept for good without a TTL", 0, map[string]time.Duration{"added": time.Minute}, 1000 * time.Hour,
			map[string]bool{"listed": true, "added": true, "other": false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newKnownIDs(slog.New(slog.DiscardHandler))
			k.reset(tc.ttl, t0)
			if !k.mayHaveKey("listed", t0) {
				t.Fatal("a set not loaded yet says no")
			}
			k.fill([]string{"listed"}, t0)
			for key, at := range tc.adds {
				k.addKey(key, t0.Add(at))
			}
			for key, want := range tc.want {
				if got := k.mayHaveKey(key, t0.Add(tc.asked)); got != want {
					t.Errorf("may have %q at t0+%s: %v, want %v", key, tc.asked, got, want)
				}
			}
		})
	}
}

// A TTL raised on the bucket keeps ids that long from then on.
func TestKnownIDsFollowTheTTL(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		ttl  time.Duration
		want bool
	}{
		{"raised", 3 * time.Hour, true},
		{"lowered", time.Minute, false},
		{"none", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newKnownIDs(slog.New(slog.DiscardHandler))
			k.reset(time.Hour, t0)
			k.fill([]string{"x"}, t0)
			k.keepFor(tc.ttl)
			if got := k.mayHaveKey("x", t0.Add(2*time.Hour+30*time.Minute)); got != tc.want {
				t.Errorf("may have x 2.5 h after a TTL of 1 h became %s: %v, want %v", tc.ttl, got, tc.want)
			}
		})
	}
}

func TestKnownIDsGiveUpPastTheLimit(t *testing.T) {
	k := newKnownIDs(slog.New(slog.DiscardHandler))
	now := time.Now()
	k.reset(time.Hour, now)
	k.fill(nil, now)
	if k.mayHaveKey("x", now) {
		t.Fatal("an empty set says yes")
	}
	for i := range maxKnown + 1 {
		k.addKey(strconv.Itoa(i), now)
	}
	if !k.mayHaveKey("x", now) {
		t.Error("past the limit the set still says no: ids added since would be missed")
	}
	if k.cur != nil || k.prev != nil {
		t.Error("past the limit the set still holds its ids")
	}
}

// A command whose id has no record runs without a lookup; one whose id
// has, even from a worker before this one, is looked up and answered from
// it: a conflict for another command, the first completion for the same.
func TestOnlyIDsWithARecordAreLookedUp(t *testing.T) {
	t.Parallel()
	s := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	nc := connect(t, s.ClientURL())
	js := bustest.JetStream(t, nc)
	// Every record lookup is a direct get on the bucket's stream; a plain
	// subscriber sees each request.
	lookups, err := nc.SubscribeSync("$JS.API.DIRECT.GET.KV_" + RecordBucket + ".>")
	if err != nil {
		t.Fatal(err)
	}
	events := collect(t, nc, EventPrefix+"."+testHost+".>")
	// A short duplicate window, so the stream lets a reused id through and
	// the record is what must catch it.
	cfg := Config{DupWindow: 100 * time.Millisecond}

	w1 := startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(newCalls()))
	for _, id := range []string{"a-1", "a-2", "a-3"} {
		publishCmd(t, js, "web-1", "status", id, "", "")
	}
	events.WaitIDs(t, waitTimeout, "a-1", "a-2")
	first := events.WaitID(t, "a-3")
	// The lookups, had there been any, came before the completions on the
	// same connection.
	if n, _, _ := lookups.Pending(); n != 0 {
		t.Errorf("%d record lookups for three new ids, want none", n)
	}
	if err := w1.stop(t); err != nil {
		t.Fatal(err)
	}

	c2 := newCalls()
	startWorker(t, connect(t, s.ClientURL()), cfg, okHandler(c2))
	time.Sleep(300 * time.Millisecond) // past the duplicate window
	publishCmd(t, js, "web-2", "stop", "a-2", "", "")
	publishCmd(t, js, "web-1", "status", "a-3", "", "")
	publishCmd(t, js, "web-1", "status", "b-1", "", "")
	reused := events.Take(t, "a-2 for web-2", func(c Completion) bool { return c.ID == "a-2" && c.VM == "web-2" })
	if reused.Status != StatusError || reused.Error == nil || reused.Error.Code != CodeConflict {
		t.Errorf("an id the worker before recorded, reused for another command: %+v, want a conflict", reused)
	}
	var again Completion
	events.WaitFor(t, waitTimeout, "a second completion of a-3", func(all []Completion) bool {
		n := 0
		for _, c := range all {
			if c.ID == "a-3" {
				n, again = n+1, c
			}
		}
		return n == 2
	})
	if again.Status != StatusOK || !again.FinishedAt.Equal(first.FinishedAt) {
		t.Errorf("an id the worker before recorded, for the same command: %+v, want its completion", again)
	}
	events.WaitID(t, "b-1")
	if n, _, _ := lookups.Pending(); n != 2 {
		t.Errorf("%d record lookups, want 2: a-2 and a-3, not b-1", n)
	}
	if got := c2.total(); got != 1 || len(c2.of("b-1")) != 1 {
		t.Errorf("the second worker ran %d commands (%v), want only b-1", got, c2.byID)
	}
}
