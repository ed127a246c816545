package bus

import "time"

// Domain state on the bus: every change of a domain's state the worker
// sees in libvirt, made by virtbus or not, is published on StateSubject
// and kept in StateBucket under StateKey (deleted when the domain is
// undefined), so a fleet can be read without asking each host.
const (
	// StatePrefix is the start of the state subjects.
	StatePrefix = "virtbus.state"
	// StateBucket is the KV bucket with the last state of every domain.
	StateBucket = "VIRTBUS_VMS"
)

// StateSubject is where host's worker publishes vm's state changes.
func StateSubject(host, vm string) string { return StatePrefix + "." + host + "." + vm }

// StateKey is vm's key in StateBucket.
func StateKey(host, vm string) string { return host + "." + vm }

// DomainState is one domain's state as libvirt reported it, the body of a
// state message and the value of its key.
type DomainState struct {
	Host string `json:"host"`
	VM   string `json:"vm"`
	UUID string `json:"uuid"`
	// State is lower case, as in completions: running, paused, shutdown,
	// shutoff, crashed, pmsuspended; "undefined" once the domain is gone.
	State string `json:"state"`
	// Reason is libvirt's reason for the state, lower case with dashes
	// (for shutoff: destroyed, shutdown, crashed, ...).
	Reason string `json:"reason"`
	// Event names what told the worker: a libvirt lifecycle event
	// (started, stopped, suspended, ...) or "resync" after a reconnect.
	Event string    `json:"event"`
	At    time.Time `json:"at"`
}
