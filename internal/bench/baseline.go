package bench

import (
	"fmt"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// pair is the two operations a row alternates on each domain: the first
// leaves it in the state the second undoes.
type pair struct {
	actions [2]string // the virtbus actions
	direct  [2]func(l *libvirt.Libvirt, d libvirt.Domain) error
}

var (
	startStop = pair{
		actions: [2]string{"start", "stop"},
		direct: [2]func(*libvirt.Libvirt, libvirt.Domain) error{
			func(l *libvirt.Libvirt, d libvirt.Domain) error { return l.DomainCreate(d) },
			func(l *libvirt.Libvirt, d libvirt.Domain) error { return l.DomainDestroy(d) },
		},
	}
	pauseResume = pair{
		actions: [2]string{"pause", "resume"},
		direct: [2]func(*libvirt.Libvirt, libvirt.Domain) error{
			func(l *libvirt.Libvirt, d libvirt.Domain) error { return l.DomainSuspend(d) },
			func(l *libvirt.Libvirt, d libvirt.Domain) error { return l.DomainResume(d) },
		},
	}
)

// direct is a baseline: ops operations by hand over the one connection l,
// spread evenly over names, one goroutine per domain. Each operation is
// what a client without virtbus would do: look the domain up by name,
// then the call, p's two by turns.
func direct(l *libvirt.Libvirt, names []string, ops int, p pair) (sample, error) {
	per := ops / len(names)
	lat := make([][]time.Duration, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	start := time.Now()
	for i, name := range names {
		wg.Go(func() {
			lat[i] = make([]time.Duration, 0, per)
			for k := range per {
				t0 := time.Now()
				d, err := l.DomainLookupByName(name)
				if err == nil {
					err = p.direct[k%2](l, d)
				}
				if err != nil {
					errs[i] = fmt.Errorf("%s %s (operation %d): %w", p.actions[k%2], name, k, err)
					return
				}
				lat[i] = append(lat[i], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for i := range names {
		if errs[i] != nil {
			return sample{}, errs[i]
		}
		all = append(all, lat[i]...)
	}
	return newSample(len(all), elapsed, all), nil
}
