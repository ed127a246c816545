//go:build readme

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
)

// readmeExamples says how to run and check each `nats` command in
// README.md's code blocks, keyed by its first three words. The test fails
// for a command without an entry and for an entry without a command, so a
// new example cannot go unchecked and a changed one is noticed.
var readmeExamples = map[string]readmeExample{
	"nats sub 'virtbus.evt.hv1.>'": {long: true, want: []string{
		`Received on "virtbus\.evt\.hv1\.web-1\.stop"$`,
		// The id is the example's Nats-Msg-Id, not an empty one.
		`^\{"id":"stop-web-1-[0-9]+","host":"hv1","vm":"web-1","action":"stop","status":"ok","changed":true,"state":"shutoff"`,
	}},
	"nats pub -J": {want: []string{
		`Published [0-9]+ bytes to "virtbus\.cmd\.hv1\.web-1\.stop"$`,
		`Stored in Stream: VIRTBUS_CMD Sequence: [0-9]+`,
	}},
	"nats req virtbus.cmd.hv1.web-1.status": {core: true, want: []string{
		`^\{"id":"~core-[^"]+","host":"hv1","vm":"web-1","action":"status","status":"ok","changed":false,"state":"(running|shutoff)"`,
	}},
	"nats sub 'virtbus.state.hv1.>'": {long: true, want: []string{
		`Received on "virtbus\.state\.hv1\.web-1"$`,
		`^\{"host":"hv1","vm":"web-1","uuid":"[0-9a-f-]{36}","state":"shutoff"`,
	}},
	"nats kv ls": {want: []string{`^hv1\.web-1$`}},
	// Before or after the stop's change reached the bucket.
	"nats kv get": {want: []string{
		`^\{"host":"hv1","vm":"web-1","uuid":"[0-9a-f-]{36}","state":"(running|shutoff)",.*"at":"[^"]+"\}$`,
	}},
	// The JetStream worker's instance of the micro service.
	"nats micro ls": {want: []string{`│ virtbus +│ [^│]+│ [A-Za-z0-9]+ +│ virtbus worker of host hv1 +│`}},
	"nats micro info": {want: []string{
		`Metadata: +host: hv1$`,
		`Subject: virtbus\.hosts\.hv1\.status$`,
	}},
	"nats micro stats": {want: []string{`"host": "hv1",$`, `"role": "active",$`, `"libvirt_up": true,$`}},
	"nats req '$SRV.PING.virtbus'": {want: []string{
		`^\{"name":"virtbus",.*"metadata":\{"host":"hv1".*"type":"io\.nats\.micro\.v1\.ping_response"\}$`,
	}},
	"nats req virtbus.hosts.hv1.status": {want: []string{
		`^\{"host":"hv1",.*"role":"active",.*"libvirt_up":true,"domains":[0-9]+\}$`,
	}},
	"nats kv watch": {long: true, want: []string{
		`PUT VIRTBUS_VMS > hv1\.web-1: \{"host":"hv1","vm":"web-1","uuid":"[0-9a-f-]{36}","state":"running"`,
		`PUT VIRTBUS_VMS > hv1\.web-1: \{"host":"hv1","vm":"web-1","uuid":"[0-9a-f-]{36}","state":"shutoff"`,
	}},
}

type readmeExample struct {
	// core: the command is for a worker with VIRTBUS_DELIVERY=core, so it
	// goes to that worker's server, which has no JetStream and so no
	// stream to answer a request first. The others go to the JetStream
	// worker's server.
	core bool
	// long: it runs until stopped (nats sub, nats kv watch). It starts
	// before the others, without the `&` the README may give it, and is
	// stopped once its output has all it wants.
	long bool
	// want: regular expressions, each of which must match a line of the
	// command's output (stdout and stderr).
	want []string
}

// readmeCommand is one `nats` command as README.md writes it.
type readmeCommand struct {
	key  string // its first three words, its entry in readmeExamples
	text string // verbatim, continuation lines and comment included
}

// replyHeader finds the Virtbus-Reply an example sets: the command's
// completion must arrive there.
var replyHeader = regexp.MustCompile(`Virtbus-Reply:([A-Za-z0-9._-]+)`)

// longWait bounds how long a running example may take to print all it
// wants once every command has run.
const longWait = 20 * time.Second

