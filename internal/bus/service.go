package bus

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Discovery: every worker registers one instance of the micro service
// ServiceName, so `nats micro ls virtbus` and $SRV.PING.virtbus find the
// live hosts, and $SRV.STATS.virtbus returns each one's HostStatus in the
// data of its endpoint StatusEndpoint.
const (
	ServiceName    = "virtbus"
	StatusEndpoint = "status"
	// HostsPrefix is the start of the hosts' own service subjects.
	HostsPrefix = "virtbus.hosts"
)

// Roles of a worker in HostStatus.
const (
	RoleActive   = "active"   // holds the host's lease and runs its commands
	RoleStandby  = "standby"  // another worker holds the lease; this one waits
	RoleStarting = "starting" // still looking at the lease
)

// StatusSubject is the endpoint on which host's worker answers its
// HostStatus.
func StatusSubject(host string) string { return HostsPrefix + "." + host + "." + StatusEndpoint }

// HostStatus is what one worker says of itself.
type HostStatus struct {
	Host     string `json:"host"`
	Version  string `json:"version"`
	Role     string `json:"role"`
	Delivery string `json:"delivery"`
	// QueueDepth counts the commands the FIFO holds, queued plus running,
	// out of QueueCapacity; InFlight those running.
	QueueDepth    int  `json:"queue_depth"`
	QueueCapacity int  `json:"queue_capacity"`
	InFlight      int  `json:"in_flight"`
	NATSReady     bool `json:"nats_ready"`
	// LibvirtUp and Domains are the libvirt connection's state and the
	// number of domains in the worker's view of them.
	LibvirtUp bool `json:"libvirt_up"`
	Domains   int  `json:"domains"`
}

// Status is the bus's part of the worker's HostStatus: what libvirt knows
// (LibvirtUp, Domains) the caller fills in.
func (w *Worker) Status(version string) HostStatus {
	role := RoleStarting
	switch {
	case w.Standby():
		role = RoleStandby
	case w.Active():
		role = RoleActive
	}
	return HostStatus{Host: w.cfg.Host, Version: version, Role: role, Delivery: w.cfg.Delivery,
		QueueDepth: w.q.Len(), QueueCapacity: w.q.Cap(), InFlight: w.q.Running(), NATSReady: w.Ready()}
}

// AddService registers this host's instance of ServiceName on nc; status
// is asked at each STATS request and each request to StatusSubject. Its
// replies go to the requests' reply subjects, which the worker's NATS
// permissions must allow (README.md, "Hosts and discovery"). The caller
// stops the service at shutdown.
func AddService(nc *nats.Conn, host, version string, status func() HostStatus) (micro.Service, error) {
	if !ValidToken(host) {
		return nil, fmt.Errorf("host %q is not a subject token", host)
	}
	svc, err := micro.AddService(nc, micro.Config{
		Name:        ServiceName,
		Version:     semver(version),
		Description: "virtbus worker of host " + host,
		Metadata:    map[string]string{"host": host, "version": version},
		// Several workers of one host (active and standby) all answer.
		QueueGroupDisabled: true,
		StatsHandler:       func(*micro.Endpoint) any { return status() },
	})
	if err != nil {
		return nil, fmt.Errorf("register service %s: %w", ServiceName, err)
	}
	answer := func(req micro.Request) {
		b, err := json.Marshal(status())
		if err != nil {
			_ = req.Error("500", err.Error(), nil)
			return
		}
		_ = req.Respond(b)
	}
	if err := svc.AddEndpoint(StatusEndpoint, micro.HandlerFunc(answer), micro.WithEndpointSubject(StatusSubject(host))); err != nil {
		return nil, errors.Join(fmt.Errorf("add endpoint %s: %w", StatusSubject(host), err), svc.Stop())
	}
	return svc, nil
}

// semverRE is what micro accepts as a version (semver.org's expression).
var semverRE = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

// semver is version as micro takes it: a module version without its "v";
// a build without one, "(devel)", is 0.0.0-devel. The metadata and the
// HostStatus keep the version as the build reports it.
func semver(version string) string {
	if v := strings.TrimPrefix(version, "v"); semverRE.MatchString(v) {
		return v
	}
	return "0.0.0-devel"
}
