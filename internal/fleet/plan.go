// Package fleet is what the multi-host harnesses share: the cluster test
// (cmd/worker, `make cluster`) and the fleet simulation (this package's
// TestFleet, `make fleet`). Each plans commands for VMs spread over hosts,
// publishes them as a careful producer would on a NATS cluster, collects
// the completions and checks that every command completed once, on its own
// host, in publish order per VM, in the state its plan says.
package fleet

import "fmt"

// VM is one domain of a harness and the commands sent to it.
type VM struct {
	Host string
	Name string
	Cmds []Cmd // in publish order
}

// Cmd is one command and the state libvirt should report after it.
type Cmd struct {
	ID, Action, Body, State string
}

// moves are the commands a VM may get in each state, each with the state
// it leaves: all of them succeed, so every completion is ok.
var moves = map[string][]struct{ action, body, next string }{
	"shutoff": {{"start", "", "running"}, {"status", "", "shutoff"}},
	"running": {{"pause", "", "paused"}, {"stop", `{"mode":"force"}`, "shutoff"}, {"status", "", "running"}, {"start", "", "running"}},
	"paused":  {{"resume", "", "running"}, {"stop", `{"mode":"force"}`, "shutoff"}, {"status", "", "paused"}},
}

// Plan gives v n commands, starting from shut off: a walk through the
// states that differs from VM to VM (seed), so the VMs end in different
// states. Command ids are the VM's name and the command's number.
func (v *VM) Plan(seed, n int) {
	state := "shutoff"
	for k := range n {
		m := moves[state][(seed+k*k+2*k)%len(moves[state])]
		v.Cmds = append(v.Cmds, Cmd{ID: fmt.Sprintf("%s-%d", v.Name, k), Action: m.action, Body: m.body, State: m.next})
		state = m.next
	}
}

// IDs is every command id of vms.
func IDs(vms []*VM) []string {
	var ids []string
	for _, v := range vms {
		for _, c := range v.Cmds {
			ids = append(ids, c.ID)
		}
	}
	return ids
}
