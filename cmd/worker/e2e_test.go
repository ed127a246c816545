package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/vm"
)

// wantCompletion checks the fields every completion carries.
func wantCompletion(t *testing.T, c bus.Completion, id, host, vmName, action string) {
	t.Helper()
	if c.ID != id || c.Host != host || c.VM != vmName || c.Action != action {
		t.Errorf("completion names id=%q host=%q vm=%q action=%q, want %q %q %q %q", c.ID, c.Host, c.VM, c.Action, id, host, vmName, action)
	}
	// Not exactly 1: another package's test may restart libvirtd meanwhile,
	// and a command that met the outage is retried, as it should be.
	if c.Attempt < 1 {
		t.Errorf("%s %s: attempt %d, want at least 1", action, vmName, c.Attempt)
	}
	if c.ReceivedAt.IsZero() || c.StartedAt.IsZero() || c.FinishedAt.Before(c.StartedAt) {
		t.Errorf("%s %s: times received %s started %s finished %s", action, vmName, c.ReceivedAt, c.StartedAt, c.FinishedAt)
	}
}

// wantOK checks an ok completion's changed and state.
func wantOK(t *testing.T, c bus.Completion, changed bool, state string) {
	t.Helper()
	if c.Status != bus.StatusOK || c.Error != nil {
		t.Fatalf("%s %s: status %q error %+v, want ok", c.Action, c.VM, c.Status, c.Error)
	}
	if c.Changed != changed || c.State != state {
		t.Errorf("%s %s: changed=%v state=%q, want changed=%v state=%q (detail %v)", c.Action, c.VM, c.Changed, c.State, changed, state, c.Detail)
	}
}

func wantState(t *testing.T, lv *testbed.Live, dom libvirt.Domain, want libvirt.DomainState) {
	t.Helper()
	if got := lv.State(dom); got != want {
		t.Errorf("libvirt says %s is %s, want %s", dom.Name, vm.StateName(got), vm.StateName(want))
	}
}

// TestEveryActionThroughPublish reads like the README: start a worker,
// send each action with `publish`, read the completion, check the VM with
// libvirt.
func TestEveryActionThroughPublish(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	dom := lv.Domain("actions", testbed.DomainOptions{})
	img := testbed.DiskImage(t, 16)
	startWorker(t, workerEnv(t, url, host))

	n := 0
	send := func(args ...string) bus.Completion {
		t.Helper()
		n++
		id := fmt.Sprintf("actions-%d", n)
		c := publish(t, url, host, append([]string{"-id", id}, args...)...).completion(t, 0)
		wantCompletion(t, c, id, host, dom.Name, args[0])
		return c
	}

	c := send("start", dom.Name)
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	c = send("start", dom.Name)
	wantOK(t, c, false, "running")

	c = send("status", dom.Name)
	wantOK(t, c, false, "running")
	if uuid := testbed.UUID(dom); c.Detail["uuid"] != uuid {
		t.Errorf("status detail uuid %v, want %s", c.Detail["uuid"], uuid)
	}

	// virtio-scsi: the no-OS guest releases it at once (a virtio-blk disk
	// it would keep for good).
	c = send("attach-disk", dom.Name, "path="+img, "bus=scsi")
	wantOK(t, c, true, "running")
	target, _ := c.Detail["target"].(string)
	if !strings.HasPrefix(target, "sd") {
		t.Fatalf("attach-disk detail %v: want an sd… target", c.Detail)
	}
	if got := lv.Disks(dom, false)[target]; got != img {
		t.Errorf("live %s is %q, want %s", target, got, img)
	}
	if got := lv.Disks(dom, true)[target]; got != img {
		t.Errorf("persistent %s is %q, want %s (persistent is the default)", target, got, img)
	}

	c = send("attach-disk", dom.Name, "path="+img, "bus=scsi")
	wantOK(t, c, false, "running")
	if c.Detail["target"] != target {
		t.Errorf("second attach-disk detail %v, want target %s", c.Detail, target)
	}

	c = send("status", dom.Name)
	if disks, _ := c.Detail["disks"].([]any); len(disks) != 1 {
		t.Errorf("status detail disks %v, want the one attached", c.Detail["disks"])
	}

	c = send("detach-disk", dom.Name, "target="+target)
	wantOK(t, c, true, "running")
	if _, ok := lv.Disks(dom, false)[target]; ok {
		t.Errorf("%s still in the live domain after detach-disk", target)
	}
	if _, ok := lv.Disks(dom, true)[target]; ok {
		t.Errorf("%s still in the config after detach-disk", target)
	}

	c = send("pause", dom.Name)
	wantOK(t, c, true, "paused")
	wantState(t, lv, dom, libvirt.DomainPaused)
	c = send("resume", dom.Name)
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	c = send("reboot", dom.Name, "mode=hard")
	wantOK(t, c, true, "running")
	if c.Detail["method"] != "reset" {
		t.Errorf("hard reboot detail %v, want method=reset", c.Detail)
	}

	// The guest ignores ACPI: a soft reboot must fall back to a reset.
	c = send("reboot", dom.Name, "timeout=1s")
	wantOK(t, c, true, "running")
	if c.Detail["fallback"] != true || c.Detail["method"] != "reset" {
		t.Errorf("soft reboot of a guest that ignores ACPI: detail %v, want fallback=true method=reset", c.Detail)
	}
	wantState(t, lv, dom, libvirt.DomainRunning)

	// Likewise a graceful stop ends in a destroy once its timeout passes.
	c = send("stop", dom.Name, "timeout=1s")
	wantOK(t, c, true, "shutoff")
	if c.Detail["forced"] != true {
		t.Errorf("graceful stop of a guest that ignores ACPI: detail %v, want forced=true", c.Detail)
	}
	wantState(t, lv, dom, libvirt.DomainShutoff)

	c = send("stop", dom.Name, "mode=force")
	wantOK(t, c, false, "shutoff")

	// Addressed by UUID instead of name.
	uuid, _ := send("status", dom.Name).Detail["uuid"].(string)
	r := publish(t, url, host, "start", uuid)
	c = r.completion(t, 0)
	if c.VM != uuid {
		t.Errorf("start by UUID: completion vm %q, want %q", c.VM, uuid)
	}
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	wantBucketAgrees(t, url, host, lv, dom)
}

