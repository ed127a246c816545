package vm

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
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

// TestDiskRootsResolve works on a plain directory: the file-system checks
// need no libvirtd (the executor tests repeat them against one).
func TestDiskRootsResolve(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "images")
	outside := filepath.Join(base, "secret")
	for _, d := range []string{root, outside, filepath.Join(root, "sub")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p string) {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(root, "a.img"))
	write(filepath.Join(root, "sub", "b.img"))
	write(filepath.Join(outside, "key"))
	link := func(target, name string) {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	link(filepath.Join(outside, "key"), "escape.img")
	link(filepath.Join(root, "a.img"), "inside.img")
	link("../secret", "dirlink")
	link("/dev/null", "null.img")
	if err := syscall.Mknod(filepath.Join(root, "node.img"), syscall.S_IFCHR|0o600, 1<<8|3); err != nil {
		t.Fatal(err)
	}
	// A root that is itself a symlink still matches what is inside it.
	if err := os.Symlink(root, filepath.Join(base, "rootlink")); err != nil {
		t.Fatal(err)
	}
	roots, err := NewDiskRoots([]string{filepath.Join(base, "rootlink")})
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		path string
		want string // resolved path, or an error code
	}{
		{filepath.Join(root, "a.img"), filepath.Join(root, "a.img")},
		{filepath.Join(root, "sub", "..", "a.img"), filepath.Join(root, "a.img")},
		{filepath.Join(root, "inside.img"), filepath.Join(root, "a.img")},
		{filepath.Join(base, "rootlink", "sub", "b.img"), filepath.Join(root, "sub", "b.img")},
		{filepath.Join(root, "missing.img"), "not_found"},
		{filepath.Join(outside, "key"), "forbidden"},
		{filepath.Join(root, "..", "secret", "key"), "forbidden"},
		{filepath.Join(root, "escape.img"), "forbidden"},
		{filepath.Join(root, "dirlink", "key"), "forbidden"},
		{filepath.Join(root, "null.img"), "forbidden"},
		{filepath.Join(root, "node.img"), "forbidden"},
		{filepath.Join(root, "sub"), "forbidden"},
		{root, "forbidden"},
		{"/etc/shadow", "forbidden"},
		{"/dev/sda", "forbidden"},
		{"a.img", "invalid"},
	} {
		got, err := roots.Resolve(c.path)
		if err != nil {
			if Code(err) != c.want {
				t.Errorf("Resolve(%s): %v (code %s), want %s", c.path, err, Code(err), c.want)
			}
			continue
		}
		if got != c.want {
			t.Errorf("Resolve(%s) = %s, want %s", c.path, got, c.want)
		}
	}
	if _, err := NewDiskRoots([]string{"relative"}); err == nil {
		t.Error("a relative disk root was accepted")
	}
	if _, err := NewDiskRoots(nil); err == nil {
		t.Error("no disk roots were accepted")
	}
}

func TestCodeAndMessage(t *testing.T) {
	for _, c := range []struct {
		err  error
		code string
	}{
		{nil, ""},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "no domain"}), "not_found"},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "not running"}), "conflict"},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrXMLError), Message: "bad xml"}), "invalid"},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrOperationTimeout), Message: "slow"}), "timeout"},
		{classify(libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "boom"}), "libvirt"},
		{classify(syscall.ECONNRESET), "unavailable"},
		{errors.New("plain"), "libvirt"},
	} {
		if got := Code(c.err); got != c.code {
			t.Errorf("Code(%v) = %q, want %q", c.err, got, c.code)
		}
	}
	err := classify(libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"})
	if got := Message(err); got != "domain is not running" {
		t.Errorf("Message = %q, want the text without the code", got)
	}
}

func deref(b *bool) bool { return b != nil && *b }
