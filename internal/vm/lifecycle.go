package vm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// start creates (boots) the domain. Already running is ok and unchanged; a
// paused domain is resumed, since "start" means "make it run". A reboot
// intent the domain carries is void once it runs, and is removed.
func (e *Executor) start(ctx context.Context, vm string) (Result, error) {
	dom, res, err := e.act(ctx, vm, planStart)
	return e.voidIntent(ctx, dom, res, err)
}

// planStart makes a domain run.
func planStart(vm string, st libvirt.DomainState) (move, error) {
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return move{}, nil
	case libvirt.DomainPmsuspended:
		return move{}, fmt.Errorf("%w: domain %s is pmsuspended; wake it from inside the guest", ErrConflict, vm)
	case libvirt.DomainPaused:
		return move{verb: "resume", call: (*libvirt.Libvirt).DomainResume, want: libvirt.DomainRunning, detail: map[string]any{"resumed": true}}, nil
	}
	return startMove(map[string]any{}), nil
}

func startMove(detail map[string]any) move {
	return move{verb: "start", call: (*libvirt.Libvirt).DomainCreate, want: libvirt.DomainRunning, detail: detail, starts: true}
}

// stop shuts the domain off: gracefully with ACPI, asked again every
// ShutdownRetry (a guest still booting loses the first request), and
// destroyed once the timeout has passed; or at once with mode=force. A
// reboot intent the domain carries is removed: an operator's stop must not
// be undone by a reboot delivered again later.
func (e *Executor) stop(ctx context.Context, vm string, p StopParams) (Result, error) {
	if p.Mode == "force" {
		dom, res, err := e.act(ctx, vm, planForcedStop)
		return e.voidIntent(ctx, dom, res, err)
	}
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	res, err := e.stopDomain(ctx, dom, st, p)
	return e.voidIntent(ctx, dom, res, err)
}

// planForcedStop destroys a domain that is not shut off.
func planForcedStop(_ string, st libvirt.DomainState) (move, error) {
	if st == libvirt.DomainShutoff {
		return move{}, nil
	}
	return destroyMove(map[string]any{"forced": true}), nil
}

func destroyMove(detail map[string]any) move {
	return move{verb: "destroy", call: (*libvirt.Libvirt).DomainDestroy, want: libvirt.DomainShutoff, detail: detail}
}

// voidIntent ends a start or stop that went well by removing the reboot
// intent dom carries: it is void now (see intent.go).
func (e *Executor) voidIntent(ctx context.Context, dom libvirt.Domain, res Result, err error) (Result, error) {
	if err != nil {
		return Result{}, err
	}
	if err := e.clearIntent(ctx, dom); err != nil {
		return Result{}, err
	}
	return res, nil
}

// stopDomain shuts dom, found in state st, off.
func (e *Executor) stopDomain(ctx context.Context, dom libvirt.Domain, st libvirt.DomainState, p StopParams) (Result, error) {
	if st == libvirt.DomainShutoff {
		return Result{State: "shutoff"}, nil
	}
	detail := map[string]any{"forced": false}
	graceful := p.Mode == "graceful" && st != libvirt.DomainPaused && st != libvirt.DomainCrashed
	if p.Mode == "graceful" && !graceful {
		// A paused or crashed guest cannot act on ACPI; waiting would only
		// delay the destroy that has to come.
		detail["reason"] = StateName(st)
	}
	if graceful {
		down, err := e.shutdown(ctx, dom, time.Duration(p.Timeout))
		if err != nil {
			return Result{}, err
		}
		if down {
			return Result{Changed: true, State: "shutoff", Detail: detail}, nil
		}
	}
	detail["forced"] = true
	return e.carry(ctx, dom.Name, dom, destroyMove(detail))
}

// shutdown asks the guest to power off (ACPI), again every ShutdownRetry,
// and waits up to timeout for it to be shut off.
func (e *Executor) shutdown(ctx context.Context, dom libvirt.Domain, timeout time.Duration) (bool, error) {
	// One registration for all the requests: the guest may act on any.
	a := e.await(dom)
	defer a.Close()
	deadline := time.Now().Add(timeout)
	for {
		err := e.conn.call(ctx, "shut down "+dom.Name, func(l *libvirt.Libvirt) error {
			return l.DomainShutdownFlags(dom, libvirt.DomainShutdownAcpiPowerBtn)
		})
		// conflict: the domain went down between our look and the request.
		if err != nil && !errors.Is(err, ErrConflict) {
			return false, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		asked := err == nil
		down, err := e.awaitState(ctx, a, dom, libvirt.DomainShutoff, min(e.cfg.ShutdownRetry, left), asked)
		if err != nil || down {
			return down, err
		}
		if time.Until(deadline) <= 0 {
			return false, nil
		}
		e.log.Debug("guest still up; asking again", "vm", dom.Name)
	}
}

// reboot restarts a running domain. soft: graceful shutdown, wait, start
// again; when the guest does not go down in time it is hard-reset, and the
// detail says so. hard: reset at once. A soft reboot records its intent in
// the domain before the shutdown (see intent.go), so that a reboot cut off
// between shutdown and start is finished by the next one.
func (e *Executor) reboot(ctx context.Context, vm string, p RebootParams) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	res, err := e.rebootDomain(ctx, dom, st, p)
	if errors.Is(err, ErrUnavailable) {
		// Not over: the worker tries again, and that try needs the intent.
		return Result{}, err
	}
	// Over, ok or not. The command's context may have ended with it; the
	// clean-up is bounded by the call timeout all the same.
	if cerr := e.clearIntent(context.WithoutCancel(ctx), dom); cerr != nil {
		// Not worth failing a reboot that happened: a retry would reboot
		// again. The stale intent only matters to a later reboot of a shut
		// off domain, and the next start or stop removes it.
		e.log.Warn("reboot over, but its intent is left in the domain", "vm", dom.Name, "err", cerr)
	}
	return res, err
}