// TestErrorsThroughPublish: every way a command can be wrong ends in one
// error completion with the right code (publish exits 1), and the VM is
// left alone.
func TestErrorsThroughPublish(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	dom := lv.Domain("errors", testbed.DomainOptions{})
	startWorker(t, workerEnv(t, url, host))
	missing := testbed.Name("missing")

	tests := []struct {
		name   string
		args   []string
		vm     string
		action string
		code   string
	}{
		{"unknown action", []string{"explode", dom.Name}, dom.Name, "explode", bus.CodeInvalid},
		{"unknown VM", []string{"start", missing}, missing, "start", bus.CodeNotFound},
		{"unknown VM by UUID", []string{"status", "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21"}, "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21", "status", bus.CodeNotFound},
		{"bad mode", []string{"stop", dom.Name, "mode=sideways"}, dom.Name, "stop", bus.CodeInvalid},
		{"bad timeout", []string{"stop", dom.Name, "timeout=soon"}, dom.Name, "stop", bus.CodeInvalid},
		{"number for a duration", []string{"-params", `{"timeout":5}`, "stop", dom.Name}, dom.Name, "stop", bus.CodeInvalid},
		{"stray parameter", []string{"start", dom.Name, "mode=force"}, dom.Name, "start", bus.CodeInvalid},
		{"attach without path", []string{"attach-disk", dom.Name}, dom.Name, "attach-disk", bus.CodeInvalid},
		{"disk outside the roots", []string{"attach-disk", dom.Name, "path=/etc/shadow"}, dom.Name, "attach-disk", bus.CodeForbidden},
		{"reboot of a shut off VM", []string{"reboot", dom.Name}, dom.Name, "reboot", bus.CodeConflict},
	}
	for i, tt := range tests {
		id := fmt.Sprintf("err-%d", i)
		c := publish(t, url, host, append([]string{"-id", id}, tt.args...)...).completion(t, 1)
		wantCompletion(t, c, id, host, tt.vm, tt.action)
		if c.Status != bus.StatusError || c.Error == nil || c.Error.Code != tt.code || c.Error.Message == "" {
			t.Errorf("%s: status %q error %+v, want error code %s with a message", tt.name, c.Status, c.Error, tt.code)
		}
		if c.State != "" || c.Changed {
			t.Errorf("%s: error completion says changed=%v state=%q", tt.name, c.Changed, c.State)
		}
	}

	// publish refuses what is not even a command: exit 2, nothing sent.
	for _, args := range [][]string{{"start"}, {"stop", "a.b"}, {"stop", dom.Name, "mode"}} {
		if r := publish(t, url, host, args...); r.code != 2 {
			t.Errorf("publish %q exited %d, want 2 (usage)\nstderr: %s", args, r.code, r.stderr)
		}
	}

	// A body that is not a JSON object cannot come from publish; any other
	// producer can send one.
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	inbox := nc.NewInbox()
	got := collect(t, nc, inbox)
	bodies := map[string]string{"bad-json": `{"mode":`, "bad-array": `["force"]`, "bad-text": `force`}
	for id, body := range bodies {
		command(t, js, host, dom.Name, "stop", id, body, inbox)
	}
	for id, body := range bodies {
		c := got.WaitID(t, id).Completion
		wantCompletion(t, c, id, host, dom.Name, "stop")
		if c.Status != bus.StatusError || c.Error == nil || c.Error.Code != bus.CodeInvalid {
			t.Errorf("body %q: status %q error %+v, want code invalid", body, c.Status, c.Error)
		}
	}

	wantState(t, lv, dom, libvirt.DomainShutoff)
	if disks := lv.Disks(dom, true); len(disks) != 0 {
		t.Errorf("the failed commands left disks on %s: %v", dom.Name, disks)
	}
}

