package bus

import (
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/virtbus/virtbus/internal/bus/bustest"
)

// discoveryWindow is how long the tests gather discovery answers: each
// wait is repeated until its outcome holds, so a slow machine only makes
// a test take longer.
const discoveryWindow = 2 * time.Second

// serve registers w's discovery service, as the worker does once ready,
// and stops it when the test ends.
func serve(t *testing.T, nc *nats.Conn, w *runningWorker) micro.Service {
	t.Helper()
	svc, err := AddService(nc, w.cfg.Host, "v1.2.3", func() HostStatus { return w.Status("v1.2.3") })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	return svc
}

// hostsAnswering is the sorted hosts in the metadata of the answers to
// a PING or INFO request on subject.
func hostsAnswering(t *testing.T, nc *nats.Conn, subject, wantType string) []string {
	t.Helper()
	return bustest.ServiceHosts(t, nc, subject, ServiceName, wantType, discoveryWindow)
}

// discovered is the hosts and roles DiscoverHosts finds.
func discovered(t *testing.T, nc *nats.Conn) []string {
	t.Helper()
	reports, err := DiscoverHosts(t.Context(), nc, discoveryWindow)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range reports {
		out = append(out, r.Host+"/"+r.Role)
	}
	return out
}

// Two hosts answer PING, INFO and STATS with their host ids; a standby
// of one of them answers too, as a standby; a stopped service is gone.
func TestDiscoveryService(t *testing.T) {
	t.Parallel()
	srv := bustest.RunServer(t, RunEmbedded, t.TempDir(), -1)
	url := srv.ClientURL()
	nc := connect(t, url)
	// A connection per worker, as each worker process has: the service
	// chains the connection's handlers after those Run set.
	nc1, nc2 := connect(t, url), connect(t, url)
	h1 := startWorker(t, nc1, Config{Host: "hv1"}, okHandler(newCalls()))
	h2 := startWorker(t, nc2, Config{Host: "hv2"}, okHandler(newCalls()))
	serve(t, nc1, h1)
	svc2 := serve(t, nc2, h2)

	want := []string{"hv1", "hv2"}
	for _, verb := range []struct {
		subject, typ string
	}{{"$SRV.PING.virtbus", micro.PingResponseType}, {"$SRV.INFO.virtbus", micro.InfoResponseType}, {"$SRV.INFO", micro.InfoResponseType}} {
		waitHosts(t, verb.subject, want, func() []string { return hostsAnswering(t, nc, verb.subject, verb.typ) })
	}
	m, err := nc.Request(StatusSubject("hv2"), nil, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	var st HostStatus
	if err := json.Unmarshal(m.Data, &st); err != nil || st.Host != "hv2" || st.Role != RoleActive || st.QueueCapacity == 0 || st.Version != "v1.2.3" {
		t.Errorf("%s answered %s (%v)", StatusSubject("hv2"), m.Data, err)
	}

	ncStandby := connect(t, url)
	standby := newWorker(t, ncStandby, Config{Host: "hv1"}, okHandler(newCalls())).start(t)
	waitFor(t, "the second worker of hv1 to stand by", standby.Standby)
	serve(t, ncStandby, standby)
	waitHosts(t, "DiscoverHosts", []string{"hv1/active", "hv1/standby", "hv2/active"}, func() []string { return discovered(t, nc) })

	if err := svc2.Stop(); err != nil {
		t.Fatal(err)
	}
	waitHosts(t, "PING after hv2 stopped", []string{"hv1", "hv1"}, func() []string {
		return hostsAnswering(t, nc, "$SRV.PING.virtbus", micro.PingResponseType)
	})
}

// waitHosts asks get again until it returns want: an answer late on a
// busy machine is not missed, and a test fails only after waitTimeout.
func waitHosts(t *testing.T, what string, want []string, get func() []string) {
	t.Helper()
	var got []string
	for deadline := time.Now().Add(waitTimeout); time.Now().Before(deadline); {
		if got = get(); slices.Equal(got, want) {
			return
		}
	}
	t.Errorf("%s: %v, want %v", what, got, want)
}

func TestSemver(t *testing.T) {
	for in, want := range map[string]string{"v1.2.3": "1.2.3", "(devel)": "0.0.0-devel", "": "0.0.0-devel",
		"v0.0.0-20261127230000-abcdef123456+dirty": "0.0.0-20261127230000-abcdef123456+dirty"} {
		if got := semver(in); got != want {
			t.Errorf("semver(%q) = %q, want %q", in, got, want)
		}
	}
}
