package vm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// confirmWait bounds the wait for the state a request brings about at
// once (a start, a destroy, a pause, a resume, a reset).
const confirmWait = 5 * time.Second

// eventPoll is how long a wait hears only events before it asks libvirtd,
// and then how often it asks while events can come. An event follows its
// change within milliseconds, so one missing means a change still under
// way (a guest shutting down) or, rarely, an event lost: asking is the
// safety net, not the way.
const eventPoll = time.Second

// A move is the one request an action makes of a domain in the state it
// found: call, meant to bring the domain to want.
type move struct {
	verb   string // the request, for errors: "start", "destroy", …
	call   func(l *libvirt.Libvirt, dom libvirt.Domain) error
	want   libvirt.DomainState
	detail map[string]any // the result's, once want is reached
	// starts says call starts QEMU: tried once more when QEMU died while
	// libvirtd started it (see diedStarting).
	starts bool
}

// reached is the result of m once its domain is in m.want.
func (m move) reached() Result {
	return Result{Changed: true, State: StateName(m.want), Detail: m.detail}
}

// A plan decides the move of an action on the domain vm in state st: a
// move, none (a nil call: the domain is as wanted already) or a refusal.
type plan func(vm string, st libvirt.DomainState) (move, error)

// act carries out the move p plans on the domain vm: start, forced stop,
// pause and resume. When the view knows the domain, its state decides and
// the request is the action's one call. The view hears of a change only
// after libvirtd's event, so what it alone cannot tell is checked against
// libvirtd, and act decides once more on the state read there: an answer
// without a request (nothing to do, a refusal: a virsh destroy a moment
// ago must not make "already shut off" of a running domain), a request
// refused as conflict (the state was another), and one refused as not
// found (the domain was undefined, maybe defined again under the same
// name with another UUID, which a lookup finds). dom is the domain acted on.
func (e *Executor) act(ctx context.Context, vm string, p plan) (libvirt.Domain, Result, error) {
	dom, st, known := e.fromView(vm)
	if known {
		if m, perr := p(vm, st); perr == nil && m.call != nil {
			s, err := e.send(ctx, vm, dom, m)
			if err == nil {
				res, err := e.confirm(ctx, s, vm, dom, m)
				return dom, res, err
			}
			if !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) {
				return dom, Result{}, err
			}
			known = !errors.Is(err, ErrNotFound)
		}
	}
	dom, st, err := e.reread(ctx, vm, dom, known)
	if err != nil {
		return dom, Result{}, err
	}
	m, err := p(vm, st)
	switch {
	case err != nil:
		return dom, Result{}, err
	case m.call == nil:
		return dom, Result{State: StateName(st)}, nil
	}
	res, err := e.carry(ctx, vm, dom, m)
	return dom, res, err
}

// carry makes the move m on dom, whose state was just read from libvirtd.
// A request refused as conflict (for a destroy, also as not found) then
// means the domain changed since the read, or a request repeated after a
// lost connection found its first try done (libvirt answers a second start
// "already running"): the state as it is now decides, with nothing to
// wait for.
func (e *Executor) carry(ctx context.Context, vm string, dom libvirt.Domain, m move) (Result, error) {
	s, err := e.send(ctx, vm, dom, m)
	if err == nil {
		return e.confirm(ctx, s, vm, dom, m)
	}
	gone := errors.Is(err, ErrNotFound) && m.want == libvirt.DomainShutoff
	if !errors.Is(err, ErrConflict) && !gone {
		return Result{}, err
	}
	there, rerr := e.isIn(ctx, dom, m.want)
	if rerr != nil {
		return Result{}, rerr
	}
	if !there {
		return Result{}, err
	}
	return m.reached(), nil
}

// sent is a request libvirtd took: its registration for the domain's
// events, and whether the event of the wanted state came before libvirtd's
// answer.
type sent struct {
	a     *Awaiting
	heard bool
}

// send registers for dom's events and sends m's request: in this order,
// so that the event the request causes cannot pass unheard. confirm ends
// the registration; a request that failed leaves none. When the event of
// m.want comes before libvirtd answers (QEMU: libvirtd saves the domain's
// status after the change, and answers 0.1 to 4 ms after its event), the
// change is confirmed then: the answer still comes, and the domain's next
// request waits for it (see tail). A request waits for the domain's last
// one's answer itself. A start whose QEMU died on the way is sent once
// more (see diedStarting).
func (e *Executor) send(ctx context.Context, vm string, dom libvirt.Domain, m move) (*sent, error) {
	e.tails.wait(dom.UUID)
	for again := false; ; again = true {
		s, err := e.request(ctx, vm, dom, m)
		if err == nil || again || !m.starts || !diedStarting(err) {
			return s, err
		}
		e.log.Info("QEMU died while libvirtd started it; starting once more", "vm", vm, "err", err, "after", startAgainAfter)
		if err := pause(ctx, startAgainAfter); err != nil {
			return nil, err
		}
	}
}

// request is one try of send: the registration, the request, and the wait
// for its answer or its event.
func (e *Executor) request(ctx context.Context, vm string, dom libvirt.Domain, m move) (*sent, error) {
	a := e.await(dom)
	answer := make(chan error, 1)
	go func() {
		answer <- e.conn.call(ctx, m.verb+" "+vm, func(l *libvirt.Libvirt) error { return m.call(l, dom) })
	}()
	heard, err := answerOrEvent(a, answer, m.want)
	if heard {
		e.tails.keep(dom.UUID, func() {
			if err := <-answer; err != nil {
				e.log.Warn("libvirt answered a request with an error after its event confirmed the change", "vm", vm, "request", m.verb, "err", err)
			}
		})
		return &sent{a: a, heard: true}, nil
	}
	if err != nil {
		a.Close()
		return nil, err
	}
	return &sent{a: a}, nil
}