// TestPerVMOrderWithConcurrency: with VIRTBUS_CONCURRENCY=4 the commands of
// four VMs run side by side, yet each VM's commands run one at a time in
// the order they were published, and each status sees what the command
// before it left.
func TestPerVMOrderWithConcurrency(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	var doms []libvirt.Domain
	for range 4 {
		doms = append(doms, lv.Domain("order", testbed.DomainOptions{}))
	}
	startWorker(t, workerEnv(t, url, host).with("VIRTBUS_CONCURRENCY", "4"))

	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	events := collect(t, nc, bus.EventPrefix+"."+host+".>")

	type step struct{ action, body, state string } // state: what it leaves
	seq := []step{
		{"start", "", "running"},
		{"status", "", "running"},
		{"stop", `{"mode":"force"}`, "shutoff"},
		{"status", "", "shutoff"},
		{"start", "", "running"},
		{"status", "", "running"},
		{"stop", `{"mode":"force"}`, "shutoff"},
		{"status", "", "shutoff"},
	}
	// Round-robin over the VMs, so that each VM's commands are interleaved
	// with the others' in the stream.
	var ids []string
	want := map[string][]string{} // vm -> ids in publish order
	for k, s := range seq {
		for _, d := range doms {
			id := fmt.Sprintf("%s-%d", d.Name, k)
			command(t, js, host, d.Name, s.action, id, s.body, "")
			ids = append(ids, id)
			want[d.Name] = append(want[d.Name], id)
		}
	}
	got := events.WaitIDs(t, waitTimeout, ids...)
	if len(got) != len(ids) {
		t.Errorf("%d completions for %d commands: %v", len(got), len(ids), got)
	}

	byVM := map[string][]received{}
	for _, r := range got {
		byVM[r.VM] = append(byVM[r.VM], r)
	}
	for _, d := range doms {
		rs := byVM[d.Name]
		var order []string
		for _, r := range rs {
			order = append(order, r.ID)
		}
		if !slices.Equal(order, want[d.Name]) {
			t.Errorf("%s: completions in order %v, want publish order %v", d.Name, order, want[d.Name])
			continue
		}
		for k, r := range rs {
			if r.Status != bus.StatusOK || r.State != seq[k].state {
				t.Errorf("%s step %d (%s): status %q state %q, want ok %q (error %+v)", d.Name, k, r.Action, r.Status, r.State, seq[k].state, r.Error)
			}
			if k > 0 && r.StartedAt.Before(rs[k-1].FinishedAt) {
				t.Errorf("%s: %s started at %s, before %s finished at %s", d.Name, r.ID, r.StartedAt, rs[k-1].ID, rs[k-1].FinishedAt)
			}
		}
		wantState(t, lv, d, libvirt.DomainShutoff)
	}

	// Concurrency 4 is in effect: commands of different VMs overlapped.
	overlapped := false
	for i, a := range got {
		for _, b := range got[i+1:] {
			if a.VM != b.VM && a.StartedAt.Before(b.FinishedAt) && b.StartedAt.Before(a.FinishedAt) {
				overlapped = true
			}
		}
	}
	if !overlapped {
		t.Errorf("no two commands of different VMs ran at the same time with VIRTBUS_CONCURRENCY=4")
	}
	wantBucketAgrees(t, url, host, lv, doms...)
}

