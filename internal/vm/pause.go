package vm

import (
	"context"
	"fmt"

	"github.com/digitalocean/go-libvirt"
)

// pause stops the vCPUs of a running domain (virsh suspend): the guest keeps
// its memory and devices, and runs again on resume. Already paused is ok and
// unchanged, so a redelivered pause is harmless.
func (e *Executor) pause(ctx context.Context, vm string) (Result, error) {
	_, res, err := e.act(ctx, vm, planPause)
	return res, err
}

func planPause(vm string, st libvirt.DomainState) (move, error) {
	switch st {
	case libvirt.DomainPaused:
		return move{}, nil
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return move{verb: "pause", call: (*libvirt.Libvirt).DomainSuspend, want: libvirt.DomainPaused}, nil
	case libvirt.DomainPmsuspended:
		return move{}, pmsuspended("pause", vm)
	}
	// Only a running guest has vCPUs to stop: a shut-off domain has none,
	// and pausing one that is shutting down or crashed would only hold it
	// half-way.
	return move{}, fmt.Errorf("pause %s: %w: domain is %s; pause needs a running domain", vm, ErrConflict, StateName(st))
}

// resume lets a paused domain's vCPUs run again (virsh resume). Already
// running is ok and unchanged. Unlike start it does not boot a shut-off
// domain: a resume that meets one was meant for a domain that was paused,
// and something else has happened to it since.
func (e *Executor) resume(ctx context.Context, vm string) (Result, error) {
	_, res, err := e.act(ctx, vm, planResume)
	return res, err
}

func planResume(vm string, st libvirt.DomainState) (move, error) {
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return move{}, nil
	case libvirt.DomainPaused:
		return move{verb: "resume", call: (*libvirt.Libvirt).DomainResume, want: libvirt.DomainRunning}, nil
	case libvirt.DomainPmsuspended:
		return move{}, pmsuspended("resume", vm)
	}
	return move{}, fmt.Errorf("resume %s: %w: domain is %s; resume needs a paused domain (use start)", vm, ErrConflict, StateName(st))
}

// pmsuspended is the conflict of a pause or resume on a domain whose guest
// suspended itself to RAM: its vCPUs are already stopped, by the guest, and
// only a wake-up brings it back, which resume is not.
func pmsuspended(verb, vm string) error {
	return fmt.Errorf("%s %s: %w: domain is pmsuspended (the guest suspended itself to RAM); "+
		"pause and resume do not apply until it is woken (virsh dompmwakeup)", verb, vm, ErrConflict)
}
