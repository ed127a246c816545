package vm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// start creates (boots) the domain. Already running is ok and unchanged; a
// paused domain is resumed, since "start" means "make it run".
func (e *Executor) start(ctx context.Context, vm string) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
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
// destroyed once the timeout has passed; or at once with mode=force.
func (e *Executor) stop(ctx context.Context, vm string, p StopParams) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
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
// detail says so. hard: reset at once.
func (e *Executor) reboot(ctx context.Context, vm string, p RebootParams) (Result, error) {
	dom, st, err := e.find(ctx, vm)
	if err != nil {
		return Result{}, err
	}
	if st != libvirt.DomainRunning && st != libvirt.DomainBlocked {
		return Result{}, fmt.Errorf("%w: domain %s is %s; reboot needs a running domain (use start)", ErrConflict, vm, StateName(st))
	}
	detail := map[string]any{}
	if p.Mode == "soft" {
		var persistent int32
		err := e.conn.call(ctx, "is persistent "+vm, func(l *libvirt.Libvirt) (err error) {
			persistent, err = l.DomainIsPersistent(dom)
			return err
		})
		if err != nil {
			return Result{}, err
		}
		if persistent == 0 {
			return Result{}, fmt.Errorf("%w: domain %s is transient: a soft reboot shuts it down, which would remove it; use mode=hard", ErrConflict, vm)
		}
		down, err := e.shutdown(ctx, dom, time.Duration(p.Timeout))
		if err != nil {
			return Result{}, err
		}
		if down {
			detail["method"] = "shutdown"
			err = e.conn.call(ctx, "start "+vm, func(l *libvirt.Libvirt) error { return l.DomainCreate(dom) })
			if err != nil && !errors.Is(err, ErrConflict) {
				return Result{}, err
			}
			return e.verifyRunning(ctx, dom, detail)
		}
		detail["fallback"] = true
		e.log.Info("guest did not shut down in time; resetting", "vm", vm, "timeout", time.Duration(p.Timeout))
	}
	detail["method"] = "reset"
	if err := e.conn.call(ctx, "reset "+vm, func(l *libvirt.Libvirt) error { return l.DomainReset(dom, 0) }); err != nil {
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
	return Result{State: StateName(st), Detail: map[string]any{"uuid": uuidString(dom.UUID), "disks": disks}}, nil
}
