package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
)

func TestParseStop(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    StopParams
		invalid bool
	}{
		{``, StopParams{Mode: "graceful", Timeout: Duration(DefaultStopTimeout)}, false},
		{`{}`, StopParams{Mode: "graceful", Timeout: Duration(DefaultStopTimeout)}, false},
		{`{"mode":"force"}`, StopParams{Mode: "force", Timeout: Duration(DefaultStopTimeout)}, false},
		{`{"timeout":"90s"}`, StopParams{Mode: "graceful", Timeout: Duration(90 * time.Second)}, false},
		{`{"mode":"gentle"}`, StopParams{}, true},
		{`{"timeout":60}`, StopParams{}, true},
		{`{"timeout":"soon"}`, StopParams{}, true},
		{`{"timeout":"-1s"}`, StopParams{}, true},
		{`{"timeout":"2h"}`, StopParams{}, true},
		{`{"mdoe":"force"}`, StopParams{}, true},
		{`{"mode":"force"} {}`, StopParams{}, true},
		{`[]`, StopParams{}, true},
		{`{"mode":`, StopParams{}, true},
	} {
		got, err := ParseStop(json.RawMessage(c.in))
		if c.invalid {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseStop(%s) = %+v, %v; want ErrInvalid", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseStop(%s) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

func TestParseReboot(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    RebootParams
		invalid bool
	}{
		{``, RebootParams{Mode: "soft", Timeout: Duration(DefaultRebootTimeout)}, false},
		{`{"mode":"hard"}`, RebootParams{Mode: "hard", Timeout: Duration(DefaultRebootTimeout)}, false},
		{`{"timeout":"5s"}`, RebootParams{Mode: "soft", Timeout: Duration(5 * time.Second)}, false},
		{`{"mode":"warm"}`, RebootParams{}, true},
		{`{"force":true}`, RebootParams{}, true},
	} {
		got, err := ParseReboot(json.RawMessage(c.in))
		if c.invalid {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseReboot(%s) = %+v, %v; want ErrInvalid", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseReboot(%s) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

func TestParseAttach(t *testing.T) {
	for _, c := range []struct {
		in                            string
		target, bus, format           string
		readonly, persistent, invalid bool
	}{
		{in: `{"path":"/i/a.img"}`, bus: "virtio", format: "raw", persistent: true},
		{in: `{"path":"/i/a.img","bus":"scsi","target":"sdc","format":"qcow2","readonly":true,"persistent":false}`,
			target: "sdc", bus: "scsi", format: "qcow2", readonly: true},
		{in: `{"path":"/i/a.img","bus":"sata"}`, bus: "sata", format: "raw", persistent: true},
		{in: `{}`, invalid: true},
		{in: `{"path":"  "}`, invalid: true},
		{in: `{"path":"/i/a.img","bus":"ide"}`, invalid: true},
		{in: `{"path":"/i/a.img","format":"vmdk"}`, invalid: true},
		{in: `{"path":"/i/a.img","target":"hda"}`, invalid: true},
		{in: `{"path":"/i/a.img","target":"sdb"}`, invalid: true}, // virtio bus wants vd*
		{in: `{"path":"/i/a.img","target":"vdb; rm"}`, invalid: true},
		{in: `{"path":"/i/a.img","readonly":"yes"}`, invalid: true},
		{in: `{"path":"/` + strings.Repeat("x", maxPathBytes-1) + `"}`, bus: "virtio", format: "raw", persistent: true},
		{in: `{"path":"/` + strings.Repeat("x", maxPathBytes) + `"}`, invalid: true},
	} {
		got, err := ParseAttach(json.RawMessage(c.in))
		if c.invalid {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseAttach(%s) = %+v, %v; want ErrInvalid", c.in, got, err)
			}
			continue
		}
		if err != nil || got.Target != c.target || got.Bus != c.bus || got.Format != c.format ||
			got.ReadOnly != c.readonly || got.Persistent == nil || *got.Persistent != c.persistent {
			t.Errorf("ParseAttach(%s) = %+v (persistent %v), %v", c.in, got, deref(got.Persistent), err)
		}
	}
}

func TestParseDetach(t *testing.T) {
	for _, c := range []struct {
		in      string
		timeout time.Duration
		invalid bool
	}{
		{in: `{"target":"vdb"}`, timeout: DefaultDetachTimeout},
		{in: `{"path":"/i/a.img","timeout":"5s"}`, timeout: 5 * time.Second},
		{in: `{}`, invalid: true},
		{in: `{"target":"nvme0"}`, invalid: true},
		{in: `{"target":"vdb","timeout":"0.5"}`, invalid: true},
		{in: `{"path":"/` + strings.Repeat("x", maxPathBytes) + `"}`, invalid: true},
	} {
		got, err := ParseDetach(json.RawMessage(c.in))
		if c.invalid {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseDetach(%s) = %+v, %v; want ErrInvalid", c.in, got, err)
			}
			continue
		}
		if err != nil || time.Duration(got.Timeout) != c.timeout || !deref(got.Persistent) {
			t.Errorf("ParseDetach(%s) = %+v, %v", c.in, got, err)
		}
	}
}

func TestParseAction(t *testing.T) {
	for _, a := range Actions {
		if got, err := ParseAction(string(a)); err != nil || got != a {
			t.Errorf("ParseAction(%q) = %q, %v", a, got, err)
		}
	}
	for _, s := range []string{"", "START", "destroy", "attach_disk"} {
		if _, err := ParseAction(s); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseAction(%q): %v, want ErrInvalid", s, err)
		}
	}
}

// TestClassify: every go-libvirt error comes out carrying the sentinel
// its libvirt error number means, and transport errors are unavailable.
func TestClassify(t *testing.T) {
	for _, c := range []struct {
		err  error
		want error
	}{
		{classify(libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "no domain"}), ErrNotFound},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "not running"}), ErrConflict},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrXMLError), Message: "bad xml"}), ErrInvalid},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrOperationTimeout), Message: "slow"}), ErrTimeout},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "boom"}), ErrLibvirt},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrDeviceMissing), Message: "no target device sda"}), ErrLibvirt},
		{classify(syscall.ECONNRESET), ErrUnavailable},
		{classify(fmt.Errorf("%w: already one", ErrConflict)), ErrConflict},
	} {
		if !errors.Is(c.err, c.want) {
			t.Errorf("classified %v, want %v", c.err, c.want)
		}
	}
	// A detach tells "device not found" apart: an earlier request may have
	// done the work.
	if err := classify(libvirt.Error{Code: uint32(libvirt.ErrDeviceMissing), Message: "no target device sda"}); !errors.Is(err, errDeviceMissing) {
		t.Errorf("device missing classified as %v", err)
	}
	// The sentinel's words lead, so the worker can strip them.
	err := classify(libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"})
	if got := err.Error(); got != "conflict: domain is not running" {
		t.Errorf("classified text %q, want the sentinel's words, then libvirt's", got)
	}
}

