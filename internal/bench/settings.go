package bench

import (
	"fmt"
	"math"
	"strconv"
	"time"
)

// testDomains is how many test-driver domains the parallel rows spread
// their load over.
const testDomains = 8

// Sizes are how many operations each row runs.
type Sizes struct {
	Scale    float64
	Serial   int   // one test-driver domain, one at a time (rows 1 and a)
	Parallel int   // spread over the test-driver domains (rows 2, b and c)
	QEMU     int   // pause and resume on one QEMU domain (rows 3 and d)
	InFlight int   // commands kept in flight in rows b and c
	Backlogs []int // commands published while no worker runs, one row each
	// Profiles, when set, is a directory where each virtbus row leaves a
	// CPU profile of its worker (<row>.cpu.pprof), taken over the row's
	// first ProfileFor; VIRTBUS_BENCH_PPROF names it.
	Profiles   string
	ProfileFor time.Duration
}

// defaultSizes keep a whole `make bench` within about six minutes on a
// 2-core machine.
var defaultSizes = Sizes{Scale: 1, Serial: 2000, Parallel: 4000, QEMU: 400, InFlight: 256,
	Backlogs: []int{10_000, 100_000}}

// LoadSizes reads VIRTBUS_BENCH_SCALE (default 1; 0.1 for a quick run),
// which multiplies every size but the commands in flight, and
// VIRTBUS_BENCH_PPROF (a directory for the workers' CPU profiles). Each size is
// rounded to whole start-stop (or pause-resume) pairs per domain, so
// every domain ends each row in the state it began it in.
func LoadSizes(getenv func(string) string) (Sizes, error) {
	s := defaultSizes
	if raw := getenv("VIRTBUS_BENCH_SCALE"); raw != "" {
		f, err := strconv.ParseFloat(raw, 64)
		if err != nil || f <= 0 || math.IsInf(f, 0) {
			return s, fmt.Errorf("VIRTBUS_BENCH_SCALE=%q: want a positive number", raw)
		}
		s.Scale = f
	}
	if s.Profiles = getenv("VIRTBUS_BENCH_PPROF"); s.Profiles != "" {
		s.ProfileFor = 5 * time.Second
	}
	s.Serial = scaled(s.Serial, s.Scale, 2)
	s.Parallel = scaled(s.Parallel, s.Scale, 2*testDomains)
	s.QEMU = scaled(s.QEMU, s.Scale, 2)
	s.Backlogs = nil
	for _, n := range defaultSizes.Backlogs {
		s.Backlogs = append(s.Backlogs, scaled(n, s.Scale, 2*testDomains))
	}
	return s, nil
}

// scaled is n times f, rounded to a multiple of unit, at least one unit.
func scaled(n int, f float64, unit int) int {
	return max(int(math.Round(float64(n)*f/float64(unit))), 1) * unit
}
