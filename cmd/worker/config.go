package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/virtbus/virtbus/internal/bus"
)

// envPrefix is the prefix of every variable the worker reads.
const envPrefix = "virtbus"

// config is the worker's whole configuration, read from VIRTBUS_*
// variables. The tags are envconfig's: `worker -h` prints this table.
type config struct {
	Host           string        `envconfig:"HOST" desc:"host id in the subjects (default: the hostname, subject-safe)"`
	NATSURL        string        `envconfig:"NATS_URL" desc:"NATS server URL(s); empty: embedded server with JetStream on 127.0.0.1:4222"`
	NATSCreds      string        `envconfig:"NATS_CREDS" desc:"NATS .creds file"`
	NATSUser       string        `envconfig:"NATS_USER" desc:"NATS user"`
	NATSPassword   string        `envconfig:"NATS_PASSWORD" desc:"NATS password"`
	NATSToken      string        `envconfig:"NATS_TOKEN" desc:"NATS token"`
	NATSTLSCA      string        `envconfig:"NATS_TLS_CA" desc:"CA file to verify the NATS server"`
	NATSTLSCert    string        `envconfig:"NATS_TLS_CERT" desc:"client certificate file"`
	NATSTLSKey     string        `envconfig:"NATS_TLS_KEY" desc:"client key file"`
	Delivery       string        `envconfig:"DELIVERY" default:"jetstream" desc:"jetstream (nothing lost) or core (at most once)"`
	StateDir       string        `envconfig:"STATE_DIR" default:"/var/lib/virtbus" desc:"state of the embedded NATS server"`
	LibvirtURI     string        `envconfig:"LIBVIRT_URI" default:"qemu:///system" desc:"libvirt driver URI"`
	LibvirtSocket  string        `envconfig:"LIBVIRT_SOCKET" default:"/var/run/libvirt/libvirt-sock" desc:"libvirt socket"`
	LibvirtTimeout time.Duration `envconfig:"LIBVIRT_TIMEOUT" default:"30s" desc:"deadline of each libvirt call"`
	QueueSize      int           `envconfig:"QUEUE_SIZE" default:"64" desc:"FIFO capacity (queued plus running)"`
	Concurrency    int           `envconfig:"CONCURRENCY" default:"1" desc:"commands for different VMs run side by side"`
	MaxDeliver     int           `envconfig:"MAX_DELIVER" default:"5" desc:"attempts of a command that keeps ending unavailable before its final error"`
	DiskRoots      []string      `envconfig:"DISK_ROOTS" default:"/var/lib/libvirt/images" desc:"comma-separated directories disk images must resolve into; {vm} as a path element stands for the domain name (one directory per VM)"`
	MetricsAddr    string        `envconfig:"METRICS_ADDR" default:":9480" desc:"listen address of /metrics, /healthz and /readyz (read-only); off: none"`
	APIAddr        string        `envconfig:"API_ADDR" default:"127.0.0.1:9481" desc:"listen address of the command API; off: none; not loopback: needs VIRTBUS_API_TOKEN_FILE"`
	APITokenFile   string        `envconfig:"API_TOKEN_FILE" desc:"file holding the command API's bearer token"`
	CommandMaxAge  time.Duration `envconfig:"COMMAND_MAX_AGE" default:"24h" desc:"a command older than this (from its stream timestamp) ends in expired without running"`
	StreamReplicas int           `envconfig:"STREAM_REPLICAS" default:"1" desc:"replicas of the stream and buckets, used only when the worker creates them"`
	Lease          time.Duration `envconfig:"LEASE" default:"15s" desc:"one active worker per host: a standby takes over within this long after the active one stops or dies"`
	ReplyPrefixes  []string      `envconfig:"REPLY_PREFIXES" default:"_INBOX.,_INBOX_,virtbus.reply." desc:"comma-separated subject prefixes a Virtbus-Reply header must start with"`
	LogLevel       string        `envconfig:"LOG_LEVEL" default:"info" desc:"debug, info, warn or error"`
	LogFormat      string        `envconfig:"LOG_FORMAT" default:"text" desc:"text or json"`
}

// loadConfig reads the configuration through getenv. envconfig reads only
// the process environment and cannot be handed a lookup function, while run
// must take its environment as a parameter (so tests can run the worker
// in-process with their own); so the same struct tags envconfig prints are
// read here, and a bad value names its variable.
func loadConfig(getenv func(string) string) (config, error) {
	var c config
	v := reflect.ValueOf(&c).Elem()
	for i := range v.NumField() {
		f := v.Type().Field(i)
		key := strings.ToUpper(envPrefix) + "_" + f.Tag.Get("envconfig")
		raw := getenv(key)
		if raw == "" {
			raw = f.Tag.Get("default")
		}
		if err := setField(v.Field(i), raw); err != nil {
			return c, fmt.Errorf("%s=%q: %w", key, raw, err)
		}
	}
	if c.Host == "" {
		h, err := os.Hostname()
		if err != nil {
			return c, fmt.Errorf("VIRTBUS_HOST is empty and the hostname is unknown: %w", err)
		}
		c.Host = bus.HostToken(h)
	}
	return c, c.check()
}

func setField(f reflect.Value, raw string) error {
	switch f.Interface().(type) {
	case string:
		f.SetString(raw)
	case time.Duration:
		d, err := time.ParseDuration(raw)
		if err != nil {
			return err
		}
		f.SetInt(int64(d))
	case int:
		n, err := strconv.Atoi(raw)
		if err != nil {
			return fmt.Errorf("not a whole number")
		}
		f.SetInt(int64(n))
	case []string:
		var parts []string
		for _, p := range strings.Split(raw, ",") {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		f.Set(reflect.ValueOf(parts))
	default:
		return fmt.Errorf("unsupported field type %s", f.Type())
	}
	return nil
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
	for _, l := range []struct{ key, addr string }{{"VIRTBUS_METRICS_ADDR", c.MetricsAddr}, {"VIRTBUS_API_ADDR", c.APIAddr}} {
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
	if err := envconfig.Usagef(envPrefix, &config{}, tw, envconfig.DefaultTableFormat); err != nil {
		return err
	}
	return tw.Flush()
}