// TestREADMENatsExamples runs every `nats` command of README.md verbatim
// through bash with the stock nats CLI (make lint-readme fetches it), as a
// reader would: against a real worker as hv1 in JetStream mode and another
// in core mode, and a domain web-1 running in libvirt's test driver. Each
// command must exit 0 (a long-running one must still run when it is
// stopped) and print what its entry wants; one with a Virtbus-Reply must
// get an ok completion there; and web-1 must end shut off in libvirt.
func TestREADMENatsExamples(t *testing.T) {
	cli := natsCLI(t)
	commands := readmeNatsCommands(t)

	td, err := testdriver.Open(testbed.Socket())
	if err != nil {
		t.Fatalf("libvirtd's test driver (make lint-readme brings libvirtd up): %v", err)
	}
	t.Cleanup(func() {
		if err := td.Close(); err != nil {
			t.Error(err)
		}
	})
	if err := td.Define("web-1"); err != nil {
		t.Fatalf("%v (a web-1 left behind in %s? remove it)", err, testdriver.URI)
	}
	startTestDomain(t, "web-1")

	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	core := bustest.RunCoreServer(t)
	startWorker(t, workerEnv(t, srv.ClientURL(), "hv1").with("VIRTBUS_LIBVIRT_URI", testdriver.URI))
	startWorker(t, workerEnv(t, core.ClientURL(), "hv1").with("VIRTBUS_LIBVIRT_URI", testdriver.URI,
		"VIRTBUS_DELIVERY", "core"))
	nc := bustest.Connect(t, srv.ClientURL())
	// A running worker has told the bucket about its domains.
	waitKey(t, bustest.JetStream(t, nc), "hv1", "web-1", "running")

	home := t.TempDir() // so that no nats context saved on this machine applies
	env := func(ex readmeExample) []string {
		url := srv.ClientURL()
		if ex.core {
			url = core.ClientURL()
		}
		return []string{"PATH=" + filepath.Dir(cli) + ":" + os.Getenv("PATH"),
			"HOME=" + home, "XDG_CONFIG_HOME=" + home, "NATS_URL=" + url}
	}

	var running []*runningExample
	for _, c := range commands {
		if ex := readmeExamples[c.key]; ex.long {
			running = append(running, startLongExample(t, c, env(ex)))
		}
	}
	waitCLISubscribed(t, srv, len(running))

	for _, c := range commands {
		ex := readmeExamples[c.key]
		if ex.long {
			continue
		}
		t.Run(c.key, func(t *testing.T) {
			var replies *bustest.Collector[received]
			reply := replyHeader.FindStringSubmatch(c.text)
			if reply != nil {
				replies = collect(t, nc, reply[1])
			}
			out, err := runExample(c, env(ex))
			t.Logf("$ %s\n%s", c.text, out)
			if err != nil {
				t.Fatalf("%v", err)
			}
			wantLines(t, out, ex.want)
			if reply != nil {
				got := replies.WaitFor(t, waitTimeout, "the completion on "+reply[1],
					func(got []received) bool { return len(got) > 0 })
				if got[0].Status != bus.StatusOK {
					t.Errorf("completion on %s: %s, want ok", reply[1], got[0])
				}
			}
		})
	}

	for _, r := range running {
		t.Run(r.key, func(t *testing.T) {
			want := readmeExamples[r.key].want
			out, err := r.stopOnceItHas(want)
			t.Logf("$ %s\n%s", r.text, out)
			if err != nil {
				t.Fatalf("%v", err)
			}
			wantLines(t, out, want)
		})
	}

	if st, err := td.State("web-1"); err != nil || st != libvirt.DomainShutoff {
		t.Errorf("web-1 in libvirt: state %v (%v), want shut off after the README's stop", st, err)
	}
}

// natsCLI is the nats CLI the examples run: VIRTBUS_NATS_CLI, or nats on
// PATH. Its directory goes first in the examples' PATH.
func natsCLI(t *testing.T) string {
	t.Helper()
	cli := os.Getenv("VIRTBUS_NATS_CLI")
	if cli == "" {
		var err error
		if cli, err = exec.LookPath("nats"); err != nil {
			t.Fatal("no nats CLI: run make lint-readme, which fetches it, or set VIRTBUS_NATS_CLI")
		}
	}
	if filepath.Base(cli) != "nats" {
		t.Fatalf("VIRTBUS_NATS_CLI=%s: the examples call it nats", cli)
	}
	out, err := exec.Command(cli, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --version: %v\n%s", cli, err, out)
	}
	t.Logf("nats CLI %s (%s)", strings.TrimSpace(string(out)), cli)
	return cli
}

