package main

import (
	"bytes"
	"errors"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/virtbus/virtbus/internal/buildinfo"
	"github.com/virtbus/virtbus/internal/bus/bustest"
)

var versionLine = regexp.MustCompile(`^virtbus (worker|publish) \S+ \(commit ([0-9a-f]{12}|unknown)( dirty)?, go\S+\)\n$`)

// runBinary runs a built command with env only and returns its exit code
// and output.
func runBinary(t *testing.T, name string, e env, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), binary(t, name), args...)
	cmd.Env = e.list()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("%s %q: %v", name, args, err)
		}
		code = ee.ExitCode()
	}
	return code, out.String(), errb.String()
}

// TestVersion: both commands print their build and exit 0, reading no
// configuration (the environment is empty).
func TestVersion(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ name, arg string }{{"worker", "--version"}, {"worker", "-version"}, {"publish", "--version"}, {"publish", "-version"}} {
		code, stdout, stderr := runBinary(t, c.name, env{}, c.arg)
		if code != 0 || !versionLine.MatchString(stdout) || !strings.HasPrefix(stdout, "virtbus "+c.name+" ") || stderr != "" {
			t.Errorf("%s %s: exit %d, stdout %q, stderr %q", c.name, c.arg, code, stdout, stderr)
		}
	}
}

// TestExitStatus: 2 for a worker started wrong, whatever the mistake, and
// 1 for any other error.
func TestExitStatus(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		env  env
		args []string
	}{
		{env{}, []string{"-bogus"}},
		{env{}, []string{"start"}},
		{env{}, []string{"--version", "extra"}},
		{env{"VIRTBUS_DELIVERY": "carrier-pigeon"}, nil},
		{env{"VIRTBUS_LEASE": "soon"}, nil},
		{env{"VIRTBUS_API_TOKEN_FILE": "/nonexistent/virtbus-token"}, nil},
	} {
		code, _, stderr := runBinary(t, "worker", c.env, c.args...)
		if code != 2 || !strings.Contains(stderr, "worker: ") {
			t.Errorf("worker %q with %v: exit %d, want 2\nstderr: %.300s", c.args, c.env, code, stderr)
		}
	}
	var stderr bustest.Buffer
	if got := exitCode(errors.New("nats connection closed"), &stderr); got != 1 || stderr.String() != "worker: nats connection closed\n" {
		t.Errorf("exitCode of a run error = %d, printed %q; want 1", got, stderr.String())
	}
	if got := exitCode(nil, &stderr); got != 0 {
		t.Errorf("exitCode(nil) = %d", got)
	}
}

// TestHelpDocumentsExitStatus: `worker -h` names the flags and the exit
// statuses.
func TestHelpDocumentsExitStatus(t *testing.T) {
	t.Parallel()
	var stdout, stderr bustest.Buffer
	if err := run(t.Context(), []string{"-h"}, env{}.getenv, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"-version", "Exit status", "2 on a usage error", "1 on any other error"} {
		if !strings.Contains(stderr.String(), s) {
			t.Errorf("worker -h does not say %q", s)
		}
	}
}

// TestBuildInfoMetric: virtbus_build_info carries the build -version
// prints.
func TestBuildInfoMetric(t *testing.T) {
	t.Parallel()
	mfs, err := newRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	info := buildinfo.Read()
	want := map[string]string{"version": info.Version, "revision": info.LabelRevision(), "goversion": info.GoVersion}
	for _, mf := range mfs {
		if mf.GetName() != "virtbus_build_info" {
			continue
		}
		m := mf.GetMetric()
		if len(m) != 1 || m[0].GetGauge().GetValue() != 1 {
			t.Fatalf("virtbus_build_info: %v", m)
		}
		got := map[string]string{}
		for _, l := range m[0].GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if len(got) != len(want) {
			t.Errorf("labels %v, want %v", got, want)
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("label %s=%q, want %q", k, got[k], v)
			}
		}
		return
	}
	t.Error("no virtbus_build_info")
}
