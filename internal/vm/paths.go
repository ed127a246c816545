package vm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// DiskRoots are the directories a disk image may live in. A publisher must
// never be able to hand a guest a host file such as /etc/shadow or a raw
// block device, so every path is resolved (symlinks followed) before it is
// checked, and only regular files are allowed.
type DiskRoots struct {
	roots   []string // absolute, symlinks resolved: what a path must resolve into
	written []string // as configured: what a path may be spelled with
}

// NewDiskRoots resolves each root once, so that a root that is itself a
// symlink (images on another volume) still matches the paths inside it.
func NewDiskRoots(roots []string) (DiskRoots, error) {
	var out, written []string
	for _, r := range roots {
		if r == "" {
			continue
		}
		if !filepath.IsAbs(r) {
			return DiskRoots{}, fmt.Errorf("disk root %q is not an absolute path", r)
		}
		resolved, err := filepath.EvalSymlinks(r)
		if err != nil {
			return DiskRoots{}, fmt.Errorf("disk root %s: %w", r, err)
		}
		out = append(out, resolved)
		written = append(written, filepath.Clean(r))
	}
	if len(out) == 0 {
		return DiskRoots{}, errors.New("no disk roots configured")
	}
	return DiskRoots{roots: out, written: written}, nil
}

// Resolve returns the real path of p if it is a regular file inside one of
// the roots. A path outside the roots is ErrForbidden before anything about
// it is looked up, so the answer never tells whether a host file exists.
func (d DiskRoots) Resolve(p string) (string, error) {
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("%w: disk path %q is not absolute", ErrInvalid, p)
	}
	if clean := filepath.Clean(p); !within(d.written, clean) && !within(d.roots, clean) {
		return "", fmt.Errorf("%w: disk path %s is outside the disk roots %s", ErrForbidden, p, d)
	}
	real, err := filepath.EvalSymlinks(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%w: disk image %s does not exist", ErrNotFound, p)
	}
	if err != nil {
		return "", fmt.Errorf("%w: resolve disk path %s: %v", ErrInvalid, p, err)
	}
	if !within(d.roots, real) {
		return "", fmt.Errorf("%w: disk path %s resolves to %s, outside the disk roots %s", ErrForbidden, p, real, d)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return "", fmt.Errorf("%w: stat disk image %s: %v", ErrNotFound, real, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%w: disk path %s is not a regular file (%s)", ErrForbidden, p, fi.Mode().Type())
	}
	return real, nil
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

func (d DiskRoots) String() string { return strings.Join(d.roots, ":") }