// readmeNatsCommands pulls every line that starts with `nats ` out of
// README.md's fenced code blocks, with its continuation lines, and checks
// that each has an entry in readmeExamples and each entry a command.
func readmeNatsCommands(t *testing.T) []readmeCommand {
	t.Helper()
	f, err := os.Open("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []readmeCommand
	fenced, cont := false, false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "```"):
			fenced, cont = !fenced, false
		case cont:
			out[len(out)-1].text += "\n" + line
		case fenced && strings.HasPrefix(line, "nats "):
			out = append(out, readmeCommand{key: readmeKey(line), text: line})
		default:
			continue
		}
		cont = fenced && strings.HasSuffix(line, `\`)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, c := range out {
		if _, ok := readmeExamples[c.key]; !ok {
			t.Errorf("README.md has %q, which readmeExamples does not check: add an entry", c.text)
		}
		if seen[c.key] {
			t.Errorf("README.md has two commands that start %q: make readmeExamples' keys longer", c.key)
		}
		seen[c.key] = true
	}
	for key := range readmeExamples {
		if !seen[key] {
			t.Errorf("readmeExamples checks %q, which README.md no longer has", key)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return out
}

func readmeKey(text string) string {
	words := strings.Fields(text)
	return strings.Join(words[:min(3, len(words))], " ")
}

// startTestDomain starts name, already defined in the test driver, over a
// connection of its own.
func startTestDomain(t *testing.T, name string) {
	t.Helper()
	l, err := testdriver.Dial(testbed.Socket())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Disconnect() }()
	dom, err := l.DomainLookupByName(name)
	if err == nil {
		err = l.DomainCreate(dom)
	}
	if err != nil {
		t.Fatalf("start %s in %s: %v", name, testdriver.URI, err)
	}
}

// waitCLISubscribed waits until n nats CLI connections to s have a
// subscription: the long-running examples listen before anything is sent.
func waitCLISubscribed(t *testing.T, s *server.Server, n int) {
	t.Helper()
	bustest.Eventually(t, waitTimeout, fmt.Sprintf("%d nats CLI subscribers", n), func() bool {
		cz, err := s.Connz(&server.ConnzOptions{})
		if err != nil {
			return false
		}
		k := 0
		for _, c := range cz.Conns {
			if strings.HasPrefix(c.Name, "NATS CLI") && c.NumSubs > 0 {
				k++
			}
		}
		return k >= n
	})
}

// shell is bash running text in a process group of its own, so that
// stopping it stops whatever it started.
func shell(ctx context.Context, text string, env []string, out *bustest.Buffer) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "bash", "-c", text)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd
}

// runExample runs a command that ends by itself, and returns its output
// and an error unless it exited 0 within waitTimeout.
func runExample(c readmeCommand, env []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	var out bustest.Buffer
	if err := shell(ctx, c.text, env, &out).Run(); err != nil {
		if ctx.Err() != nil {
			return out.String(), fmt.Errorf("still running after %s", waitTimeout)
		}
		return out.String(), err
	}
	return out.String(), nil
}

// runningExample is a long-running command started in the background.
type runningExample struct {
	readmeCommand
	cmd    *exec.Cmd
	out    bustest.Buffer
	exited chan struct{} // closed once it has ended, with err set
	err    error
}

func startLongExample(t *testing.T, c readmeCommand, env []string) *runningExample {
	t.Helper()
	r := &runningExample{readmeCommand: c, exited: make(chan struct{})}
	text := strings.TrimSuffix(strings.TrimSpace(c.text), "&")
	r.cmd = shell(context.Background(), text, env, &r.out)
	if err := r.cmd.Start(); err != nil {
		t.Fatalf("%s: %v", c.text, err)
	}
	go func() { r.err = r.cmd.Wait(); close(r.exited) }()
	t.Cleanup(func() { r.signal(syscall.SIGKILL) })
	return r
}

func (r *runningExample) ended() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

// signal sends sig to the command's process group unless it has ended.
func (r *runningExample) signal(sig syscall.Signal) {
	if !r.ended() {
		_ = syscall.Kill(-r.cmd.Process.Pid, sig)
	}
}

// stopOnceItHas waits up to longWait for output that matches every one of
// want, then stops the command with SIGTERM and returns its output; an
// error if it had ended by itself before.
func (r *runningExample) stopOnceItHas(want []string) (string, error) {
	deadline := time.Now().Add(longWait)
	for time.Now().Before(deadline) && len(missingLines(r.out.String(), want)) > 0 && !r.ended() {
		time.Sleep(50 * time.Millisecond)
	}
	if r.ended() {
		return r.out.String(), fmt.Errorf("ended by itself (%v); it should run until stopped", r.err)
	}
	r.signal(syscall.SIGTERM)
	select {
	case <-r.exited:
		return r.out.String(), nil
	case <-time.After(10 * time.Second):
		r.signal(syscall.SIGKILL)
		<-r.exited
		return r.out.String(), errors.New("did not stop within 10 s of SIGTERM")
	}
}

// missingLines returns the patterns of want that no line of out matches.
func missingLines(out string, want []string) []string {
	lines := strings.Split(out, "\n")
	var missing []string
	for _, w := range want {
		re := regexp.MustCompile(w)
		if !slices.ContainsFunc(lines, re.MatchString) {
			missing = append(missing, w)
		}
	}
	return missing
}

func wantLines(t *testing.T, out string, want []string) {
	t.Helper()
	for _, w := range missingLines(out, want) {
		t.Errorf("no line of the output matches %s", w)
	}
}