// answerOrEvent waits for libvirtd's answer to a request, or for an event
// of a saying the domain is in want, whichever comes first (heard: the
// event).
func answerOrEvent(a *Awaiting, answer <-chan error, want libvirt.DomainState) (heard bool, err error) {
	lost := a.ended()
	for {
		select {
		case err := <-answer:
			return false, err
		case st := <-a.events():
			if st == StateName(want) {
				return true, nil
			}
		case <-lost:
			return false, <-answer
		}
	}
}

// startAgainAfter is the pause before a start that diedStarting allows
// once more.
const startAgainAfter = 500 * time.Millisecond

// diedStarting reports whether a start failed because QEMU died while
// libvirtd was starting it. libvirt 9.0 (Debian 12) handles the monitor
// EOF of a QEMU it has just destroyed only after the destroy returned; a
// start in that moment gets a new QEMU that the late EOF handler then
// kills as crashed ("domain is no longer running", libvirtd's QEMU log
// says "reason=crashed"). A second start finds the domain shut off and
// works. A QEMU that cannot start at all (a missing disk) fails the second
// time too, with its own message, half a second later.
func diedStarting(err error) bool {
	return errors.Is(err, ErrLibvirt) && SaysDiedStarting(err.Error())
}

// SaysDiedStarting reports whether msg, libvirt's error for a failed
// start, carries one of its words for a QEMU that died while libvirtd
// started it. The chaos harness reads completions' messages with it.
func SaysDiedStarting(msg string) bool {
	for _, said := range []string{"domain is no longer running", "process exited while connecting to monitor", "qemu unexpectedly closed the monitor"} {
		if strings.Contains(msg, said) {
			return true
		}
	}
	return false
}

// pause waits d, or returns ctx's error as ErrUnavailable.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return fmt.Errorf("%w: %v", ErrUnavailable, context.Cause(ctx))
	case <-t.C:
		return nil
	}
}

// confirm waits for m's request to take effect and reports the state
// libvirt confirmed, by its event or when asked, never the request's
// return code.
func (e *Executor) confirm(ctx context.Context, s *sent, vm string, dom libvirt.Domain, m move) (Result, error) {
	a := s.a
	defer a.Close()
	if s.heard {
		return m.reached(), nil
	}
	there, err := e.awaitState(ctx, a, dom, m.want, confirmWait, true)
	if err != nil {
		return Result{}, err
	}
	if !there {
		st, _ := e.state(ctx, dom)
		return Result{}, fmt.Errorf("%s %s: %w: domain is %s, not %s", m.verb, vm, ErrLibvirt, StateName(st), StateName(m.want))
	}
	return m.reached(), nil
}

// await registers for dom's lifecycle events with the view; nil without
// one.
func (e *Executor) await(dom libvirt.Domain) *Awaiting {
	if e.cfg.View == nil {
		return nil
	}
	return e.cfg.View.Await(dom.UUID)
}

// awaitState waits until dom is in want, or until d has passed
// (reached=false, no error). An event from a that says so ends it; libvirtd
// is asked every eventPoll, as a safety net, and every cfg.Poll once no
// event can come (no view, no live subscription), as before there were
// events. sent says a request meant to bring want was sent after a
// registered: its event is waited for before the first asking, which
// otherwise comes at once.
func (e *Executor) awaitState(ctx context.Context, a *Awaiting, dom libvirt.Domain, want libvirt.DomainState, d time.Duration, sent bool) (bool, error) {
	deadline := time.Now().Add(d)
	ask := !sent || d <= 0 || a.down()
	for {
		if ask {
			if there, err := e.isIn(ctx, dom, want); there || err != nil {
				return there, err
			}
		}
		ask = true
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		if heard, err := e.hear(ctx, a, dom, want, left); heard || err != nil {
			return heard, err
		}
	}
}

// hear waits up to left, and no longer than until libvirtd is to be asked,
// for an event saying dom is in want.
func (e *Executor) hear(ctx context.Context, a *Awaiting, dom libvirt.Domain, want libvirt.DomainState, left time.Duration) (bool, error) {
	lost, poll := a.ended(), eventPoll
	if a.down() {
		lost, poll = nil, e.cfg.Poll
	}
	timer := time.NewTimer(min(poll, left))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("wait for %s to be %s: %w: %v", dom.Name, StateName(want), ErrUnavailable, context.Cause(ctx))
		case <-timer.C:
			return false, nil
		case <-lost:
			return false, nil
		case st := <-a.events():
			if st == StateName(want) {
				return true, nil
			}
		}
	}
}

// isIn asks libvirtd whether dom is in want. A domain that is gone counts
// as shut off: a transient domain vanishes on its way down.
func (e *Executor) isIn(ctx context.Context, dom libvirt.Domain, want libvirt.DomainState) (bool, error) {
	st, err := e.state(ctx, dom)
	if errors.Is(err, ErrNotFound) && want == libvirt.DomainShutoff {
		return true, nil
	}
	return err == nil && st == want, err
}
