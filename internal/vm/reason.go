package vm

import "github.com/digitalocean/go-libvirt"

// Words for libvirt's numbers, for people and scripts that read the state
// messages: libvirt's own names (virsh domstate --reason), lower case with
// dashes. A number a newer libvirt added is "unknown" rather than a number
// nobody can look up.

// reasons lists, per state, the words of libvirt's reason numbers in order
// (libvirt-domain.h: virDomainRunningReason, virDomainPausedReason, ...).
var reasons = map[libvirt.DomainState][]string{
	libvirt.DomainNostate: {"unknown"},
	libvirt.DomainRunning: {"unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused",
		"migration-canceled", "save-canceled", "wakeup", "crashed", "postcopy", "postcopy-failed"},
	libvirt.DomainBlocked: {"unknown"},
	libvirt.DomainPaused: {"unknown", "user", "migration", "save", "dump", "ioerror", "watchdog",
		"from-snapshot", "shutting-down", "snapshot", "crashed", "starting-up", "postcopy",
		"postcopy-failed", "api-error"},
	libvirt.DomainShutdown: {"unknown", "user"},
	libvirt.DomainShutoff: {"unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
		"from-snapshot", "daemon"},
	libvirt.DomainCrashed:     {"unknown", "panicked"},
	libvirt.DomainPmsuspended: {"unknown"},
}

// ReasonName is the word for reason in state st, as DomainGetState reports
// them.
func ReasonName(st libvirt.DomainState, reason int32) string {
	words := reasons[st]
	if reason < 0 || int(reason) >= len(words) {
		return "unknown"
	}
	return words[reason]
}

// events lists the words of libvirt's lifecycle event numbers in order
// (virDomainEventType).
var events = []string{"defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
	"pmsuspended", "crashed"}

// EventName is the word for a lifecycle event number.
func EventName(ev int32) string {
	if ev < 0 || int(ev) >= len(events) {
		return "unknown"
	}
	return events[ev]
}
