package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"
)

// Defaults and bounds of the action parameters (README.md, "Actions").
const (
	DefaultStopTimeout   = 60 * time.Second
	DefaultRebootTimeout = 120 * time.Second
	DefaultDetachTimeout = 30 * time.Second
	MaxTimeout           = time.Hour // the longest timeout an action may ask for
)

// Duration is a time.Duration that reads a Go duration string ("90s").
type Duration time.Duration

// UnmarshalJSON accepts only a string such as "90s" or "2m": a bare number
// is ambiguous (seconds? nanoseconds?) and is refused.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"90s\", got %s", clip(string(b)))
	}
	// ParseDuration's own error quotes all of s.
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: want a Go duration such as \"90s\"", clip(s))
	}
	*d = Duration(v)
	return nil
}

// StopParams are the parameters of stop.
type StopParams struct {
	Mode    string   `json:"mode"`    // graceful (default) or force
	Timeout Duration `json:"timeout"` // graceful only: destroy after this long
}

// RebootParams are the parameters of reboot.
type RebootParams struct {
	Mode    string   `json:"mode"`    // soft (default) or hard
	Timeout Duration `json:"timeout"` // soft only: hard-reset after this long
}

// AttachParams are the parameters of attach-disk.
type AttachParams struct {
	Path       string `json:"path"`
	Target     string `json:"target"` // e.g. vdb; empty: the next free one for the bus
	Bus        string `json:"bus"`    // virtio (default), scsi, sata
	Format     string `json:"format"` // raw (default), qcow2
	ReadOnly   bool   `json:"readonly"`
	Persistent *bool  `json:"persistent"` // default true
}

// DetachParams are the parameters of detach-disk.
type DetachParams struct {
	Target     string   `json:"target"`
	Path       string   `json:"path"`
	Timeout    Duration `json:"timeout"`
	Persistent *bool    `json:"persistent"` // default true
}

// jsonErrBytes bounds a decoding error in a message.
const jsonErrBytes = 160

// targetRe matches the device names libvirt accepts for disks: vda, sdb,
// vdaa and so on.
var targetRe = regexp.MustCompile(`^(vd|sd)[a-z]{1,3}$`)

// decode reads params strictly: an unknown key is a typo the caller wants to
// hear about, not something to ignore.
func decode(raw json.RawMessage, v any) error {
	if len(bytes.TrimSpace(raw)) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		// json's messages quote what they refuse (an unknown key of any
		// length); most of the text is json's own, hence the wider bound.
		return fmt.Errorf("%w: parameters: %s", ErrInvalid, clipAt(err.Error(), jsonErrBytes))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: parameters: trailing data after the JSON object", ErrInvalid)
	}
	return nil
}

func timeoutOr(d Duration, def time.Duration) (time.Duration, error) {
	v := time.Duration(d)
	switch {
	case v == 0:
		return def, nil
	case v < 0 || v > MaxTimeout:
		return 0, fmt.Errorf("%w: timeout %s out of range (0 to %s)", ErrInvalid, v, MaxTimeout)
	}
	return v, nil
}

// ParseStop decodes and checks stop's parameters, filling in defaults.
func ParseStop(raw json.RawMessage) (StopParams, error) {
	var p StopParams
	if err := decode(raw, &p); err != nil {
		return p, err
	}
	switch p.Mode {
	case "":
		p.Mode = "graceful"
	case "graceful", "force":
	default:
		return p, fmt.Errorf("%w: mode %q: want graceful or force", ErrInvalid, clip(p.Mode))
	}
	t, err := timeoutOr(p.Timeout, DefaultStopTimeout)
	p.Timeout = Duration(t)
	return p, err
}

// ParseReboot decodes and checks reboot's parameters, filling in defaults.
func ParseReboot(raw json.RawMessage) (RebootParams, error) {
	var p RebootParams
	if err := decode(raw, &p); err != nil {
		return p, err
	}
	switch p.Mode {
	case "":
		p.Mode = "soft"
	case "soft", "hard":
	default:
		return p, fmt.Errorf("%w: mode %q: want soft or hard", ErrInvalid, clip(p.Mode))
	}
	t, err := timeoutOr(p.Timeout, DefaultRebootTimeout)
	p.Timeout = Duration(t)
	return p, err
}

// ParseAttach decodes and checks attach-disk's parameters, filling in
// defaults. It does not look at the file system: the path is checked
// against the disk roots when the action runs.
func ParseAttach(raw json.RawMessage) (AttachParams, error) {
	var p AttachParams
	if err := decode(raw, &p); err != nil {
		return p, err
	}
	if strings.TrimSpace(p.Path) == "" {
		return p, fmt.Errorf("%w: path is required", ErrInvalid)
	}
	if err := checkPathLen(p.Path); err != nil {
		return p, err
	}
	switch p.Bus {
	case "":
		p.Bus = "virtio"
	case "virtio", "scsi", "sata":
	default:
		return p, fmt.Errorf("%w: bus %q: want virtio, scsi or sata", ErrInvalid, clip(p.Bus))
	}
	switch p.Format {
	case "":
		p.Format = "raw"
	case "raw", "qcow2":
	default:
		return p, fmt.Errorf("%w: format %q: want raw or qcow2", ErrInvalid, clip(p.Format))
	}
	if p.Target != "" {
		if !targetRe.MatchString(p.Target) {
			return p, fmt.Errorf("%w: target %q: want a disk device name such as vdb or sdb", ErrInvalid, clip(p.Target))
		}
		if want := targetPrefix(p.Bus); !strings.HasPrefix(p.Target, want) {
			return p, fmt.Errorf("%w: target %q does not fit bus %s (want %s…)", ErrInvalid, p.Target, p.Bus, want)
		}
	}
	if p.Persistent == nil {
		p.Persistent = ptr(true)
	}
	return p, nil
}

// ParseDetach decodes and checks detach-disk's parameters, filling in
// defaults.
func ParseDetach(raw json.RawMessage) (DetachParams, error) {
	var p DetachParams
	if err := decode(raw, &p); err != nil {
		return p, err
	}
	if p.Target == "" && p.Path == "" {
		return p, fmt.Errorf("%w: target or path is required", ErrInvalid)
	}
	if p.Target != "" && !targetRe.MatchString(p.Target) {
		return p, fmt.Errorf("%w: target %q: want a disk device name such as vdb or sdb", ErrInvalid, clip(p.Target))
	}
	if err := checkPathLen(p.Path); err != nil {
		return p, err
	}
	t, err := timeoutOr(p.Timeout, DefaultDetachTimeout)
	p.Timeout = Duration(t)
	if p.Persistent == nil {
		p.Persistent = ptr(true)
	}
	return p, err
}

// parseNone accepts only an empty parameter object: start, status, pause and
// resume take no parameters, and a stray one is probably meant for another action.
func parseNone(raw json.RawMessage) error {
	var p struct{}
	return decode(raw, &p)
}

// checkPathLen refuses a path no file system could hold before it goes
// anywhere near one.
func checkPathLen(p string) error {
	if len(p) > maxPathBytes {
		return fmt.Errorf("%w: path is %d bytes, longer than %d", ErrInvalid, len(p), maxPathBytes)
	}
	return nil
}

func targetPrefix(bus string) string {
	if bus == "virtio" {
		return "vd"
	}
	return "sd"
}

func ptr[T any](v T) *T { return &v }
