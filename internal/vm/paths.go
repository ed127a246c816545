package vm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// vmElement is the path element a disk root may hold to stand for the
// domain's name, so that each domain reaches only its own directory.
const vmElement = "{vm}"

// maxPathBytes is PATH_MAX: no longer path can name a file, and a client
// may send a megabyte.
const maxPathBytes = 4096

// DiskRoots are the directories a disk image may live in. A publisher must
// never be able to hand a guest a host file such as /etc/shadow or a raw
// block device, so every path is resolved (symlinks followed) before it is
// checked, and only regular files are allowed.
type DiskRoots struct {
	roots []diskRoot
}

// diskRoot is one configured root. A template (/srv/{vm}/disks) is split
// at {vm}: its fixed part is resolved at start, like a plain root, and the
// per-VM directory only when a path is checked, since it may be made (or
// replaced) while the worker runs.
type diskRoot struct {
	written string // the fixed part as configured (all of a plain root)
	real    string // the fixed part with symlinks resolved at start
	tail    string // from {vm} on ("{vm}/disks"); empty for a plain root
}

// NewDiskRoots resolves each root once, so that a root that is itself a
// symlink (images on another volume) still matches the paths inside it. A
// root may hold {vm} as one whole path element.
func NewDiskRoots(roots []string) (DiskRoots, error) {
	var out DiskRoots
	for _, r := range roots {
		if r == "" {
			continue
		}
		if !filepath.IsAbs(r) {
			return DiskRoots{}, fmt.Errorf("disk root %q is not an absolute path", r)
		}
		fixed, tail, err := splitTemplate(filepath.Clean(r))
		if err != nil {
			return DiskRoots{}, err
		}
		resolved, err := filepath.EvalSymlinks(fixed)
		if err != nil {
			return DiskRoots{}, fmt.Errorf("disk root %s: %w", r, err)
		}
		out.roots = append(out.roots, diskRoot{written: fixed, real: resolved, tail: tail})
	}
	if len(out.roots) == 0 {
		return DiskRoots{}, errors.New("no disk roots configured")
	}
	return out, nil
}

// splitTemplate splits a clean root at its {vm} element. {vm} inside an
// element (/x/{vm}y) would let one name reach another's directory
// (/x/ay is also /x/{vm} for "ay"), and a second {vm} buys nothing: both
// are refused.
func splitTemplate(r string) (fixed, tail string, err error) {
	if !strings.Contains(r, vmElement) {
		return r, "", nil
	}
	elems := strings.Split(r, "/")
	at := -1
	for i, e := range elems {
		switch {
		case e == vmElement && at < 0:
			at = i
		case strings.Contains(e, vmElement):
			return "", "", fmt.Errorf("disk root %s: %s must be a whole path element, and appear once", r, vmElement)
		}
	}
	return "/" + filepath.Join(elems[:at]...), filepath.Join(elems[at:]...), nil
}

// vmDir is one root as it applies to one domain.
type vmDir struct {
	spellings []string // what a path may be spelled with
	real      string   // what it must resolve into; empty: nothing does
}

// dirsFor expands the roots for the domain named name. A name that is not
// one safe path element ("..", "a/b") matches no template: "/x/{vm}" with
// ".." would be /, the whole host.
func (d DiskRoots) dirsFor(name string) []vmDir {
	safe := name != "" && name != "." && name != ".." && !strings.ContainsAny(name, "/\x00")
	var out []vmDir
	for _, r := range d.roots {
		if r.tail == "" {
			out = append(out, vmDir{spellings: []string{r.written, r.real}, real: r.real})
			continue
		}
		if !safe {
			continue
		}
		tail := strings.Replace(r.tail, vmElement, name, 1)
		dir := vmDir{spellings: []string{filepath.Join(r.written, tail), filepath.Join(r.real, tail)}}
		// A per-VM directory that does not exist holds nothing; its
		// paths still count as inside, so a missing image is not_found.
		if real, err := filepath.EvalSymlinks(filepath.Join(r.real, tail)); err == nil {
			dir.real = real
			dir.spellings = append(dir.spellings, real)
		}
		out = append(out, dir)
	}
	return out
}

// Resolve returns the real path of p if it is a regular file inside one of
// the roots as they apply to the domain named vmName (libvirt's name, also
// when the domain was addressed by UUID). A path outside the roots is
// ErrForbidden before anything about it is looked up, so the answer never
// tells whether a host file exists.
func (d DiskRoots) Resolve(p, vmName string) (string, error) {
	if err := checkPathLen(p); err != nil {
		return "", err
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("%w: disk path %q is not absolute", ErrInvalid, clip(p))
	}
	dirs := d.dirsFor(vmName)
	if !spelledWithin(dirs, filepath.Clean(p)) {
		return "", fmt.Errorf("%w: disk path %s is outside the disk roots %s", ErrForbidden, clip(p), d)
	}
	real, err := filepath.EvalSymlinks(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%w: disk image %s does not exist", ErrNotFound, clip(p))
	}
	if err != nil {
		return "", fmt.Errorf("%w: resolve disk path %s: %v", ErrInvalid, clip(p), pathErr(err))
	}
	if !resolvesWithin(dirs, real) {
		return "", fmt.Errorf("%w: disk path %s resolves to %s, outside the disk roots %s", ErrForbidden, clip(p), clip(real), d)
	}
	if err := regularFile(real, p); err != nil {
		return "", err
	}
	return real, nil
}

// regularFile refuses anything but a regular file with one name. A second
// hard link may sit outside the roots: a file linked into them (a link
// needs no access to the file's directory) would pass every path check.
func regularFile(real, p string) error {
	fi, err := os.Stat(real)
	if err != nil {
		return fmt.Errorf("%w: stat disk image %s: %v", ErrNotFound, clip(p), pathErr(err))
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: disk path %s is not a regular file (%s)", ErrForbidden, clip(p), fi.Mode().Type())
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || st.Nlink > 1 {
		return fmt.Errorf("%w: disk image %s has more than one hard link", ErrForbidden, clip(p))
	}
	return nil
}

func spelledWithin(dirs []vmDir, p string) bool {
	for _, d := range dirs {
		if within(d.spellings, p) {
			return true
		}
	}
	return false
}

func resolvesWithin(dirs []vmDir, p string) bool {
	for _, d := range dirs {
		if d.real != "" && within([]string{d.real}, p) {
			return true
		}
	}
	return false
}

// within reports whether p lies strictly inside one of roots.
func within(roots []string, p string) bool {
	for _, r := range roots {
		rel, err := filepath.Rel(r, p)
		if err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../") {
			return true
		}
	}
	return false
}

// pathErr is err without the path an *fs.PathError repeats: the message
// around it names the path already, clipped.
func pathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return err
}

// String lists the roots as configured, templates with their {vm}.
func (d DiskRoots) String() string {
	s := make([]string, len(d.roots))
	for i, r := range d.roots {
		s[i] = filepath.Join(r.written, r.tail)
	}
	return strings.Join(s, ":")
}
