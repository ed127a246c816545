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
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	res, err := e.startDomain(ctx, vm, dom, st)
	if err != nil {
		return Result{}, err
	}
	if err := e.clearIntent(ctx, dom); err != nil {
		return Result{}, err
	}
	return res, nil
}

// startDomain makes dom, found in state st, run.
func (e *Executor) startDomain(ctx context.Context, vm string, dom libvirt.Domain, st libvirt.DomainState) (Result, error) {
	var err error
	detail := map[string]any{}
	switch st {
	case libvirt.DomainRunning, libvirt.DomainBlocked:
		return Result{State: StateName(st)}, nil
	case libvirt.DomainPmsuspended:
		return Result{}, fmt.Errorf("%w: domain %s is pmsuspended; wake it from inside the guest", ErrConflict, vm)
	case libvirt.DomainPaused:
		err = e.conn.call(ctx, "resume "+vm, func(l *libvirt.Libvirt) error { return l.DomainResume(dom) })
		detail["resumed"] = true
	default:
		err = e.conn.call(ctx, "start "+vm, func(l *libvirt.Libvirt) error { return l.DomainCreate(dom) })
	}
	// A call repeated after a lost connection may find its own first try
	// already done; the state below is what counts.
	if err != nil && !errors.Is(err, ErrConflict) {
		return Result{}, err
	}
	if ok, werr := e.waitState(ctx, dom, libvirt.DomainRunning, 5*time.Second); werr != nil {
		return Result{}, werr
	} else if !ok {
		st, _ := e.state(ctx, dom)
		if err != nil {
			return Result{}, err
		}
		return Result{}, fmt.Errorf("%w: start %s: domain is %s, not running", ErrLibvirt, vm, StateName(st))
	}
	return Result{Changed: true, State: "running", Detail: detail}, nil
}

// stop shuts the domain off: gracefully with ACPI, asked again every
// ShutdownRetry (a guest still booting loses the first request), and
// destroyed once the timeout has passed; or at once with mode=force. A
// reboot intent the domain carries is removed: an operator's stop must not
// be undone by a reboot delivered again later.
func (e *Executor) stop(ctx context.Context, vm string, p StopParams) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	res, err := e.stopDomain(ctx, dom, st, p)
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
	if err := e.destroy(ctx, dom); err != nil {
		return Result{}, err
	}
	detail["forced"] = true
	return Result{Changed: true, State: "shutoff", Detail: detail}, nil
}

// shutdown asks the guest to power off (ACPI), again every ShutdownRetry,
// and waits up to timeout for it to be shut off.
func (e *Executor) shutdown(ctx context.Context, dom libvirt.Domain, timeout time.Duration) (bool, error) {
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
		down, err := e.waitShutoff(ctx, dom, min(e.cfg.ShutdownRetry, left))
		if err != nil || down {
			return down, err
		}
		if time.Until(deadline) <= 0 {
			return false, nil
		}
		e.log.Debug("guest still up; asking again", "vm", dom.Name)
	}
}

// waitShutoff waits for shutoff; a transient domain that vanished on its
// way down counts as shut off.
func (e *Executor) waitShutoff(ctx context.Context, dom libvirt.Domain, d time.Duration) (bool, error) {
	ok, err := e.waitState(ctx, dom, libvirt.DomainShutoff, d)
	if errors.Is(err, ErrNotFound) {
		return true, nil
	}
	return ok, err
}

// destroy powers the domain off at once and verifies it.
func (e *Executor) destroy(ctx context.Context, dom libvirt.Domain) error {
	err := e.conn.call(ctx, "destroy "+dom.Name, func(l *libvirt.Libvirt) error { return l.DomainDestroy(dom) })
	if err != nil && !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) {
		return err
	}
	down, werr := e.waitShutoff(ctx, dom, 5*time.Second)
	if werr != nil {
		return werr
	}
	if !down {
		if err != nil {
			return err
		}
		return fmt.Errorf("%w: destroy %s: domain still not shut off", ErrLibvirt, dom.Name)
	}
	return nil
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
	err := e.conn.call(ctx, "start "+dom.Name, func(l *libvirt.Libvirt) error { return l.DomainCreate(dom) })
	// conflict: a call repeated after a lost connection found its first try
	// done; verifyRunning says what counts.
	if err != nil && !errors.Is(err, ErrConflict) {
		return Result{}, err
	}
	return e.verifyRunning(ctx, dom, detail)
}

func (e *Executor) verifyRunning(ctx context.Context, dom libvirt.Domain, detail map[string]any) (Result, error) {
	ok, err := e.waitState(ctx, dom, libvirt.DomainRunning, 5*time.Second)
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
