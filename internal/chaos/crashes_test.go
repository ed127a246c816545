package chaos

import (
	"slices"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
)

// A QEMU log as libvirtd writes it, with the domain stopped three ways.
const qemuLog = `2026-11-28 07:00:01.100+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.0
-msg timestamp=on
2026-11-28 07:00:05.200+0000: shutting down, reason=destroyed
2026-11-28 07:00:06.300+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.0
2026-11-28 07:00:08.432+0000: shutting down, reason=crashed
2026-11-28 07:00:09.000+0000: shutting down, reason=shutdown
2026-11-28 07:00:10.500+0000: shutting down, reason=crashed
not a time: shutting down, reason=crashed
`

func at(clock string) time.Time {
	t, err := time.Parse(time.DateTime+".000", "2026-11-28 "+clock)
	if err != nil {
		panic(err)
	}
	return t
}

func TestCrashesInReadsOnlyCrashedLinesFromTheRun(t *testing.T) {
	got := crashesIn([]byte(qemuLog), at("07:00:00.000"))
	want := []time.Time{at("07:00:08.432"), at("07:00:10.500")}
	if !slices.EqualFunc(got, want, time.Time.Equal) {
		t.Fatalf("crashes %v, want %v", got, want)
	}
	if got := crashesIn([]byte(qemuLog), at("07:00:09.000")); len(got) != 1 || !got[0].Equal(at("07:00:10.500")) {
		t.Fatalf("crashes since 07:00:09: %v, want only the one at 07:00:10.500", got)
	}
}

// crashRun is a QEMU VM started, then sent an attach-disk that failed
// because libvirtd stopped the VM as crashed while it ran (the form of
// libvirt 9.0's stale EOF race a retried start cannot catch).
func crashRun(crashAt time.Time) (*evidence, Step) {
	v := &VM{Name: "q", Kind: KindQEMU, Host: "h"}
	start := Step{ID: "q-0000", VM: v, Action: "start", Index: 0}
	attach := Step{ID: "q-0001", VM: v, Action: "attach-disk", Index: 1}
	e := &evidence{
		o: &Outcome{Plans: map[string][]Step{"q": {start, attach}}},
		final: map[string]bus.Completion{
			start.ID: {ID: start.ID, Status: bus.StatusOK, StartedAt: at("07:00:06.000"), FinishedAt: at("07:00:06.900")},
			attach.ID: {ID: attach.ID, Status: bus.StatusError, StartedAt: at("07:00:06.901"), FinishedAt: at("07:00:08.500"),
				Error: &bus.Error{Code: bus.CodeConflict, Message: "Requested operation is not valid: domain is not running"}},
		},
		crashes: map[string][]time.Time{},
	}
	if !crashAt.IsZero() {
		e.crashes["q"] = []time.Time{crashAt}
	}
	return e, attach
}

func TestAnErrorAfterACrashIsExplained(t *testing.T) {
	e, attach := crashRun(at("07:00:08.432"))
	if why := e.explain(attach, e.final[attach.ID], nil, 3*time.Second, time.Time{}); why == "" {
		t.Fatal("an error ending after libvirtd stopped the VM as crashed is not explained")
	}
	e, attach = crashRun(time.Time{})
	if why := e.explain(attach, e.final[attach.ID], nil, 3*time.Second, time.Time{}); why != "" {
		t.Fatalf("with no crash the error is explained as %q", why)
	}
	e, attach = crashRun(at("07:00:09.000"))
	if why := e.explain(attach, e.final[attach.ID], nil, 3*time.Second, time.Time{}); why != "" {
		t.Fatalf("a crash after the error ended explains it as %q", why)
	}
}

func TestACrashStopsTheReplayedVM(t *testing.T) {
	e, _ := crashRun(at("07:00:08.432"))
	m, unsure := e.expect(e.o.Plans["q"][0].VM)
	if m.running || unsure[touchPower] != "" {
		t.Fatalf("after a crash the replay has running=%v (unsure %q), want shut off for sure", m.running, unsure[touchPower])
	}
	if unsure[touchDisk] == "" {
		t.Fatal("the attach-disk the crash broke leaves the disk sure")
	}
	e, _ = crashRun(time.Time{})
	if m, _ := e.expect(e.o.Plans["q"][0].VM); !m.running {
		t.Fatal("with no crash the replay has the VM shut off after its start")
	}
}
