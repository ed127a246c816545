package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// healthcheckTimeout bounds the whole check. It is short because a
// container runtime's own timeout (Dockerfile HEALTHCHECK --timeout=5s)
// kills a check that outlives it, and a killed check says nothing of why.
const healthcheckTimeout = 3 * time.Second

// healthcheck is `worker -healthcheck`, for a container runtime, which can
// run a command in the container but cannot speak HTTP itself (the image has
// no curl). It asks the running worker's /readyz, on the address the worker's
// own configuration gives VIRTBUS_METRICS_ADDR (read through getenv, as the
// worker reads it), and returns nil only on 200. Every failure is a plain
// error, so the exit status is 1: Docker reserves 2, which a usage error
// would give.
func healthcheck(getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	url, err := readyzURL(cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	client := &http.Client{Timeout: healthcheckTimeout}
	resp, err := client.Get(url)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	// /readyz says why in a line; read no more than a line's worth.
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	why := string(bytes.TrimSpace(body))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: GET %s: %s: %s", url, resp.Status, why)
	}
	_, err = fmt.Fprintf(stdout, "healthcheck: GET %s: %s: %s\n", url, resp.Status, why)
	return err
}

// readyzURL is where the worker listening on addr answers /readyz. A
// listener on every interface (":9480", "0.0.0.0:9480", "[::]:9480") is
// asked on 127.0.0.1, which it covers and which needs no name lookup; a
// listener on one address is asked there, since loopback would miss it.
func readyzURL(addr string) (string, error) {
	if addr == "off" {
		return "", errors.New("VIRTBUS_METRICS_ADDR=off: the worker serves no /readyz to ask")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("VIRTBUS_METRICS_ADDR=%q: %w", addr, err)
	}
	if ip, err := netip.ParseAddr(host); host == "" || (err == nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/readyz", nil
}
