// Package vm runs virtbus actions against one host's libvirtd through
// go-libvirt (no cgo). Every action is idempotent and reports the domain
// state it verified afterwards, not what a return code suggested. It knows
// nothing of NATS: the worker feeds it commands and publishes its results.
package vm

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// Result is what an action reports when it succeeds.
type Result struct {
	Changed bool           // whether the action changed anything
	State   string         // the domain state verified after the action
	Detail  map[string]any // what the action wants to say (forced, method, target, …)
}

// Config tunes an Executor. Zero values take the defaults.
type Config struct {
	Roots DiskRoots
	// ShutdownRetry is how often a graceful shutdown is asked again: a guest
	// that is still booting ignores the first ACPI request.
	ShutdownRetry time.Duration // default 10s
	// Poll is how often a state being waited for is looked at.
	Poll time.Duration // default 200ms
	// View, when set, names the domains known now (the worker's Watcher):
	// a command's domain is then found without asking libvirtd. nil: every
	// action looks its domain up in libvirtd.
	View DomainView
}

// DomainView finds a domain by name or UUID among those known now; a
// Watcher is one.
type DomainView interface {
	Lookup(vm string) (DomainInfo, bool)
}

// Executor runs actions against the domains of one libvirtd.
type Executor struct {
	conn *Conn
	cfg  Config
	log  *slog.Logger

	attaching chan struct{} // held by the attach past its sharing check

	// afterShutdown, set by tests only, runs when a soft reboot's shutdown is
	// done; an error ends the reboot there, before its start, as a worker
	// that crashed at that point would leave it.
	afterShutdown func() error
	// beforeUnplugAsk, set by tests only, runs before every unplug request,
	// once the unplug watches for the removal: where a test freezes libvirtd
	// to make the request go unanswered.
	beforeUnplugAsk func()
}

// NewExecutor returns an executor that talks through conn.
func NewExecutor(conn *Conn, cfg Config, log *slog.Logger) *Executor {
	if cfg.ShutdownRetry <= 0 {
		cfg.ShutdownRetry = 10 * time.Second
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 200 * time.Millisecond
	}
	return &Executor{conn: conn, cfg: cfg, log: log, attaching: make(chan struct{}, 1)}
}

// Do runs action on the domain named (or with the UUID) vm. params is the
// action's JSON parameter object; it may be empty. The error, if any,
// carries one of the package's sentinels (see Code).
func (e *Executor) Do(ctx context.Context, vm string, action Action, params json.RawMessage) (Result, error) {
	run, ok := runnerOf(action)
	if !ok {
		return Result{}, fmt.Errorf("%w: unknown action %q", ErrInvalid, clip(string(action)))
	}
	return run(e, ctx, vm, params)
}

// lookup finds a domain by UUID (when vm looks like one) or by name.
func (e *Executor) lookup(ctx context.Context, vm string) (libvirt.Domain, error) {
	var dom libvirt.Domain
	if uuid, ok := parseUUID(vm); ok {
		err := e.conn.call(ctx, "look up domain "+clip(vm), func(l *libvirt.Libvirt) (err error) {
			dom, err = l.DomainLookupByUUID(uuid)
			return err
		})
		if err == nil {
			return dom, nil
		}
		if !errors.Is(err, ErrNotFound) {
			return dom, err
		}
	}
	err := e.conn.call(ctx, "look up domain "+clip(vm), func(l *libvirt.Libvirt) (err error) {
		dom, err = l.DomainLookupByName(vm)
		return err
	})
	if errors.Is(err, ErrNotFound) {
		return dom, fmt.Errorf("%w: no domain %q on this host", ErrNotFound, clip(vm))
	}
	return dom, err
}

// find looks the domain up and reads its state: where every action starts.
// The state always comes from libvirtd, never from the view: the view
// hears of a change only after libvirtd's event, and an action decides on
// the state (a start of a domain that is running does nothing).
func (e *Executor) find(ctx context.Context, vm string) (libvirt.Domain, libvirt.DomainState, error) {
	if dom, ok := e.fromView(vm); ok {
		st, err := e.state(ctx, dom)
		if !errors.Is(err, ErrNotFound) {
			return dom, st, err
		}
		// The view is behind: the domain was undefined since, and maybe
		// defined again under the same name with another UUID.
	}
	dom, err := e.lookup(ctx, vm)
	if err != nil {
		return dom, 0, err
	}
	st, err := e.state(ctx, dom)
	return dom, st, err
}

// fromView is the domain named (or with the UUID) vm as the view knows
// it. libvirtd finds a domain by its UUID alone, so that and the name make
// a handle as good as a lookup's.
func (e *Executor) fromView(vm string) (libvirt.Domain, bool) {
	if e.cfg.View == nil {
		return libvirt.Domain{}, false
	}
	d, ok := e.cfg.View.Lookup(vm)
	if !ok || d.State == StateUndefined {
		return libvirt.Domain{}, false
	}
	u, ok := parseUUID(d.UUID)
	if !ok {
		return libvirt.Domain{}, false
	}
	return libvirt.Domain{Name: d.Name, UUID: u}, true
}

// parseUUID reads the 36-character form (or the bare 32 hex digits).
func parseUUID(s string) (libvirt.UUID, bool) {
	var u libvirt.UUID
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 || (len(s) != 32 && len(s) != 36) {
		return u, false
	}
	if _, err := hex.Decode(u[:], []byte(h)); err != nil {
		return u, false
	}
	return u, true
}

// state reads the domain's state.
func (e *Executor) state(ctx context.Context, dom libvirt.Domain) (libvirt.DomainState, error) {
	var st int32
	err := e.conn.call(ctx, "get state of "+dom.Name, func(l *libvirt.Libvirt) (err error) {
		st, _, err = l.DomainGetState(dom, 0)
		return err
	})
	return libvirt.DomainState(st), err
}

// waitState polls until the domain is in want, or until d has passed
// (reached=false, no error).
func (e *Executor) waitState(ctx context.Context, dom libvirt.Domain, want libvirt.DomainState, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	for {
		st, err := e.state(ctx, dom)
		if err != nil {
			return false, err
		}
		if st == want {
			return true, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("wait for %s to be %s: %w: %v", dom.Name, StateName(want), ErrUnavailable, context.Cause(ctx))
		case <-time.After(min(e.cfg.Poll, left)):
		}
	}
}

// StateName is the lower-case name of a libvirt domain state, as completions
// report it.
func StateName(s libvirt.DomainState) string {
	switch s {
	case libvirt.DomainRunning:
		return "running"
	case libvirt.DomainBlocked:
		return "blocked"
	case libvirt.DomainPaused:
		return "paused"
	case libvirt.DomainShutdown:
		return "shutdown"
	case libvirt.DomainShutoff:
		return "shutoff"
	case libvirt.DomainCrashed:
		return "crashed"
	case libvirt.DomainPmsuspended:
		return "pmsuspended"
	default:
		return "nostate"
	}
}
