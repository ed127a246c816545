package fleet

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// Event is a completion and the subject it came on.
type Event struct {
	bus.Completion
	Subject string
}

func (e Event) String() string { return e.ID + "@" + e.Subject + "=" + e.Status }

// Collect gathers every completion on virtbus.evt.> that nc's node routes
// to it; waits give up after timeout.
func Collect(t testing.TB, nc *nats.Conn, timeout time.Duration) *bustest.Collector[Event] {
	t.Helper()
	return bustest.Collect(t, nc, "virtbus.evt.>", timeout, func(m *nats.Msg) (Event, string, error) {
		e := Event{Subject: m.Subject}
		if err := json.Unmarshal(m.Data, &e.Completion); err != nil {
			return e, "", err
		}
		if e.ID == "" {
			return e, "", errors.New("completion without an id")
		}
		return e, e.ID, nil
	})
}

// WaitAll waits for a completion of every command of vms on c, then for
// what was published before the wait ended, and returns all it holds.
func WaitAll(t testing.TB, c *bustest.Collector[Event], timeout time.Duration, vms []*VM) []Event {
	t.Helper()
	c.WaitIDs(t, timeout, IDs(vms)...)
	return c.Settled(t)
}

// Check checks the completions got of vms' commands: one per command (or
// identical copies: sent again after a broken connection), from its own
// host, on its own host's subject, each VM's first ones in publish order,
// each ok and reporting the state the VM's commands so far lead to —
// unless stateUnknown says the VM's domain was reset behind the harness's
// back. It returns how many commands had more than one copy.
func Check(t testing.TB, got []Event, vms []*VM, stateUnknown func(*VM) bool) (copied int) {
	t.Helper()
	byID := map[string][]Event{}
	byVM := map[string][]string{}
	attempts := map[string][]string{} // by VM: the ids' numbers and attempts, for a failure message
	for _, e := range got {
		if len(byID[e.ID]) == 0 {
			// The order is that of each command's first completion: a
			// copy (sent again after a broken connection, or answered
			// from the record on a redelivery) may come later.
			byVM[e.VM] = append(byVM[e.VM], e.ID)
		}
		byID[e.ID] = append(byID[e.ID], e)
		attempts[e.VM] = append(attempts[e.VM], fmt.Sprintf("%s(attempt %d)", strings.TrimPrefix(e.ID, e.VM+"-"), e.Attempt))
	}
	sent := map[string]bool{}
	for _, v := range vms {
		var want []string
		for _, c := range v.Cmds {
			want = append(want, c.ID)
			sent[c.ID] = true
			if checkOne(t, v, c, byID[c.ID], stateUnknown(v)) {
				copied++
			}
		}
		if !slices.Equal(byVM[v.Name], want) {
			t.Errorf("completions of %s (host %s) came in the order %v, want the publish order 0 to %d", v.Name, v.Host, attempts[v.Name], len(want)-1)
		}
	}
	for id, es := range byID {
		if !sent[id] {
			t.Errorf("completion of a command never sent: %v", es)
		}
	}
	return copied
}

// checkOne checks the completions of one command: one, or copies of one
// (the same completion sent again), never two different ones. It says
// whether there were copies.
func checkOne(t testing.TB, v *VM, c Cmd, es []Event, stateUnknown bool) bool {
	t.Helper()
	if len(es) == 0 {
		t.Errorf("command %s (%s %s) has no completion", c.ID, c.Action, v.Name)
		return false
	}
	e := es[0]
	for _, dup := range es[1:] {
		if !reflect.DeepEqual(dup.Completion, e.Completion) || dup.Subject != e.Subject {
			t.Errorf("command %s (%s %s) has different completions: %+v and %+v", c.ID, c.Action, v.Name, e.Completion, dup.Completion)
		}
	}
	if e.Host != v.Host || e.Subject != bus.EventSubject(v.Host, v.Name, c.Action) {
		t.Errorf("command %s for host %s completed by host %q on %s", c.ID, v.Host, e.Host, e.Subject)
	}
	if !stateUnknown && (e.Status != bus.StatusOK || e.State != c.State) {
		t.Errorf("command %s (%s %s): status %s error %+v state %q, want ok and %s", c.ID, c.Action, v.Name, e.Status, e.Error, e.State, c.State)
	}
	return len(es) > 1
}

// Counters reads a worker's /metrics at addr: each series by its name and
// labels as the page writes them (virtbus_reconnects_total{target="nats"}),
// and each metric family's sum over its series by its bare name.
func Counters(addr string) (map[string]float64, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/metrics: %s", addr, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse %s/metrics: %w", addr, err)
	}
	sums := map[string]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			sums[name] += v
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			if len(labels) > 0 {
				sums[name+"{"+strings.Join(labels, ",")+"}"] = v
			}
		}
	}
	return sums, nil
}

// Ran is how many commands a worker ran (a command answered from its
// record is not run and not counted), from its Counters.
func Ran(counters map[string]float64) int {
	return int(counters["virtbus_commands_completed_total"])
}
