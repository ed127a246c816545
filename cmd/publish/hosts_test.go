package main

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus"
)

func TestPrintHosts(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	reports := []bus.HostReport{
		{HostStatus: bus.HostStatus{Host: "hv1", Version: "v1.2.3", Role: bus.RoleActive, QueueDepth: 3, QueueCapacity: 64, InFlight: 1, LibvirtUp: true, Domains: 12},
			Started: now.Add(-90 * time.Minute)},
		{HostStatus: bus.HostStatus{Host: "hv1", Version: "v1.2.3", Role: bus.RoleStandby, QueueCapacity: 64}},
	}
	var b strings.Builder
	if err := printHosts(&b, reports, now); err != nil {
		t.Fatal(err)
	}
	want := `HOST  ROLE     VERSION  QUEUE  IN-FLIGHT  LIBVIRT  DOMAINS  UP
hv1   active   v1.2.3   3/64   1          up       12       1h30m
hv1   standby  v1.2.3   0/64   0          down     0        -
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestHostsOf(t *testing.T) {
	states := []bus.DomainState{
		{Host: "hv1", VM: "web-1", UUID: "0F3C1E52-7A4B-4C8E-9D1A-2B6F5E4D3C21"},
		{Host: "hv2", VM: "web-1"},
		{Host: "hv2", VM: "db-1"},
		{Host: "hv3", VM: "db-1"},
		{Host: "hv3", VM: "db-1"},
		{Host: "bad.host", VM: "db-2"},
	}
	for vm, want := range map[string][]string{
		"web-1": {"hv1", "hv2"}, "db-1": {"hv2", "hv3"}, "0f3c1e52-7a4b-4c8e-9d1a-2b6f5e4d3c21": {"hv1"}, "db-2": nil, "none": nil,
	} {
		if got := hostsOf(states, vm); !slices.Equal(got, want) {
			t.Errorf("hostsOf(%s) = %v, want %v", vm, got, want)
		}
	}
}
