//go:build chaos

package chaos

import (
	"os"
	"testing"
	"time"
)

// TestChaos runs the whole system under faults and checks its promises;
// see the package comment. VIRTBUS_CHAOS=short|full sizes it, and
// VIRTBUS_CHAOS_SEED repeats a run's plan and fault schedule.
func TestChaos(t *testing.T) {
	s, err := LoadSettings(os.Getenv, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("chaos %s, seed %d (VIRTBUS_CHAOS_SEED=%d repeats the plan and the fault schedule)", s.Name, s.Seed, s.Seed)
	h := NewHarness(t, s)
	o := h.Run()
	if v := h.Report(o); len(v) > 0 {
		t.Errorf("%d violations, listed above (seed %d)", len(v), s.Seed)
	}
}
