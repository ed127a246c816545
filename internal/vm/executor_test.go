package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
	"libvirt.org/go/libvirtxml"
)

// harness is an executor on a connection of its own, plus a go-libvirt
// connection the test uses to set things up and to check what libvirt says.
type harness struct {
	ex   *vm.Executor
	conn *vm.Conn
	// lv outlives a restart of libvirtd, which another package's test may
	// make while this one runs: ask it for a client at every use.
	lv *testbed.Live
	// stop ends the Conn's Run and waits for it; the test's end does too.
	stop func()
}

func newHarness(t *testing.T) harness {
	t.Helper()
	return newHarnessWith(t, 15*time.Second, testbed.ImageRoot())
}

// newHarnessRoots is newHarness with the disk roots given.
func newHarnessRoots(t *testing.T, diskRoots ...string) harness {
	t.Helper()
	return newHarnessWith(t, 15*time.Second, diskRoots...)
}

// newHarnessWith is newHarness with the libvirt call timeout and the disk
// roots given.
func newHarnessWith(t *testing.T, timeout time.Duration, diskRoots ...string) harness {
	t.Helper()
	lv := testbed.Require(t)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	conn := vm.NewConn(testbed.Socket(), "qemu:///system", timeout, log)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { conn.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	roots, err := vm.NewDiskRoots(diskRoots)
	if err != nil {
		t.Fatal(err)
	}
	ex := vm.NewExecutor(conn, vm.Config{Roots: roots, ShutdownRetry: 500 * time.Millisecond}, log)
	return harness{ex: ex, conn: conn, lv: lv, stop: stop}
}

func (h harness) do(t *testing.T, vmName string, a vm.Action, params string) (vm.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return h.ex.Do(ctx, vmName, a, json.RawMessage(params))
}

// ok runs an action that must succeed and checks changed and state.
func (h harness) ok(t *testing.T, dom libvirt.Domain, a vm.Action, params string, changed bool, state string) vm.Result {
	t.Helper()
	res, err := h.do(t, dom.Name, a, params)
	if err != nil {
		t.Fatalf("%s %s %s: %v", a, dom.Name, params, err)
	}
	if res.Changed != changed || res.State != state {
		t.Fatalf("%s %s %s = changed %v state %q, want changed %v state %q (detail %v)", a, dom.Name, params, res.Changed, res.State, changed, state, res.Detail)
	}
	return res
}

func (h harness) fails(t *testing.T, vmName string, a vm.Action, params string, want error) error {
	t.Helper()
	_, err := h.do(t, vmName, a, params)
	if !errors.Is(err, want) {
		t.Fatalf("%s %s %s: error %v, want %v", a, vmName, params, err, want)
	}
	return err
}

func wantState(t *testing.T, lv *testbed.Live, dom libvirt.Domain, want libvirt.DomainState) {
	t.Helper()
	if got := lv.State(dom); got != want {
		t.Fatalf("libvirt says %s is %s, want %s", dom.Name, vm.StateName(got), vm.StateName(want))
	}
}

// resets counts libvirt's reboot events of dom from now on, to prove a
// reset really ran (or did not). One reset may raise more than one event.
func resets(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain) func() int {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := l.SubscribeEvents(ctx, libvirt.DomainEventIDReboot, libvirt.OptDomain{dom})
	if err != nil {
		t.Fatalf("subscribe to reboot events: %v", err)
	}
	n := make(chan int)
	go func() {
		count := 0
		for ev := range ch {
			if m, ok := ev.(*libvirt.DomainEventCallbackRebootMsg); ok && m.Msg.Dom.UUID == dom.UUID {
				count++
			}
		}
		n <- count
	}()
	return func() int {
		// The event arrives shortly after the reset returns.
		time.Sleep(300 * time.Millisecond)
		cancel()
		return <-n
	}
}

func TestStart(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("start", testbed.DomainOptions{})
	h.ok(t, dom, vm.Start, ``, true, "running")
	wantState(t, h.lv, dom, libvirt.DomainRunning)
	h.ok(t, dom, vm.Start, `{}`, false, "running")
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

func TestStartResumesPaused(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("resume", testbed.DomainOptions{Running: true})
	if err := h.lv.Conn().DomainSuspend(dom); err != nil {
		t.Fatal(err)
	}
	res := h.ok(t, dom, vm.Start, ``, true, "running")
	if res.Detail["resumed"] != true {
		t.Fatalf("detail %v, want resumed=true", res.Detail)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

func TestStartByUUID(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("uuid", testbed.DomainOptions{})
	res, err := h.do(t, testbed.UUID(dom), vm.Start, ``)
	if err != nil || !res.Changed || res.State != "running" {
		t.Fatalf("start by UUID: %+v, %v", res, err)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

func TestStopForce(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("stopforce", testbed.DomainOptions{Running: true})
	res := h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff")
	if res.Detail["forced"] != true {
		t.Fatalf("detail %v, want forced=true", res.Detail)
	}
	wantState(t, h.lv, dom, libvirt.DomainShutoff)
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, false, "shutoff")
	h.ok(t, dom, vm.Stop, ``, false, "shutoff")
}

// The test guest ignores ACPI, so a graceful stop must end in the destroy
// after its timeout, and say so.
func TestStopGracefulForcedAfterTimeout(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("stoptimeout", testbed.DomainOptions{Running: true})
	start := time.Now()
	res := h.ok(t, dom, vm.Stop, `{"timeout":"1500ms"}`, true, "shutoff")
	if res.Detail["forced"] != true {
		t.Fatalf("detail %v, want forced=true", res.Detail)
	}
	if waited := time.Since(start); waited < 1500*time.Millisecond {
		t.Fatalf("destroyed after %s, before the 1.5s timeout", waited)
	}
	wantState(t, h.lv, dom, libvirt.DomainShutoff)
}

// A guest that powers off while the stop waits (here: the test pulls the
// plug, as a guest honouring ACPI would) ends the wait unforced.
func TestStopGracefulGuestGoesDown(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("stopdown", testbed.DomainOptions{Running: true})
	go func() {
		time.Sleep(time.Second)
		_ = h.lv.Conn().DomainDestroy(dom)
	}()
	res := h.ok(t, dom, vm.Stop, `{"timeout":"60s"}`, true, "shutoff")
	if res.Detail["forced"] != false {
		t.Fatalf("detail %v, want forced=false", res.Detail)
	}
	wantState(t, h.lv, dom, libvirt.DomainShutoff)
}

func TestStopPausedIsForcedAtOnce(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("stoppaused", testbed.DomainOptions{Running: true})
	if err := h.lv.Conn().DomainSuspend(dom); err != nil {
		t.Fatal(err)
	}
	res := h.ok(t, dom, vm.Stop, `{"timeout":"10m"}`, true, "shutoff")
	if res.Detail["forced"] != true || res.Detail["reason"] != "paused" {
		t.Fatalf("detail %v, want forced=true reason=paused", res.Detail)
	}
}

func TestStopTransientDomain(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("transient", testbed.DomainOptions{Transient: true})
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff")
	h.fails(t, dom.Name, vm.Status, ``, vm.ErrNotFound)
}

func TestRebootHard(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("reboothard", testbed.DomainOptions{Running: true})
	count := resets(t, h.lv.Conn(), dom)
	res := h.ok(t, dom, vm.Reboot, `{"mode":"hard"}`, true, "running")
	if res.Detail["method"] != "reset" {
		t.Fatalf("detail %v, want method=reset", res.Detail)
	}
	if n := count(); n == 0 {
		t.Fatalf("no guest reset seen: the reset did not run")
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// The test guest ignores ACPI: a soft reboot must fall back to a reset that
// really happens, and say so.
func TestRebootSoftFallsBackToReset(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("rebootfallback", testbed.DomainOptions{Running: true})
	count := resets(t, h.lv.Conn(), dom)
	res := h.ok(t, dom, vm.Reboot, `{"timeout":"1500ms"}`, true, "running")
	if res.Detail["method"] != "reset" || res.Detail["fallback"] != true {
		t.Fatalf("detail %v, want method=reset fallback=true", res.Detail)
	}
	if n := count(); n == 0 {
		t.Fatalf("no guest reset seen: the reset did not run")
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// A guest that goes down during a soft reboot is started again.
func TestRebootSoftShutdownAndStart(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("rebootsoft", testbed.DomainOptions{Running: true})
	count := resets(t, h.lv.Conn(), dom)
	go func() {
		time.Sleep(time.Second)
		_ = h.lv.Conn().DomainDestroy(dom)
	}()
	res := h.ok(t, dom, vm.Reboot, `{"timeout":"60s"}`, true, "running")
	if res.Detail["method"] != "shutdown" || res.Detail["fallback"] != nil {
		t.Fatalf("detail %v, want method=shutdown and no fallback", res.Detail)
	}
	if n := count(); n != 0 {
		t.Fatalf("%d guest resets seen, want none: the guest went down by itself", n)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

func TestRebootConflicts(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	off := h.lv.Domain("rebootoff", testbed.DomainOptions{})
	h.fails(t, off.Name, vm.Reboot, ``, vm.ErrConflict)
	wantState(t, h.lv, off, libvirt.DomainShutoff)
	transient := h.lv.Domain("reboottransient", testbed.DomainOptions{Transient: true})
	h.fails(t, transient.Name, vm.Reboot, `{"mode":"soft"}`, vm.ErrConflict)
	wantState(t, h.lv, transient, libvirt.DomainRunning)
}

func TestStatus(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("status", testbed.DomainOptions{})
	res := h.ok(t, dom, vm.Status, ``, false, "shutoff")
	if res.Detail["uuid"] != testbed.UUID(dom) {
		t.Fatalf("status uuid %v, want %s", res.Detail["uuid"], testbed.UUID(dom))
	}
}

// A virtio-scsi disk hot-unplugs at once: attach, attach again (unchanged),
// detach, detach again (unchanged), each checked in libvirt's live XML and
// config.
func TestAttachDetachSCSI(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("scsi", testbed.DomainOptions{Running: true})
	img := testbed.DiskImage(t, 8)
	params := `{"path":"` + img + `","bus":"scsi"}`
	res := h.ok(t, dom, vm.AttachDisk, params, true, "running")
	if res.Detail["target"] != "sda" {
		t.Fatalf("detail %v, want target sda", res.Detail)
	}
	for _, inactive := range []bool{false, true} {
		if got := h.lv.Disks(dom, inactive)["sda"]; got != img {
			t.Fatalf("sda (inactive=%v) is %q, want %s", inactive, got, img)
		}
	}
	res = h.ok(t, dom, vm.AttachDisk, params, false, "running")
	if res.Detail["target"] != "sda" {
		t.Fatalf("second attach detail %v, want target sda", res.Detail)
	}

	h.ok(t, dom, vm.DetachDisk, `{"target":"sda","timeout":"20s"}`, true, "running")
	for _, inactive := range []bool{false, true} {
		if src, still := h.lv.Disks(dom, inactive)["sda"]; still {
			t.Fatalf("sda (inactive=%v) still attached to %s after detach", inactive, src)
		}
	}
	h.ok(t, dom, vm.DetachDisk, `{"target":"sda"}`, false, "running")
	h.ok(t, dom, vm.DetachDisk, `{"path":"`+img+`"}`, false, "running")
}

// A virtio disk is never released by a guest without a driver, while
// libvirt's detach still returns success: the detach must end in timeout,
// never ok, and the disk must still be there.
func TestDetachVirtioGuestIgnoresUnplug(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("virtio", testbed.DomainOptions{Running: true})
	img := testbed.DiskImage(t, 8)
	res := h.ok(t, dom, vm.AttachDisk, `{"path":"`+img+`","persistent":false}`, true, "running")
	target, _ := res.Detail["target"].(string)
	if target != "vda" {
		t.Fatalf("detail %v, want target vda", res.Detail)
	}
	if _, inConfig := h.lv.Disks(dom, true)[target]; inConfig {
		t.Fatalf("persistent=false attach reached the config")
	}
	h.fails(t, dom.Name, vm.DetachDisk, `{"path":"`+img+`","timeout":"3s","persistent":false}`, vm.ErrTimeout)
	if got := h.lv.Disks(dom, false)[target]; got != img {
		t.Fatalf("after the timed-out detach, live %s is %q, want still %s", target, got, img)
	}
}

func TestAttachToShutoffDomainGoesToConfig(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("attachoff", testbed.DomainOptions{})
	img := testbed.DiskImage(t, 8)
	res := h.ok(t, dom, vm.AttachDisk, `{"path":"`+img+`","target":"vdc","readonly":true}`, true, "shutoff")
	if res.Detail["target"] != "vdc" {
		t.Fatalf("detail %v, want target vdc", res.Detail)
	}
	if got := h.lv.Disks(dom, true)["vdc"]; got != img {
		t.Fatalf("config vdc is %q, want %s", got, img)
	}
	h.fails(t, dom.Name, vm.AttachDisk, `{"path":"`+img+`","persistent":false}`, vm.ErrConflict)
	// The disk is in the config, so the domain boots with it.
	h.ok(t, dom, vm.Start, ``, true, "running")
	if got := h.lv.Disks(dom, false)["vdc"]; got != img {
		t.Fatalf("live vdc after start is %q, want %s", got, img)
	}
	h.ok(t, dom, vm.Stop, `{"mode":"force"}`, true, "shutoff")
	h.ok(t, dom, vm.DetachDisk, `{"target":"vdc"}`, true, "shutoff")
	if _, still := h.lv.Disks(dom, true)["vdc"]; still {
		t.Fatalf("vdc still in the config after detach")
	}
}

func TestAttachTargetTaken(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("taken", testbed.DomainOptions{})
	a, b := testbed.DiskImage(t, 1), testbed.DiskImage(t, 1)
	h.ok(t, dom, vm.AttachDisk, `{"path":"`+a+`","target":"vdb"}`, true, "shutoff")
	h.fails(t, dom.Name, vm.AttachDisk, `{"path":"`+b+`","target":"vdb"}`, vm.ErrConflict)
	res := h.ok(t, dom, vm.AttachDisk, `{"path":"`+b+`"}`, true, "shutoff")
	if res.Detail["target"] != "vda" {
		t.Fatalf("next free target %v, want vda", res.Detail["target"])
	}
}

func TestNotFound(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	img := testbed.DiskImage(t, 1)
	missing := testbed.Name("missing")
	for _, c := range []struct {
		vm     string
		action vm.Action
		params string
	}{
		{missing, vm.Start, ``},
		{missing, vm.Stop, ``},
		{missing, vm.Reboot, ``},
		{missing, vm.Status, ``},
		{missing, vm.AttachDisk, `{"path":"` + img + `"}`},
		{missing, vm.DetachDisk, `{"target":"vdb"}`},
		{"6f1c2b1e-0000-4000-8000-00000000dead", vm.Start, ``},
	} {
		h.fails(t, c.vm, c.action, c.params, vm.ErrNotFound)
	}
	dom := h.lv.Domain("noimage", testbed.DomainOptions{})
	h.fails(t, dom.Name, vm.AttachDisk, `{"path":"`+filepath.Join(filepath.Dir(img), "nope.img")+`"}`, vm.ErrNotFound)
}

// No path outside the disk roots reaches a guest, however it is spelled.
func TestAttachForbiddenPaths(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("forbidden", testbed.DomainOptions{Running: true})
	dir := testbed.Dir(t)
	mustSymlink(t, "/etc/passwd", filepath.Join(dir, "escape.img"))
	mustSymlink(t, "/dev/null", filepath.Join(dir, "devlink.img"))
	if err := syscall.Mknod(filepath.Join(dir, "node.img"), syscall.S_IFCHR|0o600, 1<<8|3); err != nil {
		t.Fatalf("mknod: %v", err)
	}
	for _, p := range []string{
		"/etc/shadow",
		testbed.ImageRoot() + "/../../../../etc/shadow",
		filepath.Join(dir, "escape.img"),
		filepath.Join(dir, "devlink.img"),
		filepath.Join(dir, "node.img"),
		"/dev/null",
		testbed.ImageRoot(),
	} {
		h.fails(t, dom.Name, vm.AttachDisk, `{"path":"`+p+`"}`, vm.ErrForbidden)
	}
	if disks := h.lv.Disks(dom, false); len(disks) != 0 {
		t.Fatalf("disks %v reached the domain", disks)
	}
}

func TestBadParameters(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("badparams", testbed.DomainOptions{Running: true})
	for _, c := range []struct {
		action vm.Action
		params string
	}{
		{vm.Start, `{"force":true}`},
		{vm.Stop, `{"mode":"gentle"}`},
		{vm.Stop, `{"timeout":60}`},
		{vm.Stop, `{"timeout":"-1s"}`},
		{vm.Reboot, `{"mode":"warm"}`},
		{vm.AttachDisk, `{}`},
		{vm.AttachDisk, `{"path":"relative.img"}`},
		{vm.AttachDisk, `{"path":"/x.img","bus":"ide"}`},
		{vm.DetachDisk, `{}`},
		{vm.Stop, `[1,2]`},
		{vm.Action("explode"), ``},
	} {
		h.fails(t, dom.Name, c.action, c.params, vm.ErrInvalid)
	}
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

// libvirtd goes away in the middle of a series of calls and comes back:
// the calls made while it is down wait for it, and every call completes.
func TestLibvirtdRestart(t *testing.T) {
	h := newHarness(t)
	testbed.OwnLibvirtd(t)
	dom := h.lv.Domain("restart", testbed.DomainOptions{})
	h.ok(t, dom, vm.Start, ``, true, "running")

	testbed.StopLibvirtd(t)
	type outcome struct {
		res vm.Result
		err error
	}
	results := make(chan outcome, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		res, err := h.ex.Do(ctx, dom.Name, vm.Stop, json.RawMessage(`{"mode":"force"}`))
		results <- outcome{res, err}
	}()
	time.Sleep(time.Second) // the stop is now waiting for libvirtd
	testbed.StartLibvirtd(t)
	got := <-results
	if got.err != nil || !got.res.Changed || got.res.State != "shutoff" {
		t.Fatalf("stop across the restart: %+v, %v", got.res, got.err)
	}
	h.ok(t, dom, vm.Start, ``, true, "running")
	h.ok(t, dom, vm.Status, ``, false, "running")
	// The test's own connection died with the daemon; Live dials anew.
	wantState(t, h.lv, dom, libvirt.DomainRunning)
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// bus, format and readonly reach libvirt as asked. The domain is shut off:
// a SATA disk cannot be hot-plugged on the pc machine, and the image is raw
// whatever the format says, which only matters once QEMU opens it.
func TestAttachParametersReachTheConfig(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	dom := h.lv.Domain("attachparams", testbed.DomainOptions{})
	for _, c := range []struct {
		params, target, bus, format string
		readonly                    bool
	}{
		{`"bus":"sata","format":"qcow2"`, "sda", "sata", "qcow2", false},
		{`"bus":"scsi","readonly":true`, "sdb", "scsi", "raw", true},
		{`"target":"vdd"`, "vdd", "virtio", "raw", false},
	} {
		img := testbed.DiskImage(t, 1)
		res := h.ok(t, dom, vm.AttachDisk, `{"path":"`+img+`",`+c.params+`}`, true, "shutoff")
		if res.Detail["target"] != c.target {
			t.Fatalf("%s: detail %v, want target %s", c.params, res.Detail, c.target)
		}
		d, ok := configDisk(t, h.lv.Conn(), dom, c.target)
		if !ok {
			t.Fatalf("%s: %s not in the config", c.params, c.target)
		}
		if d.Target.Bus != c.bus || d.Driver == nil || d.Driver.Type != c.format || (d.ReadOnly != nil) != c.readonly {
			t.Errorf("%s: config has bus %q, driver %+v, readonly %v; want %s, %s, %v",
				c.params, d.Target.Bus, d.Driver, d.ReadOnly != nil, c.bus, c.format, c.readonly)
		}
	}
}

func configDisk(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, target string) (libvirtxml.DomainDisk, bool) {
	t.Helper()
	doc, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	for _, d := range def.Devices.Disks {
		if d.Target != nil && d.Target.Dev == target {
			return d, true
		}
	}
	return libvirtxml.DomainDisk{}, false
}

// With a {vm} disk root a domain attaches only from its own directory, by
// name or by UUID, and never from another domain's.
func TestAttachPerVMRoots(t *testing.T) {
	t.Parallel()
	dir := testbed.Dir(t)
	h := newHarnessRoots(t, filepath.Join(dir, "{vm}"))
	a := h.lv.Domain("pervm-a", testbed.DomainOptions{Running: true})
	b := h.lv.Domain("pervm-b", testbed.DomainOptions{})
	own, other := imageIn(t, filepath.Join(dir, a.Name)), imageIn(t, filepath.Join(dir, b.Name))

	res, err := h.do(t, testbed.UUID(a), vm.AttachDisk, `{"path":"`+own+`","bus":"scsi"}`)
	if err != nil || !res.Changed || res.State != "running" || res.Detail["target"] != "sda" {
		t.Fatalf("attach from its own dir by UUID: %+v, %v", res, err)
	}
	if got := h.lv.Disks(a, false)["sda"]; got != own {
		t.Fatalf("live sda of %s is %q, want %s", a.Name, got, own)
	}
	for _, p := range []string{
		other,
		filepath.Join(dir, a.Name, "..", b.Name, "disk.img"),
		filepath.Join(dir, "disk.img"),
	} {
		h.fails(t, a.Name, vm.AttachDisk, `{"path":"`+p+`"}`, vm.ErrForbidden)
		h.fails(t, testbed.UUID(a), vm.AttachDisk, `{"path":"`+p+`"}`, vm.ErrForbidden)
	}
	if disks := h.lv.Disks(a, false); len(disks) != 1 {
		t.Fatalf("%s has disks %v, want only sda", a.Name, disks)
	}
	// The other domain's image is fine for the other domain.
	h.ok(t, b, vm.AttachDisk, `{"path":"`+other+`"}`, true, "shutoff")
	if got := h.lv.Disks(b, true)["vda"]; got != other {
		t.Fatalf("config vda of %s is %q, want %s", b.Name, got, other)
	}
}

// A file one domain uses may go to another only when both attaches are
// read-only, whichever definition of the holder has it and however its
// path is spelled there.
func TestAttachSharedDisk(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	running := h.lv.Domain("share-run", testbed.DomainOptions{Running: true})
	off := h.lv.Domain("share-off", testbed.DomainOptions{})
	live := libvirt.DomainDeviceModifyLive
	config := libvirt.DomainDeviceModifyConfig
	for i, c := range []struct {
		name             string
		holder           libvirt.Domain
		holderFlags      libvirt.DomainDeviceModifyFlags
		holderReadOnly   bool
		holderSymlink    bool // the holder names the file through a symlink
		attacher         libvirt.Domain
		attacherReadOnly bool
		want             error // nil: attached
	}{
		{"rw then rw", running, live | config, false, false, off, false, vm.ErrForbidden},
		{"rw then ro", running, live | config, false, false, off, true, vm.ErrForbidden},
		{"ro then rw", running, live | config, true, false, off, false, vm.ErrForbidden},
		{"ro then ro", running, live | config, true, false, off, true, nil},
		{"rw in the config of a running domain", running, config, false, false, off, true, vm.ErrForbidden},
		{"rw through a symlink", running, live, false, true, off, false, vm.ErrForbidden},
		{"rw in a shut off domain", off, config, false, false, running, false, vm.ErrForbidden},
		{"ro in a shut off domain, then ro", off, config, true, false, running, true, nil},
	} {
		img := testbed.DiskImage(t, 1)
		held := img
		if c.holderSymlink {
			held = filepath.Join(testbed.Dir(t), "alias.img")
			mustSymlink(t, img, held)
		}
		attachDirect(t, h.lv.Conn(), c.holder, held, "vd"+string(rune('b'+i)), c.holderReadOnly, c.holderFlags)
		params := fmt.Sprintf(`{"path":%q,"readonly":%v}`, img, c.attacherReadOnly)
		shutoff := c.attacher.Name == off.Name
		if c.want != nil {
			h.fails(t, c.attacher.Name, vm.AttachDisk, params, c.want)
		} else if _, err := h.do(t, c.attacher.Name, vm.AttachDisk, params); err != nil {
			t.Fatalf("%s: attach to %s: %v", c.name, c.attacher.Name, err)
		}
		attached := slices.Contains(slices.Collect(maps.Values(h.lv.Disks(c.attacher, shutoff))), img)
		if attached != (c.want == nil) {
			t.Fatalf("%s: %s has the image: %v, want %v", c.name, c.attacher.Name, attached, c.want == nil)
		}
	}
}

// attachDirect attaches img to dom through libvirt, around virtbus, as
// another tool (virsh) may have done.
func attachDirect(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, img, target string, readonly bool, flags libvirt.DomainDeviceModifyFlags) {
	t.Helper()
	disk := libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: img}},
		Target: &libvirtxml.DomainDiskTarget{Dev: target, Bus: "virtio"},
	}
	if readonly {
		disk.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	doc, err := disk.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.DomainAttachDeviceFlags(dom, doc, uint32(flags)); err != nil {
		t.Fatalf("attach %s to %s: %v", img, dom.Name, err)
	}
}

// imageIn makes dir (reachable for QEMU) with a 1 MiB disk.img in it; the
// test's testbed.Dir that holds it removes both.
func imageIn(t *testing.T, dir string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil { // Mkdir's mode is cut by the umask
		t.Fatal(err)
	}
	p := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	return p
}
