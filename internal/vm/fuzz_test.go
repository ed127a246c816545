package vm

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// maxMessageBytes bounds an error message made from client input: it goes
// back in a completion, whatever size the input had.
const maxMessageBytes = 512

// paramChecks parses one action's parameters and checks what a success
// promises: every default filled in, every value in its set.
var paramChecks = map[Action]func(t *testing.T, raw json.RawMessage) error{
	Start:      func(t *testing.T, raw json.RawMessage) error { return parseNone(raw) },
	Status:     func(t *testing.T, raw json.RawMessage) error { return parseNone(raw) },
	Stop:       checkStop,
	Reboot:     checkReboot,
	AttachDisk: checkAttach,
	DetachDisk: checkDetach,
	Pause:      func(t *testing.T, raw json.RawMessage) error { return parseNone(raw) },
	Resume:     func(t *testing.T, raw json.RawMessage) error { return parseNone(raw) },
}

// FuzzParams feeds any action name and parameter bytes to the parsing a
// command goes through: client input must not panic the worker, must fail
// only as invalid and with a bounded message, and must succeed only with
// parameters the executor can use as they are.
func FuzzParams(f *testing.F) {
	for _, a := range Actions {
		if paramChecks[a] == nil {
			f.Fatalf("no parameter check for action %s: add one to paramChecks", a)
		}
	}
	huge := strings.Repeat("x", 1<<16) // far past every bound; larger only slows the fuzzer
	for _, s := range []struct{ action, params string }{
		{"start", ``},
		{"status", `{}`},
		{"stop", `{"mode":"force","timeout":"90s"}`},
		{"stop", `{"mode":"` + huge + `"}`},
		{"stop", `{"timeout":"` + huge + `"}`},
		{"reboot", `{"mode":"hard"}`},
		{"reboot", `{"timeout":` + strings.Repeat("9", 1<<16) + `}`},
		{"attach-disk", `{"path":"/i/a.img","bus":"scsi","target":"sdc","format":"qcow2","readonly":true,"persistent":false}`},
		{"attach-disk", `{"path":"/` + huge + `"}`},
		{"attach-disk", `{"path":"/i/a.img","format":"` + huge + `"}`},
		{"attach-disk", `{"` + huge + `":1}`},
		{"detach-disk", `{"target":"vdb","timeout":"5s"}`},
		{"detach-disk", `{"target":"` + huge + `"}`},
		{"pause", ``},
		{"resume", `{"` + huge + `":true}`},
		{huge, `{}`},
	} {
		f.Add(s.action, []byte(s.params))
	}
	f.Fuzz(func(t *testing.T, action string, params []byte) {
		a, err := ParseAction(action)
		if err != nil {
			checkInvalid(t, "ParseAction", err)
			return
		}
		if err := paramChecks[a](t, json.RawMessage(params)); err != nil {
			checkInvalid(t, string(a), err)
		}
	})
}

func checkInvalid(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("%s: error %q does not wrap ErrInvalid", what, clipAt(err.Error(), 200))
	}
	if n := len(err.Error()); n > maxMessageBytes {
		t.Fatalf("%s: error message of %d bytes, want at most %d: %s", what, n, maxMessageBytes, clipAt(err.Error(), 200))
	}
}

func checkTimeout(t *testing.T, d Duration) {
	t.Helper()
	if v := time.Duration(d); v <= 0 || v > MaxTimeout {
		t.Fatalf("timeout %s, want within (0, %s]", v, MaxTimeout)
	}
}

func checkStop(t *testing.T, raw json.RawMessage) error {
	p, err := ParseStop(raw)
	if err == nil {
		if p.Mode != "graceful" && p.Mode != "force" {
			t.Fatalf("stop mode %q", p.Mode)
		}
		checkTimeout(t, p.Timeout)
	}
	return err
}

func checkReboot(t *testing.T, raw json.RawMessage) error {
	p, err := ParseReboot(raw)
	if err == nil {
		if p.Mode != "soft" && p.Mode != "hard" {
			t.Fatalf("reboot mode %q", p.Mode)
		}
		checkTimeout(t, p.Timeout)
	}
	return err
}

func checkAttach(t *testing.T, raw json.RawMessage) error {
	p, err := ParseAttach(raw)
	if err != nil {
		return err
	}
	switch {
	case strings.TrimSpace(p.Path) == "" || len(p.Path) > maxPathBytes:
		t.Fatalf("attach path of %d bytes accepted", len(p.Path))
	case p.Bus != "virtio" && p.Bus != "scsi" && p.Bus != "sata":
		t.Fatalf("attach bus %q", p.Bus)
	case p.Format != "raw" && p.Format != "qcow2":
		t.Fatalf("attach format %q", p.Format)
	case p.Target != "" && (!targetRe.MatchString(p.Target) || !strings.HasPrefix(p.Target, targetPrefix(p.Bus))):
		t.Fatalf("attach target %q on bus %s", p.Target, p.Bus)
	case p.Persistent == nil:
		t.Fatal("attach persistent left nil")
	}
	return nil
}

func checkDetach(t *testing.T, raw json.RawMessage) error {
	p, err := ParseDetach(raw)
	if err != nil {
		return err
	}
	switch {
	case p.Target == "" && p.Path == "":
		t.Fatal("detach with neither target nor path accepted")
	case p.Target != "" && !targetRe.MatchString(p.Target):
		t.Fatalf("detach target %q", p.Target)
	case len(p.Path) > maxPathBytes:
		t.Fatalf("detach path of %d bytes accepted", len(p.Path))
	case p.Persistent == nil:
		t.Fatal("detach persistent left nil")
	}
	checkTimeout(t, p.Timeout)
	return nil
}
