package vm

import "fmt"

// Action is one of the closed set of things the executor can do to a domain.
type Action string

// The actions of the README's action table, status included.
const (
	Start      Action = "start"
	Stop       Action = "stop"
	Reboot     Action = "reboot"
	AttachDisk Action = "attach-disk"
	DetachDisk Action = "detach-disk"
	Status     Action = "status"
)

// Actions lists every action the executor knows, in the order of the docs.
var Actions = []Action{Start, Stop, Reboot, AttachDisk, DetachDisk, Status}

// ParseAction returns the action named s, or ErrInvalid.
func ParseAction(s string) (Action, error) {
	for _, a := range Actions {
		if string(a) == s {
			return a, nil
		}
	}
	return "", fmt.Errorf("%w: unknown action %q (known: start, stop, reboot, attach-disk, detach-disk, status)", ErrInvalid, clip(s))
}
