package bench

import (
	"time"

	"github.com/virtbus/virtbus/internal/testdriver"
)

// Run measures every row and returns them in the table's order: the
// baselines, the virtbus rows that stand beside them, the backlogs. The
// rows on the test driver run first, the two QEMU rows together while
// their domain exists. Run stops at the first row that fails: a lost,
// duplicated or failed command, a worker that did not start or stop
// cleanly.
func (b *Bench) Run() ([]*Row, error) {
	var failed error
	measure := func(run func() (*Row, error)) *Row {
		if failed != nil {
			return nil
		}
		from := time.Now()
		r, err := run()
		if err != nil {
			failed = err
			return nil
		}
		r.From, r.To = from, time.Now()
		b.t.Logf("%-42s %7d ops in %8s (%.0f/s)", r.What, r.S.ops, r.S.elapsed.Round(time.Millisecond), r.S.rate())
		return r
	}
	s, one, all := b.S, b.names[:1], b.names
	test1 := workerOptions{uri: testdriver.URI, concurrency: 1}
	test8 := workerOptions{uri: testdriver.URI, concurrency: 8}
	serial := measure(func() (*Row, error) { return b.baselineRow("go-libvirt serial", b.tdConn, one, s.Serial, startStop) })
	parallel := measure(func() (*Row, error) {
		return b.baselineRow("go-libvirt parallel", b.tdConn, all, s.Parallel, startStop)
	})
	c1 := measure(func() (*Row, error) {
		return b.liveRow("virtbus c1, one at a time", test1, alternate(one, s.Serial, startStop), 1)
	})
	c1Backlog := measure(func() (*Row, error) {
		return b.liveRow("virtbus c1, backlog", test1, alternate(all, s.Parallel/len(all), startStop), s.InFlight)
	})
	c8 := measure(func() (*Row, error) {
		return b.liveRow("virtbus c8, 8 domains", test8, alternate(all, s.Parallel/len(all), startStop), s.InFlight)
	})
	var qemuBase, qemuLive *Row
	if failed == nil {
		failed = b.withQEMU(func() error {
			vm := []string{b.qemu.Name}
			qemuBase = measure(func() (*Row, error) {
				return b.baselineRow("go-libvirt pause/resume (QEMU)", b.qemuCon, vm, s.QEMU, pauseResume)
			})
			qemuLive = measure(func() (*Row, error) {
				return b.liveRow("virtbus pause/resume (QEMU), one at a time",
					workerOptions{uri: "qemu:///system", concurrency: 1}, alternate(vm, s.QEMU, pauseResume), 1)
			})
			return failed
		})
	}
	var backlogs []*Row
	for _, n := range s.Backlogs {
		backlogs = append(backlogs, measure(func() (*Row, error) { return b.backlogRow(backlogName(n), n) }))
	}
	if failed != nil {
		return nil, failed
	}
	c1.Base, c1.Target = serial, p50Within(500*time.Microsecond)
	c1Backlog.Base, c1Backlog.Target = serial, rateAtLeast(0.9)
	c8.Base, c8.Target = parallel, rateAtLeast(0.9)
	qemuLive.Base, qemuLive.Target = qemuBase, p50Within(500*time.Microsecond)
	setBacklogTargets(backlogs)
	return append([]*Row{serial, parallel, qemuBase, c1, c1Backlog, c8, qemuLive}, backlogs...), nil
}

// setBacklogTargets gives each backlog row issue 9's memory target: at
// most 64 MiB, and flat, within a fifth of the smaller backlog's before it.
func setBacklogTargets(backlogs []*Row) {
	for i, r := range backlogs {
		var smaller *Row
		if i > 0 {
			smaller = backlogs[i-1]
		}
		r.Target = rssAtMost(64<<20, smaller)
	}
}
