package vm_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// These tests boot the test guest (testbed.Guest, a tiny Linux made by
// scripts/guest-image.sh): what a real guest does with the ACPI power
// button and a hot-unplugged disk, rather than a test pulling the plug.

// wantGuestPoweredOff checks that g is shut off because it powered itself
// off for the power button, once: not destroyed.
func wantGuestPoweredOff(t *testing.T, lv *testbed.Live, g testbed.Guest) {
	t.Helper()
	if r := lv.ShutoffReason(g.Domain); r != libvirt.DomainShutoffShutdown {
		t.Fatalf("%s shut off with reason %d, want %d (the guest's own shutdown); its console:\n%s", g.Name, r, libvirt.DomainShutoffShutdown, g.Console(t))
	}
	if n := g.Said(t, testbed.GuestPowerOff); n != 1 {
		t.Fatalf("the guest powered off for the power button %d times, want 1; its console:\n%s", n, g.Console(t))
	}
}

// A graceful stop of a guest that honours ACPI ends unforced, by the
// guest's own power-off.
func TestGuestStopGraceful(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	g := h.lv.Guest("gueststop", testbed.GuestOptions{Running: true})
	start := time.Now()
	res := h.ok(t, g.Domain, vm.Stop, `{"timeout":"120s"}`, true, "shutoff")
	t.Logf("graceful stop took %s", time.Since(start).Round(time.Millisecond))
	if res.Detail["forced"] != false {
		t.Fatalf("detail %v, want forced=false", res.Detail)
	}
	wantGuestPoweredOff(t, h.lv, g)
}

// A soft reboot of a guest that honours ACPI is its shutdown and a start,
// with no reset: the guest boots a second time.
func TestGuestRebootSoft(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	g := h.lv.Guest("guestreboot", testbed.GuestOptions{Running: true})
	count := resets(t, h.lv.Conn(), g.Domain)
	start := time.Now()
	res := h.ok(t, g.Domain, vm.Reboot, `{"timeout":"120s"}`, true, "running")
	t.Logf("soft reboot took %s", time.Since(start).Round(time.Millisecond))
	if res.Detail["method"] != "shutdown" || res.Detail["fallback"] != nil {
		t.Fatalf("detail %v, want method=shutdown and no fallback", res.Detail)
	}
	if n := count(); n != 0 {
		t.Fatalf("%d reset events for a reboot by shutdown, want none", n)
	}
	wantState(t, h.lv, g.Domain, libvirt.DomainRunning)
	if n := g.Said(t, testbed.GuestPowerOff); n != 1 {
		t.Fatalf("the guest powered off %d times, want 1; its console:\n%s", n, g.Console(t))
	}
	g.WaitReady(t, 2)
}

// A guest releases a hot-unplugged virtio disk, so its detach ends ok
// (where Domain's guest, with no OS, leaves it in timeout).
func TestGuestDetachVirtio(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	g := h.lv.Guest("guestvirtio", testbed.GuestOptions{Running: true})
	img := testbed.DiskImage(t, 8)
	res := h.ok(t, g.Domain, vm.AttachDisk, `{"path":"`+img+`","persistent":false}`, true, "running")
	if res.Detail["target"] != "vda" {
		t.Fatalf("detail %v, want target vda", res.Detail)
	}
	g.WaitSaid(t, "virtbus-guest: disk vda: add", 1) // the guest has the disk
	h.ok(t, g.Domain, vm.DetachDisk, `{"path":"`+img+`","timeout":"60s","persistent":false}`, true, "running")
	if src, still := h.lv.Disks(g.Domain, false)["vda"]; still {
		t.Fatalf("vda (%s) still in the live definition after its detach", src)
	}
	if g.Said(t, "virtbus-guest: disk vda: remove") != 1 {
		t.Fatalf("the guest never saw vda go; its console:\n%s", g.Console(t))
	}
	wantState(t, h.lv, g.Domain, libvirt.DomainRunning)
}

// A guest that ignores ACPI takes the other paths: a soft reboot falls
// back to a reset, and a graceful stop ends in the destroy.
func TestGuestDeafForced(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	g := h.lv.Guest("guestdeaf", testbed.GuestOptions{Running: true, Deaf: true})
	count := resets(t, h.lv.Conn(), g.Domain)
	res := h.ok(t, g.Domain, vm.Reboot, `{"timeout":"3s"}`, true, "running")
	if res.Detail["method"] != "reset" || res.Detail["fallback"] != true {
		t.Fatalf("reboot detail %v, want method=reset fallback=true", res.Detail)
	}
	if count() == 0 {
		t.Fatal("no reset event for the reboot's fallback")
	}
	wantState(t, h.lv, g.Domain, libvirt.DomainRunning)
	g.WaitReady(t, 2) // the reset booted it again

	res = h.ok(t, g.Domain, vm.Stop, `{"timeout":"3s"}`, true, "shutoff")
	if res.Detail["forced"] != true {
		t.Fatalf("stop detail %v, want forced=true", res.Detail)
	}
	if r := h.lv.ShutoffReason(g.Domain); r != libvirt.DomainShutoffDestroyed {
		t.Fatalf("%s shut off with reason %d, want %d (destroyed)", g.Name, r, libvirt.DomainShutoffDestroyed)
	}
	if n := g.Said(t, testbed.GuestPowerOff); n != 0 {
		t.Fatalf("the deaf guest powered off %d times for the power button; its console:\n%s", n, g.Console(t))
	}
}

// The ACPI request of a stop sent while the guest boots is lost: nothing
// listens to the power button yet. The executor asks again every
// ShutdownRetry (the default 10s here, as in the worker), and a request
// after the boot brings the guest down unforced.
func TestGuestStopWhileBooting(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ex := vm.NewExecutor(h.conn, vm.Config{}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	g := h.lv.Guest("guestbooting", testbed.GuestOptions{})
	h.ok(t, g.Domain, vm.Start, ``, true, "running")
	if g.Said(t, testbed.GuestReady) != 0 {
		t.Fatalf("the guest booted before the stop could be sent; its console:\n%s", g.Console(t))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	res, err := ex.Do(ctx, g.Name, vm.Stop, json.RawMessage(`{"timeout":"240s"}`))
	if err != nil || !res.Changed || res.State != "shutoff" || res.Detail["forced"] != false {
		t.Fatalf("stop while booting: %+v, %v; want changed, shutoff, forced=false; the guest's console:\n%s", res, err, g.Console(t))
	}
	t.Logf("stop sent while booting took %s", time.Since(start).Round(time.Millisecond))
	if g.Said(t, testbed.GuestReady) != 1 {
		t.Fatalf("the guest never booted before it powered off; its console:\n%s", g.Console(t))
	}
	wantGuestPoweredOff(t, h.lv, g)
}
