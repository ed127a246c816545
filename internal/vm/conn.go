package vm

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// Conn keeps one live connection to libvirtd. go-libvirt has no contexts and
// no timeouts, and a client that lost its connection must not be reused
// (re-connecting it races with its own clean-up), so Conn builds a new client
// after every loss, reconnects with back-off, and makes callers wait for it
// instead of failing them.
type Conn struct {
	socket  string
	uri     libvirt.ConnectURI
	timeout time.Duration
	log     *slog.Logger

	// OnState, when set before Run, is told every change of the connection
	// (true: connected). The worker turns it into a metric.
	OnState func(up bool)

	mu    sync.Mutex
	cur   *libvirt.Libvirt // nil while disconnected
	ready chan struct{}    // closed while cur is usable; replaced on loss
}

// NewConn returns a Conn for the libvirt socket at socket, speaking to the
// driver at uri. timeout bounds every call made through it.
func NewConn(socket, uri string, timeout time.Duration, log *slog.Logger) *Conn {
	return &Conn{
		socket:  socket,
		uri:     libvirt.ConnectURI(uri),
		timeout: timeout,
		log:     log,
		ready:   make(chan struct{}),
	}
}

// Run connects and keeps reconnecting until ctx ends; then it disconnects.
func (c *Conn) Run(ctx context.Context) {
	backoff := newBackoff(200*time.Millisecond, 10*time.Second)
	for {
		l, err := c.dial()
		if err != nil {
			c.log.Warn("libvirt connect failed", "socket", c.socket, "uri", c.uri, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff.next()):
				continue
			}
		}
		backoff.reset()
		c.set(l)
		c.log.Info("libvirt connected", "socket", c.socket, "uri", c.uri)
		select {
		case <-ctx.Done():
			c.set(nil)
			_ = l.Disconnect()
			return
		case <-l.Disconnected():
			c.set(nil)
			c.log.Warn("libvirt connection lost; reconnecting")
		}
	}
}

func (c *Conn) dial() (*libvirt.Libvirt, error) {
	l := libvirt.NewWithDialer(dialers.NewLocal(
		dialers.WithSocket(c.socket),
		dialers.WithLocalTimeout(c.timeout),
	))
	done := make(chan error, 1)
	go func() { done <- l.ConnectToURI(c.uri) }()
	select {
	case err := <-done:
		if err != nil {
			return nil, fmt.Errorf("connect %s via %s: %w", c.uri, c.socket, err)
		}
		return l, nil
	case <-time.After(c.timeout):
		// The handshake hung on a daemon that accepted the socket but does
		// not answer; dropping the client frees the goroutine.
		go func() { <-done; _ = l.Disconnect() }()
		return nil, fmt.Errorf("connect %s via %s: no answer within %s", c.uri, c.socket, c.timeout)
	}
}

func (c *Conn) set(l *libvirt.Libvirt) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if l != nil {
		c.cur = l
		close(c.ready)
	} else if c.cur != nil {
		c.cur = nil
		c.ready = make(chan struct{})
	}
	if c.OnState != nil {
		c.OnState(l != nil)
	}
}

// Up reports whether a connection is established right now.
func (c *Conn) Up() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur != nil
}

// client waits for a connected client. While libvirtd is down callers wait
// here, for up to the call timeout: a longer outage ends in ErrUnavailable,
// which the worker retries with back-off rather than holding a command
// (and its VM's queue) for good.
func (c *Conn) client(ctx context.Context) (*libvirt.Libvirt, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.timeout, fmt.Errorf("libvirtd not reachable for %s", c.timeout))
	defer cancel()
	for {
		c.mu.Lock()
		l, ready := c.cur, c.ready
		c.mu.Unlock()
		if l != nil && l.IsConnected() {
			return l, nil
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: no libvirt connection: %v", ErrUnavailable, context.Cause(ctx))
		}
	}
}

// call runs fn against a connected client under the per-call deadline. A
// call that outlives the deadline means the daemon hangs: the client is
// dropped so that Run builds a fresh one, and fn's goroutine ends with it.
// A call that fails because the connection died is tried again on the next
// client: every call made through here is safe to repeat, and callers
// should not see a libvirtd restart at all.
func (c *Conn) call(ctx context.Context, what string, fn func(l *libvirt.Libvirt) error) error {
	for {
		l, err := c.client(ctx)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		done := make(chan error, 1)
		go func() { done <- fn(l) }()
		timer := time.NewTimer(c.timeout)
		select {
		case err = <-done:
			timer.Stop()
		case <-timer.C:
			c.log.Warn("libvirt call timed out; dropping the connection", "call", what, "timeout", c.timeout)
			_ = l.Disconnect()
			return fmt.Errorf("%s: %w: no answer within %s", what, ErrUnavailable, c.timeout)
		case <-ctx.Done():
			timer.Stop()
			return fmt.Errorf("%s: %w: %v", what, ErrUnavailable, context.Cause(ctx))
		}
		if err == nil {
			return nil
		}
		if !l.IsConnected() {
			c.log.Debug("libvirt call lost its connection; retrying on the next one", "call", what, "err", err)
			continue
		}
		return fmt.Errorf("%s: %w", what, classify(err))
	}
}

// backoff doubles a wait from min to max.
type backoff struct{ min, max, cur time.Duration }

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max, cur: min} }

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return d
}

func (b *backoff) reset() { b.cur = b.min }
