package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/virtbus/virtbus/internal/bus"
	"github.com/virtbus/virtbus/internal/envload"
)

// config is the worker's whole configuration, read from VIRTBUS_*
// variables by envconfig (through envload, so that run can take its
// environment as a function): `worker -h` prints this table. The bus's
// settings and the NATS connection settings are the bus package's own
// structs, so their names, defaults and descriptions live in one place.
type config struct {
	bus.Config
	NATS           bus.NATSSettings
	StateDir       string        `split_words:"true" default:"/var/lib/virtbus" desc:"state of the embedded NATS server"`
	LibvirtURI     string        `split_words:"true" default:"qemu:///system" desc:"libvirt driver URI"`
	LibvirtSocket  string        `split_words:"true" default:"/var/run/libvirt/libvirt-sock" desc:"libvirt socket"`
	LibvirtTimeout time.Duration `split_words:"true" default:"30s" desc:"deadline of each libvirt call"`
	DiskRoots      []string      `split_words:"true" default:"/var/lib/libvirt/images" desc:"comma-separated directories disk images must resolve into; {vm} as a path element stands for the domain name (one directory per VM)"`
	MetricsAddr    string        `split_words:"true" default:":9480" desc:"listen address of /metrics, /healthz and /readyz (read-only); off: none"`
	APIAddr        string        `split_words:"true" default:"127.0.0.1:9481" desc:"listen address of the command API; off: none; not loopback: needs VIRTBUS_API_TOKEN_FILE"`
	APITokenFile   string        `split_words:"true" desc:"file holding the command API's bearer token"`
	PprofAddr      string        `split_words:"true" default:"off" desc:"loopback listen address of Go's profiler (/debug/pprof/); off: none"`
	LogLevel       string        `split_words:"true" default:"info" desc:"debug, info, warn or error"`
	LogFormat      string        `split_words:"true" default:"text" desc:"text or json"`
}

// loadConfig reads the configuration through getenv, and names the
// variable of a bad value.
func loadConfig(getenv func(string) string) (config, error) {
	var c config
	if err := envload.Load(bus.EnvPrefix, getenv, &c); err != nil {
		return c, err
	}
	// envconfig splits lists at commas and keeps the spaces around them.
	c.DiskRoots, c.ReplyPrefixes = trimList(c.DiskRoots), trimList(c.ReplyPrefixes)
	if c.Host == "" {
		h, err := os.Hostname()
		if err != nil {
			return c, fmt.Errorf("VIRTBUS_HOST is empty and the hostname is unknown: %w", err)
		}
		c.Host = bus.HostToken(h)
	}
	return c, c.check()
}

// trimList drops the spaces around a list's items, and empty items.
func trimList(items []string) []string {
	var out []string
	for _, it := range items {
		if it = strings.TrimSpace(it); it != "" {
			out = append(out, it)
		}
	}
	return out
}

// check refuses values that would only fail later, naming the variable.
func (c config) check() error {
	switch {
	case !bus.ValidToken(c.Host):
		return fmt.Errorf("VIRTBUS_HOST=%q: not a subject token (no dots, spaces, * or >)", c.Host)
	case c.Delivery != bus.DeliveryJetStream && c.Delivery != bus.DeliveryCore:
		return fmt.Errorf("VIRTBUS_DELIVERY=%q: want jetstream or core", c.Delivery)
	case c.LibvirtTimeout <= 0:
		return fmt.Errorf("VIRTBUS_LIBVIRT_TIMEOUT=%s: must be positive", c.LibvirtTimeout)
	case c.QueueSize < 1:
		return fmt.Errorf("VIRTBUS_QUEUE_SIZE=%d: must be at least 1", c.QueueSize)
	case c.Concurrency < 1 || c.Concurrency > c.QueueSize:
		return fmt.Errorf("VIRTBUS_CONCURRENCY=%d: must be between 1 and VIRTBUS_QUEUE_SIZE (%d)", c.Concurrency, c.QueueSize)
	case c.MaxDeliver < 1:
		return fmt.Errorf("VIRTBUS_MAX_DELIVER=%d: must be at least 1", c.MaxDeliver)
	case c.CommandMaxAge <= 0:
		return fmt.Errorf("VIRTBUS_COMMAND_MAX_AGE=%s: must be positive", c.CommandMaxAge)
	case c.StreamReplicas < 1 || c.StreamReplicas > 5:
		return fmt.Errorf("VIRTBUS_STREAM_REPLICAS=%d: want 1 to 5", c.StreamReplicas)
	case c.Lease < time.Second:
		return fmt.Errorf("VIRTBUS_LEASE=%s: must be at least 1s", c.Lease)
	case len(c.DiskRoots) == 0:
		return fmt.Errorf("VIRTBUS_DISK_ROOTS is empty: name at least one directory")
	}
	if err := c.checkHTTP(); err != nil {
		return err
	}
	if err := bus.CheckReplyPrefixes(c.ReplyPrefixes); err != nil {
		return fmt.Errorf("VIRTBUS_REPLY_PREFIXES: %w", err)
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		return err
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("VIRTBUS_LOG_FORMAT=%q: want text or json", c.LogFormat)
	}
	return nil
}

// checkHTTP refuses listener addresses that cannot be opened, and a
// command API reachable from other machines without a token.
func (c config) checkHTTP() error {
	for _, l := range []struct{ key, addr string }{{"VIRTBUS_METRICS_ADDR", c.MetricsAddr}, {"VIRTBUS_API_ADDR", c.APIAddr}, {"VIRTBUS_PPROF_ADDR", c.PprofAddr}} {
		if l.addr == "off" {
			continue
		}
		if _, _, err := net.SplitHostPort(l.addr); err != nil {
			return fmt.Errorf("%s=%q: want host:port or off: %w", l.key, l.addr, err)
		}
	}
	switch {
	case c.APIAddr == "off":
	case c.APIAddr == c.MetricsAddr:
		return fmt.Errorf("VIRTBUS_API_ADDR=%q: the same as VIRTBUS_METRICS_ADDR; the command API needs an address of its own", c.APIAddr)
	case c.APITokenFile == "" && !loopbackAddr(c.APIAddr):
		return fmt.Errorf("VIRTBUS_API_ADDR=%q is not a loopback address: set VIRTBUS_API_TOKEN_FILE to a file holding the API's bearer token", c.APIAddr)
	}
	// The profiler shows memory and stacks, and costs CPU while it
	// profiles: it has no token, so it is never reachable from outside.
	if c.PprofAddr != "off" && !loopbackAddr(c.PprofAddr) {
		return fmt.Errorf("VIRTBUS_PPROF_ADDR=%q is not a loopback address: the profiler only listens on this machine", c.PprofAddr)
	}
	return nil
}

// loopbackAddr reports whether addr listens only to this machine: its host
// is in 127.0.0.0/8, ::1 or localhost. An empty host listens everywhere.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("VIRTBUS_LOG_LEVEL=%q: want debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(c config, w io.Writer) *slog.Logger {
	level, _ := parseLevel(c.LogLevel)
	opts := &slog.HandlerOptions{Level: level}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// usage prints every variable with its default (envconfig's table).
func usage(w io.Writer) error {
	fmt.Fprintln(w, "Usage: worker\n\nThe virtbus worker takes VM commands from NATS and runs them against this host's libvirt.")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if err := envconfig.Usagef(bus.EnvPrefix, &config{}, tw, envconfig.DefaultTableFormat); err != nil {
		return err
	}
	return tw.Flush()
}
