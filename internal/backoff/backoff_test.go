package backoff

import (
	"testing"
	"time"
)

func TestNext(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i, w := range want {
		if got := b.Next(); got != w*time.Millisecond {
			t.Errorf("wait %d = %s, want %s", i, got, w*time.Millisecond)
		}
	}
	b.Reset()
	if got := b.Next(); got != 100*time.Millisecond {
		t.Errorf("after Reset: %s, want 100ms", got)
	}
}

func TestNthDoesNotOverflow(t *testing.T) {
	if got := Nth(time.Second, 30*time.Second, 1000); got != 30*time.Second {
		t.Errorf("Nth(1s, 30s, 1000) = %s, want 30s", got)
	}
	if got := Nth(time.Second, 30*time.Second, 0); got != time.Second {
		t.Errorf("Nth(1s, 30s, 0) = %s, want 1s", got)
	}
}
