package vm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// pause stops the vCPUs of a running domain (virsh suspend): the guest keeps
// its memory and devices, and runs again on resume. Already paused is ok and
// unchanged, so a redelivered pause is harmless.
func (e *Executor) pause(ctx context.Context, vm string) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	switch st {
	case libvirt.DomainPaused:
		return Result{State: StateName(st)}, nil
	case libvirt.DomainRunning, libvirt.DomainBlocked:
	case libvirt.DomainPmsuspended:
		return Result{}, pmsuspended("pause", vm)
	default:
		// Only a running guest has vCPUs to stop: a shut-off domain has
		// none, and pausing one that is shutting down or crashed would
		// only hold it half-way.
		return Result{}, fmt.Errorf("pause %s: %w: domain is %s; pause needs a running domain", vm, ErrConflict, StateName(st))
	}
	err = e.conn.call(ctx, "pause "+vm, func(l *libvirt.Libvirt) error { return l.DomainSuspend(dom) })
	return e.confirm(ctx, "pause", vm, dom, libvirt.DomainPaused, err)
}

// resume lets a paused domain's vCPUs run again (virsh resume). Already
// running is ok and unchanged. Unlike start it does not boot a shut-off
// domain: a resume that meets one was meant for a domain that was paused,
// and something else has happened to it since.
func (e *Executor) resume(ctx context.Context, vm string) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return Result{State: StateName(st)}, nil
	case libvirt.DomainPaused:
	case libvirt.DomainPmsuspended:
		return Result{}, pmsuspended("resume", vm)
	default:
		return Result{}, fmt.Errorf("resume %s: %w: domain is %s; resume needs a paused domain (use start)", vm, ErrConflict, StateName(st))
	}
	err = e.conn.call(ctx, "resume "+vm, func(l *libvirt.Libvirt) error { return l.DomainResume(dom) })
	return e.confirm(ctx, "resume", vm, dom, libvirt.DomainRunning, err)
}

// pmsuspended is the conflict of a pause or resume on a domain whose guest
// suspended itself to RAM: its vCPUs are already stopped, by the guest, and
// only a wake-up brings it back, which resume is not.
func pmsuspended(verb, vm string) error {
	return fmt.Errorf("%s %s: %w: domain is pmsuspended (the guest suspended itself to RAM); "+
		"pause and resume do not apply until it is woken (virsh dompmwakeup)", verb, vm, ErrConflict)
}

// confirm reports the state libvirt shows after a pause or resume whose
// request returned callErr, not what the return code suggests.
func (e *Executor) confirm(ctx context.Context, verb, vm string, dom libvirt.Domain, want libvirt.DomainState, callErr error) (Result, error) {
	// conflict: a request repeated after a lost connection may find its
	// first try done (libvirt answers a second resume "already running"),
	// or the domain changed between our look and the request. The state
	// as it is now decides, with nothing to wait for.
	if callErr != nil && !errors.Is(callErr, ErrConflict) {
		return Result{}, callErr
	}
	wait := 5 * time.Second
	if callErr != nil {
		wait = 0
	}
	ok, err := e.waitState(ctx, dom, want, wait)
	if err != nil {
		return Result{}, err
	}
	if !ok {
		if callErr != nil {
			return Result{}, callErr
		}
		st, _ := e.state(ctx, dom)
		return Result{}, fmt.Errorf("%s %s: %w: domain is %s, not %s", verb, vm, ErrLibvirt, StateName(st), StateName(want))
	}
	return Result{Changed: true, State: StateName(want)}, nil
}