// TestDuplicateMsgIDRunsOnce: the same Nats-Msg-Id published twice, before
// and after the command ran, runs once and is answered once.
func TestDuplicateMsgIDRunsOnce(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	dom := lv.Domain("dup", testbed.DomainOptions{})
	e := workerEnv(t, url, host)
	startWorker(t, e)
	nc := bustest.Connect(t, url)
	events := collect(t, nc, bus.EventPrefix+"."+host+".>")

	queued := func(r pubResult) (dup bool) {
		t.Helper()
		if r.code != 0 {
			t.Fatalf("publish %q exited %d\nstderr: %s", r.args, r.code, r.stderr)
		}
		var ack struct {
			ID        string `json:"id"`
			Duplicate bool   `json:"duplicate"`
		}
		if err := json.Unmarshal([]byte(r.stdout), &ack); err != nil || ack.ID == "" {
			t.Fatalf("publish %q: %v: %q", r.args, err, r.stdout)
		}
		return ack.Duplicate
	}
	// Twice at once, then once more after the completion: the stream's
	// duplicate window drops both copies.
	if queued(publish(t, url, host, "-wait=false", "-id", "dup-1", "start", dom.Name)) {
		t.Fatal("the first copy was taken for a duplicate")
	}
	if !queued(publish(t, url, host, "-wait=false", "-id", "dup-1", "start", dom.Name)) {
		t.Error("the second copy was not taken for a duplicate")
	}
	first := events.WaitID(t, "dup-1")
	wantOK(t, first.Completion, true, "running")
	if !queued(publish(t, url, host, "-wait=false", "-id", "dup-1", "start", dom.Name)) {
		t.Error("the copy sent after the completion was not taken for a duplicate")
	}

	// The VM's commands run in order, so once a later command is answered
	// a copy of dup-1 that got through would have been answered too.
	c := publish(t, url, host, "-id", "dup-barrier", "stop", dom.Name, "mode=force").completion(t, 0)
	wantOK(t, c, true, "shutoff")
	events.WaitID(t, "dup-barrier")
	n := 0
	for _, r := range events.Snapshot() {
		if r.ID == "dup-1" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("dup-1 completed %d times, want once", n)
	}
	// The worker ran start once and never saw a copy: not run again, not
	// answered again from its record. (The barrier's count moves last.)
	waitMetrics(t, "http://"+e["VIRTBUS_METRICS_ADDR"]+"/metrics", map[string]float64{
		`virtbus_commands_completed_total{action="stop",status="ok"}`:  1,
		`virtbus_commands_completed_total{action="start",status="ok"}`: 1,
		"virtbus_duplicates_suppressed_total":                          0,
	})
	wantState(t, lv, dom, libvirt.DomainShutoff)
	wantBucketAgrees(t, url, host, lv, dom)
}

// TestCoreModeAnswersPlainRequest: with VIRTBUS_DELIVERY=core a plain NATS
// request (what `nats req` sends) gets the completion as its reply.
func TestCoreModeAnswersPlainRequest(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, host := srv.ClientURL(), hostID()
	dom := lv.Domain("core", testbed.DomainOptions{})
	startWorker(t, workerEnv(t, url, host).with("VIRTBUS_DELIVERY", "core"))
	nc := bustest.Connect(t, url)

	m, err := nc.Request(bus.CommandSubject(host, dom.Name, "start"), nil, waitTimeout)
	if err != nil {
		t.Fatalf("request start: %v", err)
	}
	var c bus.Completion
	if err := json.Unmarshal(m.Data, &c); err != nil {
		t.Fatalf("reply is not a completion: %v: %s", err, m.Data)
	}
	if !strings.HasPrefix(c.ID, "~core-") || bus.ValidID(c.ID) {
		t.Errorf("a command without Nats-Msg-Id got id %q, want a generated ~core-… id outside the client alphabet", c.ID)
	}
	wantCompletion(t, c, c.ID, host, dom.Name, "start")
	wantOK(t, c, true, "running")
	wantState(t, lv, dom, libvirt.DomainRunning)

	// publish -core is the same request, with an id of its own.
	c = publish(t, url, host, "-core", "-id", "core-stop", "stop", dom.Name, "mode=force").completion(t, 0)
	wantCompletion(t, c, "core-stop", host, dom.Name, "stop")
	wantOK(t, c, true, "shutoff")
	wantState(t, lv, dom, libvirt.DomainShutoff)

	c = publish(t, url, host, "-core", "stop", dom.Name, "mode=upside-down").completion(t, 1)
	if c.Error == nil || c.Error.Code != bus.CodeInvalid {
		t.Errorf("core bad parameter: error %+v, want invalid", c.Error)
	}
}
