package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/virtbus/virtbus/internal/bus"
)

// hostsWindow is how long `publish hosts` gathers answers by default: a
// live worker answers within milliseconds, and there is no telling when
// the last one has.
const hostsWindow = time.Second

// runHosts prints the workers that answer the discovery request within
// -timeout.
func runHosts(ctx context.Context, nc *nats.Conn, c *config, stdout io.Writer) error {
	reports, err := bus.DiscoverHosts(ctx, nc, c.timeout)
	if err != nil {
		return readError(ctx, err, "asking the hosts", c.timeout)
	}
	if c.json {
		if reports == nil {
			reports = []bus.HostReport{} // [], not null, for scripts
		}
		return json.NewEncoder(stdout).Encode(reports)
	}
	return printHosts(stdout, reports, time.Now())
}

// printHosts prints the table of hosts, its header even when empty.
func printHosts(w io.Writer, reports []bus.HostReport, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tROLE\tVERSION\tQUEUE\tIN-FLIGHT\tLIBVIRT\tDOMAINS\tUP")
	for _, r := range reports {
		libvirt := "down"
		if r.LibvirtUp {
			libvirt = "up"
		}
		up := "-"
		if !r.Started.IsZero() {
			up = ago(now.Sub(r.Started))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%d\t%s\t%d\t%s\n", oneLine(r.Host), dash(r.Role), dash(r.Version),
			r.QueueDepth, r.QueueCapacity, r.InFlight, libvirt, r.Domains, up)
	}
	return tw.Flush()
}
