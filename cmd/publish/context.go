package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/virtbus/virtbus/internal/bus"
)

// natsContext is the part of a nats CLI context file
// (~/.config/nats/context/NAME.json, written by `nats context save`) that
// publish uses. The JSON names are natscli's (jsm.go natscontext); the
// fields it has and publish does not use (JetStream domain, socks proxy,
// colour scheme, ...) are ignored.
type natsContext struct {
	URL         string `json:"url"`
	User        string `json:"user"`
	Password    string `json:"password"`
	Creds       string `json:"creds"`
	NKey        string `json:"nkey"`
	Token       string `json:"token"`
	Cert        string `json:"cert"`
	Key         string `json:"key"`
	CA          string `json:"ca"`
	InboxPrefix string `json:"inbox_prefix"`
}

// contextPath is where the nats CLI keeps context name: under
// $XDG_CONFIG_HOME, else ~/.config, as natscli does. getenv rather than
// os.UserHomeDir, so tests can give a home of their own.
func contextPath(name string, getenv func(string) string) (string, error) {
	// The name becomes a file name: refuse one that would leave the
	// context directory.
	if name == "" || strings.ContainsAny(name, `/\`) || strings.HasPrefix(name, ".") {
		return "", usageErrorf("--context %s: want a context name, as `nats context ls` lists them", quoteArg(name))
	}
	dir := getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home := getenv("HOME")
		if home == "" {
			return "", fmt.Errorf("context %s: neither XDG_CONFIG_HOME nor HOME is set", name)
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "nats", "context", name+".json"), nil
}

// loadContext reads nats CLI context name as connection options.
func loadContext(name string, getenv func(string) string) (bus.ConnOptions, error) {
	path, err := contextPath(name, getenv)
	if err != nil {
		return bus.ConnOptions{}, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return bus.ConnOptions{}, fmt.Errorf("nats context %s: %w", name, err)
	}
	var nc natsContext
	if err := json.Unmarshal(b, &nc); err != nil {
		return bus.ConnOptions{}, fmt.Errorf("nats context %s (%s): %w", name, path, err)
	}
	// natscli expands a leading ~ in the file paths it saves; so must we,
	// or a context that works for `nats` would not for publish.
	home := func(p string) string {
		if rest, ok := strings.CutPrefix(p, "~/"); ok && getenv("HOME") != "" {
			return filepath.Join(getenv("HOME"), rest)
		}
		return p
	}
	return bus.ConnOptions{URL: nc.URL, User: nc.User, Password: nc.Password, Creds: home(nc.Creds), NKey: home(nc.NKey),
		Token: nc.Token, TLSCert: home(nc.Cert), TLSKey: home(nc.Key), TLSCA: home(nc.CA), InboxPrefix: nc.InboxPrefix}, nil
}

// natsEnv is the connection the nats CLI's own variables describe, so that
// a shell set up for `nats` works for publish too.
func natsEnv(getenv func(string) string) bus.ConnOptions {
	return bus.ConnOptions{URL: getenv("NATS_URL"), User: getenv("NATS_USER"), Password: getenv("NATS_PASSWORD"),
		Creds: getenv("NATS_CREDS"), NKey: getenv("NATS_NKEY"), TLSCert: getenv("NATS_CERT"), TLSKey: getenv("NATS_KEY"),
		TLSCA: getenv("NATS_CA")}
}

// mergeConn combines connection settings from sources in order of
// precedence (flags, VIRTBUS_*, NATS_*, context). Each plain setting comes
// from the first source that has it. The way to authenticate (creds, nkey,
// user, token) comes whole from the first source that names one, so that
// -user on the command line is not overruled by a creds file in a context
// (bus.Connect prefers creds); the password, which goes with any user,
// comes from the first source that has one.
func mergeConn(sources ...bus.ConnOptions) bus.ConnOptions {
	var m bus.ConnOptions
	authSet := false
	for _, s := range sources {
		for _, f := range []struct {
			dst *string
			src string
		}{
			{&m.URL, s.URL}, {&m.Password, s.Password}, {&m.TLSCA, s.TLSCA},
			{&m.TLSCert, s.TLSCert}, {&m.TLSKey, s.TLSKey}, {&m.InboxPrefix, s.InboxPrefix},
		} {
			if *f.dst == "" {
				*f.dst = f.src
			}
		}
		if !authSet && (s.Creds != "" || s.NKey != "" || s.User != "" || s.Token != "") {
			m.Creds, m.NKey, m.User, m.Token = s.Creds, s.NKey, s.User, s.Token
			authSet = true
		}
	}
	return m
}

// readPasswordFile is --password-file: the first line of the file, so a
// trailing newline from an editor or echo is not part of the password.
func readPasswordFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--password-file: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSuffix(line, "\r"), nil
}
