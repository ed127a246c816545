// Package buildinfo says which build of virtbus is running, from what the
// Go toolchain stamps into every binary (runtime/debug.ReadBuildInfo), so
// no -ldflags are needed: a plain `go build` in a checkout, the Dockerfile's
// build and `go install` all report themselves.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Placeholders for what the binary does not know: "(devel)" is what the
// toolchain itself reports for a main module built from a checkout without
// a version.
const (
	Devel   = "(devel)"
	Unknown = "unknown"
)

// Info is one binary's build.
type Info struct {
	Version   string // main module version, or Devel
	Revision  string // VCS commit, in full, or Unknown
	Modified  bool   // built from a work tree with uncommitted changes
	GoVersion string // toolchain, e.g. go1.26.8
}

// Read is the build of the running binary.
func Read() Info { return From(debug.ReadBuildInfo()) }

// From turns the toolchain's build information into an Info; ok false (a
// binary built without module support) leaves only the Go version.
func From(bi *debug.BuildInfo, ok bool) Info {
	info := Info{Version: Devel, Revision: Unknown, GoVersion: runtime.Version()}
	if !ok || bi == nil {
		return info
	}
	if bi.Main.Version != "" {
		info.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		info.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			if s.Value != "" {
				info.Revision = s.Value
			}
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}

// ShortRevision is the commit cut to 12 characters, as git abbreviates
// it in practice and enough to be unique in any repository of this size.
func (i Info) ShortRevision() string {
	if len(i.Revision) > 12 {
		return i.Revision[:12]
	}
	return i.Revision
}

// LabelRevision is the revision for a metric label: short, with "-dirty"
// for a modified work tree, so that a dashboard tells such a build apart
// from the commit it started from.
func (i Info) LabelRevision() string {
	if i.Modified {
		return i.ShortRevision() + "-dirty"
	}
	return i.ShortRevision()
}

// Line is what `<program> --version` prints:
// "virtbus worker v1.2.0 (commit 0123456789ab dirty, go1.26.8)".
func (i Info) Line(program string) string {
	dirty := ""
	if i.Modified {
		dirty = " dirty"
	}
	return fmt.Sprintf("virtbus %s %s (commit %s%s, %s)", program, i.Version, i.ShortRevision(), dirty, i.GoVersion)
}
