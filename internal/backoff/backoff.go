// Package backoff is the one doubling back-off the worker waits with
// between tries: reconnecting to libvirtd, setting up JetStream again,
// retrying a NATS call, and retrying a command that ended unavailable.
// No jitter: each worker retries against its own host's libvirtd and its
// own consumer, so there is no crowd of clients to spread out.
package backoff

import "time"

// Backoff hands out waits that double from Min up to Max. Its zero value
// waits nothing; set Min and Max.
type Backoff struct {
	Min, Max time.Duration
	n        int
}

// Next is the wait before the next try: Min, then twice that, and so on,
// never more than Max.
func (b *Backoff) Next() time.Duration {
	d := Nth(b.Min, b.Max, b.n)
	b.n++
	return d
}

// Reset starts again from Min, after a success.
func (b *Backoff) Reset() { b.n = 0 }

// Nth is the n-th wait (from 0) of a back-off from min to max.
func Nth(min, max time.Duration, n int) time.Duration {
	d := min
	for i := 0; i < n && d < max; i++ {
		d *= 2
	}
	return clamp(d, min, max)
}

func clamp(d, lo, hi time.Duration) time.Duration {
	return max(lo, min(d, hi))
}
