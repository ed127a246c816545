package chaos

import (
	"fmt"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/vm"
)

// checkErrors sorts out the error completions. Every command of a plan is
// valid when its VM's commands run in publish order, so an error is the
// work of a fault, and must be one the README allows for:
//   - unavailable: libvirtd out of reach for longer than the timeout; the
//     final completion after VIRTBUS_MAX_DELIVER attempts;
//   - on a test-driver VM, an error whose run overlaps a reset of the
//     driver (libvirtd restarted; the domains were gone until the holder
//     defined them again);
//   - a follow-on: an error on a VM where something already went off plan
//     (an earlier error, a completion out of order, a reset), so its
//     state may not be what the plan assumed;
//   - a QEMU that died while a libvirtd restarted during the run started it
//     (libvirt's words "process exited while connecting to monitor",
//     "domain is no longer running", or "qemu unexpectedly closed the
//     monitor", once with QEMU saying libvirtd itself sent it SIGTERM):
//     seen here about once in eight short runs, each time a start right
//     after a destroy of a domain that was running across the restart.
//     libvirt 9.0 handles a destroyed QEMU's monitor EOF late and kills the
//     QEMU started after it; the worker now starts once more (diedStarting
//     in internal/vm), and only a second death in a row still ends a start
//     with code libvirt;
//   - on a QEMU VM, an error that ended after libvirtd stopped the VM as
//     crashed (its QEMU log says so; see crashes.go): the same libvirt 9.0
//     race in its other form, the late EOF handler killing a QEMU whose
//     start had succeeded: 9 such crashes in the logs of about 93 runs on
//     the development machine.
//
// Any other error is a violation.
func checkErrors(h *Harness, e *evidence, t *tally) []string {
	t.codes, t.explained = map[string]int{}, map[string]int{}
	var out []string
	for _, name := range e.vmNames() {
		steps := e.o.Plans[name]
		offPlan := e.offPlan(steps, h.S.LibvirtTimeout)
		for _, s := range steps {
			c, ok := e.final[s.ID]
			if !ok {
				continue
			}
			code := "ok"
			if c.Error != nil {
				code = c.Error.Code
			}
			t.codes[code]++
			if c.Error == nil {
				continue
			}
			why := e.explain(s, c, offPlan, h.S.LibvirtTimeout, h.firstFault("libvirtd-restart"))
			if why == "" {
				out = append(out, fmt.Sprintf("%s (%s): %s\n    before: %s\n    faults: %s",
					s.ID, s.VM.Kind, brief(c), e.before(s), h.faultsDuring(c)))
				why = "not explained"
			}
			t.explained[why]++
		}
	}
	return out
}

// explain says why c is an error, or "" when nothing does. restarted is
// when libvirtd was first restarted (zero: never).
func (e *evidence) explain(s Step, c bus.Completion, offPlan []time.Time, timeout time.Duration, restarted time.Time) string {
	if restarted.IsZero() {
		restarted = c.StartedAt // nothing before the command
	}
	switch {
	case c.Error.Code == bus.CodeUnavailable:
		return "unavailable (final after retries)"
	case s.VM.Kind == KindTest && e.duringReset(c, timeout):
		return "test driver reset while it ran"
	case s.VM.Kind == KindQEMU && c.Error.Code == bus.CodeLibvirt && restarted.Before(c.StartedAt) &&
		vm.SaysDiedStarting(c.Error.Message):
		return "QEMU died while a restarted libvirtd started it"
	case s.VM.Kind == KindQEMU && e.crashedBy(s.VM.Name, c.FinishedAt):
		return "libvirtd stopped the VM as crashed before it ended"
	}
	for _, at := range offPlan {
		if at.Before(c.StartedAt) {
			return "follow-on of an earlier error, reorder or reset"
		}
	}
	return ""
}

// offPlan lists when a VM's commands went off plan: each error's end, the
// start of a command that ran ahead of one published before it, and, for
// a test-driver VM, each reset of the driver.
func (e *evidence) offPlan(steps []Step, timeout time.Duration) []time.Time {
	var out []time.Time
	for _, s := range steps {
		if c, ok := e.final[s.ID]; ok && c.Error != nil {
			out = append(out, c.FinishedAt)
		}
		if ahead, ok := e.outOfOrder[s.ID]; ok {
			out = append(out, e.final[ahead].StartedAt)
		}
	}
	if len(steps) > 0 && steps[0].VM.Kind == KindTest {
		for _, r := range e.resets {
			out = append(out, r.Lost.Add(-timeout))
		}
	}
	return out
}

// duringReset: the command ran while the driver was being reset. The
// worker noticed the lost daemon up to one libvirt timeout before the
// holder did.
func (e *evidence) duringReset(c bus.Completion, timeout time.Duration) bool {
	for _, r := range e.resets {
		if c.StartedAt.Before(r.Recreated.Add(time.Second)) && c.FinishedAt.After(r.Lost.Add(-timeout)) {
			return true
		}
	}
	return false
}

// before is the completion of the command published just before s on
// its VM: what the VM had just been through.
func (e *evidence) before(s Step) string {
	if s.Index == 0 {
		return "nothing (first command)"
	}
	prev := e.o.Plans[s.VM.Name][s.Index-1]
	if c, ok := e.final[prev.ID]; ok {
		return brief(c)
	}
	return prev.ID + " (" + prev.Action + ") has no completion"
}

// faultsDuring names the faults near a command's run, for evidence.
func (h *Harness) faultsDuring(c bus.Completion) string {
	return h.faultsBetween(c.StartedAt.Add(-30*time.Second), c.FinishedAt.Add(time.Second))
}

// faultsBetween names the faults active at some time between from and to.
func (h *Harness) faultsBetween(from, to time.Time) string {
	s := ""
	for _, f := range h.faults {
		if f.At.Before(to) && f.Back.After(from) {
			s += fmt.Sprintf("%s at %s (back %s); ", f.Kind, f.At.Format("15:04:05.000"), f.Back.Format("15:04:05.000"))
		}
	}
	for _, r := range h.resetsUnplanned() {
		if r.Lost.Before(to) && r.Recreated.After(from) {
			s += fmt.Sprintf("unplanned libvirtd restart at %s; ", r.Lost.Format("15:04:05.000"))
		}
	}
	if s == "" {
		return "none"
	}
	return s
}

// firstFault is when the first fault of kind was injected; zero when none
// was.
func (h *Harness) firstFault(kind string) time.Time {
	for _, f := range h.faults {
		if f.Kind == kind {
			return f.At
		}
	}
	return time.Time{}
}
