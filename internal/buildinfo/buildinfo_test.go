package buildinfo

import (
	"regexp"
	"runtime"
	"runtime/debug"
	"testing"
)

func TestLine(t *testing.T) {
	t.Parallel()
	stamped := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/virtbus/virtbus", Version: "v1.2.0"},
		Settings: []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"}, {Key: "vcs.modified", Value: "true"}}}
	clean := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/virtbus/virtbus", Version: "v1.2.0"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"}, {Key: "vcs.modified", Value: "false"}}}
	bare := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/virtbus/virtbus"}}
	for _, tt := range []struct {
		name  string
		bi    *debug.BuildInfo
		ok    bool
		line  string
		label string
	}{
		{"stamped and dirty", stamped, true, "virtbus worker v1.2.0 (commit 0123456789ab dirty, go1.26.8)", "0123456789ab-dirty"},
		{"clean", clean, true, "virtbus worker v1.2.0 (commit 0123456789ab, go1.26.8)", "0123456789ab"},
		{"no vcs, no version", bare, true, "virtbus worker (devel) (commit unknown, go1.26.8)", "unknown"},
		{"no build info", nil, false, "virtbus worker (devel) (commit unknown, " + runtime.Version() + ")", "unknown"},
	} {
		info := From(tt.bi, tt.ok)
		if got := info.Line("worker"); got != tt.line {
			t.Errorf("%s: Line = %q, want %q", tt.name, got, tt.line)
		}
		if got := info.LabelRevision(); got != tt.label {
			t.Errorf("%s: LabelRevision = %q, want %q", tt.name, got, tt.label)
		}
	}
}

// The test binary itself has build information: Read must not invent any.
func TestReadRunningBinary(t *testing.T) {
	t.Parallel()
	line := Read().Line("publish")
	if !regexp.MustCompile(`^virtbus publish \S+ \(commit ([0-9a-f]{12}|unknown)( dirty)?, go\S+\)$`).MatchString(line) {
		t.Errorf("Line = %q", line)
	}
}
