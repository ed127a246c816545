package vm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// The disk-root tests work on plain directories: the file-system checks
// need no libvirtd (the executor tests repeat them against one).

// node is one entry of a test file tree under a base directory: a
// directory (path ends in /), a file, or, with link set, a symlink to link
// (relative to the symlink, as written) or, with hard set, a hard link to
// hard (relative to the base).
type node struct{ path, link, hard string }

func makeTree(t *testing.T, base string, nodes ...node) {
	t.Helper()
	for _, n := range nodes {
		p := filepath.Join(base, n.path)
		var err error
		switch {
		case strings.HasSuffix(n.path, "/"):
			err = os.MkdirAll(p, 0o755)
		case n.link != "":
			err = os.Symlink(n.link, p)
		case n.hard != "":
			err = os.Link(filepath.Join(base, n.hard), p)
		default:
			err = os.WriteFile(p, nil, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// resolveCase is a path asked for a domain, and the real path (relative to
// the base) or the kind of error wanted (a key of sentinelNamed).
type resolveCase struct{ vm, path, want string }

var sentinelNamed = map[string]error{"invalid": ErrInvalid, "not_found": ErrNotFound, "forbidden": ErrForbidden}

func checkResolve(t *testing.T, base string, roots DiskRoots, cases []resolveCase) {
	t.Helper()
	for _, c := range cases {
		p := c.path
		if !strings.HasPrefix(p, "/") && p != "a.img" {
			p = filepath.Join(base, p)
		}
		got, err := roots.Resolve(p, c.vm)
		switch {
		case err != nil && !errors.Is(err, sentinelNamed[c.want]):
			t.Errorf("Resolve(%s, %q): %v, want %s", c.path, c.vm, err, c.want)
		case err == nil && got != filepath.Join(base, c.want):
			t.Errorf("Resolve(%s, %q) = %s, want %s", c.path, c.vm, got, c.want)
		}
	}
}

func TestDiskRootsResolve(t *testing.T) {
	base := t.TempDir()
	makeTree(t, base,
		node{path: "images/sub/"}, node{path: "secret/"},
		node{path: "images/a.img"}, node{path: "images/sub/b.img"}, node{path: "secret/key"},
		node{path: "images/escape.img", link: "../secret/key"},
		node{path: "images/inside.img", link: "a.img"},
		node{path: "images/dirlink", link: "../secret"},
		node{path: "images/null.img", link: "/dev/null"},
		// A hard link passes every path check; both its names are refused.
		node{path: "images/twin.img"}, node{path: "images/twin2.img", hard: "images/twin.img"},
		node{path: "secret/shadow"}, node{path: "images/shadow.img", hard: "secret/shadow"},
		// A root that is itself a symlink still matches what is inside it.
		node{path: "rootlink", link: "images"},
	)
	if err := syscall.Mknod(filepath.Join(base, "images/node.img"), syscall.S_IFCHR|0o600, 1<<8|3); err != nil {
		t.Fatal(err)
	}
	roots, err := NewDiskRoots([]string{filepath.Join(base, "rootlink")})
	if err != nil {
		t.Fatal(err)
	}
	checkResolve(t, base, roots, []resolveCase{
		{"vm1", "images/a.img", "images/a.img"},
		{"vm1", "images/sub/../a.img", "images/a.img"},
		{"vm1", "images/inside.img", "images/a.img"},
		{"vm1", "rootlink/sub/b.img", "images/sub/b.img"},
		{"", "images/a.img", "images/a.img"}, // a plain root needs no name
		{"vm1", "images/missing.img", "not_found"},
		{"vm1", "secret/key", "forbidden"},
		{"vm1", "images/../secret/key", "forbidden"},
		{"vm1", "images/escape.img", "forbidden"},
		{"vm1", "images/dirlink/key", "forbidden"},
		{"vm1", "images/null.img", "forbidden"},
		{"vm1", "images/node.img", "forbidden"},
		{"vm1", "images/twin.img", "forbidden"},
		{"vm1", "images/twin2.img", "forbidden"},
		{"vm1", "images/shadow.img", "forbidden"},
		{"vm1", "images/sub", "forbidden"},
		{"vm1", "images", "forbidden"},
		{"vm1", "/etc/shadow", "forbidden"},
		{"vm1", "/dev/sda", "forbidden"},
		{"vm1", "a.img", "invalid"},
		{"vm1", "images/" + strings.Repeat("x", maxPathBytes), "invalid"},
	})
	if _, err := NewDiskRoots([]string{"relative"}); err == nil {
		t.Error("a relative disk root was accepted")
	}
	if _, err := NewDiskRoots(nil); err == nil {
		t.Error("no disk roots were accepted")
	}
}

// With {vm} in a root each domain reaches its own directory, and only
// that: not another domain's, not the directory above, whatever the path or
// the domain's name says.
func TestDiskRootsPerVM(t *testing.T) {
	base := t.TempDir()
	makeTree(t, base,
		node{path: "vms/a/x/"}, node{path: "vms/b/"}, node{path: "elsewhere/c/"},
		node{path: "srv/a/disks/"}, node{path: "common/"}, node{path: "secret/"},
		node{path: "vms/a/a.img"}, node{path: "vms/a/x/x.img"}, node{path: "vms/b/b.img"},
		node{path: "vms/shared.img"}, node{path: "secret/key"}, node{path: "common/common.img"},
		node{path: "srv/a/disks/d.img"}, node{path: "srv/a/other.img"}, node{path: "elsewhere/c/c.img"},
		node{path: "vms/a/own.img", link: "a.img"},
		node{path: "vms/a/tob.img", link: "../b/b.img"},
		node{path: "vms/a/up.img", link: "../shared.img"},
		node{path: "vms/c", link: "../elsewhere/c"}, // a per-VM dir on another volume
		node{path: "vmlink", link: "vms"},           // a fixed part that is a symlink
	)
	roots, err := NewDiskRoots([]string{
		filepath.Join(base, "vmlink", "{vm}"),
		filepath.Join(base, "srv", "{vm}", "disks"),
		filepath.Join(base, "common"),
	})
	if err != nil {
		t.Fatal(err)
	}
	checkResolve(t, base, roots, []resolveCase{
		{"a", "vms/a/a.img", "vms/a/a.img"},
		{"a", "vmlink/a/a.img", "vms/a/a.img"},
		{"a", "vms/a/own.img", "vms/a/a.img"},
		{"a", "vms/a/x/../a.img", "vms/a/a.img"},
		{"a", "srv/a/disks/d.img", "srv/a/disks/d.img"},
		{"b", "vms/b/b.img", "vms/b/b.img"},
		{"c", "vms/c/c.img", "elsewhere/c/c.img"},
		{"a", "common/common.img", "common/common.img"},
		{"..", "common/common.img", "common/common.img"},
		{"a", "vms/a/missing.img", "not_found"},
		{"d", "vms/d/d.img", "not_found"}, // its directory is not made yet
		{"a", "vms/b/b.img", "forbidden"},
		{"b", "vms/a/a.img", "forbidden"},
		{"b", "vms/a/missing.img", "forbidden"},
		{"a", "vms/a/../b/b.img", "forbidden"},
		{"a", "vms/a/tob.img", "forbidden"},
		{"a", "vms/a/up.img", "forbidden"},
		{"a", "vms/shared.img", "forbidden"},
		{"a", "vms/a", "forbidden"},
		{"a", "srv/a/other.img", "forbidden"},
		{"a", "secret/key", "forbidden"},
		{"b", "srv/a/disks/d.img", "forbidden"},
		// Names that are not one safe path element match no template.
		{"..", "secret/key", "forbidden"},
		{"..", "vms/shared.img", "forbidden"},
		{".", "vms/shared.img", "forbidden"},
		{"", "vms/shared.img", "forbidden"},
		{"a/x", "vms/a/x/x.img", "forbidden"},
		{"a\x00", "vms/a/a.img", "forbidden"},
	})
	if got, want := roots.String(), filepath.Join(base, "vmlink", "{vm}"); !strings.HasPrefix(got, want+":") {
		t.Errorf("roots.String() = %s, want the templates as configured", got)
	}
}

func TestNewDiskRootsTemplates(t *testing.T) {
	base := t.TempDir()
	for _, c := range []struct {
		root string
		err  string // a part of the error wanted; empty: accepted
	}{
		{base + "/{vm}", ""},
		{base + "/{vm}/disks", ""},
		{base + "/./{vm}/", ""},
		{"/{vm}", ""},
		{base + "/{vm}y", "whole path element"},
		{base + "/x{vm}", "whole path element"},
		{base + "/{vm}{vm}", "whole path element"},
		{base + "/{vm}/{vm}", "whole path element"},
		{base + "/{vm}/x{vm}", "whole path element"},
		{base + "/missing/{vm}", "no such file"},
		{"{vm}/disks", "not an absolute path"},
	} {
		_, err := NewDiskRoots([]string{c.root})
		if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("NewDiskRoots(%s): %v, want %q", c.root, err, c.err)
		}
	}
}
