package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
)

// Action is one of the closed set of things the executor can do to a domain.
type Action string

// The actions of the README's action table, status included.
const (
	Start      Action = "start"
	Stop       Action = "stop"
	Reboot     Action = "reboot"
	AttachDisk Action = "attach-disk"
	DetachDisk Action = "detach-disk"
	Status     Action = "status"
	Pause      Action = "pause"
	Resume     Action = "resume"
)

// runFunc parses an action's parameters and runs it on the domain vm.
type runFunc func(e *Executor, ctx context.Context, vm string, params json.RawMessage) (Result, error)

// actionTable is the one place that knows the actions: Actions, ParseAction
// and Do all read it, so a new action is a row here and its function. The
// order is the docs' order, which Actions (metric labels) keeps.
var actionTable = []struct {
	name Action
	run  runFunc
}{
	{Start, noParams((*Executor).start)},
	{Stop, withParams(ParseStop, (*Executor).stop)},
	{Reboot, withParams(ParseReboot, (*Executor).reboot)},
	{AttachDisk, withParams(ParseAttach, (*Executor).attach)},
	{DetachDisk, withParams(ParseDetach, (*Executor).detach)},
	{Status, noParams((*Executor).status)},
	{Pause, noParams((*Executor).pause)},
	{Resume, noParams((*Executor).resume)},
}

// Actions lists every action the executor knows, in the order of the docs.
var Actions = actionNames()

// knownActions is the list an unknown action's error names, made once.
var knownActions = strings.Join(actionStrings(), ", ")

func actionNames() []Action {
	names := make([]Action, len(actionTable))
	for i, a := range actionTable {
		names[i] = a.name
	}
	return names
}

func actionStrings() []string {
	names := make([]string, len(actionTable))
	for i, a := range actionTable {
		names[i] = string(a.name)
	}
	return names
}

// ParseAction returns the action named s, or ErrInvalid.
func ParseAction(s string) (Action, error) {
	if _, ok := runnerOf(Action(s)); ok {
		return Action(s), nil
	}
	return "", fmt.Errorf("%w: unknown action %q (known: %s)", ErrInvalid, clip(s), knownActions)
}

// runnerOf finds a's row. A scan, not a map: the table is a handful of
// rows, and a map would be a second copy to keep in step.
func runnerOf(a Action) (runFunc, bool) {
	for _, row := range actionTable {
		if row.name == a {
			return row.run, true
		}
	}
	return nil, false
}

// noParams is the row of an action that takes no parameters: a stray one is
// refused, since it was probably meant for another action.
func noParams(run func(e *Executor, ctx context.Context, vm string) (Result, error)) runFunc {
	return func(e *Executor, ctx context.Context, vm string, raw json.RawMessage) (Result, error) {
		if err := parseNone(raw); err != nil {
			return Result{}, err
		}
		return run(e, ctx, vm)
	}
}

// withParams is the row of an action whose parameters parse decodes and
// checks before run sees them.
func withParams[P any](parse func(json.RawMessage) (P, error), run func(e *Executor, ctx context.Context, vm string, p P) (Result, error)) runFunc {
	return func(e *Executor, ctx context.Context, vm string, raw json.RawMessage) (Result, error) {
		p, err := parse(raw)
		if err != nil {
			return Result{}, err
		}
		return run(e, ctx, vm, p)
	}
}
