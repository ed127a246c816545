package bus

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnOptions says how to reach NATS: the URL and at most one way to
// authenticate, plus optional TLS files.
type ConnOptions struct {
	URL      string
	Name     string // client name shown by the server
	Creds    string // path to a .creds file
	NKey     string // path to an NKey seed file (nats CLI --nkey)
	User     string
	Password string
	Token    string
	TLSCA    string
	TLSCert  string
	TLSKey   string
	// InboxPrefix replaces "_INBOX" in the connection's reply subjects
	// (JetStream API answers, fetched messages, KV reads), so that NATS
	// permissions can keep each user's replies to itself.
	InboxPrefix string

	// WaitForServer keeps trying when the server is not there at start,
	// as a daemon should; a CLI leaves it off to fail at once.
	WaitForServer bool
}

// NATSSettings are the connection settings the worker and publish both
// read from VIRTBUS_NATS_* (envconfig; see internal/envload).
type NATSSettings struct {
	URL      string `desc:"NATS server URL(s), comma-separated; empty: the worker starts an embedded server with JetStream on 127.0.0.1:4222, publish dials that address"`
	Creds    string `desc:"NATS .creds file (JWT and NKey seed)"`
	User     string `desc:"NATS user"`
	Password string `desc:"NATS password"`
	Token    string `desc:"NATS token"`
	TLS      struct {
		CA   string `desc:"CA file to verify the NATS server"`
		Cert string `desc:"client certificate file"`
		Key  string `desc:"client key file"`
	}
}

// ConnOptions are the options to Connect with these settings.
func (s NATSSettings) ConnOptions(name string) ConnOptions {
	return ConnOptions{URL: s.URL, Name: name, Creds: s.Creds, User: s.User, Password: s.Password, Token: s.Token,
		TLSCA: s.TLS.CA, TLSCert: s.TLS.Cert, TLSKey: s.TLS.Key}
}

// WorkerInboxPrefix is the inbox prefix of host's worker connection:
// deploy/nats-server.conf lets only that worker subscribe below it.
func WorkerInboxPrefix(host string) string { return "_INBOX_virtbus-" + host }

// Connect dials NATS and keeps reconnecting forever: a worker must outlive
// any NATS outage, however long, and pick up where it left off.
func Connect(o ConnOptions, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.RetryOnFailedConnect(o.WaitForServer),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Error("nats async error", "subject", subject, "err", err)
		}),
	}
	switch {
	case o.Creds != "":
		opts = append(opts, nats.UserCredentials(o.Creds))
	case o.NKey != "":
		// Read at connect, so a missing or bad seed file fails at once
		// rather than at every reconnect.
		opt, err := nats.NkeyOptionFromSeed(o.NKey)
		if err != nil {
			return nil, fmt.Errorf("nkey seed %s: %w", o.NKey, err)
		}
		opts = append(opts, opt)
	case o.User != "":
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	case o.Token != "":
		opts = append(opts, nats.Token(o.Token))
	}
	if o.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(o.InboxPrefix))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	if o.TLSCert != "" || o.TLSKey != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats %s: %w", o.URL, err)
	}
	return nc, nil
}
