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
	"sync"
	"sync/atomic"
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
	// View, when set, names the domains known now and hears their
	// lifecycle events (the worker's Watcher): a command's domain is then
	// found without asking libvirtd, a start, forced stop, pause or resume
	// acts on the state the view knows (see act), and waits end on
	// libvirt's events rather than by asking. nil: every action looks its
	// domain up in libvirtd, reads its state there and polls.
	View DomainView
}

// DomainView knows the domains of the host and hears their lifecycle
// events; a Watcher is one.
type DomainView interface {
	// Lookup finds a domain by name or UUID among those known now, with
	// the latest state libvirtd told of it.
	Lookup(vm string) (DomainInfo, bool)
	// Await registers for the lifecycle events of the domain with UUID u
	// from now on; nil when none would come.
	Await(u libvirt.UUID) *Awaiting
	// Definition numbers what is known of the definition of the domain
	// with UUID u: it changes whenever the domain may have been defined
	// anew since (an event said so, or events could have been missed),
	// and is 0 when nothing can be known (no live subscription).
	Definition(u libvirt.UUID) uint64
}

// Executor runs actions against the domains of one libvirtd.
type Executor struct {
	conn *Conn
	cfg  Config
	log  *slog.Logger

	attaching chan struct{} // held by the attach past its sharing check
	tails     tails         // requests confirmed before libvirtd answered them
	// intentFree holds the domains known to carry no reboot intent, by
	// UUID, with the View's Definition they were known for (see
	// clearIntent).
	intentFree sync.Map
	nfree      atomic.Int64

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

// find looks the domain up and reads its state from libvirtd: where the
// actions start that read it before deciding (see act for those that
// decide on the view's).
func (e *Executor) find(ctx context.Context, vm string) (libvirt.Domain, libvirt.DomainState, error) {
	dom, _, known := e.fromView(vm)
	return e.reread(ctx, vm, dom, known)
}

// reread reads the state of dom, the domain vm as it was known (known:
// else it is looked up). A domain gone since is looked up anew: it may
// have been defined again under the same name, with another UUID.
func (e *Executor) reread(ctx context.Context, vm string, dom libvirt.Domain, known bool) (libvirt.Domain, libvirt.DomainState, error) {
	if known {
		st, err := e.state(ctx, dom)
		if !errors.Is(err, ErrNotFound) {
			return dom, st, err
		}
	}
	dom, err := e.lookup(ctx, vm)
	if err != nil {
		return dom, 0, err
	}
	st, err := e.state(ctx, dom)
	return dom, st, err
}

// fromView is the domain named (or with the UUID) vm and its state as the
// view knows them. libvirtd finds a domain by its UUID alone, so that and
// the name make a handle as good as a lookup's.
func (e *Executor) fromView(vm string) (libvirt.Domain, libvirt.DomainState, bool) {
	if e.cfg.View == nil {
		return libvirt.Domain{}, 0, false
	}
	d, ok := e.cfg.View.Lookup(vm)
	if !ok {
		return libvirt.Domain{}, 0, false
	}
	st, ok := stateNamed(d.State)
	u, uok := parseUUID(d.UUID)
	if !ok || !uok {
		// Undefined: the domain is gone, or runs on as a transient one.
		return libvirt.Domain{}, 0, false
	}
	return libvirt.Domain{Name: d.Name, UUID: u}, st, true
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

// waitState waits until the domain is in want, or until d has passed
// (reached=false, no error). It asks libvirtd at once, then waits for an
// event saying so (see awaitState).
func (e *Executor) waitState(ctx context.Context, dom libvirt.Domain, want libvirt.DomainState, d time.Duration) (bool, error) {
	a := e.await(dom)
	defer a.Close()
	return e.awaitState(ctx, a, dom, want, d, false)
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

// stateNamed is the state StateName calls name.
func stateNamed(name string) (libvirt.DomainState, bool) {
	for st := libvirt.DomainNostate; st <= libvirt.DomainPmsuspended; st++ {
		if StateName(st) == name {
			return st, true
		}
	}
	return 0, false
}
