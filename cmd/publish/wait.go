package main

import (
	"encoding/json"
	"time"
)

// minWait is the default -timeout, and the least an action's default wait
// is: enough for most actions on a busy host.
const minWait = 2 * time.Minute

// waitMargin is added to an action's own timeout: the worker may take the
// command a little late and then needs time to report its completion.
const waitMargin = 30 * time.Second

// actionTimeouts are the worker's defaults of the actions that take a
// timeout parameter, from README.md's action table ("Actions"). They are
// copied rather than imported from internal/vm because that package pulls
// in libvirt, which publish, a client, must not need; keep them in step
// with that table.
var actionTimeouts = map[string]time.Duration{
	"stop":        60 * time.Second,
	"reboot":      120 * time.Second,
	"detach-disk": 30 * time.Second,
}

// defaultWait is -timeout when none is given for action: long enough that
// publish does not give up on a command the worker is still running, so
// that `publish reboot VM` reports the reboot's outcome rather than exit
// 3. A timeout parameter the worker would refuse leaves the default: the
// worker answers such a command at once.
func defaultWait(action string, params json.RawMessage) time.Duration {
	t, ok := actionTimeouts[action]
	var p struct {
		Timeout any `json:"timeout"`
	}
	if json.Unmarshal(params, &p) == nil {
		if s, isStr := p.Timeout.(string); isStr {
			if d, err := time.ParseDuration(s); err == nil && d > 0 {
				t, ok = d, true
			}
		}
	}
	if !ok {
		return minWait
	}
	return max(t+waitMargin, minWait)
}
