package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/testbed"
	"github.com/virtbus/virtbus/internal/testdriver"
)

// Two workers on different hosts, one on QEMU and one on libvirt's test
// driver, found as an operator finds them: the stock micro requests and
// `publish hosts`; `publish status VM` without -host goes to the VM's
// host, refuses a name on both, and a stopped worker is no longer listed.
func TestDiscovery(t *testing.T) {
	t.Parallel()
	lv := testbed.Require(t)
	drv, err := testdriver.Open(testbed.Socket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = drv.Close() })
	srv := bustest.RunServer(t, bus.RunEmbedded, t.TempDir(), -1)
	url, qemuHost, testHost := srv.ClientURL(), hostID(), hostID()

	onQEMU := lv.Domain("discq", testbed.DomainOptions{})
	both := lv.Domain("discboth", testbed.DomainOptions{})
	onTest := testbed.Name("disct")
	for _, name := range []string{onTest, both.Name} {
		if err := drv.Define(name); err != nil {
			t.Fatal(err)
		}
	}
	startWorker(t, workerEnv(t, url, qemuHost))
	second := startWorker(t, workerEnv(t, url, testHost).with("VIRTBUS_LIBVIRT_URI", testdriver.URI))
	nc := bustest.Connect(t, url)
	js := bustest.JetStream(t, nc)
	waitKey(t, js, qemuHost, onQEMU.Name, "shutoff")
	waitKey(t, js, qemuHost, both.Name, "shutoff")
	waitKey(t, js, testHost, both.Name, "shutoff")
	waitKey(t, js, testHost, onTest, "shutoff")

	want := []string{qemuHost, testHost}
	slices.Sort(want)
	for _, verb := range []struct{ subject, typ string }{
		{"$SRV.PING.virtbus", micro.PingResponseType}, {"$SRV.INFO.virtbus", micro.InfoResponseType},
	} {
		waitFor(t, verb.subject, want, func() []string { return answeringHosts(t, nc, verb.subject, verb.typ) })
	}
	waitFor(t, "publish hosts", want, func() []string { return listedHosts(t, url) })
	for _, r := range publishHosts(t, url) {
		if r.Role != bus.RoleActive || !r.LibvirtUp || r.Domains < 2 || r.Version == "" || !r.NATSReady {
			t.Errorf("publish hosts: %+v, want an active worker connected to libvirt with at least two domains", r)
		}
	}

	for vm, host := range map[string]string{onQEMU.Name: qemuHost, onTest: testHost, testbed.UUID(onQEMU): qemuHost} {
		r := publish(t, url, "", "status", vm)
		if c := r.completion(t, 0); c.Host != host || !strings.Contains(r.stderr, " is on "+host) {
			t.Errorf("publish status %s without -host: completion from %s, stderr %q; want %s", vm, c.Host, r.stderr, host)
		}
	}
	if r := publish(t, url, "", "status", both.Name); r.code != 2 || !strings.Contains(r.stderr, qemuHost) || !strings.Contains(r.stderr, testHost) {
		t.Errorf("publish status %s, on both hosts: exit %d, stderr %q; want 2 naming both", both.Name, r.code, r.stderr)
	}
	if r := publish(t, url, "", "status", "nowhere"); r.code != 1 || !strings.Contains(r.stderr, "on no host") {
		t.Errorf("publish status of a VM on no host: exit %d, stderr %q; want 1", r.code, r.stderr)
	}
	if r := publish(t, url, qemuHost, "status", onTest); r.code != 1 {
		t.Errorf("an explicit -host is taken as given: exit %d, want 1 (not found on %s)\n%s", r.code, qemuHost, r.stderr)
	}

	if err := second.stop(t); err != nil {
		t.Fatalf("worker: %v", err)
	}
	waitFor(t, "publish hosts after "+testHost+" stopped", []string{qemuHost}, func() []string { return listedHosts(t, url) })
}

// waitFor asks get again until it returns want, and returns it: an answer
// late on a busy machine is not missed, and the test fails only after
// waitTimeout.
func waitFor(t *testing.T, what string, want []string, get func() []string) []string {
	t.Helper()
	var got []string
	for deadline := time.Now().Add(waitTimeout); time.Now().Before(deadline); {
		if got = get(); slices.Equal(got, want) {
			return got
		}
	}
	t.Fatalf("%s: %v, want %v", what, got, want)
	return nil
}

// answeringHosts sends one request on subject and returns, sorted, the
// host ids in the metadata of the answers of type typ that come within
// two seconds.
func answeringHosts(t *testing.T, nc *nats.Conn, subject, typ string) []string {
	t.Helper()
	return bustest.ServiceHosts(t, nc, subject, bus.ServiceName, typ, 2*time.Second)
}

// publishHosts runs `publish -json hosts`.
func publishHosts(t *testing.T, url string) []bus.HostReport {
	t.Helper()
	r := publish(t, url, "", "-timeout", "2s", "hosts")
	var reports []bus.HostReport
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &reports) != nil {
		t.Fatalf("publish -json hosts: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	return reports
}

// listedHosts is the hosts `publish hosts` lists.
func listedHosts(t *testing.T, url string) []string {
	t.Helper()
	var hosts []string
	for _, r := range publishHosts(t, url) {
		hosts = append(hosts, r.Host)
	}
	return hosts
}
