package chaos

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
)

// Kind is the libvirt driver a VM lives on, and so which worker serves it.
type Kind string

const (
	KindQEMU Kind = "qemu" // real TCG domains on qemu:///system
	KindTest Kind = "test" // libvirt's test driver, test:///default
)

// VM is one domain the harness made and drives.
type VM struct {
	Name  string
	Kind  Kind
	Host  string // host id of the worker that serves it
	Image string // QEMU only: the image its attach-disk commands use
}

// Step is one command of a VM's plan.
type Step struct {
	ID     string
	VM     *VM
	Action string
	Body   string
	Index  int // position in the VM's plan, which is its publish order
}

// model is what a VM's commands have done to it: the plan's view while
// it is made, the completions' view when the final state is checked.
type model struct{ running, disk bool }

// touch says what part of a VM an action changes.
type touch int

const (
	touchNothing touch = iota
	touchPower
	touchDisk
)

// action is one row of the table that drives the commands: what is sent,
// when the plan may send it, and what it leaves behind.
type action struct {
	name     string
	weight   int
	qemuOnly bool // the test driver of libvirt 9 cannot attach or detach
	touches  touch
	allowed  func(m model) bool // nil: always
	body     func(v *VM) string // nil: empty
	apply    func(m *model)     // nil: changes nothing
}

// diskTarget is the one SCSI target each QEMU VM's image goes to.
const diskTarget = "sda"

var actions = []action{
	{name: "start", weight: 30, touches: touchPower, apply: func(m *model) { m.running = true }},
	{name: "stop", weight: 25, touches: touchPower, body: fixed(`{"mode":"force"}`),
		apply: func(m *model) { m.running = false }},
	// A reboot needs a running domain; the plan sends one only then.
	{name: "reboot", weight: 15, touches: touchPower, body: fixed(`{"mode":"hard"}`),
		allowed: func(m model) bool { return m.running }, apply: func(m *model) { m.running = true }},
	{name: "status", weight: 20},
	{name: "attach-disk", weight: 8, qemuOnly: true, touches: touchDisk, body: attachBody,
		allowed: func(m model) bool { return !m.disk }, apply: func(m *model) { m.disk = true }},
	{name: "detach-disk", weight: 8, qemuOnly: true, touches: touchDisk,
		// The default timeout (30s): under a chaos run's load a TCG guest
		// has been seen to keep a SCSI disk past 10s.
		body:    fixed(`{"target":"` + diskTarget + `"}`),
		allowed: func(m model) bool { return m.disk }, apply: func(m *model) { m.disk = false }},
}

func fixed(body string) func(*VM) string { return func(*VM) string { return body } }

func attachBody(v *VM) string {
	b, _ := json.Marshal(map[string]string{"path": v.Image, "bus": "scsi", "target": diskTarget})
	return string(b)
}

// actionNamed returns the table row of an action.
func actionNamed(name string) action {
	for _, a := range actions {
		if a.name == name {
			return a
		}
	}
	panic("chaos: no action " + name)
}

// planVM makes n commands for v, drawn by weight from the actions the
// plan's model of v allows. Every command is valid when the VM's commands
// run in order, so any error completion is the work of a fault.
func planVM(rng *rand.Rand, v *VM, n int) []Step {
	var m model
	steps := make([]Step, 0, n)
	for i := range n {
		a := pick(rng, v.Kind, m)
		s := Step{ID: fmt.Sprintf("%s-%04d", v.Name, i), VM: v, Action: a.name, Index: i}
		if a.body != nil {
			s.Body = a.body(v)
		}
		if a.apply != nil {
			a.apply(&m)
		}
		steps = append(steps, s)
	}
	return steps
}

func pick(rng *rand.Rand, k Kind, m model) action {
	var ok []action
	total := 0
	for _, a := range actions {
		if (a.qemuOnly && k != KindQEMU) || (a.allowed != nil && !a.allowed(m)) {
			continue
		}
		ok = append(ok, a)
		total += a.weight
	}
	n := rng.IntN(total)
	for _, a := range ok {
		if n -= a.weight; n < 0 {
			return a
		}
	}
	panic("unreachable")
}

// interleave merges the plans of one producer's VMs into its publish
// order: each VM's steps stay in order, and the VMs are drawn by how many
// steps they have left, so they run out together.
func interleave(rng *rand.Rand, plans [][]Step) []Step {
	var out []Step
	next := make([]int, len(plans))
	left := 0
	for _, p := range plans {
		left += len(p)
	}
	for ; left > 0; left-- {
		n := rng.IntN(left)
		for i, p := range plans {
			if n -= len(p) - next[i]; n < 0 {
				out = append(out, p[next[i]])
				next[i]++
				break
			}
		}
	}
	return out
}