// A client may send a megabyte where a word is expected; what a message
// echoes of it stays short, says how long it was, and is still UTF-8.
func TestClip(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", ""},
		{"gentle", "gentle"},
		{strings.Repeat("x", clipBytes), strings.Repeat("x", clipBytes)},
		{strings.Repeat("x", 1<<20), strings.Repeat("x", clipBytes) + "… (1048576 bytes)"},
		// A rune across the cut is left out whole.
		{strings.Repeat("x", clipBytes-1) + "é" + "y", strings.Repeat("x", clipBytes-1) + "… (66 bytes)"},
	} {
		if got := clip(c.in); got != c.want {
			t.Errorf("clip(%.20q…) = %q, want %q", c.in, got, c.want)
		}
	}
}

func deref(b *bool) bool { return b != nil && *b }

// TestDiedStarting: a start is tried once more only when QEMU died while
// libvirtd started it, as the call's error comes back through Conn.call.
func TestDiedStarting(t *testing.T) {
	for _, c := range []struct {
		err  libvirt.Error
		want bool
	}{
		{libvirt.Error{Code: uint32(libvirt.ErrOperationFailed), Message: "operation failed: domain is no longer running"}, true},
		{libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: process exited while connecting to monitor: qemu: could not load PC BIOS"}, true},
		{libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: qemu unexpectedly closed the monitor: Failed to get \"write\" lock"}, true},
		{libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "requested operation is not valid: domain is already running"}, false},
		{libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "Domain not found"}, false},
		{libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: unable to execute QEMU command"}, false},
	} {
		err := fmt.Errorf("start web-1: %w", classify(c.err))
		if got := diedStarting(err); got != c.want {
			t.Errorf("diedStarting(%v) = %v, want %v", err, got, c.want)
		}
	}
	if diedStarting(fmt.Errorf("%w: process exited while connecting to monitor", ErrUnavailable)) {
		t.Error("an unreachable libvirtd counts as a QEMU that died starting")
	}
}