// rebootDomain reboots dom, found in state st. A domain that is not running
// qualifies only with the intent of a reboot cut off after its shutdown:
// this reboot finishes that one ("continued" in the detail).
func (e *Executor) rebootDomain(ctx context.Context, dom libvirt.Domain, st libvirt.DomainState, p RebootParams) (Result, error) {
	detail := map[string]any{}
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
	case libvirt.DomainShutoff, libvirt.DomainShutdown:
		intent, err := e.readIntent(ctx, dom)
		if err != nil {
			return Result{}, err
		}
		if intent == nil {
			return Result{}, notRunning(dom, st)
		}
		e.log.Info("finishing a reboot cut off after its shutdown", "vm", dom.Name, "since", intent.Since, "state", StateName(st))
		detail["continued"] = true
		if st == libvirt.DomainShutoff {
			detail["method"] = "shutdown"
			return e.startAgain(ctx, dom, detail)
		}
		// Still on its way down: the soft path below waits for it.
	default:
		return Result{}, notRunning(dom, st)
	}
	if p.Mode == "soft" {
		res, down, err := e.softReboot(ctx, dom, time.Duration(p.Timeout), detail)
		if err != nil || down {
			return res, err
		}
	}
	detail["method"] = "reset"
	if err := e.conn.call(ctx, "reset "+dom.Name, func(l *libvirt.Libvirt) error { return l.DomainReset(dom, 0) }); err != nil {
		return Result{}, err
	}
	return e.verifyRunning(ctx, dom, detail)
}

func notRunning(dom libvirt.Domain, st libvirt.DomainState) error {
	return fmt.Errorf("%w: domain %s is %s; reboot needs a running domain (use start)", ErrConflict, dom.Name, StateName(st))
}

// softReboot records the intent, shuts the guest down and starts it again.
// down is false when the guest did not go down within timeout: the caller
// resets it then.
func (e *Executor) softReboot(ctx context.Context, dom libvirt.Domain, timeout time.Duration, detail map[string]any) (res Result, down bool, err error) {
	flags, err := e.intentFlags(ctx, dom)
	if err != nil {
		return Result{}, false, err
	}
	if flags&libvirt.DomainAffectConfig == 0 {
		return Result{}, false, fmt.Errorf("%w: domain %s is transient: a soft reboot shuts it down, which would remove it; use mode=hard", ErrConflict, dom.Name)
	}
	if err := e.setIntent(ctx, dom, time.Now(), flags); err != nil {
		return Result{}, false, err
	}
	if down, err = e.shutdown(ctx, dom, timeout); err != nil {
		return Result{}, false, err
	}
	if !down {
		detail["fallback"] = true
		e.log.Info("guest did not shut down in time; resetting", "vm", dom.Name, "timeout", timeout)
		return Result{}, false, nil
	}
	if e.afterShutdown != nil {
		if err := e.afterShutdown(); err != nil {
			return Result{}, true, err
		}
	}
	detail["method"] = "shutdown"
	res, err = e.startAgain(ctx, dom, detail)
	return res, true, err
}

// startAgain starts dom after a reboot's shutdown and verifies it runs.
func (e *Executor) startAgain(ctx context.Context, dom libvirt.Domain, detail map[string]any) (Result, error) {
	return e.carry(ctx, dom.Name, dom, startMove(detail))
}

// verifyRunning verifies that dom runs after a reset, which leaves it
// running and so tells no lifecycle event: libvirtd is asked at once.
func (e *Executor) verifyRunning(ctx context.Context, dom libvirt.Domain, detail map[string]any) (Result, error) {
	ok, err := e.waitState(ctx, dom, libvirt.DomainRunning, confirmWait)
	if err != nil {
		return Result{}, err
	}
	if !ok {
		st, _ := e.state(ctx, dom)
		return Result{}, fmt.Errorf("%w: %s is %s after reboot, not running", ErrLibvirt, dom.Name, StateName(st))
	}
	return Result{Changed: true, State: "running", Detail: detail}, nil
}

// status reports the state and the disks, changing nothing.
func (e *Executor) status(ctx context.Context, vm string) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	def, err := e.domainXML(ctx, dom, 0)
	if err != nil {
		return Result{}, err
	}
	disks := []map[string]any{}
	if def.Devices != nil {
		for _, d := range def.Devices.Disks {
			disks = append(disks, map[string]any{"target": diskTarget(d), "source": diskSource(d), "bus": diskBus(d)})
		}
	}
	return Result{State: StateName(st), Detail: map[string]any{"uuid": UUIDString(dom.UUID), "disks": disks}}, nil
}
