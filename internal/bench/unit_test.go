package bench

import (
	"os"
	"slices"
	"testing"
	"time"
)

func TestLoadSizes(t *testing.T) {
	tests := []struct {
		scale    string
		want     Sizes
		wantFail bool
	}{
		{"", Sizes{Scale: 1, Serial: 2000, Parallel: 4000, QEMU: 400, InFlight: 256, Backlogs: []int{10_000, 100_000}}, false},
		{"0.1", Sizes{Scale: 0.1, Serial: 200, Parallel: 400, QEMU: 40, InFlight: 256, Backlogs: []int{1008, 10_000}}, false},
		{"0.0001", Sizes{Scale: 0.0001, Serial: 2, Parallel: 16, QEMU: 2, InFlight: 256, Backlogs: []int{16, 16}}, false},
		{"0", Sizes{}, true},
		{"-1", Sizes{}, true},
		{"fast", Sizes{}, true},
	}
	for _, tc := range tests {
		got, err := LoadSizes(func(string) string { return tc.scale })
		if (err != nil) != tc.wantFail {
			t.Errorf("scale %q: error %v, want failure %v", tc.scale, err, tc.wantFail)
			continue
		}
		if !tc.wantFail && (got.Scale != tc.want.Scale || got.Serial != tc.want.Serial || got.Parallel != tc.want.Parallel ||
			got.QEMU != tc.want.QEMU || got.InFlight != tc.want.InFlight || !slices.Equal(got.Backlogs, tc.want.Backlogs)) {
			t.Errorf("scale %q: %+v, want %+v", tc.scale, got, tc.want)
		}
	}
}

func TestQuantile(t *testing.T) {
	var lat []time.Duration
	for i := 100; i >= 1; i-- {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	s := newSample(len(lat), time.Second, lat)
	for q, want := range map[float64]time.Duration{0.5: 50 * time.Millisecond, 0.99: 99 * time.Millisecond, 1: 100 * time.Millisecond} {
		if got, ok := s.quantile(q); !ok || got != want {
			t.Errorf("quantile %v = %v, want %v", q, got, want)
		}
	}
	if _, ok := (sample{}).quantile(0.5); ok {
		t.Error("a sample without latencies has a median")
	}
	if r := s.rate(); r != 100 {
		t.Errorf("rate %v, want 100", r)
	}
}

func TestAlternate(t *testing.T) {
	got := alternate([]string{"a", "b"}, 2, startStop)
	want := []command{{"a", "start"}, {"b", "start"}, {"a", "stop"}, {"b", "stop"}}
	if !slices.Equal(got, want) {
		t.Errorf("%v, want %v", got, want)
	}
}

func TestProcReadsThisProcess(t *testing.T) {
	// Burn a little CPU so that at least one tick shows.
	for start := time.Now(); time.Since(start) < 30*time.Millisecond; {
	}
	cpu, err := CPUTime(os.Getpid())
	if err != nil || cpu <= 0 {
		t.Errorf("cpu time %v, %v", cpu, err)
	}
	rss, err := PeakRSS(os.Getpid())
	if err != nil || rss < 1<<20 {
		t.Errorf("peak RSS %d, %v", rss, err)
	}
}

func TestNames(t *testing.T) {
	if got := thousands(100000); got != "100,000" {
		t.Errorf("thousands: %q", got)
	}
	if got := slug("virtbus c1, one at a time"); got != "virtbus-c1-one-a" {
		t.Errorf("slug: %q", got)
	}
}
