package bench

import (
	"slices"
	"time"
)

// sample is what one measured batch of operations gave.
type sample struct {
	ops     int
	elapsed time.Duration   // from the first operation's start to the last one's end
	lat     []time.Duration // each operation's, sorted; nil where not measured
}

func newSample(ops int, elapsed time.Duration, lat []time.Duration) sample {
	slices.Sort(lat)
	return sample{ops: ops, elapsed: elapsed, lat: lat}
}

// rate is operations per second.
func (s sample) rate() float64 {
	if s.elapsed <= 0 {
		return 0
	}
	return float64(s.ops) / s.elapsed.Seconds()
}

// quantile is the nearest-rank q-quantile of the latencies (q in (0, 1]);
// false when none were measured.
func (s sample) quantile(q float64) (time.Duration, bool) {
	if len(s.lat) == 0 {
		return 0, false
	}
	return Quantile(s.lat, q), true
}

// Quantile is the nearest-rank q-quantile (q in (0, 1]) of sorted, which
// must not be empty.
func Quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
